//! Byte-level BPE (GPT-2 family), read from the bundle's `tokenizer.json`.
//!
//! Encoding: special tokens are matched first; the text between them is split by the
//! pre-tokenizer (optionally every digit on its own, then GPT-2's regex), each piece is mapped
//! byte by byte to the 256 base tokens and merged by rank. Decoding maps ids back to bytes, so any
//! UTF-8 text round-trips, including a character whose bytes land in different tokens.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::path::Path;

use regex::Regex;
use serde_json::Value;

use crate::error::BundleError;

pub type TokenId = u32;

/// GPT-2's regex without its `\s+(?!\S)` look-ahead, which the `regex` crate lacks; the
/// look-ahead is applied by hand in [`Tokenizer::split_gpt2`].
const GPT2_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+";

/// GPT-2's reversible map from bytes to printable characters.
#[expect(clippy::indexing_slicing, reason = "b < 256 indexes a 256-entry array")]
#[expect(
    clippy::expect_used,
    reason = "code points below 512 are all valid chars"
)]
fn bytes_to_unicode() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        map[b as usize] = if printable {
            char::from_u32(b).expect("latin-1")
        } else {
            n += 1;
            char::from_u32(255 + n).expect("valid code point")
        };
    }
    map
}

/// FxHash (rustc's hash): one rotate, xor and multiply per 8 bytes, against SipHash's rounds.
/// The tables it keys are built from the bundle's vocabulary (checked against the manifest's
/// CRC-32); user text only looks keys up, so there is nothing for it to flood. With it (and
/// a table in place of a map from chars to bytes) the teacher's tables build in about 30 ms
/// instead of about 40 (`BENCHMARKS.md`, session 16).
#[derive(Default)]
struct Fx(u64);

impl Fx {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for Fx {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let (words, rest) = bytes.as_chunks::<8>();
        for w in words {
            self.add(u64::from_le_bytes(*w));
        }
        if !rest.is_empty() {
            let mut last = [0u8; 8];
            for (l, &r) in last.iter_mut().zip(rest) {
                *l = r;
            }
            self.add(u64::from_le_bytes(last));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(i.into());
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(i.into());
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<Fx>>;

#[derive(Debug, Clone)]
pub struct Tokenizer {
    /// id → the bytes it stands for (special tokens: their text).
    bytes: Vec<Vec<u8>>,
    /// id → true for special (control) tokens.
    special: Vec<bool>,
    /// byte → id of its single-byte token. Some vocabularies lack a few (SmolLM2 has no token
    /// for the control bytes 0x04, 0x06, 0x13, 0x14, 0x16, 0x1d, nor for bytes that never occur
    /// in UTF-8); like Hugging Face `tokenizers` without an unknown token, they are dropped.
    byte_ids: [Option<TokenId>; 256],
    /// (left, right) → (rank, merged id).
    merges: FxMap<(TokenId, TokenId), (u32, TokenId)>,
    /// Added tokens matched verbatim in the input, longest first.
    added: Vec<(String, TokenId)>,
    split_digits: bool,
    regex: Regex,
}

fn bad(path: &Path, reason: impl Into<String>) -> BundleError {
    BundleError::BadTokenizer {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Tokenizer, BundleError> {
        let text = std::fs::read_to_string(path).map_err(|source| BundleError::Io {
            path: path.to_owned(),
            source,
        })?;
        let json: Value = serde_json::from_str(&text).map_err(|e| bad(path, e.to_string()))?;
        Self::from_json(&json).map_err(|reason| bad(path, reason))
    }

    /// Builds a tokenizer from a parsed Hugging Face `tokenizer.json`.
    #[expect(
        clippy::indexing_slicing,
        reason = "ids are checked < n, the length of bytes and special, before use; b < 256; p.len() == 2 is matched"
    )]
    pub fn from_json(json: &Value) -> Result<Tokenizer, String> {
        let model = &json["model"];
        if model["type"] != "BPE" {
            return Err(format!("model type is {}, expected \"BPE\"", model["type"]));
        }
        let vocab = model["vocab"]
            .as_object()
            .ok_or("model.vocab is not an object")?;
        let n = vocab.len();
        // char → byte, indexed by code point (the 256 chars stand below U+0144).
        let mut decode_map = [None; 0x144];
        for (b, &c) in bytes_to_unicode().iter().enumerate() {
            if let Some(slot) = decode_map.get_mut(c as usize) {
                *slot = Some(b as u8);
            }
        }
        let mut bytes = vec![Vec::new(); n];
        let mut ids: FxMap<&str, TokenId> = FxMap::with_capacity_and_hasher(n, Default::default());
        for (tok, id) in vocab {
            let id = id
                .as_u64()
                .filter(|&i| (i as usize) < n)
                .ok_or("vocab id out of range")? as usize;
            // Added tokens below are not byte-level encoded; their bytes are set there.
            bytes[id] = tok
                .chars()
                .map(|c| {
                    decode_map
                        .get(c as usize)
                        .copied()
                        .flatten()
                        .unwrap_or(b'?')
                })
                .collect();
            ids.insert(tok.as_str(), id as TokenId);
        }
        let mut special = vec![false; n];
        let mut added = Vec::new();
        for t in json["added_tokens"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[])
        {
            let id = t["id"]
                .as_u64()
                .filter(|&i| (i as usize) < n)
                .ok_or("added token id out of range")?;
            let content = t["content"].as_str().ok_or("added token without content")?;
            bytes[id as usize] = content.as_bytes().to_vec();
            special[id as usize] = t["special"].as_bool().unwrap_or(false);
            added.push((content.to_string(), id as TokenId));
        }
        added.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));

