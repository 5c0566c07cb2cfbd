//! Turning generated token bytes into printable text, and stopping at user stop strings.
//!
//! Bytes wait in a fixed buffer until they are safe to print: an incomplete UTF-8 character is
//! held back until its last byte arrives, and so is any tail that could be the start of a stop
//! string. Text is therefore never printed and then retracted, and a stop string split across
//! tokens is still found.

use heapless::Vec as HVec;

/// Longest stop string, in bytes.
pub const MAX_STOP_BYTES: usize = 128;
/// Most stop strings.
pub const MAX_STOPS: usize = 8;
/// Bytes one token may add at once (the longest token in a GPT-2-style vocabulary is far shorter).
pub const MAX_TOKEN_BYTES: usize = 256;
const PENDING: usize = MAX_STOP_BYTES + MAX_TOKEN_BYTES + 4;
/// Printable text one push can produce: every pending byte may become U+FFFD (3 bytes).
pub const MAX_EMIT_BYTES: usize = 3 * PENDING;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum StopError {
    #[error("a stop string is empty")]
    Empty,
    #[error("stop string of {0} bytes is longer than the {MAX_STOP_BYTES} bytes quill supports")]
    TooLong(usize),
    #[error("{0} stop strings given; quill supports at most {MAX_STOPS}")]
    TooMany(usize),
}

#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: HVec<HVec<u8, MAX_STOP_BYTES>, MAX_STOPS>,
    pending: HVec<u8, PENDING>,
    out: HVec<u8, MAX_EMIT_BYTES>,
}

/// Length of a trailing incomplete UTF-8 sequence (0 if the bytes end on a boundary).
fn incomplete_tail(b: &[u8]) -> usize {
    for back in 1..=b.len().min(3) {
        let c = b[b.len() - back];
        if c & 0xC0 == 0x80 {
            continue; // continuation byte: keep looking for the lead byte
        }
        let need = match c {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => 1,
        };
        return if need > back { back } else { 0 };
    }
    0
}

impl StopMatcher {
    pub fn new<S: AsRef<str>>(stops: &[S]) -> Result<StopMatcher, StopError> {
        if stops.len() > MAX_STOPS {
            return Err(StopError::TooMany(stops.len()));
        }
        let mut v = HVec::new();
        for s in stops {
            let s = s.as_ref().as_bytes();
            if s.is_empty() {
                return Err(StopError::Empty);
            }
            let bytes = HVec::from_slice(s).map_err(|_| StopError::TooLong(s.len()))?;
            v.push(bytes).map_err(|_| StopError::TooMany(stops.len()))?;
        }
        Ok(StopMatcher {
            stops: v,
            pending: HVec::new(),
            out: HVec::new(),
        })
    }

    /// Appends the bytes of one token. Returns true when a stop string is complete; either way
    /// [`StopMatcher::text`] is then what can be printed (on a stop: the text before it).
    pub fn push(&mut self, bytes: &[u8]) -> bool {
        self.out.clear();
        // Bytes beyond MAX_TOKEN_BYTES cannot come from a real vocabulary; they are dropped
        // rather than overflowing the fixed buffer.
        let bytes = &bytes[..bytes.len().min(MAX_TOKEN_BYTES)];
        self.pending
            .extend_from_slice(bytes)
            .expect("pending holds a stop prefix plus one token");

        let hit = self
            .stops
            .iter()
            .filter_map(|s| find(&self.pending, s))
            .min();
        if let Some(at) = hit {
            emit_lossy(&self.pending[..at], &mut self.out);
            self.pending.clear();
            return true;
        }

        let p = &self.pending;
        let mut hold = incomplete_tail(p);
        for s in &self.stops {
            for k in (1..s.len().min(p.len() + 1)).rev() {
                if p.ends_with(&s[..k]) {
                    hold = hold.max(k);
                    break;
                }
            }
        }
        let ready = p.len() - hold;
        emit_lossy(&self.pending[..ready], &mut self.out);
        let keep = self.pending.len() - ready;
        self.pending.copy_within(ready.., 0);
        self.pending.truncate(keep);
        false
    }

