//! Framing: a message's postcard bytes, then their CRC-32 (little-endian), COBS-encoded and ended
//! by a zero byte.
//!
//! ```text
//! wire:    COBS( postcard(message) ++ crc32(postcard(message)) ) ++ 0x00
//! limits:  postcard bytes ≤ MAX_PAYLOAD, whole frame on the wire ≤ MAX_FRAME
//! ```
//!
//! COBS removes every zero from the frame, so a zero always ends one: a receiver that joins in the
//! middle of a frame, or loses bytes to line noise, is back in step at the next zero. The CRC
//! catches what noise does to the bytes in between (every single-byte error, every burst of up to
//! 32 bits). Nothing here allocates; buffers are fixed arrays.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Most postcard bytes in one message.
pub const MAX_PAYLOAD: usize = 500;
/// Bytes of CRC after the payload.
pub const CRC_LEN: usize = 4;
/// Most bytes of one frame on the wire, its terminating zero included: COBS adds one byte per
/// 254 and one more.
pub const MAX_FRAME: usize = MAX_PAYLOAD + CRC_LEN + (MAX_PAYLOAD + CRC_LEN) / 254 + 2;

/// Why a frame was not accepted. Each maps to an error code the server sends back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum FrameError {
    /// More than [`MAX_FRAME`] bytes arrived without a terminating zero.
    Oversized,
    /// The COBS encoding is broken (a length code points past the end of the frame).
    Cobs,
    /// The frame is shorter than a CRC.
    TooShort,
    /// The CRC does not match the bytes: line noise.
    Crc,
    /// The bytes are intact but are not a message of this protocol version.
    Malformed,
    /// The bytes are intact but name a message kind this side does not know.
    UnknownMessage,
    /// The message does not fit in [`MAX_PAYLOAD`] bytes (encoding side).
    TooLarge,
}

impl FrameError {
    /// A one-line description for people.
    pub fn describe(self) -> &'static str {
        match self {
            FrameError::Oversized => "frame longer than the protocol's maximum; discarded",
            FrameError::Cobs => "frame with a broken COBS encoding",
            FrameError::TooShort => "frame shorter than its CRC",
            FrameError::Crc => "frame whose CRC does not match (line noise?)",
            FrameError::Malformed => "frame that does not decode as a message of this protocol",
            FrameError::UnknownMessage => "frame with an unknown message kind",
            FrameError::TooLarge => "message too large for one frame",
        }
    }
}

#[expect(clippy::indexing_slicing, reason = "i < 256 indexes a 256-entry table")]
const fn crc_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

static CRC_TABLE: [u32; 256] = crc_table();

/// CRC-32 (IEEE 802.3, as in zlib and Ethernet).
#[expect(
    clippy::indexing_slicing,
    reason = "a masked byte indexes the 256-entry table"
)]
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c = CRC_TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// COBS-encodes `src` into `dst` (no terminating zero); returns the encoded length, or `None`
/// if `dst` is too small.
#[expect(
    clippy::indexing_slicing,
    reason = "every write is checked against dst.len() first"
)]
pub fn cobs_encode(src: &[u8], dst: &mut [u8]) -> Option<usize> {
    let mut code_at = 0;
    let mut out = 1;
    let mut code = 1u8;
    if dst.is_empty() {
        return None;
    }
    for &b in src {
        if b == 0 {
            dst[code_at] = code;
            code_at = out;
            *dst.get_mut(out)? = 0;
            out += 1;
            code = 1;
        } else {
            *dst.get_mut(out)? = b;
            out += 1;
            code += 1;
            if code == 0xff {
                dst[code_at] = code;
                code_at = out;
                *dst.get_mut(out)? = 0;
                out += 1;
                code = 1;
            }
        }
    }
    dst[code_at] = code;
    Some(out)
}

/// Decodes a COBS frame (without its terminating zero) in place; returns the decoded length.
#[expect(
    clippy::indexing_slicing,
    reason = "read < buf.len() is checked before each read; write <= read"
)]
pub fn cobs_decode_in_place(buf: &mut [u8]) -> Result<usize, FrameError> {
    let (mut read, mut write) = (0, 0);
    while read < buf.len() {
        let code = buf[read] as usize;
        if code == 0 || read + code > buf.len() {
            return Err(FrameError::Cobs);
        }
        read += 1;
        for _ in 1..code {
            if buf[read] == 0 {
                return Err(FrameError::Cobs);
            }
            buf[write] = buf[read];
            write += 1;
            read += 1;
        }
        // A code below 0xff stands for a zero, except at the very end of the frame.
        if code < 0xff && read < buf.len() {
            buf[write] = 0;
            write += 1;
        }
    }
    Ok(write)
}

/// Encodes `msg` as one frame into `out`; returns the frame, terminating zero included.
#[expect(
    clippy::indexing_slicing,
    reason = "n comes from postcard writing into raw, which has CRC_LEN bytes spare; len < out.len() from cobs_encode"
)]
pub fn encode<'o, T: Serialize>(
    msg: &T,
    out: &'o mut [u8; MAX_FRAME],
) -> Result<&'o [u8], FrameError> {
    let mut raw = [0u8; MAX_PAYLOAD + CRC_LEN];
    let n = postcard::to_slice(msg, &mut raw[..MAX_PAYLOAD])
        .map_err(|_| FrameError::TooLarge)?
        .len();
    let crc = crc32(&raw[..n]);
    raw[n..n + CRC_LEN].copy_from_slice(&crc.to_le_bytes());
    let len =
        cobs_encode(&raw[..n + CRC_LEN], &mut out[..MAX_FRAME - 1]).ok_or(FrameError::TooLarge)?;
    out[len] = 0;
    Ok(&out[..len + 1])
}