        let enc = bytes_to_unicode();
        let mut byte_ids = [None; 256];
        for b in 0..256 {
            byte_ids[b] = ids.get(enc[b].to_string().as_str()).copied();
        }
        if byte_ids.iter().flatten().count() < 128 {
            return Err(
                "fewer than 128 of the 256 byte tokens are in the vocabulary: not a byte-level BPE"
                    .into(),
            );
        }
        let mut merges = FxMap::default();
        let mut merged = String::new();
        for (rank, m) in model["merges"]
            .as_array()
            .ok_or("model.merges is not an array")?
            .iter()
            .enumerate()
        {
            let (a, b) = match m {
                Value::String(s) => s
                    .split_once(' ')
                    .ok_or_else(|| format!("bad merge {s:?}"))?,
                Value::Array(p) if p.len() == 2 => (
                    p[0].as_str().ok_or("bad merge pair")?,
                    p[1].as_str().ok_or("bad merge pair")?,
                ),
                other => return Err(format!("bad merge {other}")),
            };
            merged.clear();
            merged.push_str(a);
            merged.push_str(b);
            let (Some(&ia), Some(&ib), Some(&im)) =
                (ids.get(a), ids.get(b), ids.get(merged.as_str()))
            else {
                return Err(format!(
                    "merge {a:?} {b:?} refers to tokens missing from the vocabulary"
                ));
            };
            merges.entry((ia, ib)).or_insert((rank as u32, im));
        }

        let pre = &json["pre_tokenizer"];
        let parts: Vec<&Value> = match pre["type"].as_str() {
            Some("Sequence") => pre["pretokenizers"]
                .as_array()
                .ok_or("bad pre_tokenizer")?
                .iter()
                .collect(),
            Some(_) => vec![pre],
            None => return Err("no pre_tokenizer".into()),
        };
        let mut split_digits = false;
        for p in parts {
            match p["type"].as_str() {
                Some("Digits") if p["individual_digits"] == true => split_digits = true,
                Some("ByteLevel") if p["add_prefix_space"] != true => {}
                other => return Err(format!("unsupported pre-tokenizer {other:?} in {p}")),
            }
        }
        let regex = Regex::new(GPT2_PATTERN).map_err(|e| e.to_string())?;
        Ok(Tokenizer {
            bytes,
            special,
            byte_ids,
            merges,
            added,
            split_digits,
            regex,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.bytes.len()
    }

    /// The id of a token given by its text (special tokens or plain ones).
    pub fn token_id(&self, text: &str) -> Option<TokenId> {
        if let Some((_, id)) = self.added.iter().find(|(s, _)| s == text) {
            return Some(*id);
        }
        let ids = self.encode(text, false);
        match ids.as_slice() {
            &[id] => Some(id),
            _ => None,
        }
    }

    pub fn is_special(&self, id: TokenId) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// The bytes a token stands for (a special token: its text). Empty for unknown ids.
    pub fn token_bytes(&self, id: TokenId) -> &[u8] {
        self.bytes
            .get(id as usize)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Encodes `text`. With `parse_special`, the text of added tokens (e.g. `<|im_start|>`)
    /// becomes those tokens; without, it is encoded as plain text (what user input needs).
    pub fn encode(&self, text: &str, parse_special: bool) -> Vec<TokenId> {
        let mut out = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let next = if parse_special {
                self.added
                    .iter()
                    .filter_map(|(s, id)| rest.find(s.as_str()).map(|i| (i, s.len(), *id)))
                    .min_by_key(|&(i, len, _)| (i, std::cmp::Reverse(len)))
            } else {
                None
            };
            match next {
                Some((i, len, id)) => {
                    self.encode_plain(&rest[..i], &mut out);
                    out.push(id);
                    rest = &rest[i + len..];
                }
                None => {
                    self.encode_plain(rest, &mut out);
                    rest = "";
                }
            }
        }
        out
    }

    fn encode_plain(&self, text: &str, out: &mut Vec<TokenId>) {
        if !self.split_digits {
            return self.split_gpt2(text, out);
        }
        // Every numeric character is a piece of its own; the runs between them go to the regex.
        let mut start = 0;
        for (i, c) in text.char_indices() {
            if c.is_numeric() {
                self.split_gpt2(&text[start..i], out);
                self.bpe(&text[i..i + c.len_utf8()], out);
                start = i + c.len_utf8();
            }
        }
        self.split_gpt2(&text[start..], out);
    }

    /// GPT-2's pre-tokenizer regex, including its `\s+(?!\S)` rule: a run of whitespace followed
    /// by a non-space leaves its last character to start the next word.
    #[expect(
        clippy::expect_used,
        reason = "the pattern matches any character, so find_at before the end always matches; a match is never empty"
    )]
    fn split_gpt2(&self, text: &str, out: &mut Vec<TokenId>) {
        let mut pos = 0;
        while pos < text.len() {
            let m = self
                .regex
                .find_at(text, pos)
                .expect("the last alternative matches any whitespace, the others any other char");
            let mut end = m.end();
            let piece = m.as_str();
            if end < text.len() && piece.chars().all(char::is_whitespace) {
                let last = piece.chars().next_back().expect("non-empty match");
                if piece.len() > last.len_utf8() {
                    end -= last.len_utf8();
                }
            }
            self.bpe(&text[pos..end], out);
            pos = end;
        }
    }

