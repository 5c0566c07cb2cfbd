//! The line editor of text mode: what a serial terminal's user types, byte by byte.
//!
//! Serial terminals (picocom, screen, minicom) send every key as it is pressed and echo nothing
//! themselves, so the editor decides what to echo. It accepts `\r`, `\n` and `\r\n` as Enter,
//! backspace (DEL or BS), Ctrl-W (erase a word), Ctrl-U (erase the line) and Ctrl-C; it swallows
//! ANSI escape sequences (arrow keys); and it keeps a line of at most `N` bytes in a fixed buffer.
//! A line that is not UTF-8, that holds control characters (line noise), or that overflows the
//! buffer is rejected whole, with a reason, instead of being sent to the model.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use heapless::Vec as HVec;

/// What the console should do after a byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edit {
    /// Nothing to show.
    None,
    /// Echo this byte.
    Echo(u8),
    /// Erase this many characters before the cursor.
    Erase(usize),
    /// The line was erased (Ctrl-U): redraw the prompt.
    Cleared,
    /// Ctrl-C: abandon the line.
    Interrupt,
    /// Enter: take the line with [`LineEditor::take`].
    Enter,
    /// The line just outgrew the buffer; the rest of it, up to Enter, is discarded.
    Overflow,
}

/// Why a line was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineError {
    NotUtf8,
    ControlBytes,
    TooLong,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Normal,
    /// After a `\r`: a `\n` right now belongs to the same Enter.
    AfterCr,
    /// After ESC.
    Escape,
    /// Inside `ESC [ …` up to its final byte.
    Csi,
    /// After `ESC O`: one more byte.
    Ss3,
    /// The line overflowed: skip to Enter.
    Discard,
}

#[derive(Debug)]
pub struct LineEditor<const N: usize> {
    line: HVec<u8, N>,
    state: State,
    /// Control bytes arrived in this line.
    garbage: bool,
    /// The line that overflowed ended: report it once at its Enter.
    overflowed: bool,
}

