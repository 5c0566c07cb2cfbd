//! `quill serve`: the model over a serial line, for a person at a terminal (text mode) or a
//! microcontroller speaking [`quill_protocol`] (binary mode).
//!
//! The console is written once against `embedded-io` ([`Port`]: `Read + Write + ReadReady`) and
//! `embedded-hal`'s `OutputPin` (the status LED), so the same code serves a UART, a PTY, stdio
//! ([`port::FdPort`]) and the in-memory loopback of the unit tests.
//!
//! ```text
//! serve(port) ── loop ── wait for a peer ── Console::session ──┬─ text::session   (line editor, commands, chat)
//!                  ^                                          └─ binary::session (frames → requests → responses)
//!                  └──── the peer went away: cancel, keep the conversation, wait again
//! ```
//!
//! **Invariant:** one generation at a time, on this thread; input is polled between tokens, so
//! Ctrl-C, Cancel and a stop signal (SIGTERM, SIGINT: [`stop`]) stop a generation within one
//! token. Writes block while the line is slower than the model (output is never dropped),
//! bounded by the write timeout.

pub mod backend;
pub mod binary;
pub mod led;
pub mod line;
pub mod port;
pub mod stop;
pub mod text;

#[cfg(test)]
mod tests;

use std::time::Duration;

use embedded_hal::digital::OutputPin;
use embedded_io::{ErrorKind, Read, ReadReady, Write};

use crate::generate::GenerateOptions;
pub use backend::{Backend, Finish, Flow, ModelBackend, Outcome, Turn};
use port::{FdPort, Line};

/// What the console needs of a line.
pub trait Port: Read + Write + ReadReady {}
impl<T: Read + Write + ReadReady> Port for T {}

/// Which side of the console a session starts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Text,
    Binary,
}

/// How a session ended.
#[derive(Debug)]
pub enum End {
    /// The input ended (stdin closed): the server stops.
    Eof,
    /// The peer went away or the line failed; the server waits for the next peer.
    PeerGone(String),
    /// A stop signal arrived (see [`stop`]) while the line was in this mode: the server stops.
    Stopped(Mode),
}

/// Bytes received and not yet handled, in a fixed queue: what was typed (or sent) while a
/// generation ran, and the rest of a read after an Enter or a frame.
pub(crate) struct Input {
    queue: heapless::Deque<u8, 1024>,
    /// Bytes dropped because the queue was full.
    pub lost: usize,
}

impl Input {
    pub(crate) fn new() -> Self {
        Input {
            queue: heapless::Deque::new(),
            lost: 0,
        }
    }

    fn push_all(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.queue.push_back(b).is_err() {
                self.lost += 1;
            }
        }
    }

    /// The next byte, waiting for the line if none is queued; `None` at the end of input.
    pub(crate) fn next<P: Port>(&mut self, port: &mut P) -> Result<Option<u8>, P::Error> {
        if let Some(b) = self.queue.pop_front() {
            return Ok(Some(b));
        }
        let mut buf = [0u8; 256];
        let n = port.read(&mut buf)?;
        self.push_all(&buf[..n]);
        Ok(self.queue.pop_front())
    }

    /// Queues whatever the line has ready and the queue has room for, without waiting.
    pub(crate) fn poll<P: Port>(&mut self, port: &mut P) -> Result<(), P::Error> {
        let mut buf = [0u8; 256];
        loop {
            let room = self.queue.capacity() - self.queue.len();
            if room == 0 || !port.read_ready()? {
                return Ok(());
            }
            let n = port.read(&mut buf[..room.min(256)])?;
            if n == 0 {
                return Ok(());
            }
            self.push_all(&buf[..n]);
        }
    }

    /// Drops everything queued, counting it as lost.
    pub(crate) fn drop_all(&mut self) {
        self.lost += self.queue.len();
        self.queue.clear();
    }

    pub(crate) fn is_full(&self) -> bool {
        self.queue.is_full()
    }

    pub(crate) fn pop(&mut self) -> Option<u8> {
        self.queue.pop_front()
    }

    pub(crate) fn queue_mut(&mut self) -> &mut heapless::Deque<u8, 1024> {
        &mut self.queue
    }
}

/// Totals since the server started, for `/stats`.
#[derive(Debug, Default, Clone)]
pub struct Totals {
    pub replies: u64,
    pub cancelled: u64,
    pub tokens: u64,
    pub frame_errors: u64,
}

/// The console: a model, its settings and its conversation, served to one peer at a time.
pub struct Console<B: Backend, L: OutputPin> {
    pub backend: B,
    led: L,
    /// Sampling and length defaults; `/set` and binary requests change them.
    pub options: GenerateOptions,
    /// `None`: a fresh seed from the clock for every generation.
    pub seed: Option<u64>,
    pub mode: Mode,
    pub last: Option<Outcome>,
    pub totals: Totals,
    /// Log connection events to stderr.
    pub verbose: bool,
}

impl<B: Backend, L: OutputPin> Console<B, L> {
    pub fn new(
        backend: B,
        led: L,
        options: GenerateOptions,
        seed: Option<u64>,
        mode: Mode,
    ) -> Self {
        Console {
            backend,
            led,
            options,
            seed,
            mode,
            last: None,
            totals: Totals::default(),
            verbose: false,
        }
    }