    /// Merges the bytes of one pre-tokenized piece, lowest rank first (leftmost on ties).
    #[expect(
        clippy::indexing_slicing,
        reason = "a byte indexes the 256-entry table; i is a window index, so i + 1 < syms.len()"
    )]
    fn bpe(&self, piece: &str, out: &mut Vec<TokenId>) {
        if piece.is_empty() {
            return;
        }
        let mut syms: Vec<TokenId> = piece
            .bytes()
            .filter_map(|b| self.byte_ids[b as usize])
            .collect();
        loop {
            let best = syms
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| {
                    self.merges
                        .get(&(w[0], w[1]))
                        .map(|&(rank, id)| (rank, i, id))
                })
                .min();
            let Some((_, i, id)) = best else { break };
            syms[i] = id;
            syms.remove(i + 1);
        }
        out.extend_from_slice(&syms);
    }

    /// Decodes ids to text (invalid UTF-8 becomes U+FFFD); special tokens are kept as their text
    /// unless `skip_special`.
    pub fn decode(&self, ids: &[TokenId], skip_special: bool) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            if !(skip_special && self.is_special(id)) {
                bytes.extend_from_slice(self.token_bytes(id));
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A tiny tokenizer: the 256 byte tokens, plus merges "Ġ t" and "Ġt h".
    fn tiny() -> Tokenizer {
        let enc = bytes_to_unicode();
        let mut vocab = serde_json::Map::new();
        for (i, c) in enc.iter().enumerate() {
            vocab.insert(c.to_string(), json!(i));
        }
        vocab.insert("Ġt".into(), json!(256));
        vocab.insert("Ġth".into(), json!(257));
        vocab.insert("<|end|>".into(), json!(258));
        let j = json!({
            "added_tokens": [{"id": 258, "content": "<|end|>", "special": true}],
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, {"type": "ByteLevel"}]},
            "model": {"type": "BPE", "vocab": vocab, "merges": ["Ġ t", "Ġt h"]}
        });
        Tokenizer::from_json(&j).unwrap()
    }

    #[test]
    fn merges_and_special_tokens() {
        let t = tiny();
        assert_eq!(t.encode(" th", false), vec![257]);
        assert_eq!(t.encode("a<|end|>", true), vec![b'a' as u32, 258]);
        assert_eq!(t.encode("<|end|>", false).len(), 7);
        assert_eq!(t.decode(&[257, 258], true), " th");
    }

    #[test]
    fn whitespace_lookahead_and_digits() {
        let t = tiny();
        // "  th": the first space stands alone, the second starts " th".
        let ids = t.encode("  th", false);
        assert_eq!(ids, vec![t.byte_ids[b' ' as usize].unwrap(), 257]);
        // Digits split one by one, even inside a word.
        assert_eq!(t.encode("12", false).len(), 2);
    }

    #[test]
    fn round_trips_any_utf8() {
        let t = tiny();
        for s in [
            "héllo wörld",
            "日本語 🙂\n\n\tx",
            "  trailing  ",
            "a\u{0301}b",
        ] {
            assert_eq!(t.decode(&t.encode(s, false), false), s);
        }
    }
}
