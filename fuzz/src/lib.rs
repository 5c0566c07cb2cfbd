//! Helpers shared by the fuzz targets: a tiny llama checkpoint written as GGUF, and the tiny
//! bundle `cargo xtask export` makes of it.
//!
//! The real teacher's bundle is 100+ MB; loading it takes seconds, so the bundle loader could not
//! be fuzzed with it. The tiny model has the teacher's structure (one block, grouped-query
//! attention, SwiGLU, tied embeddings, a byte-level BPE vocabulary with ChatML markers, int8
//! weights with every rotation) at a width of 32, so the exporter writes the same kind of graph
//! in a few kilobytes, and tract loads it in milliseconds.

use std::path::{Path, PathBuf};

use xtask::export::{ExportOptions, QuantOptions, WeightFormat};

/// The tiny model's shape.
pub const D_MODEL: usize = 32;
pub const N_HEADS: usize = 2;
pub const N_KV_HEADS: usize = 1;
pub const HEAD_DIM: usize = D_MODEL / N_HEADS;
pub const D_FF: usize = 64;
pub const CONTEXT: usize = 64;

/// GPT-2's reversible map from bytes to printable characters (as in `quill::tokenizer`).
pub fn bytes_to_unicode() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        map[b as usize] = if printable {
            char::from_u32(b).unwrap_or('?')
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('?')
        };
    }
    map
}

/// Writes GGUF (version 3) by hand: just enough of the format for the tiny checkpoint.
struct GgufWriter {
    kv: Vec<u8>,
    n_kv: u64,
    /// (name, ne, f32 data)
    tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
}

impl GgufWriter {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    fn key(&mut self, k: &str, ty: u32) {
        Self::string(&mut self.kv, k);
        self.kv.extend(ty.to_le_bytes());
        self.n_kv += 1;
    }
    fn str(&mut self, k: &str, v: &str) {
        self.key(k, 8);
        Self::string(&mut self.kv, v);
    }
    fn u32(&mut self, k: &str, v: u32) {
        self.key(k, 4);
        self.kv.extend(v.to_le_bytes());
    }
    fn f32(&mut self, k: &str, v: f32) {
        self.key(k, 6);
        self.kv.extend(v.to_le_bytes());
    }
    fn strs(&mut self, k: &str, v: &[String]) {
        self.key(k, 9);
        self.kv.extend(8u32.to_le_bytes());
        self.kv.extend((v.len() as u64).to_le_bytes());
        for s in v {
            Self::string(&mut self.kv, s);
        }
    }
    fn i32s(&mut self, k: &str, v: &[i32]) {
        self.key(k, 9);
        self.kv.extend(5u32.to_le_bytes());
        self.kv.extend((v.len() as u64).to_le_bytes());
        for x in v {
            self.kv.extend(x.to_le_bytes());
        }
    }
    fn finish(self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend(self.n_kv.to_le_bytes());
        out.extend(&self.kv);
        let mut offset = 0u64;
        for (name, ne, data) in &self.tensors {
            Self::string(&mut out, name);
            out.extend((ne.len() as u32).to_le_bytes());
            for &d in ne {
                out.extend((d as u64).to_le_bytes());
            }
            out.extend(0u32.to_le_bytes()); // F32
            out.extend(offset.to_le_bytes());
            offset += (data.len() * 4).next_multiple_of(32) as u64;
        }
        out.resize(out.len().next_multiple_of(32), 0);
        for (_, _, data) in &self.tensors {
            let start = out.len();
            out.extend(data.iter().flat_map(|x| x.to_le_bytes()));
            out.resize(start + (data.len() * 4).next_multiple_of(32), 0);
        }
        out
    }
}

/// The tiny checkpoint's vocabulary: the 256 byte tokens, a few merges, ChatML's markers.
fn vocabulary() -> (Vec<String>, Vec<i32>, Vec<String>) {
    let enc = bytes_to_unicode();
    let mut tokens: Vec<String> = enc.iter().map(|c| c.to_string()).collect();
    let merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a")];
    let mut merge_lines = Vec::new();
    for (a, b) in merges {
        tokens.push(format!("{a}{b}"));
        merge_lines.push(format!("{a} {b}"));
    }
    let mut types = vec![1; tokens.len()];
    for special in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] {
        tokens.push(special.to_string());
        types.push(3);
    }
    (tokens, types, merge_lines)
}