/// Decodes a message from a frame's payload (as [`FrameDecoder::push`] hands it out).
/// `variants` is how many kinds of message `T` has: a payload naming another kind is
/// [`FrameError::UnknownMessage`] rather than [`FrameError::Malformed`].
pub fn decode<T: DeserializeOwned>(payload: &[u8], variants: u32) -> Result<T, FrameError> {
    // postcard writes an enum's variant index first, as a varint.
    let mut index = 0u32;
    for (i, &b) in payload.iter().take(5).enumerate() {
        index |= ((b & 0x7f) as u32) << (7 * i);
        if b & 0x80 == 0 {
            if index >= variants {
                return Err(FrameError::UnknownMessage);
            }
            break;
        }
    }
    match postcard::take_from_bytes::<T>(payload) {
        Ok((msg, [])) => Ok(msg),
        _ => Err(FrameError::Malformed),
    }
}

/// Collects bytes into frames. Fixed capacity `N` (use [`MAX_FRAME`]); never allocates.
#[derive(Debug)]
pub struct FrameDecoder<const N: usize> {
    buf: [u8; N],
    len: usize,
    /// Bytes were dropped since the last zero: the frame is reported as oversized at its end.
    overflow: bool,
}

impl<const N: usize> Default for FrameDecoder<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> FrameDecoder<N> {
    pub const fn new() -> Self {
        FrameDecoder {
            buf: [0; N],
            len: 0,
            overflow: false,
        }
    }

    /// Forgets a partly received frame (after the peer went away, say).
    pub fn clear(&mut self) {
        self.len = 0;
        self.overflow = false;
    }

    /// True while a frame is partly received.
    pub fn in_frame(&self) -> bool {
        self.len > 0 || self.overflow
    }

    /// Takes one byte from the line. At the end of a frame, returns its payload (CRC checked and
    /// removed) or why it was rejected; empty frames (two zeros in a row) are ignored.
    #[expect(
        clippy::indexing_slicing,
        reason = "len < MAX_FRAME is checked before the write"
    )]
    pub fn push(&mut self, byte: u8) -> Option<Result<&[u8], FrameError>> {
        if byte != 0 {
            if self.len < N.min(MAX_FRAME - 1) {
                self.buf[self.len] = byte;
                self.len += 1;
            } else {
                self.overflow = true;
            }
            return None;
        }
        let (len, overflow) = (self.len, self.overflow);
        self.clear();
        if overflow {
            return Some(Err(FrameError::Oversized));
        }
        if len == 0 {
            return None;
        }
        Some(self.finish(len))
    }

    #[expect(
        clippy::indexing_slicing,
        reason = "len >= CRC_LEN is checked first; split_at yields exactly CRC_LEN bytes"
    )]
    fn finish(&mut self, len: usize) -> Result<&[u8], FrameError> {
        let n = cobs_decode_in_place(&mut self.buf[..len])?;
        if n <= CRC_LEN {
            return Err(FrameError::TooShort);
        }
        let (payload, crc) = self.buf[..n].split_at(n - CRC_LEN);
        let crc = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
        if crc32(payload) != crc {
            return Err(FrameError::Crc);
        }
        Ok(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    fn cobs_round_trip(data: &[u8]) {
        let mut enc = [0u8; 1200];
        let n = cobs_encode(data, &mut enc).unwrap();
        assert!(!enc[..n].contains(&0), "COBS output contains a zero");
        assert!(n <= data.len() + data.len() / 254 + 1);
        let got = cobs_decode_in_place(&mut enc[..n]).unwrap();
        assert_eq!(&enc[..got], data);
    }

    #[test]
    fn cobs_round_trips_edge_cases() {
        cobs_round_trip(&[]);
        cobs_round_trip(&[0]);
        cobs_round_trip(&[0, 0]);
        cobs_round_trip(&[1, 0, 2]);
        for len in [253, 254, 255, 256, 508, 509, 1000] {
            cobs_round_trip(&vec![7u8; len]);
            let mut v = vec![7u8; len];
            v[len / 2] = 0;
            cobs_round_trip(&v);
            v.push(0);
            cobs_round_trip(&v);
        }
    }

    #[test]
    fn decoder_rejects_an_oversized_frame_and_recovers() {
        let mut d = FrameDecoder::<MAX_FRAME>::new();
        for _ in 0..MAX_FRAME + 10 {
            assert!(d.push(1).is_none());
        }
        assert_eq!(d.push(0), Some(Err(FrameError::Oversized)));
        assert!(!d.in_frame());
        let mut out = [0u8; MAX_FRAME];
        let frame = encode(&(1u8, 2u16), &mut out).unwrap();
        let mut got = None;
        for &b in frame {
            if let Some(r) = d.push(b) {
                got = Some(r.map(|p| p.to_vec()));
            }
        }
        let payload = got.unwrap().unwrap();
        assert_eq!(postcard::from_bytes::<(u8, u16)>(&payload).unwrap(), (1, 2));
    }
}