    fn log(&self, msg: std::fmt::Arguments<'_>) {
        if self.verbose {
            eprintln!("quill serve: {msg}");
        }
    }

    /// Options for the next generation (the seed drawn now when it is not fixed).
    pub(crate) fn next_options(&self) -> GenerateOptions {
        let mut o = self.options.clone();
        o.sampling.seed = self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        });
        o
    }

    /// Runs `generate` with the LED on.
    pub(crate) fn generate(
        &mut self,
        turn: Turn<'_>,
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(&str) -> Flow,
    ) -> Result<Outcome, crate::GenerateError> {
        let _ = self.led.set_high();
        // A stop signal cancels like Ctrl-C or Cancel: the peer still gets the end of the reply
        // (`[stopped]`, a `Done`), then the session's next read reports the stop.
        let r = self.backend.generate(turn, opts, &mut |text| {
            let flow = on_text(text);
            if stop::requested() {
                Flow::Cancel
            } else {
                flow
            }
        });
        let _ = self.led.set_low();
        if let Ok(o) = &r {
            self.totals.replies += 1;
            self.totals.tokens += o.stats.generated_tokens as u64;
            if o.finish == Finish::Cancelled {
                self.totals.cancelled += 1;
            }
            self.last = Some(o.clone());
        }
        r
    }

    /// Serves one peer until it goes away or the input ends.
    pub fn session<P: Port>(&mut self, port: &mut P) -> End
    where
        P::Error: std::fmt::Display,
    {
        let mut mode = self.mode;
        let mut input = Input::new();
        loop {
            let r = match mode {
                Mode::Text => text::session(self, port, &mut input),
                Mode::Binary => binary::session(self, port, &mut input),
            };
            match r {
                Ok(Some(next)) => mode = next,
                Ok(None) => return End::Eof,
                Err(_) if stop::requested() => return End::Stopped(mode),
                Err(e) => {
                    let kind = embedded_io::Error::kind(&e);
                    let why = match kind {
                        ErrorKind::NotConnected | ErrorKind::TimedOut => e.to_string(),
                        _ => format!("the line failed: {e}"),
                    };
                    return End::PeerGone(why);
                }
            }
        }
    }
}

/// Serves on `port` until its input ends (stdio), or a stop signal arrives (after
/// [`stop::install`]), waiting for the next peer whenever one goes away.
pub fn serve<B: Backend, L: OutputPin>(
    console: &mut Console<B, L>,
    mut port: FdPort,
    write_timeout: Option<Duration>,
) -> anyhow::Result<()> {
    port.set_write_timeout(write_timeout);
    loop {
        if matches!(port.line, Line::Pty { .. }) {
            if !port.wait_for_peer() {
                let mode = console.mode;
                return stopped(console, &mut port, mode);
            }
            console.log(format_args!("a peer opened the terminal"));
        }
        match console.session(&mut port) {
            End::Eof => return Ok(()),
            End::Stopped(mode) => return stopped(console, &mut port, mode),
            End::PeerGone(why) => {
                console.log(format_args!("{why}; waiting for the next peer"));
                match port.line.clone() {
                    Line::Stdio => return Ok(()),
                    // What the last peer left unread is not for the next one.
                    Line::Pty { .. } => port.discard_pending(),
                    Line::Serial { path, baud, rtscts } => {
                        // The adapter may have been unplugged: reopen it when it is back.
                        drop(port);
                        port = loop {
                            match FdPort::open_serial(&path, baud, rtscts) {
                                Ok(p) => break p,
                                Err(_) if stop::requested() => {
                                    console
                                        .log(format_args!("stopping on {}", stop::signal_name()));
                                    return Ok(());
                                }
                                Err(_) => std::thread::sleep(Duration::from_millis(100)),
                            }
                        };
                        port.set_write_timeout(write_timeout);
                    }
                }
            }
        }
    }
}

/// The end after a stop signal: a last line to a person (written only if the line takes it at
/// once), at most 300 ms for the line to send what is queued, a line in the log; the port is
/// closed by the caller's return.
fn stopped<B: Backend, L: OutputPin>(
    console: &mut Console<B, L>,
    port: &mut FdPort,
    mode: Mode,
) -> anyhow::Result<()> {
    // Binary mode has no message for it: the client got its `Done`, then sees the line close.
    if mode == Mode::Text {
        port.write_now(b"\r\n[quill is shutting down]\r\n");
    }
    port.drop_unsent(Duration::from_millis(300));
    let _ = console.led.set_low();
    console.log(format_args!(
        "stopping on {}: {} replies served ({} cancelled); the line is released",
        stop::signal_name(),
        console.totals.replies,
        console.totals.cancelled
    ));
    Ok(())
}

/// Splits `text` into pieces of at most `max` bytes at character boundaries.
pub(crate) fn chunks(text: &str, max: usize) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut end = rest.len().min(max);
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        let (head, tail) = rest.split_at(end);
        rest = tail;
        Some(head)
    })
}