/// A tiny llama checkpoint in GGUF, F32 tensors, deterministic weights.
pub fn tiny_gguf() -> Vec<u8> {
    let (tokens, types, merges) = vocabulary();
    let vocab = tokens.len();
    let mut w = GgufWriter {
        kv: Vec::new(),
        n_kv: 0,
        tensors: Vec::new(),
    };
    w.str("general.architecture", "llama");
    w.str("general.name", "quill fuzz tiny");
    w.u32("llama.block_count", 1);
    w.u32("llama.context_length", CONTEXT as u32);
    w.u32("llama.embedding_length", D_MODEL as u32);
    w.u32("llama.feed_forward_length", D_FF as u32);
    w.u32("llama.attention.head_count", N_HEADS as u32);
    w.u32("llama.attention.head_count_kv", N_KV_HEADS as u32);
    w.f32("llama.rope.freq_base", 10_000.0);
    w.f32("llama.attention.layer_norm_rms_epsilon", 1e-5);
    w.str("tokenizer.ggml.model", "gpt2");
    w.str("tokenizer.ggml.pre", "smollm");
    w.strs("tokenizer.ggml.tokens", &tokens);
    w.i32s("tokenizer.ggml.token_type", &types);
    w.strs("tokenizer.ggml.merges", &merges);
    w.u32("tokenizer.ggml.eos_token_id", (vocab - 1) as u32);
    w.str(
        "tokenizer.chat_template",
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n\
         {% endfor %}<|im_start|>system\nYou are tiny.<|im_end|>",
    );
    // xorshift: small, reproducible, not all equal.
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let mut rand = |n: usize, scale: f32| -> Vec<f32> {
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
            })
            .collect()
    };
    let (d, q, kv, ff) = (D_MODEL, N_HEADS * HEAD_DIM, N_KV_HEADS * HEAD_DIM, D_FF);
    let mut t = |name: &str, ne: Vec<usize>, data: Vec<f32>| {
        w.tensors.push((name.to_string(), ne, data));
    };
    t("token_embd.weight", vec![d, vocab], rand(d * vocab, 1.0));
    t("blk.0.attn_norm.weight", vec![d], vec![1.0; d]);
    t("blk.0.attn_q.weight", vec![d, q], rand(d * q, 0.3));
    t("blk.0.attn_k.weight", vec![d, kv], rand(d * kv, 0.3));
    t("blk.0.attn_v.weight", vec![d, kv], rand(d * kv, 0.3));
    t("blk.0.attn_output.weight", vec![q, d], rand(q * d, 0.3));
    t("blk.0.ffn_norm.weight", vec![d], vec![1.0; d]);
    t("blk.0.ffn_gate.weight", vec![d, ff], rand(d * ff, 0.3));
    t("blk.0.ffn_up.weight", vec![d, ff], rand(d * ff, 0.3));
    t("blk.0.ffn_down.weight", vec![ff, d], rand(ff * d, 0.3));
    t("output_norm.weight", vec![d], vec![1.0; d]);
    w.finish()
}

/// Exports the tiny checkpoint (int8, the default export) into `<work>/bundle`; returns that
/// directory. `work` must exist.
pub fn tiny_bundle(work: &Path) -> PathBuf {
    let teacher = work.join("tiny.gguf");
    std::fs::write(&teacher, tiny_gguf()).expect("writing the tiny checkpoint");
    let out_dir = work.join("bundle");
    xtask::export::export(&ExportOptions {
        teacher,
        out_dir: out_dir.clone(),
        name: "fuzz-tiny-int8".to_string(),
        quant: QuantOptions::new(WeightFormat::Int8),
        blocks: None,
    })
    .expect("exporting the tiny bundle");
    out_dir
}

/// A fresh directory under the system's temporary directory, unique to this process.
pub fn scratch_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("quill-fuzz-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating a scratch directory");
    dir
}
