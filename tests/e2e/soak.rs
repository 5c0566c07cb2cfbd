//! The serial console under faults: many short greedy requests to `quill serve --pty`, in text
//! and binary mode, with the PTY set to 9600 and to 115200 baud, and line noise, bursts,
//! break-like floods, half frames, Ctrl-C storms and clients that vanish mid-generation and come
//! back, injected between them. Every well-formed request is answered with exactly the reference
//! answer (computed once per prompt at the start), the server never dies, and its resident memory
//! at the end is within 1 MB of what it was after the first requests.
//!
//! The suite runs a reduced soak (`QUILL_SOAK_REQUESTS`, default 800, split over the four runs of
//! mode × baud); the full one is the same code with more requests:
//!
//! ```sh
//! QUILL_SOAK_REQUESTS=10000 cargo test --release -p quill --test e2e soak -- --nocapture
//! ```
//!
//! The model is the two-block int8 export of the teacher that `cargo xtask cross-check` uses:
//! real weights, real tokenizer and chat template, several times faster than the teacher.
//! A PTY carries bytes as fast as both sides go whatever its baud setting: the settings are
//! applied and checked, but nothing here is paced like a real 9600-baud line.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use quill_protocol::{
    ErrorCode, FrameDecoder, Generate, MAX_FRAME, Request, Response, Sampling, decode, encode,
    truncated,
};

use crate::serve::Server;

/// Requests over the four runs when `QUILL_SOAK_REQUESTS` is not set.
const REDUCED: usize = 800;

const PROMPTS: &[&str] = &[
    "Hello",
    "The sky is",
    "One, two,",
    "Dear friend,",
    "In the beginning",
    "What is the capital of France?",
    "Name a colour.",
    "2 + 2 =",
    "Once upon a time",
    "The quick brown fox",
];

fn requests_per_run() -> usize {
    let total = std::env::var("QUILL_SOAK_REQUESTS")
        .ok()
        .map(|v| v.parse::<usize>().expect("QUILL_SOAK_REQUESTS is a number"))
        .unwrap_or(REDUCED);
    total.div_ceil(4).max(60)
}

/// xorshift64*: the noise is reproducible from the seed printed in the summary.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn speed(baud: u32) -> libc::speed_t {
    match baud {
        9600 => libc::B9600,
        115200 => libc::B115200,
        _ => panic!("the soak runs at 9600 and 115200 baud, not {baud}"),
    }
}

/// The far end of the server's PTY, as a terminal program or a microcontroller's UART would
/// hold it: raw, at `baud`, non-blocking so that the soak reads while it writes (the server
/// echoes and answers while a burst is still going in; a blocking writer would deadlock with it).
struct Peer {
    fd: OwnedFd,
    /// Received and not yet consumed.
    rx: Vec<u8>,
}

