//! The messages: requests from a client (a microcontroller, `quill client`), responses from the
//! server (`quill serve --mode binary`).
//!
//! A conversation on the line:
//!
//! ```text
//! client → Generate { id: 7, prompt, chat, sampling }
//! server ← Token { id: 7, text } …            (one per piece of text, in order)
//! client → Cancel { id: 7 }                   (optional, at any time)
//! server ← Done { id: 7, finish, stats… }     (always last, also after a cancel)
//!        | Error { id: Some(7), code, … }     (the request was refused or failed)
//! ```
//!
//! Ping, Info and Reset may be sent between generations; a Ping is answered during one too.
//! Every size is bounded by a `heapless` capacity, so a message fits in a fixed buffer on both
//! sides. New variants are only ever appended, so the variant indices on the wire stay put.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use heapless::String;
use serde::{Deserialize, Serialize};

/// The version of this protocol, reported in [`Info`]. Bumped when a message changes.
pub const PROTOCOL_VERSION: u16 = 1;
/// Most bytes of UTF-8 in a prompt.
pub const MAX_PROMPT: usize = 384;
/// Most bytes of UTF-8 text in one [`Response::Token`]; longer pieces are split over several.
pub const MAX_CHUNK: usize = 64;
/// Most bytes in an error's detail text.
pub const MAX_DETAIL: usize = 120;
/// Most bytes in a model name.
pub const MAX_NAME: usize = 64;

/// Sampling options of one request; `None` keeps the server's setting.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Sampling {
    pub max_tokens: Option<u16>,
    /// 0 = greedy.
    pub temperature: Option<f32>,
    pub top_k: Option<u16>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    pub seed: Option<u64>,
}

/// Generate text after a prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Generate {
    /// Chosen by the client; echoed in every response to this request.
    pub id: u16,
    pub prompt: String<MAX_PROMPT>,
    /// True: the prompt is the user's next chat message and the conversation continues.
    /// False: the prompt is continued as plain text, on its own (the conversation is cleared).
    pub chat: bool,
    pub sampling: Sampling,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Request {
    Ping {
        nonce: u32,
    },
    Info,
    Generate(Generate),
    /// Stop the generation with this id (ignored if it already ended).
    Cancel {
        id: u16,
    },
    /// Start a new conversation.
    Reset,
}

impl Request {
    /// How many variants [`Request`] has (see [`crate::decode`]).
    pub const VARIANTS: u32 = 5;
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Finish {
    /// The model ended its reply.
    Eos,
    /// `max_tokens` were generated.
    MaxTokens,
    /// The conversation filled the model's context; send Reset.
    ContextFull,
    /// A Cancel arrived, or the client went away.
    Cancelled,
    /// A stop string appeared.
    StopString,
}

/// The end of a generation, with its statistics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Done {
    pub id: u16,
    pub finish: Finish,
    pub prompt_tokens: u32,
    pub generated_tokens: u32,
    /// Time to the first token (the prompt's prefill), milliseconds.
    pub prefill_ms: u32,
    /// All later tokens, milliseconds.
    pub decode_ms: u32,
    /// Tokens of the conversation now in the context, and the context's size.
    pub context_used: u32,
    pub context: u32,
}

/// What went wrong with a request or a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ErrorCode {
    /// A frame was damaged on the line (COBS, CRC or length): resend the request.
    CorruptFrame,
    /// A frame was longer than the protocol allows.
    Oversized,
    /// A frame was intact but not a valid request of this protocol version.
    Malformed,
    /// A frame named a request kind the server does not know.
    UnknownMessage,
    /// A generation is running; wait for its Done or cancel it.
    Busy,
    /// The prompt does not fit in the context.
    PromptTooLong,
    /// The conversation filled the context; send Reset.
    ContextFull,
    /// A sampling option is out of range.
    BadOption,
    /// The prompt is empty.
    EmptyPrompt,
    /// The model failed; the conversation was cleared.
    Internal,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ErrorReport {
    /// The request this answers, when it is known.
    pub id: Option<u16>,
    pub code: ErrorCode,
    /// For people: what was expected, what was found.
    pub detail: String<MAX_DETAIL>,
}

/// The model behind the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Info {
    pub protocol: u16,
    pub model: String<MAX_NAME>,
    /// Weight format: "int8", "f16" or "f32".
    pub weights: String<8>,
    pub context: u32,
    pub vocab: u32,
    /// Tokens of the conversation now in the context.
    pub context_used: u32,
    pub max_prompt: u16,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Response {
    Pong {
        nonce: u32,
    },
    Info(Info),
    Token {
        id: u16,
        text: String<MAX_CHUNK>,
    },
    Done(Done),
    Error(ErrorReport),
    /// The conversation was cleared.
    ResetDone,
}

impl Response {
    /// How many variants [`Response`] has (see [`crate::decode`]).
    pub const VARIANTS: u32 = 6;
}

