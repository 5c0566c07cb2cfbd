//! Text mode: a person at a serial terminal chats with the model.
//!
//! quill echoes what is typed (see [`super::line`]), sends `\r\n` line endings, streams each
//! reply as it is produced, and stops it at Ctrl-C. Lines starting with `/` are commands. Nothing
//! a line does wrong (bad bytes, too long, a message the context cannot take) touches the
//! conversation: the user gets one line saying what happened and a fresh prompt.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use embedded_hal::digital::OutputPin;

use super::backend::{Backend, Finish, Flow, Turn};
use super::line::{Edit, LineEditor, LineError};
use super::{Console, Input, Mode, Port};
use crate::error::GenerateError;
use crate::generate::StopReason;

/// Most bytes in one typed line.
pub const LINE_CAP: usize = 512;

const PROMPT: &[u8] = b"> ";

const HELP: &str = "\
commands:
  /help                 this list
  /reset                start a new conversation
  /set                  show the settings
  /set NAME VALUE       change one: temperature, top_k, top_p, min_p, repeat_penalty,
                        repeat_window, max_tokens, seed (a number, or `random`)
  /info                 the model
  /stats                the last reply's speed, and totals
  /binary               switch this line to the binary protocol (until it is closed)
keys: Enter sends, Backspace, Ctrl-W (word), Ctrl-U (line), Ctrl-C stops a reply";

/// Writes text for a terminal: `\n` becomes `\r\n`; control characters other than tab are
/// dropped, so that model output cannot drive the terminal (no escape sequences).
#[expect(
    clippy::indexing_slicing,
    reason = "the buffer is flushed while n + 2 would exceed it, before every write"
)]
pub(crate) fn put<P: Port>(port: &mut P, text: &str) -> Result<(), P::Error> {
    let mut buf = [0u8; 256];
    let mut n = 0;
    for &b in text.as_bytes() {
        if n + 2 > buf.len() {
            port.write_all(&buf[..n])?;
            n = 0;
        }
        match b {
            b'\n' => {
                buf[n] = b'\r';
                buf[n + 1] = b'\n';
                n += 2;
            }
            b'\t' => {
                buf[n] = b;
                n += 1;
            }
            0..0x20 | 0x7f => {}
            _ => {
                buf[n] = b;
                n += 1;
            }
        }
    }
    port.write_all(&buf[..n])?;
    port.flush()
}

/// A one-line notice on a line of its own, then a fresh prompt.
fn notice<P: Port>(port: &mut P, msg: &str) -> Result<(), P::Error> {
    put(port, "[")?;
    put(port, msg)?;
    put(port, "]\n")?;
    port.write_all(PROMPT)?;
    port.flush()
}