impl Peer {
    fn open(path: &Path, baud: u32) -> Peer {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path; the descriptor is owned below.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDWR | libc::O_NOCTTY | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        assert!(fd >= 0, "opening {}: {}", path.display(), last_error());
        // SAFETY: a fresh descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: plain termios calls on a valid descriptor.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            assert_eq!(libc::tcgetattr(fd.as_raw_fd(), &mut t), 0);
            libc::cfmakeraw(&mut t);
            assert_eq!(libc::cfsetispeed(&mut t, speed(baud)), 0);
            assert_eq!(libc::cfsetospeed(&mut t, speed(baud)), 0);
            assert_eq!(libc::tcsetattr(fd.as_raw_fd(), libc::TCSANOW, &t), 0);
            // The PTY keeps the speed (it does not pace by it).
            let mut back: libc::termios = std::mem::zeroed();
            assert_eq!(libc::tcgetattr(fd.as_raw_fd(), &mut back), 0);
            assert_eq!(libc::cfgetospeed(&back), speed(baud));
        }
        Peer { fd, rx: Vec::new() }
    }

    /// Reads what arrives within `wait`; false when nothing did.
    fn pump(&mut self, wait: Duration) -> bool {
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut p, 1, wait.as_millis() as i32) } <= 0 {
            return false;
        }
        let mut any = false;
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: writes within buf.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return any;
            }
            any = true;
            self.rx.extend_from_slice(&buf[..n as usize]);
        }
    }

    /// Writes all of `bytes`, reading whatever the server sends meanwhile.
    fn send(&mut self, bytes: &[u8]) {
        let mut rest = bytes;
        let t0 = Instant::now();
        while !rest.is_empty() {
            // SAFETY: reads within `rest`.
            let n = unsafe { libc::write(self.fd.as_raw_fd(), rest.as_ptr().cast(), rest.len()) };
            if n > 0 {
                rest = &rest[n as usize..];
                continue;
            }
            let e = last_error();
            assert_eq!(
                e.kind(),
                std::io::ErrorKind::WouldBlock,
                "writing to the PTY: {e}"
            );
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "the server took nothing for 60 s"
            );
            let mut p = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN | libc::POLLOUT,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut p, 1, 100) };
            if p.revents & libc::POLLIN != 0 {
                self.pump(Duration::ZERO);
            }
        }
    }

    /// Everything up to and including the first `pattern`, consumed; `None` after `limit`.
    fn take_until(&mut self, pattern: &[u8], limit: Duration) -> Option<Vec<u8>> {
        let t0 = Instant::now();
        loop {
            if let Some(at) = find(&self.rx, pattern) {
                return Some(self.rx.drain(..at + pattern.len()).collect());
            }
            if t0.elapsed() > limit {
                return None;
            }
            self.pump(Duration::from_millis(50));
        }
    }

    /// Closes the line, waits until the server has seen the hang-up (its log says so), waits
    /// `pause_ms` more, and opens the line again.
    ///
    /// Why wait for the server: the kernel reports a PTY's hang-up only while nobody has the
    /// terminal side open; a peer that comes back before the server next looks at the line (it
    /// looks between tokens, not during a prompt's prefill) is the same peer to it, and gets the
    /// rest of the reply. A person reconnecting takes longer than that; a test must not.
    fn vanish_and_return(&mut self, server: &Server, baud: u32, pause_ms: usize) {
        let gone = |log: &str| log.matches("waiting for the next peer").count();
        let before = gone(&server.log());
        let raw = self.fd.as_raw_fd();
        // SAFETY: closes our own descriptor; the `OwnedFd` that held it is forgotten below,
        // before anything else can reuse the number.
        unsafe { libc::close(raw) };
        let t0 = Instant::now();
        while gone(&server.log()) == before {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "the server did not notice the peer going away in 20 s; log:\n{}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(pause_ms as u64));
        let new = Peer::open(&server.path, baud);
        std::mem::forget(std::mem::replace(&mut self.fd, new.fd));
        self.rx.clear();
    }

    fn expect(&mut self, pattern: &[u8], what: &str) -> Vec<u8> {
        match self.take_until(pattern, Duration::from_secs(60)) {
            Some(got) => got,
            None => panic!(
                "waited 60 s for {what} ({:?}); received:\n{}",
                String::from_utf8_lossy(pattern),
                String::from_utf8_lossy(&self.rx)
            ),
        }
    }
}

