//! The text-mode line editor on arbitrary byte streams (what a terminal, or line noise, sends).
//!
//! Beyond "no panic", it checks, after every byte:
//! - the line never holds more than its capacity `N`;
//! - an echoed byte is printable text (tab, or 0x20 and above but not DEL) and is the byte now
//!   last in the line; an erase removes exactly the characters it reports;
//! - every line `take()` accepts is valid UTF-8, holds no control characters but tab, is at
//!   most `N` bytes, and equals the bytes typed into it;
//! - a rejected line is rejected for the right reason (control bytes seen, or not UTF-8), and the
//!   editor is empty again after `done()`.
//!
//! Both a tiny capacity (16, so overflows are frequent) and the console's own size are used;
//! the first input byte chooses.

#![no_main]

use libfuzzer_sys::fuzz_target;
use quill::serve::line::{Edit, LineEditor, LineError};

fn chars(b: &[u8]) -> usize {
    b.iter().filter(|&&c| c & 0xc0 != 0x80).count()
}

fn run<const N: usize>(data: &[u8]) {
    let mut ed = LineEditor::<N>::new();
    // The line before each byte, in a fixed buffer: no allocation per byte.
    let mut before_buf = [0u8; N];
    for &b in data {
        let n = ed.bytes().len();
        before_buf[..n].copy_from_slice(ed.bytes());
        let before = &before_buf[..n];
        let edit = ed.push(b);
        let after = ed.bytes();
        assert!(
            after.len() <= N,
            "line of {} bytes in a {N}-byte editor",
            after.len()
        );
        match edit {
            Edit::Echo(e) => {
                assert_eq!(e, b);
                assert!(
                    e == b'\t' || (0x20..0x7f).contains(&e) || e >= 0x80,
                    "echoed {e:#x}"
                );
                assert_eq!(after.last(), Some(&e));
                assert_eq!(after.len(), before.len() + 1);
            }
            Edit::Erase(n) => {
                assert!(n > 0);
                assert!(after.len() < before.len());
                assert!(before.starts_with(after));
                assert_eq!(chars(before) - chars(after), n, "erase count");
            }
            Edit::Cleared | Edit::Interrupt | Edit::Overflow => assert!(after.is_empty()),
            Edit::None => {}
            Edit::Enter => {
                let mut typed_buf = [0u8; N];
                let typed = &mut typed_buf[..ed.bytes().len()];
                typed.copy_from_slice(ed.bytes());
                let typed = &*typed;
                match ed.take() {
                    Ok(line) => {
                        assert!(line.len() <= N);
                        assert_eq!(line.as_bytes(), typed);
                        assert!(
                            !line.chars().any(|c| c.is_control() && c != '\t'),
                            "control character accepted in {line:?}"
                        );
                    }
                    Err(LineError::NotUtf8) => assert!(std::str::from_utf8(typed).is_err()),
                    Err(LineError::ControlBytes) | Err(LineError::TooLong) => {}
                }
                ed.done();
                assert!(ed.bytes().is_empty());
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((&sel, rest)) if sel & 1 == 0 => run::<16>(rest),
        Some((_, rest)) => run::<{ quill::serve::text::LINE_CAP }>(rest),
        None => {}
    }
});
