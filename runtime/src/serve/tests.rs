//! The console over an in-memory loopback, with a scripted backend: the line discipline, the
//! commands and the framing, without a model. (The end-to-end tests run the real model over a
//! real pseudo-terminal.)

use std::collections::VecDeque;

use embedded_io::{ErrorKind, ErrorType, Read, ReadReady, Write};
use quill_protocol::{
    ErrorCode, FrameDecoder, Generate, MAX_FRAME, Request, Response, Sampling, decode, encode,
    truncated,
};

use super::backend::{Backend, Description, Finish, Flow, Outcome, Turn};
use super::led::NoLed;
use super::{Console, End, Mode};
use crate::error::GenerateError;
use crate::generate::{GenerateOptions, Stats, StopReason};

/// Input scripted in advance; output collected. When the script is used up the peer "goes away".
struct Loopback {
    input: VecDeque<u8>,
    output: Vec<u8>,
    /// Most bytes one read returns (1: every frame arrives split at every byte).
    max_read: usize,
}

impl Loopback {
    fn new(input: &[u8]) -> Self {
        Loopback {
            input: input.iter().copied().collect(),
            output: Vec::new(),
            max_read: 7,
        }
    }
}

#[derive(Debug)]
struct Gone;

impl embedded_io::Error for Gone {
    fn kind(&self) -> ErrorKind {
        ErrorKind::NotConnected
    }
}

impl std::fmt::Display for Gone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "gone")
    }
}

impl ErrorType for Loopback {
    type Error = Gone;
}

impl Read for Loopback {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Gone> {
        if self.input.is_empty() {
            return Err(Gone);
        }
        let n = buf.len().min(self.max_read).min(self.input.len());
        for b in &mut buf[..n] {
            *b = self.input.pop_front().unwrap();
        }
        Ok(n)
    }
}

impl ReadReady for Loopback {
    fn read_ready(&mut self) -> Result<bool, Gone> {
        Ok(!self.input.is_empty())
    }
}

impl Write for Loopback {
    /// Takes one byte at a time: the console must not drop what a slow line does not take.
    fn write(&mut self, buf: &[u8]) -> Result<usize, Gone> {
        match buf.first() {
            Some(&b) => {
                self.output.push(b);
                Ok(1)
            }
            None => Ok(0),
        }
    }
    fn flush(&mut self) -> Result<(), Gone> {
        Ok(())
    }
}

/// "Generates" the message's words back in reverse order, one word per token.
#[derive(Default)]
struct Echo {
    used: usize,
    turns: Vec<String>,
}

impl Backend for Echo {
    fn describe(&self) -> Description {
        Description {
            name: "echo".into(),
            weights: "none".into(),
            context: 64,
            vocab: 1,
            chat: true,
        }
    }
    fn context_used(&self) -> usize {
        self.used
    }
    fn reset(&mut self) -> Result<(), GenerateError> {
        self.used = 0;
        Ok(())
    }
    fn generate(
        &mut self,
        turn: Turn<'_>,
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(&str) -> Flow,
    ) -> Result<Outcome, GenerateError> {
        let text = match turn {
            Turn::Chat(t) => t,
            Turn::Complete(t) => {
                self.used = 0;
                t
            }
        };
        let words: Vec<&str> = text.split_whitespace().rev().collect();
        if self.used + words.len() > 64 {
            return Err(GenerateError::ContextFull { context: 64 });
        }
        self.turns.push(text.to_owned());
        self.used += words.len();
        let mut stats = Stats {
            prompt_tokens: words.len(),
            ..Stats::default()
        };
        for (i, w) in words.iter().enumerate() {
            if i == opts.max_tokens {
                return Ok(Outcome {
                    finish: Finish::Stopped(StopReason::MaxTokens),
                    stats,
                });
            }
            stats.generated_tokens += 1;
            self.used += 1;
            let piece = if i == 0 {
                w.to_string()
            } else {
                format!(" {w}")
            };
            if on_text(&piece) == Flow::Cancel {
                return Ok(Outcome {
                    finish: Finish::Cancelled,
                    stats,
                });
            }
        }
        on_text("\n");
        Ok(Outcome {
            finish: Finish::Stopped(StopReason::Eos),
            stats,
        })
    }
}