fn last_error() -> std::io::Error {
    std::io::Error::last_os_error()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// What one run did.
#[derive(Default)]
struct Tally {
    requests: usize,
    answered: usize,
    noise: HashMap<&'static str, usize>,
    reconnects: usize,
    resyncs: usize,
    rss_early: u64,
    rss_end: u64,
}

impl Tally {
    fn noise(&mut self, kind: &'static str) {
        *self.noise.entry(kind).or_default() += 1;
    }

    fn summary(&self, mode: &str, baud: u32, seed: u64, early_at: usize, took: Duration) -> String {
        let mut kinds: Vec<_> = self.noise.iter().collect();
        kinds.sort();
        let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{k} {n}")).collect();
        format!(
            "soak {mode} mode, {baud} baud (seed {seed:#x}): requests {}, answered {}, noise events \
             {} ({}), reconnects {}, resyncs {}, anonymous RSS after {early_at} requests {} kB, at the end \
             {} kB ({:+} kB), {:.1} s",
            self.requests,
            self.answered,
            self.noise.values().sum::<usize>(),
            kinds.join(", "),
            self.reconnects,
            self.resyncs,
            self.rss_early,
            self.rss_end,
            self.rss_end as i64 - self.rss_early as i64,
            took.as_secs_f64()
        )
    }
}

/// Runs `requests` requests through `one` (which may inject a fault, then sends request `i` and
/// checks its answer), measures RSS after the first ones and at the end, and checks the server.
fn run(
    mode: &str,
    baud: u32,
    server: &Server,
    seed: u64,
    requests: usize,
    mut one: impl FnMut(usize, &mut Tally),
) -> Tally {
    let early_at = if requests >= 400 { 100 } else { 50 };
    let t0 = Instant::now();
    let mut tally = Tally::default();
    for i in 0..requests {
        one(i, &mut tally);
        if i + 1 == early_at {
            tally.rss_early = server.rss_kb();
        }
    }
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", server.child.id())).unwrap_or_default();
    assert!(
        status.contains("RssAnon:"),
        "the server is gone; log:\n{}",
        server.log()
    );
    tally.rss_end = server.rss_kb();
    let summary = tally.summary(mode, baud, seed, early_at, t0.elapsed());
    eprintln!("{summary}");
    let log = server.log();
    assert!(
        !log.contains("panicked") && !log.contains("error:"),
        "the server failed: {log}"
    );
    assert_eq!(tally.requests, requests);
    assert_eq!(tally.answered, tally.requests, "{summary}");
    assert!(
        tally.rss_end <= tally.rss_early + 1024,
        "the server grew by more than 1 MB: {summary}"
    );
    tally
}

// ---------------------------------------------------------------------------------------------
// Text mode

const RESET_DONE: &[u8] = b"[new conversation]\r\n> ";

/// A text-mode request and the `/reset` behind it: every request sees an empty conversation, so
/// greedy answers are the same every time. Returns the transcript up to the reset's prompt.
fn text_request(peer: &mut Peer, prompt: &str) -> Vec<u8> {
    peer.send(format!("{prompt}\r/reset\r").as_bytes());
    peer.expect(RESET_DONE, "the answer and the reset")
}

/// Brings the line editor back to a clean prompt whatever the noise left (an escape sequence,
/// an overlong line, a half-typed line, a reply to a noise line that happened to be text):
/// Ctrl-C stops any reply, `@` ends an escape sequence, Ctrl-U empties the line, Enter ends an
/// overlong one; then a setting with a fresh value to wait for, the reply length back to 3, and
/// `/reset`.
fn text_sync(peer: &mut Peer, n: &mut u64, tally: &mut Tally) {
    loop {
        *n += 1;
        peer.send(format!("\x03@\x15\r/set seed {n}\r/set max_tokens 3\r/reset\r").as_bytes());
        let marker = format!("[seed = {n}]\r\n> ");
        // A flood typed during a reply can make the server drop its queue, sync included.
        if peer
            .take_until(marker.as_bytes(), Duration::from_secs(20))
            .is_some()
        {
            peer.expect(RESET_DONE, "the reset after a sync");
            return;
        }
        tally.resyncs += 1;
    }
}

/// A line of text with control bytes or bytes that are not UTF-8 in it, and exactly what the
/// server answers: the printable bytes echoed, then one line of error and a fresh prompt.
fn garbage_line(rng: &mut Rng) -> (Vec<u8>, Vec<u8>) {
    // Control bytes the line editor does not treat as editing keys.
    const CONTROL: &[u8] = &[
        0x01, 0x02, 0x05, 0x06, 0x07, 0x0e, 0x0f, 0x10, 0x12, 0x14, 0x16, 0x18, 0x19, 0x1a, 0x1c,
        0x1d, 0x1e, 0x1f,
    ];
    let control = rng.below(2) == 0;
    let mut line = Vec::new();
    let len = rng.range(3, 60);
    for _ in 0..len {
        line.push(b"abcdefghij klmnopqrstuvwxyz"[rng.below(27)]);
    }
    for _ in 0..rng.range(1, 4) {
        let at = rng.range(1, line.len());
        let b = if control {
            CONTROL[rng.below(CONTROL.len())]
        } else {
            [0xff, 0xfe, 0xc0][rng.below(3)]
        };
        line.insert(at, b);
    }
    let why = if control {
        "that line had control characters in it (line noise?)"
    } else {
        "that line is not valid UTF-8"
    };
    let mut expected: Vec<u8> = line.iter().copied().filter(|&b| b >= 0x20).collect();
    expected.extend_from_slice(
        format!("\r\n[error: {why}; it was discarded, nothing was sent]\r\n> ").as_bytes(),
    );
    line.push(b'\r');
    (line, expected)
}

fn soak_text(baud: u32, requests: usize, seed: u64) -> Tally {
    let model = crate::support::small_bundle_dir();
    let b = baud.to_string();
    let server = Server::start_with(model, &["--baud", &b, "--max-tokens", "3"]);
    let mut peer = Peer::open(&server.path, baud);
    peer.expect(b"/help for commands\r\n> ", "the banner");
    let reference: Vec<Vec<u8>> = PROMPTS.iter().map(|p| text_request(&mut peer, p)).collect();
    for (p, r) in PROMPTS.iter().zip(&reference) {
        assert!(
            find(r, b"\r\n").is_some_and(|at| at > 0),
            "no answer to {p:?}: {}",
            String::from_utf8_lossy(r)
        );
    }
    let mut rng = Rng(seed);
    let mut sync_n = 0u64;
    run("text", baud, &server, seed, requests, |i, tally| {
        // Noise before three requests in five.
        if rng.below(5) < 3 {
            match rng.below(9) {
                0 => {
                    tally.noise("random bytes");
                    let n = rng.range(1, 200);
                    peer.send(&rng.bytes(n));
                    text_sync(&mut peer, &mut sync_n, tally);
                }
                1 => {
                    // Checked exactly: an error line and a fresh prompt, nothing sent.
                    tally.noise("noise line");
                    let (line, expected) = garbage_line(&mut rng);
                    peer.send(&line);
                    let got = peer.expect(b"]\r\n> ", "the error line");
                    assert_eq!(
                        String::from_utf8_lossy(&got),
                        String::from_utf8_lossy(&expected),
                        "after the noise line {line:?}"
                    );
                }
                2 => {
                    tally.noise("dropped or duplicated byte");
                    let mut line = format!("{}\r", PROMPTS[rng.below(PROMPTS.len())]).into_bytes();
                    let at = rng.below(line.len());
                    if rng.below(2) == 0 {
                        line.remove(at);
                    } else {
                        line.insert(at, line[at]);
                    }
                    peer.send(&line);
                    text_sync(&mut peer, &mut sync_n, tally);
                }
                3 => {
                    tally.noise("burst");
                    let n = rng.range(1000, 8000);
                    peer.send(&rng.bytes(n));
                    text_sync(&mut peer, &mut sync_n, tally);
                }
                4 => {
                    tally.noise("break flood");
                    let b = if rng.below(2) == 0 { 0x00 } else { 0xff };
                    let n = rng.range(100, 3000);
                    peer.send(&vec![b; n]);
                    text_sync(&mut peer, &mut sync_n, tally);
                }
                5 => {
                    tally.noise("half line");
                    let p = PROMPTS[rng.below(PROMPTS.len())];
                    peer.send(&p.as_bytes()[..p.len() / 2]);
                    text_sync(&mut peer, &mut sync_n, tally);
                }
                6 => {
                    // Idle: every Ctrl-C abandons an empty line and gives a fresh prompt.
                    tally.noise("Ctrl-C storm");
                    let n = rng.range(5, 60);
                    peer.send(&vec![0x03; n]);
                    for _ in 0..n {
                        peer.expect(b"^C\r\n> ", "a prompt for each Ctrl-C");
                    }
                }
                7 => {
                    // During a reply: the first stops it, the others give prompts.
                    tally.noise("Ctrl-C storm in a reply");
                    peer.send(b"/set max_tokens 500\r");
                    peer.expect(b"[max_tokens = 500]\r\n> ", "the setting");
                    peer.send(b"Tell me a long story.\r");
                    peer.expect(b"\r\n", "the echo");
                    peer.pump(Duration::from_millis(rng.range(0, 100) as u64));
                    peer.send(&vec![0x03; rng.range(2, 40)]);
                    text_sync(&mut peer, &mut sync_n, tally);
                }
                _ => {
                    // The terminal goes away mid-reply and comes back.
                    tally.noise("vanished mid-reply");
                    tally.reconnects += 1;
                    peer.send(b"/set max_tokens 2000\r");
                    peer.expect(b"[max_tokens = 2000]\r\n> ", "the setting");
                    peer.send(b"Tell me about the history of Rome.\r");
                    peer.expect(b"\r\n", "the echo");
                    // Gone once the reply is streaming.
                    while !peer.pump(Duration::from_millis(50)) {}
                    peer.pump(Duration::from_millis(rng.range(0, 30) as u64));
                    peer.vanish_and_return(&server, baud, rng.range(0, 100));
                    peer.expect(b"/help for commands\r\n> ", "the banner for the new peer");
                    text_sync(&mut peer, &mut sync_n, tally);
                }
            }
        }
        let k = (i * 7 + 3) % PROMPTS.len();
        tally.requests += 1;
        let got = text_request(&mut peer, PROMPTS[k]);
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&reference[k]),
            "request {i} ({:?}) after the noise",
            PROMPTS[k]
        );
        tally.answered += 1;
    })
}