/// Copies as much of `s` as fits into a `String<N>`, cutting at a character boundary.
pub fn truncated<const N: usize>(s: &str) -> String<N> {
    let mut end = s.len().min(N);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = String::new();
    // Cannot fail: `end` ≤ N.
    let _ = out.push_str(&s[..end]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{FrameDecoder, FrameError, MAX_FRAME, decode, encode};

    fn largest_request() -> Request {
        Request::Generate(Generate {
            id: u16::MAX,
            prompt: truncated(&"é".repeat(MAX_PROMPT)),
            chat: true,
            sampling: Sampling {
                max_tokens: Some(u16::MAX),
                temperature: Some(1.5),
                top_k: Some(u16::MAX),
                top_p: Some(0.9),
                min_p: Some(0.1),
                repeat_penalty: Some(1.1),
                seed: Some(u64::MAX),
            },
        })
    }

    fn largest_responses() -> [Response; 3] {
        [
            Response::Token {
                id: u16::MAX,
                text: truncated(&"\u{10FFFF}".repeat(MAX_CHUNK)),
            },
            Response::Error(ErrorReport {
                id: Some(u16::MAX),
                code: ErrorCode::Internal,
                detail: truncated(&"x".repeat(MAX_DETAIL)),
            }),
            Response::Info(Info {
                protocol: u16::MAX,
                model: truncated(&"m".repeat(MAX_NAME)),
                weights: truncated("float32"),
                context: u32::MAX,
                vocab: u32::MAX,
                context_used: u32::MAX,
                max_prompt: u16::MAX,
            }),
        ]
    }

    /// Feeds a frame to a decoder, returning every payload or error it reports.
    fn feed(d: &mut FrameDecoder<MAX_FRAME>, bytes: &[u8]) -> Vec<Result<Vec<u8>, FrameError>> {
        bytes
            .iter()
            .filter_map(|&b| d.push(b).map(|r| r.map(|p| p.to_vec())))
            .collect()
    }

    #[test]
    fn the_largest_messages_fit_in_a_frame_and_round_trip() {
        let mut out = [0u8; MAX_FRAME];
        let mut d = FrameDecoder::new();
        let req = largest_request();
        let frame = encode(&req, &mut out).unwrap().to_vec();
        let got = feed(&mut d, &frame);
        assert_eq!(got.len(), 1);
        assert_eq!(
            decode::<Request>(got[0].as_ref().unwrap(), Request::VARIANTS).unwrap(),
            req
        );
        for resp in largest_responses() {
            let frame = encode(&resp, &mut out).unwrap().to_vec();
            let got = feed(&mut d, &frame);
            let back: Response = decode(got[0].as_ref().unwrap(), Response::VARIANTS).unwrap();
            assert_eq!(back, resp);
        }
    }

    #[test]
    fn every_single_byte_corruption_is_rejected() {
        let mut out = [0u8; MAX_FRAME];
        let frame = encode(&largest_request(), &mut out).unwrap().to_vec();
        let mut d = FrameDecoder::new();
        for i in 0..frame.len() - 1 {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut bad = frame.clone();
                bad[i] ^= flip;
                // A corrupted byte may become a zero and cut the frame in two: every piece must
                // be rejected, and the decoder must be back in step for the next frame.
                for r in feed(&mut d, &bad) {
                    let accepted = r.map(|p| decode::<Request>(&p, Request::VARIANTS));
                    assert!(
                        !matches!(accepted, Ok(Ok(_))),
                        "byte {i} ^ {flip:#x} was accepted"
                    );
                }
                let good = feed(&mut d, &frame);
                assert_eq!(
                    good.len(),
                    1,
                    "decoder out of step after corrupting byte {i}"
                );
                assert!(good[0].is_ok());
            }
        }
    }

    #[test]
    fn unknown_kinds_and_trailing_bytes_are_named() {
        assert_eq!(
            decode::<Request>(&[9, 0], Request::VARIANTS),
            Err(FrameError::UnknownMessage)
        );
        assert_eq!(
            decode::<Request>(&[0x85, 0x01], Request::VARIANTS),
            Err(FrameError::UnknownMessage)
        );
        // Ping { nonce: 1 } followed by a stray byte.
        assert_eq!(
            decode::<Request>(&[0, 1, 5], Request::VARIANTS),
            Err(FrameError::Malformed)
        );
        assert_eq!(
            decode::<Request>(&[0, 1], Request::VARIANTS),
            Ok(Request::Ping { nonce: 1 })
        );
        // A prompt that is not UTF-8.
        assert_eq!(
            decode::<Request>(
                &[2, 1, 0, 2, 0xff, 0xfe, 0, 0, 0, 0, 0, 0, 0, 0],
                Request::VARIANTS
            ),
            Err(FrameError::Malformed)
        );
    }

    #[test]
    fn random_bytes_never_panic_and_are_never_accepted_as_garbage() {
        // xorshift: a fixed stream of pseudo-random bytes.
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        let mut d = FrameDecoder::<MAX_FRAME>::new();
        let mut accepted = 0;
        for _ in 0..200_000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            // Zeros often enough to end frames of all lengths.
            let b = if s.is_multiple_of(23) {
                0
            } else {
                (s >> 24) as u8
            };
            if let Some(Ok(p)) = d.push(b)
                && decode::<Request>(p, Request::VARIANTS).is_ok()
            {
                accepted += 1;
            }
        }
        // A random frame passes the CRC with probability 2^-32.
        assert_eq!(accepted, 0);
    }

    #[test]
    fn truncation_keeps_whole_characters() {
        let s: String<5> = truncated("aé€x");
        assert_eq!(s.as_str(), "aé");
    }
}