/// Serves a person until the line goes away (`Err`), the input ends (`Ok(None)`) or they switch
/// to binary mode (`Ok(Some(Mode::Binary))`).
pub(crate) fn session<B: Backend, L: OutputPin, P: Port>(
    c: &mut Console<B, L>,
    port: &mut P,
    input: &mut Input,
) -> Result<Option<Mode>, P::Error> {
    let d = c.backend.describe();
    put(
        port,
        &format!(
            "quill {} · {} ({}) · context {} tokens · /help for commands\n",
            env!("CARGO_PKG_VERSION"),
            d.name,
            d.weights,
            d.context
        ),
    )?;
    port.write_all(PROMPT)?;
    port.flush()?;
    let mut editor = LineEditor::<LINE_CAP>::new();
    loop {
        let Some(b) = input.next(port)? else {
            return Ok(None);
        };
        match editor.push(b) {
            Edit::None => {}
            Edit::Echo(b) => {
                port.write_all(&[b])?;
                port.flush()?;
            }
            Edit::Erase(n) => {
                for _ in 0..n {
                    port.write_all(b"\x08 \x08")?;
                }
                port.flush()?;
            }
            Edit::Cleared => {
                port.write_all(b"\r\x1b[K")?;
                port.write_all(PROMPT)?;
                port.flush()?;
            }
            Edit::Interrupt => {
                port.write_all(b"^C\r\n")?;
                port.write_all(PROMPT)?;
                port.flush()?;
            }
            Edit::Overflow => {
                put(port, "\n")?;
                notice(
                    port,
                    &format!(
                        "error: that line is longer than {LINE_CAP} bytes; it was discarded, \
                         nothing was sent"
                    ),
                )?;
            }
            Edit::Enter => {
                let line = match editor.take() {
                    // Already reported when it overflowed.
                    Err(LineError::TooLong) => {
                        editor.done();
                        continue;
                    }
                    Err(e) => {
                        editor.done();
                        put(port, "\n")?;
                        let why = match e {
                            LineError::NotUtf8 => "that line is not valid UTF-8",
                            _ => "that line had control characters in it (line noise?)",
                        };
                        notice(
                            port,
                            &format!("error: {why}; it was discarded, nothing was sent"),
                        )?;
                        continue;
                    }
                    Ok(l) => l.trim().to_owned(),
                };
                editor.done();
                put(port, "\n")?;
                if line.is_empty() {
                    port.write_all(PROMPT)?;
                    port.flush()?;
                } else if let Some(cmd) = line.strip_prefix('/') {
                    if cmd.trim() == "binary" {
                        put(
                            port,
                            "[binary protocol from now on; close the line to return]\n",
                        )?;
                        return Ok(Some(Mode::Binary));
                    }
                    let reply = command(c, cmd);
                    put(port, &reply)?;
                    put(port, "\n")?;
                    port.write_all(PROMPT)?;
                    port.flush()?;
                } else {
                    reply(c, port, input, &line)?;
                }
            }
        }
    }
}

/// Generates the reply to `message`, streaming it; Ctrl-C stops it.
fn reply<B: Backend, L: OutputPin, P: Port>(
    c: &mut Console<B, L>,
    port: &mut P,
    input: &mut Input,
    message: &str,
) -> Result<(), P::Error> {
    let opts = c.next_options();
    let mut failure = None;
    let mut wrote_newline = true;
    let lost_before = input.lost;
    let result = c.generate(Turn::Chat(message), &opts, &mut |text| {
        if !text.is_empty() {
            if let Err(e) = put(port, text) {
                failure = Some(e);
                return Flow::Cancel;
            }
            wrote_newline = text.ends_with('\n');
        }
        if let Err(e) = input.poll(port) {
            failure = Some(e);
            return Flow::Cancel;
        }
        // Ctrl-C: drop what was typed before it, keep what came after.
        let q = input.queue_mut();
        if let Some(at) = q.iter().position(|&b| b == 0x03) {
            for _ in 0..=at {
                q.pop_front();
            }
            return Flow::Cancel;
        }
        // A flood of type-ahead (or noise) must not hide a later Ctrl-C.
        if input.is_full() {
            input.drop_all();
        }
        Flow::Continue
    });
    if let Some(e) = failure {
        return Err(e);
    }
    if !wrote_newline {
        put(port, "\n")?;
    }
    let note = match result {
        Ok(o) => match o.finish {
            Finish::Cancelled => Some("stopped".to_owned()),
            Finish::Stopped(StopReason::MaxTokens) => Some(format!(
                "stopped at the {}-token limit; /set max_tokens N for longer replies",
                opts.max_tokens
            )),
            Finish::Stopped(StopReason::ContextFull) => Some(format!(
                "the conversation filled the model's {}-token context; /reset to start a new one",
                c.backend.describe().context
            )),
            Finish::Stopped(_) => None,
        },
        Err(e @ (GenerateError::ContextFull { .. } | GenerateError::PromptTooLong { .. })) => Some(
            format!("error: {e}; type /reset to start a new conversation"),
        ),
        Err(e @ GenerateError::BadOption(_)) => Some(format!("error: {e}; see /set")),
        Err(e) => Some(format!("error: {e}")),
    };
    if input.lost > lost_before {
        put(port, "[some of what was typed during the reply was lost]\n")?;
    }
    match note {
        Some(n) => notice(port, &n),
        None => {
            port.write_all(PROMPT)?;
            port.flush()
        }
    }
}