// ---------------------------------------------------------------------------------------------
// Binary mode

/// A binary-mode client: frames out, responses decoded from what [`Peer`] receives.
struct Mcu {
    peer: Peer,
    decoder: FrameDecoder<MAX_FRAME>,
}

/// What a generation sent back.
#[derive(Debug, Clone, PartialEq)]
struct Answer {
    text: String,
    generated: u32,
    finish: quill_protocol::Finish,
}

impl Mcu {
    fn send(&mut self, r: &Request) {
        let mut buf = [0u8; MAX_FRAME];
        let frame = encode(r, &mut buf).unwrap().to_vec();
        self.peer.send(&frame);
    }

    /// The next response; frames the server sends are always intact.
    fn recv(&mut self) -> Response {
        let t0 = Instant::now();
        loop {
            while !self.peer.rx.is_empty() {
                let b = self.peer.rx.remove(0);
                if let Some(r) = self.decoder.push(b) {
                    let payload = r.expect("a damaged frame from the server");
                    return decode(payload, Response::VARIANTS).expect("a response");
                }
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "no response for 60 s"
            );
            self.peer.pump(Duration::from_millis(50));
        }
    }

    /// Responses up to the pong with `nonce`; everything before it must be an error frame.
    fn sync(&mut self, nonce: u32) -> Vec<ErrorCode> {
        // A zero ends whatever frame the noise left open (what a client does after a fault).
        self.peer.send(&[0]);
        self.send(&Request::Ping { nonce });
        let mut errors = Vec::new();
        loop {
            match self.recv() {
                Response::Pong { nonce: n } if n == nonce => return errors,
                Response::Error(e) => errors.push(e.code),
                // The end of a generation the noise interrupted.
                Response::Token { .. } | Response::Done(_) => {}
                other => panic!("{other:?} in answer to noise"),
            }
        }
    }