impl<const N: usize> Default for LineEditor<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> LineEditor<N> {
    pub const fn new() -> Self {
        LineEditor {
            line: HVec::new(),
            state: State::Normal,
            garbage: false,
            overflowed: false,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.line.is_empty() && !self.garbage
    }

    /// The bytes typed so far.
    pub fn bytes(&self) -> &[u8] {
        &self.line
    }

    pub fn clear(&mut self) {
        self.line.clear();
        self.garbage = false;
        self.overflowed = false;
        if self.state != State::AfterCr {
            self.state = State::Normal;
        }
    }

    /// Characters (not bytes) in the line: what the terminal shows.
    fn chars(&self) -> usize {
        self.line.iter().filter(|&&b| b & 0xc0 != 0x80).count()
    }

    /// Removes the last character; returns whether there was one.
    fn pop_char(&mut self) -> bool {
        while let Some(b) = self.line.pop() {
            if b & 0xc0 != 0x80 {
                return true;
            }
        }
        false
    }

    pub fn push(&mut self, b: u8) -> Edit {
        match self.state {
            State::Escape => {
                self.state = match b {
                    b'[' => State::Csi,
                    b'O' => State::Ss3,
                    _ => State::Normal,
                };
                return Edit::None;
            }
            State::Csi => {
                if (0x40..=0x7e).contains(&b) {
                    self.state = State::Normal;
                }
                return Edit::None;
            }
            State::Ss3 => {
                self.state = State::Normal;
                return Edit::None;
            }
            State::Discard => {
                if b == b'\r' || b == b'\n' {
                    self.state = if b == b'\r' {
                        State::AfterCr
                    } else {
                        State::Normal
                    };
                    self.overflowed = true;
                    return Edit::Enter;
                }
                return Edit::None;
            }
            State::AfterCr => {
                self.state = State::Normal;
                if b == b'\n' {
                    return Edit::None;
                }
            }
            State::Normal => {}
        }
        match b {
            b'\r' | b'\n' => {
                if b == b'\r' {
                    self.state = State::AfterCr;
                }
                Edit::Enter
            }
            0x03 => {
                self.clear();
                Edit::Interrupt
            }
            0x7f | 0x08 => {
                if self.pop_char() {
                    Edit::Erase(1)
                } else {
                    Edit::None
                }
            }
            // Ctrl-W: the spaces before the cursor, then the word.
            0x17 => {
                let mut n = 0;
                while self.line.last() == Some(&b' ') && self.pop_char() {
                    n += 1;
                }
                while self.line.last().is_some_and(|&c| c != b' ') && self.pop_char() {
                    n += 1;
                }
                if n == 0 { Edit::None } else { Edit::Erase(n) }
            }
            0x15 => {
                let had = self.chars() > 0;
                self.clear();
                if had { Edit::Cleared } else { Edit::None }
            }
            0x1b => {
                self.state = State::Escape;
                Edit::None
            }
            // Ctrl-D, XON/XOFF and NUL (a break on the line) carry no text.
            0x00 | 0x04 | 0x11 | 0x13 => Edit::None,
            b'\t' | 0x20.. => {
                if self.line.push(b).is_err() {
                    self.line.clear();
                    self.state = State::Discard;
                    return Edit::Overflow;
                }
                Edit::Echo(b)
            }
            _ => {
                self.garbage = true;
                Edit::None
            }
        }
    }

    /// Takes the finished line (after [`Edit::Enter`]) and starts a new one.
    pub fn take(&mut self) -> Result<&str, LineError> {
        let (garbage, overflowed) = (self.garbage, self.overflowed);
        self.garbage = false;
        self.overflowed = false;
        // Cleared on the next push, so that the returned text can borrow it.
        let line = self.line.as_slice();
        if overflowed {
            return Err(LineError::TooLong);
        }
        if garbage {
            return Err(LineError::ControlBytes);
        }
        let text = std::str::from_utf8(line).map_err(|_| LineError::NotUtf8)?;
        // C1 controls (U+0080..U+009F) are valid UTF-8 but still control characters: U+009B is
        // CSI, which some terminals act on when the line is echoed back or printed.
        if text.chars().any(|c| c.is_control() && c != '\t') {
            return Err(LineError::ControlBytes);
        }
        Ok(text)
    }

    /// Forgets the line that [`LineEditor::take`] returned.
    pub fn done(&mut self) {
        self.line.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Types `input`; returns every finished line and the echo as a terminal would show it.
    fn type_bytes(input: &[u8]) -> (Vec<Result<String, LineError>>, Vec<Edit>) {
        let mut ed = LineEditor::<16>::new();
        let mut lines = Vec::new();
        let mut edits = Vec::new();
        for &b in input {
            let e = ed.push(b);
            if e == Edit::Enter {
                lines.push(ed.take().map(str::to_owned));
                ed.done();
            } else if e != Edit::None {
                edits.push(e);
            }
        }
        (lines, edits)
    }

    #[test]
    fn every_enter_convention_ends_one_line() {
        let (lines, _) = type_bytes(b"a\rb\nc\r\nd\n\re\r\r");
        let got: Vec<_> = lines.into_iter().map(Result::unwrap).collect();
        assert_eq!(got, ["a", "b", "c", "d", "", "e", ""]);
    }

    #[test]
    fn editing_keys() {
        let (lines, edits) = type_bytes(b"helo\x7f\x7fllo\r");
        assert_eq!(lines[0].as_deref(), Ok("hello"));
        assert_eq!(edits.iter().filter(|e| **e == Edit::Erase(1)).count(), 2);
        let (lines, _) = type_bytes(b"junk\x15ok\r");
        assert_eq!(lines[0].as_deref(), Ok("ok"));
        let (lines, _) = type_bytes(b"one two  \x17three\r");
        assert_eq!(lines[0].as_deref(), Ok("one three"));
        // Backspace removes a whole multibyte character.
        let (lines, _) = type_bytes("né\x7fe\r".as_bytes());
        assert_eq!(lines[0].as_deref(), Ok("ne"));
        let (lines, edits) = type_bytes(b"abc\x03x\r");
        assert_eq!(lines[0].as_deref(), Ok("x"));
        assert!(edits.contains(&Edit::Interrupt));
    }

    #[test]
    fn escape_sequences_are_swallowed() {
        let (lines, edits) = type_bytes(b"a\x1b[A\x1b[1;5Cb\x1bOPc\r");
        assert_eq!(lines[0].as_deref(), Ok("abc"));
        assert_eq!(
            edits,
            [Edit::Echo(b'a'), Edit::Echo(b'b'), Edit::Echo(b'c')]
        );
    }

    #[test]
    fn bad_lines_are_rejected_whole_and_the_next_line_is_clean() {
        let (lines, _) = type_bytes(b"ab\xff\xfe\rok\r");
        assert_eq!(lines[0], Err(LineError::NotUtf8));
        assert_eq!(lines[1].as_deref(), Ok("ok"));
        let (lines, _) = type_bytes(b"a\x01\x02b\rok\r");
        assert_eq!(lines[0], Err(LineError::ControlBytes));
        // A C1 control in UTF-8 (U+009B, CSI): the line_editor fuzz target's invariant caught it.
        let (lines, _) = type_bytes(b"a\xc2\x9b31mb\rok\r");
        assert_eq!(lines[0], Err(LineError::ControlBytes));
        assert_eq!(lines[1].as_deref(), Ok("ok"));
        assert_eq!(lines[1].as_deref(), Ok("ok"));
        let (lines, edits) = type_bytes(b"0123456789abcdefXYZ\r\nok\r");
        assert_eq!(lines[0], Err(LineError::TooLong));
        assert_eq!(lines[1].as_deref(), Ok("ok"));
        assert_eq!(edits.iter().filter(|e| **e == Edit::Overflow).count(), 1);
        // Exactly full is fine.
        let (lines, _) = type_bytes(b"0123456789abcdef\r");
        assert_eq!(lines[0].as_deref(), Ok("0123456789abcdef"));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut ed = LineEditor::<16>::new();
        let mut s = 0x2545_F491_4F6C_DD1Du64;
        for _ in 0..200_000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            if ed.push((s >> 32) as u8) == Edit::Enter {
                let _ = ed.take();
                ed.done();
            }
            assert!(ed.bytes().len() <= 16);
        }
    }
}