/// Runs a `/` command; returns what to print.
pub(crate) fn command<B: Backend, L: OutputPin>(c: &mut Console<B, L>, cmd: &str) -> String {
    let mut words = cmd.split_whitespace();
    match (words.next(), words.next(), words.next(), words.next()) {
        (Some("help"), None, ..) => HELP.to_owned(),
        (Some("reset"), None, ..) => match c.backend.reset() {
            Ok(()) => "[new conversation]".to_owned(),
            Err(e) => format!("[error: {e}]"),
        },
        (Some("set"), None, ..) => settings(c),
        (Some("set"), Some(name), Some(value), None) => match set(c, name, value) {
            Ok(()) => format!("[{name} = {value}]"),
            Err(e) => format!("[error: {e}]"),
        },
        (Some("info"), None, ..) => {
            let d = c.backend.describe();
            format!(
                "model {} ({} weights), vocabulary {}, context {} tokens ({} in use), {}; \
                 serial protocol version {}",
                d.name,
                d.weights,
                d.vocab,
                d.context,
                c.backend.context_used(),
                if d.chat {
                    "chat template ChatML"
                } else {
                    "no chat template (messages continue the text)"
                },
                quill_protocol::PROTOCOL_VERSION
            )
        }
        (Some("stats"), None, ..) => stats(c),
        _ => format!("[unknown command /{cmd}; /help lists the commands]"),
    }
}

fn settings<B: Backend, L: OutputPin>(c: &Console<B, L>) -> String {
    let s = &c.options.sampling;
    format!(
        "temperature {} · top_k {} · top_p {} · min_p {} · repeat_penalty {} · repeat_window {} · \
         max_tokens {} · seed {}",
        s.temperature,
        s.top_k,
        s.top_p,
        s.min_p,
        s.repeat_penalty,
        s.repeat_window,
        c.options.max_tokens,
        c.seed.map_or("random".to_owned(), |s| s.to_string())
    )
}

fn set<B: Backend, L: OutputPin>(
    c: &mut Console<B, L>,
    name: &str,
    value: &str,
) -> Result<(), String> {
    fn num<T: std::str::FromStr>(name: &str, v: &str) -> Result<T, String> {
        v.parse()
            .map_err(|_| format!("{name} takes a number, got `{v}`"))
    }
    let mut o = c.options.clone();
    let mut seed = c.seed;
    match name {
        "temperature" => o.sampling.temperature = num(name, value)?,
        "top_k" => o.sampling.top_k = num(name, value)?,
        "top_p" => o.sampling.top_p = num(name, value)?,
        "min_p" => o.sampling.min_p = num(name, value)?,
        "repeat_penalty" => o.sampling.repeat_penalty = num(name, value)?,
        "repeat_window" => o.sampling.repeat_window = num(name, value)?,
        "max_tokens" => {
            o.max_tokens = num(name, value)?;
            if o.max_tokens == 0 {
                return Err("max_tokens must be at least 1".into());
            }
        }
        "seed" => {
            seed = if value == "random" {
                None
            } else {
                Some(num(name, value)?)
            }
        }
        _ => return Err(format!("no setting called `{name}`; /set lists them")),
    }
    o.sampling.validate().map_err(|e| e.to_string())?;
    c.options = o;
    c.seed = seed;
    Ok(())
}

fn stats<B: Backend, L: OutputPin>(c: &Console<B, L>) -> String {
    let t = &c.totals;
    let d = c.backend.describe();
    let last = match &c.last {
        None => "no reply yet".to_owned(),
        Some(o) => format!(
            "last reply: {} tokens ({}), prompt {} tokens in {:.0} ms ({:.0} tok/s), decode {:.1} tok/s",
            o.stats.generated_tokens,
            match o.finish {
                Finish::Cancelled => "stopped",
                Finish::Stopped(r) => r.as_str(),
            },
            o.stats.prompt_tokens,
            o.stats.time_to_first_token.as_secs_f64() * 1e3,
            o.stats.prefill_tokens_per_s(),
            o.stats.decode_tokens_per_s()
        ),
    };
    format!(
        "{last}\ncontext {} of {} tokens in use · {} replies ({} stopped), {} tokens, {} bad frames since start",
        c.backend.context_used(),
        d.context,
        t.replies,
        t.cancelled,
        t.tokens,
        t.frame_errors
    )
}