    /// The text released by the last call.
    pub fn text(&self) -> &str {
        as_str(&self.out)
    }

    /// Forgets the text released by the last call (it has been printed).
    pub fn clear_text(&mut self) {
        self.out.clear();
    }

    /// Releases everything still held back, after the text of the last call (at the end of
    /// generation, when no stop string can complete any more).
    pub fn flush(&mut self) -> &str {
        emit_lossy(&self.pending, &mut self.out);
        self.pending.clear();
        as_str(&self.out)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Appends `bytes` to `out`, replacing invalid UTF-8 with U+FFFD.
fn emit_lossy<const N: usize>(bytes: &[u8], out: &mut HVec<u8, N>) {
    for chunk in bytes.utf8_chunks() {
        out.extend_from_slice(chunk.valid().as_bytes())
            .expect("sized for the worst case");
        if !chunk.invalid().is_empty() {
            out.extend_from_slice("\u{FFFD}".as_bytes())
                .expect("sized for the worst case");
        }
    }
}

fn as_str(b: &[u8]) -> &str {
    std::str::from_utf8(b).expect("emit_lossy writes valid UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pushes each chunk, returns everything printed and whether a stop string hit.
    fn run(stops: &[&str], chunks: &[&[u8]]) -> (String, bool) {
        let mut m = StopMatcher::new(stops).unwrap();
        let mut printed = String::new();
        for c in chunks {
            let stopped = m.push(c);
            printed.push_str(m.text());
            if stopped {
                return (printed, true);
            }
        }
        m.clear_text();
        printed.push_str(m.flush());
        (printed, false)
    }

    #[test]
    fn stop_string_across_tokens_is_never_printed() {
        let mut m = StopMatcher::new(&["\nUser:"]).unwrap();
        assert!(!m.push(b"Hello"));
        assert_eq!(m.text(), "Hello");
        assert!(!m.push(b"!\n"));
        assert_eq!(m.text(), "!");
        assert!(!m.push(b"Us"));
        assert_eq!(m.text(), "");
        assert!(m.push(b"er: more"));
        assert_eq!(m.text(), "");
    }

    #[test]
    fn a_false_start_is_released() {
        assert_eq!(run(&["STOP"], &[b"ST", b"OCK"]), ("STOCK".into(), false));
        assert_eq!(run(&["STOP"], &[b"a ST"]), ("a ST".into(), false));
        assert_eq!(run(&["STOP"], &[b"xSTO", b"P tail"]), ("x".into(), true));
    }

    #[test]
    fn multibyte_characters_split_across_tokens() {
        let s = "é🙂".as_bytes();
        let chunks: Vec<&[u8]> = s.iter().map(std::slice::from_ref).collect();
        let mut m = StopMatcher::new::<&str>(&[]).unwrap();
        let mut printed = String::new();
        for c in &chunks {
            assert!(!m.push(c));
            printed.push_str(m.text());
        }
        assert_eq!(printed, "é🙂");
        assert_eq!(run(&["🙂"], &chunks), ("é".into(), true));
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        assert_eq!(run(&[], &[b"a\xffb"]), ("a\u{FFFD}b".into(), false));
        // A lead byte with no continuation, then the end of the text.
        assert_eq!(run(&[], &[b"a\xe2"]), ("a\u{FFFD}".into(), false));
    }

    #[test]
    fn earliest_stop_wins_and_limits_are_checked() {
        assert_eq!(run(&["b", "a"], &[b"xaby"]), ("x".into(), true));
        assert_eq!(StopMatcher::new(&[""]).err(), Some(StopError::Empty));
        let long = "x".repeat(MAX_STOP_BYTES + 1);
        assert!(matches!(
            StopMatcher::new(&[long]).err(),
            Some(StopError::TooLong(_))
        ));
    }
}
