//! Binary mode: a microcontroller (or `quill client`) speaks [`quill_protocol`].
//!
//! Every frame gets an answer: a damaged, oversized or unknown frame gets an `Error` frame naming
//! what was wrong, and the server keeps serving. During a generation the line is read between
//! tokens: a `Cancel` stops it, a `Ping` is answered, anything else is refused as `Busy`.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use embedded_hal::digital::OutputPin;
use quill_protocol::{
    Done, ErrorCode, ErrorReport, FrameDecoder, FrameError, Generate, Info, MAX_CHUNK, MAX_FRAME,
    MAX_PROMPT, PROTOCOL_VERSION, Request, Response, decode, encode, truncated,
};

use super::backend::{Backend, Finish, Flow, Turn};
use super::{Console, Input, Mode, Port};
use crate::error::GenerateError;
use crate::generate::{GenerateOptions, StopReason};

/// Sends one response frame.
#[expect(
    clippy::expect_used,
    reason = "every Response is bounded (heapless capacities) to fit in one frame; a unit test encodes the largest"
)]
fn send<P: Port>(port: &mut P, msg: &Response) -> Result<(), P::Error> {
    let mut out = [0u8; MAX_FRAME];
    // Every response fits in a frame by construction (bounded strings); a failure here is a bug.
    let frame = encode(msg, &mut out).expect("responses are bounded to fit in a frame");
    port.write_all(frame)?;
    port.flush()
}

fn error(id: Option<u16>, code: ErrorCode, detail: &str) -> Response {
    Response::Error(ErrorReport {
        id,
        code,
        detail: truncated(detail),
    })
}

fn frame_error(e: FrameError) -> Response {
    let code = match e {
        FrameError::Oversized => ErrorCode::Oversized,
        FrameError::Malformed | FrameError::TooLarge => ErrorCode::Malformed,
        FrameError::UnknownMessage => ErrorCode::UnknownMessage,
        FrameError::Cobs | FrameError::TooShort | FrameError::Crc => ErrorCode::CorruptFrame,
    };
    error(None, code, e.describe())
}

/// Feeds one byte to the decoder; returns a complete request or the frame's error.
fn feed(decoder: &mut FrameDecoder<MAX_FRAME>, b: u8) -> Option<Result<Request, FrameError>> {
    decoder
        .push(b)
        .map(|r| r.and_then(|payload| decode::<Request>(payload, Request::VARIANTS)))
}

/// Serves a client until the line goes away (`Err`) or the input ends (`Ok(None)`).
pub(crate) fn session<B: Backend, L: OutputPin, P: Port>(
    c: &mut Console<B, L>,
    port: &mut P,
    input: &mut Input,
) -> Result<Option<Mode>, P::Error> {
    let mut decoder = FrameDecoder::<MAX_FRAME>::new();
    loop {
        let Some(b) = input.next(port)? else {
            return Ok(None);
        };
        match feed(&mut decoder, b) {
            None => {}
            Some(Err(e)) => {
                c.totals.frame_errors += 1;
                send(port, &frame_error(e))?;
            }
            Some(Ok(req)) => handle(c, port, input, &mut decoder, req)?,
        }
    }
}

fn handle<B: Backend, L: OutputPin, P: Port>(
    c: &mut Console<B, L>,
    port: &mut P,
    input: &mut Input,
    decoder: &mut FrameDecoder<MAX_FRAME>,
    req: Request,
) -> Result<(), P::Error> {
    match req {
        Request::Ping { nonce } => send(port, &Response::Pong { nonce }),
        Request::Info => {
            let d = c.backend.describe();
            send(
                port,
                &Response::Info(Info {
                    protocol: PROTOCOL_VERSION,
                    model: truncated(&d.name),
                    weights: truncated(&d.weights),
                    context: d.context as u32,
                    vocab: d.vocab as u32,
                    context_used: c.backend.context_used() as u32,
                    max_prompt: MAX_PROMPT as u16,
                }),
            )
        }
        Request::Reset => match c.backend.reset() {
            Ok(()) => send(port, &Response::ResetDone),
            Err(e) => send(port, &error(None, ErrorCode::Internal, &e.to_string())),
        },
        // Nothing is running: the generation it names has already ended.
        Request::Cancel { .. } => Ok(()),
        Request::Generate(g) => generate(c, port, input, decoder, g),
    }
}