fn console(mode: Mode) -> Console<Echo, NoLed> {
    Console::new(
        Echo::default(),
        NoLed,
        GenerateOptions::default(),
        Some(1),
        mode,
    )
}

fn run_text(c: &mut Console<Echo, NoLed>, input: &[u8]) -> String {
    let mut port = Loopback::new(input);
    assert!(matches!(c.session(&mut port), End::PeerGone(_)));
    String::from_utf8_lossy(&port.output).into_owned()
}

#[test]
fn text_mode_echoes_replies_and_uses_crlf() {
    let mut c = console(Mode::Text);
    let out = run_text(&mut c, b"one two three\r");
    assert!(out.starts_with("quill "), "{out:?}");
    assert!(
        out.contains("> one two three\r\nthree two one\r\n> "),
        "{out:?}"
    );
    assert!(
        !out.replace("\r\n", "").contains('\n'),
        "bare \\n in {out:?}"
    );
    assert_eq!(c.backend.turns, ["one two three"]);
}

#[test]
fn ctrl_c_stops_a_reply_and_what_follows_it_is_kept() {
    let mut c = console(Mode::Text);
    // Ctrl-C arrives while the reply streams; the line after it is the next message.
    let out = run_text(&mut c, b"a b c d e f g h\r\x03x y\r");
    assert!(out.contains("[stopped]\r\n> "), "{out:?}");
    assert_eq!(c.backend.turns, ["a b c d e f g h", "x y"]);
    assert_eq!(c.totals.cancelled, 1);
}

#[test]
fn bad_lines_leave_the_conversation_alone() {
    let mut c = console(Mode::Text);
    let long = vec![b'x'; super::text::LINE_CAP + 5];
    let mut input = b"hello there\r".to_vec();
    input.extend_from_slice(b"\xc3\x28\r\x01\x02\r");
    input.extend_from_slice(&long);
    input.extend_from_slice(b"\r\nstill here\r");
    let out = run_text(&mut c, &input);
    assert!(out.contains("not valid UTF-8"), "{out:?}");
    assert!(out.contains("control characters"), "{out:?}");
    assert!(out.contains("longer than 512 bytes"), "{out:?}");
    assert_eq!(c.backend.turns, ["hello there", "still here"]);
}

#[test]
fn commands_change_settings_and_report() {
    let mut c = console(Mode::Text);
    let out = run_text(
        &mut c,
        b"/set temperature 0.5\r/set top_p 2\r/set max_tokens 2\r/set nope 1\r/bogus\ra b c\r/stats\r/reset\r/info\r",
    );
    assert_eq!(c.options.sampling.temperature, 0.5);
    assert!(out.contains("[temperature = 0.5]"));
    assert!(out.contains("top-p must be in (0, 1], got 2"), "{out:?}");
    assert!(out.contains("no setting called `nope`"));
    assert!(out.contains("unknown command /bogus"));
    assert!(
        out.contains("c b\r\n[stopped at the 2-token limit"),
        "{out:?}"
    );
    assert!(out.contains("last reply: 2 tokens (max_tokens)"), "{out:?}");
    assert!(out.contains("[new conversation]"));
    assert!(out.contains("context 64 tokens (0 in use)"), "{out:?}");
}

#[test]
fn a_full_context_is_reported_and_reset_recovers() {
    let mut c = console(Mode::Text);
    let words = "w ".repeat(40);
    let input = format!("{words}\r{words}\r/reset\r{words}\r");
    let out = run_text(&mut c, input.as_bytes());
    assert!(out.contains("the context is full (64 tokens)"), "{out:?}");
    assert_eq!(c.backend.turns.len(), 2);
}

/// Requests as frames, back to back.
fn frames(reqs: &[Request]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; MAX_FRAME];
    for r in reqs {
        out.extend_from_slice(encode(r, &mut buf).unwrap());
    }
    out
}

