//! The serial frame decoder (COBS + CRC-32 + postcard) on arbitrary bytes from the line.
//!
//! Beyond "no panic", it checks:
//! - every payload the decoder hands out is at most `MAX_PAYLOAD` bytes and its CRC was checked
//!   (re-framing it and feeding the frame to a fresh decoder gives back the same payload);
//! - a payload that decodes as a `Request` or a `Response` re-encodes into a frame that
//!   decodes to an equal message, and encoding that message again gives the same bytes
//!   (compared as bytes, so a NaN in a sampling option still counts as equal);
//! - after the input, a zero byte always ends whatever frame was in progress, and the decoder
//!   is then idle (`in_frame()` false): line noise never leaves it stuck.

#![no_main]

use libfuzzer_sys::fuzz_target;
use quill_protocol::frame::{CRC_LEN, cobs_encode, crc32};
use quill_protocol::{
    FrameDecoder, FrameError, MAX_FRAME, MAX_PAYLOAD, Request, Response, decode, encode,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Frames `payload` exactly as `encode` would (postcard bytes ++ CRC, COBS, zero).
fn frame_of(payload: &[u8]) -> Vec<u8> {
    let mut raw = payload.to_vec();
    raw.extend(crc32(payload).to_le_bytes());
    let mut out = vec![0u8; MAX_FRAME];
    let n = cobs_encode(&raw, &mut out[..MAX_FRAME - 1]).expect("a payload fits in a frame");
    out.truncate(n);
    out.push(0);
    out
}

/// Feeds `bytes` to a fresh decoder; returns the results of the frames that ended.
fn feed(bytes: &[u8]) -> Vec<Result<Vec<u8>, FrameError>> {
    let mut d = FrameDecoder::<MAX_FRAME>::new();
    bytes
        .iter()
        .filter_map(|&b| d.push(b).map(|r| r.map(<[u8]>::to_vec)))
        .collect()
}

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(
    payload: &[u8],
    variants: u32,
) {
    let Ok(msg) = decode::<T>(payload, variants) else {
        return;
    };
    let mut out = [0u8; MAX_FRAME];
    let frame = encode(&msg, &mut out)
        .expect("a decoded message re-encodes")
        .to_vec();
    let got = feed(&frame);
    assert_eq!(got.len(), 1, "one frame in, one result out");
    let payload2 = got[0].clone().expect("a frame we encoded is accepted");
    let msg2 = decode::<T>(&payload2, variants).expect("a message we encoded decodes");
    let mut out2 = [0u8; MAX_FRAME];
    let frame2 = encode(&msg2, &mut out2).expect("re-encodes");
    assert_eq!(frame, frame2, "encode ∘ decode is not stable for {msg:?}");
    if msg == msg {
        // Not NaN anywhere: compare the values too.
        assert_eq!(msg, msg2);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut d = FrameDecoder::<MAX_FRAME>::new();
    for &b in data {
        if let Some(Ok(payload)) = d.push(b) {
            assert!(payload.len() <= MAX_PAYLOAD + CRC_LEN);
            let payload = payload.to_vec();
            assert_eq!(feed(&frame_of(&payload)), vec![Ok(payload.clone())]);
            round_trip::<Request>(&payload, Request::VARIANTS);
            round_trip::<Response>(&payload, Response::VARIANTS);
        }
    }
    // A zero ends any frame in progress; afterwards the decoder is idle.
    let _ = d.push(0);
    assert!(!d.in_frame(), "decoder still in a frame after a zero");
});