/// The request's options over the console's defaults.
fn options<B: Backend, L: OutputPin>(c: &Console<B, L>, g: &Generate) -> GenerateOptions {
    let mut o = c.next_options();
    let s = &g.sampling;
    if let Some(v) = s.max_tokens {
        o.max_tokens = v as usize;
    }
    if let Some(v) = s.temperature {
        o.sampling.temperature = v;
    }
    if let Some(v) = s.top_k {
        o.sampling.top_k = v as usize;
    }
    if let Some(v) = s.top_p {
        o.sampling.top_p = v;
    }
    if let Some(v) = s.min_p {
        o.sampling.min_p = v;
    }
    if let Some(v) = s.repeat_penalty {
        o.sampling.repeat_penalty = v;
    }
    if let Some(v) = s.seed {
        o.sampling.seed = v;
    }
    o
}

fn generate<B: Backend, L: OutputPin, P: Port>(
    c: &mut Console<B, L>,
    port: &mut P,
    input: &mut Input,
    decoder: &mut FrameDecoder<MAX_FRAME>,
    g: Generate,
) -> Result<(), P::Error> {
    let id = g.id;
    let opts = options(c, &g);
    let turn = if g.chat {
        Turn::Chat(&g.prompt)
    } else {
        Turn::Complete(&g.prompt)
    };
    let mut failure = None;
    let mut frame_errors = 0;
    let result = c.generate(turn, &opts, &mut |text| {
        let mut step = || -> Result<Flow, P::Error> {
            for piece in super::chunks(text, MAX_CHUNK) {
                send(
                    port,
                    &Response::Token {
                        id,
                        text: truncated(piece),
                    },
                )?;
            }
            input.poll(port)?;
            let mut flow = Flow::Continue;
            // After a cancel, what follows waits for the main loop.
            while flow == Flow::Continue
                && let Some(b) = input.pop()
            {
                match feed(decoder, b) {
                    None => {}
                    Some(Err(e)) => {
                        frame_errors += 1;
                        send(port, &frame_error(e))?;
                    }
                    Some(Ok(Request::Cancel { id: i })) if i == id => flow = Flow::Cancel,
                    Some(Ok(Request::Cancel { .. })) => {}
                    Some(Ok(Request::Ping { nonce })) => send(port, &Response::Pong { nonce })?,
                    Some(Ok(other)) => send(
                        port,
                        &error(
                            match other {
                                Request::Generate(g) => Some(g.id),
                                _ => None,
                            },
                            ErrorCode::Busy,
                            &format!("generation {id} is running; wait for its Done or cancel it"),
                        ),
                    )?,
                }
            }
            Ok(flow)
        };
        match step() {
            Ok(f) => f,
            Err(e) => {
                failure = Some(e);
                Flow::Cancel
            }
        }
    });
    c.totals.frame_errors += frame_errors;
    if let Some(e) = failure {
        return Err(e);
    }
    let response = match result {
        Ok(o) => Response::Done(Done {
            id,
            finish: match o.finish {
                Finish::Cancelled => quill_protocol::Finish::Cancelled,
                Finish::Stopped(StopReason::Eos) => quill_protocol::Finish::Eos,
                Finish::Stopped(StopReason::MaxTokens) => quill_protocol::Finish::MaxTokens,
                Finish::Stopped(StopReason::ContextFull) => quill_protocol::Finish::ContextFull,
                Finish::Stopped(StopReason::StopString) => quill_protocol::Finish::StopString,
            },
            prompt_tokens: o.stats.prompt_tokens as u32,
            generated_tokens: o.stats.generated_tokens as u32,
            prefill_ms: o.stats.time_to_first_token.as_millis() as u32,
            decode_ms: o.stats.decode.as_millis() as u32,
            context_used: c.backend.context_used() as u32,
            context: c.backend.describe().context as u32,
        }),
        Err(e) => {
            let code = match &e {
                GenerateError::PromptTooLong { .. } => ErrorCode::PromptTooLong,
                GenerateError::ContextFull { .. } => ErrorCode::ContextFull,
                GenerateError::BadOption(_) => ErrorCode::BadOption,
                GenerateError::EmptyPrompt => ErrorCode::EmptyPrompt,
                GenerateError::Tract(_) | GenerateError::NonFiniteLogits { .. } => {
                    ErrorCode::Internal
                }
            };
            error(Some(id), code, &e.to_string())
        }
    };
    send(port, &response)
}
