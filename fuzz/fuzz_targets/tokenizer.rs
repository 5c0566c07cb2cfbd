//! The tokenizer: encode of arbitrary text, decode of arbitrary id sequences.
//!
//! The tokenizer is the real bundle's (`models/bundles/smollm2-135m-instruct-int8/tokenizer.json`,
//! or `$QUILL_FUZZ_TOKENIZER`), loaded once; without it, the tiny fuzz vocabulary's. The first
//! input byte chooses the mode, the rest is the input:
//! - 0: bytes → `from_utf8_lossy` → `encode(text, false)` (user text). Every id is in range, no
//!   id is a special token (user text cannot forge `<|im_start|>`), and `decode` gives the text
//!   back exactly, except for the bytes the vocabulary has no token for, which encoding drops,
//!   as Hugging Face's does without an unknown token (SmolLM2 lacks the control bytes 0x04,
//!   0x06, 0x13, 0x14, 0x16, 0x1d and some UTF-8 lead bytes, so a character starting with one
//!   decodes as U+FFFD). The expected text is the input's bytes minus exactly those, decoded
//!   lossily: encoding drops nothing else and invents nothing.
//! - 1: the same with `encode(text, true)` (special tokens parsed): same round trip.
//! - otherwise: the bytes as little-endian u32 ids, any value, decoded with and without
//!   `skip_special`; the result is valid UTF-8 by construction, and must not panic (ids out of
//!   range decode to nothing).

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use quill::Tokenizer;

struct Fixture {
    tok: Tokenizer,
    /// Bytes the vocabulary has no single-byte token for.
    dropped: [bool; 256],
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let path = std::env::var_os("QUILL_FUZZ_TOKENIZER")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join("../models/bundles/smollm2-135m-instruct-int8/tokenizer.json")
            });
        let tok = if path.exists() {
            Tokenizer::from_file(&path).expect("loading the bundle's tokenizer")
        } else {
            eprintln!("{} not found: fuzzing the tiny vocabulary", path.display());
            let g = xtask::gguf::Gguf::parse(path.as_path(), quill_fuzz::tiny_gguf())
                .expect("the tiny checkpoint parses");
            let json = xtask::tokenizer_export::from_gguf(&g)
                .expect("tiny tokenizer")
                .json;
            Tokenizer::from_json(&json).expect("tiny tokenizer loads")
        };
        let mut dropped = [true; 256];
        for id in 0..tok.vocab_size() as u32 {
            if let [b] = tok.token_bytes(id)
                && !tok.is_special(id)
            {
                dropped[*b as usize] = false;
            }
        }
        let missing: Vec<String> = (0..256)
            .filter(|&b| dropped[b])
            .map(|b| format!("{b:02x}"))
            .collect();
        eprintln!("bytes without a token: {}", missing.join(" "));
        Fixture { tok, dropped }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode {
        0 | 1 => {
            let text = String::from_utf8_lossy(rest);
            let special = mode == 1;
            let ids = f.tok.encode(&text, special);
            for &id in &ids {
                assert!((id as usize) < f.tok.vocab_size(), "id {id} out of range");
                assert!(
                    special || !f.tok.is_special(id),
                    "user text became special {id}"
                );
            }
            let kept: Vec<u8> = text.bytes().filter(|&b| !f.dropped[b as usize]).collect();
            let expected = String::from_utf8_lossy(&kept);
            let got = f.tok.decode(&ids, false);
            assert_eq!(got, expected, "round trip of {text:?} via {ids:?}");
        }
        _ => {
            let ids: Vec<u32> = rest
                .chunks(4)
                .map(|c| {
                    let mut b = [0u8; 4];
                    b[..c.len()].copy_from_slice(c);
                    // Mostly ids in range, sometimes any u32.
                    let id = u32::from_le_bytes(b);
                    if mode & 2 == 0 {
                        id % (f.tok.vocab_size() as u32 + 8)
                    } else {
                        id
                    }
                })
                .collect();
            let all = f.tok.decode(&ids, false);
            let plain = f.tok.decode(&ids, true);
            assert!(plain.len() <= all.len() || all.contains('\u{fffd}'));
            for &id in &ids {
                let _ = f.tok.token_bytes(id);
                let _ = f.tok.is_special(id);
            }
        }
    }
});