fn responses(bytes: &[u8]) -> Vec<Response> {
    let mut d = FrameDecoder::<MAX_FRAME>::new();
    bytes
        .iter()
        .filter_map(|&b| {
            d.push(b)
                .map(|p| decode(p.unwrap(), Response::VARIANTS).unwrap())
        })
        .collect()
}

fn generate(id: u16, prompt: &str, max: Option<u16>) -> Request {
    Request::Generate(Generate {
        id,
        prompt: truncated(prompt),
        chat: true,
        sampling: Sampling {
            max_tokens: max,
            ..Sampling::default()
        },
    })
}

fn run_binary(input: &[u8], max_read: usize) -> Vec<Response> {
    let mut c = console(Mode::Binary);
    let mut port = Loopback::new(input);
    port.max_read = max_read;
    assert!(matches!(c.session(&mut port), End::PeerGone(_)));
    responses(&port.output)
}

#[test]
fn binary_mode_answers_each_request_byte_by_byte() {
    let input = frames(&[
        Request::Ping { nonce: 7 },
        Request::Info,
        Request::Reset,
        generate(3, "alpha beta", None),
    ]);
    let got = run_binary(&input, 1);
    assert_eq!(got[0], Response::Pong { nonce: 7 });
    assert!(matches!(&got[1], Response::Info(i) if i.model == "echo" && i.context == 64));
    let text: String = got
        .iter()
        .filter_map(|r| match r {
            Response::Token { id: 3, text } => Some(text.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(text, "beta alpha\n");
    assert_eq!(got[2], Response::ResetDone);
    assert!(matches!(got.last(), Some(Response::Done(d)) if d.id == 3 && d.generated_tokens == 2));
}

#[test]
fn binary_mode_cancels_refuses_while_busy_and_survives_bad_frames() {
    let mut input = frames(&[generate(1, "a b c d e f g h i j", None)]);
    // While generation 1 runs: a ping, another request, a damaged frame, then the cancel.
    input.extend(frames(&[
        Request::Ping { nonce: 9 },
        generate(2, "x", None),
    ]));
    let mut bad = frames(&[Request::Info]);
    bad[1] ^= 0x10;
    input.extend(bad);
    input.extend(frames(&[Request::Cancel { id: 1 }]));
    // After it: an oversized frame, a frame of an unknown kind, and a ping.
    input.extend(std::iter::repeat_n(0x41, MAX_FRAME + 3));
    input.push(0);
    let mut unknown = [0u8; MAX_FRAME];
    input.extend(encode(&(42u8, 1u8), &mut unknown).unwrap());
    input.extend(frames(&[Request::Ping { nonce: 10 }]));
    let got = run_binary(&input, 64);
    let codes: Vec<ErrorCode> = got
        .iter()
        .filter_map(|r| match r {
            Response::Error(e) => Some(e.code),
            _ => None,
        })
        .collect();
    assert_eq!(
        codes,
        [
            ErrorCode::Busy,
            ErrorCode::CorruptFrame,
            ErrorCode::Oversized,
            ErrorCode::UnknownMessage
        ]
    );
    assert!(got.contains(&Response::Pong { nonce: 9 }));
    assert!(got.iter().any(|r| matches!(r, Response::Done(d)
        if d.id == 1 && d.finish == quill_protocol::Finish::Cancelled && d.generated_tokens < 10)));
    assert_eq!(got.last(), Some(&Response::Pong { nonce: 10 }));
}

#[test]
fn text_mode_switches_to_binary_on_request() {
    let mut input = b"/binary\r".to_vec();
    input.extend(frames(&[Request::Ping { nonce: 5 }]));
    let mut c = console(Mode::Text);
    let mut port = Loopback::new(&input);
    assert!(matches!(c.session(&mut port), End::PeerGone(_)));
    let marker = b"close the line to return]\r\n";
    let text_end = port
        .output
        .windows(marker.len())
        .position(|w| w == marker)
        .unwrap()
        + marker.len();
    assert!(
        String::from_utf8_lossy(&port.output[..text_end]).contains("binary protocol from now on")
    );
    assert_eq!(
        responses(&port.output[text_end..]),
        [Response::Pong { nonce: 5 }]
    );
}