    /// The tokens and the `Done` of generation `id`; other frames are returned apart.
    fn answer(&mut self, id: u16) -> (Answer, Vec<Response>) {
        let mut text = String::new();
        let mut other = Vec::new();
        loop {
            match self.recv() {
                Response::Token { id: i, text: t } if i == id => text.push_str(&t),
                Response::Done(d) if d.id == id => {
                    return (
                        Answer {
                            text,
                            generated: d.generated_tokens,
                            finish: d.finish,
                        },
                        other,
                    );
                }
                r => other.push(r),
            }
        }
    }
}

fn generate(id: u16, prompt: &str, max_tokens: u16) -> Request {
    Request::Generate(Generate {
        id,
        prompt: truncated(prompt),
        chat: false,
        sampling: Sampling {
            max_tokens: Some(max_tokens),
            temperature: Some(0.0),
            ..Sampling::default()
        },
    })
}

fn frame_of(r: &Request) -> Vec<u8> {
    let mut buf = [0u8; MAX_FRAME];
    encode(r, &mut buf).unwrap().to_vec()
}

fn soak_binary(baud: u32, requests: usize, seed: u64) -> Tally {
    let model = crate::support::small_bundle_dir();
    let b = baud.to_string();
    let server = Server::start_with(model, &["--mode", "binary", "--baud", &b]);
    let mut mcu = Mcu {
        peer: Peer::open(&server.path, baud),
        decoder: FrameDecoder::new(),
    };
    // Every prompt with its own reply length, 2 to 4 tokens.
    let max_tokens = |k: usize| 2 + (k % 3) as u16;
    let mut id = 0u16;
    let reference: Vec<Answer> = PROMPTS
        .iter()
        .enumerate()
        .map(|(k, p)| {
            id += 1;
            mcu.send(&generate(id, p, max_tokens(k)));
            let (a, other) = mcu.answer(id);
            assert!(
                other.is_empty() && a.generated >= 1,
                "{p:?}: {a:?} {other:?}"
            );
            a
        })
        .collect();
    let mut rng = Rng(seed);
    let mut nonce = 0u32;
    run("binary", baud, &server, seed, requests, |i, tally| {
        let k = (i * 7 + 3) % PROMPTS.len();
        id = id.wrapping_add(1);
        let request = generate(id, PROMPTS[k], max_tokens(k));
        nonce += 1;
        // Noise before three requests in five; one kind goes in during the request.
        let mut during = false;
        if rng.below(5) < 3 {
            match rng.below(8) {
                0 => {
                    tally.noise("random bytes");
                    let n = rng.range(1, 600);
                    mcu.peer.send(&rng.bytes(n));
                    mcu.sync(nonce);
                }
                1 => {
                    tally.noise("dropped or duplicated byte");
                    let mut f = frame_of(&generate(id.wrapping_add(5000), PROMPTS[k], 4));
                    let at = rng.below(f.len() - 1);
                    if rng.below(2) == 0 {
                        f.remove(at);
                    } else {
                        f.insert(at, f[at]);
                    }
                    mcu.peer.send(&f);
                    let errors = mcu.sync(nonce);
                    assert!(!errors.is_empty(), "a damaged request got no error frame");
                }
                2 => {
                    tally.noise("burst");
                    let n = rng.range(1000, 8000);
                    mcu.peer.send(&rng.bytes(n));
                    mcu.sync(nonce);
                }
                3 => {
                    tally.noise("break flood");
                    let n = rng.range(600, 3000);
                    if rng.below(2) == 0 {
                        // Empty frames: ignored, no answer.
                        mcu.peer.send(&vec![0x00; n]);
                        assert_eq!(mcu.sync(nonce), []);
                    } else {
                        mcu.peer.send(&vec![0xff; n]);
                        assert_eq!(mcu.sync(nonce), [ErrorCode::Oversized]);
                    }
                }
                4 => {
                    tally.noise("half frame");
                    let f = frame_of(&request);
                    let cut = rng.range(1, f.len() - 2);
                    mcu.peer.send(&f[..cut]);
                    let errors = mcu.sync(nonce);
                    assert_eq!(errors.len(), 1, "{errors:?}");
                }
                5 => {
                    tally.noise("noise during a generation");
                    during = true;
                }
                6 => {
                    tally.noise("vanished mid-generation");
                    tally.reconnects += 1;
                    mcu.send(&generate(id.wrapping_add(10000), "The history of", 2000));
                    while !matches!(mcu.recv(), Response::Token { .. }) {}
                    if rng.below(2) == 0 {
                        // Gone halfway through a frame of its own, too.
                        let f = frame_of(&request);
                        mcu.peer.send(&f[..f.len() / 2]);
                    }
                    mcu.peer.vanish_and_return(&server, baud, rng.range(0, 100));
                    mcu.decoder.clear();
                    // What the server had not read of the half frame is still on the line.
                    let errors = mcu.sync(nonce);
                    assert!(errors.len() <= 1, "{errors:?}");
                }
                _ => {
                    tally.noise("random frames");
                    let mut f = Vec::new();
                    for _ in 0..rng.range(1, 20) {
                        let n = rng.range(1, 40);
                        f.extend(rng.bytes(n).into_iter().map(|b| b.max(1)));
                        f.push(0);
                    }
                    mcu.peer.send(&f);
                    mcu.sync(nonce);
                }
            }
        }
        tally.requests += 1;
        mcu.send(&request);
        if during {
            let n = rng.range(10, 400);
            let mut noise = rng.bytes(n);
            noise.push(0);
            mcu.peer.send(&noise);
        }
        let (got, other) = mcu.answer(id);
        assert_eq!(
            got, reference[k],
            "request {i} ({:?}) after the noise; also received {other:?}",
            PROMPTS[k]
        );
        assert!(
            other.iter().all(|r| matches!(r, Response::Error(_))),
            "{other:?}"
        );
        tally.answered += 1;
        if during {
            // Answers to the noise that came after the Done.
            mcu.sync(nonce);
        }
    })
}

// ---------------------------------------------------------------------------------------------

#[test]
fn soak_text_mode_under_line_noise_at_9600_and_115200_baud() {
    let n = requests_per_run();
    soak_text(9600, n, 0x9600_7e57);
    soak_text(115200, n, 0x1152_007e);
}

#[test]
fn soak_binary_mode_under_line_noise_at_9600_and_115200_baud() {
    let n = requests_per_run();
    soak_binary(9600, n, 0x9600_b1a7);
    soak_binary(115200, n, 0x1152_00b1);
}
