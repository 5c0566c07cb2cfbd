//! Llama-family hyper-parameters and weights read from a GGUF checkpoint.
//!
//! llama.cpp's converter permutes the rows of the Q and K projections so that RoPE rotates
//! adjacent pairs `(x[2i], x[2i+1])`. quill's graph uses the original "rotate half" layout
//! (`x[i]` with `x[i + head_dim/2]`), so [`unpermute_rope_rows`] swaps the rows back.

use anyhow::{Context, Result, ensure};

use crate::gguf::Gguf;

/// The longest context a checkpoint may declare (2^20 tokens); more is taken for corruption.
const MAX_CONTEXT: u64 = 1 << 20;

/// The shape of a llama-style decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub n_layers: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub d_ff: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    pub rope_theta: f32,
    pub rms_eps: f32,
    /// True when the checkpoint has no separate `output.weight` (lm_head = embedding).
    pub tied_embeddings: bool,
}

impl LlamaConfig {
    pub fn from_gguf(g: &Gguf) -> Result<LlamaConfig> {
        let arch = g.meta_str("general.architecture")?;
        ensure!(
            arch == "llama",
            "{}: architecture is {arch:?}; quill exports llama-family decoders (\"llama\")",
            g.path.display()
        );
        let key = |k: &str| format!("llama.{k}");
        let d_model = g.meta_u64(&key("embedding_length"))? as usize;
        let n_heads = g.meta_u64(&key("attention.head_count"))? as usize;
        let n_kv_heads = g
            .meta_u64(&key("attention.head_count_kv"))
            .map(|v| v as usize)
            .unwrap_or(n_heads);
        let vocab_size = match g.meta_u64(&key("vocab_size")) {
            Ok(v) => v as usize,
            Err(_) => g
                .meta("tokenizer.ggml.tokens")?
                .as_array()
                .context("tokenizer.ggml.tokens is not an array")?
                .len(),
        };
        // Everything below divides by the head counts or sizes buffers by these numbers: a
        // corrupt value is an error here, not a division by zero or an allocation of terabytes.
        ensure!(
            n_heads >= 1 && n_kv_heads >= 1 && d_model >= 1,
            "{}: {n_heads} attention heads, {n_kv_heads} key/value heads, width {d_model}: \
             expected at least 1 of each (the metadata is corrupt)",
            g.path.display()
        );
        let context_length = g.meta_u64(&key("context_length"))?;
        ensure!(
            (1..=MAX_CONTEXT).contains(&context_length),
            "{}: context length {context_length}, expected 1 to {MAX_CONTEXT} (the rotary tables \
             and the KV cache are sized by it; the metadata is corrupt)",
            g.path.display()
        );
        let cfg = LlamaConfig {
            n_layers: g.meta_u64(&key("block_count"))? as usize,
            d_model,
            n_heads,
            n_kv_heads,
            head_dim: d_model / n_heads,
            d_ff: g.meta_u64(&key("feed_forward_length"))? as usize,
            vocab_size,
            context_length: context_length as usize,
            rope_theta: g.meta_f64(&key("rope.freq_base")).unwrap_or(10_000.0) as f32,
            rms_eps: g.meta_f64(&key("attention.layer_norm_rms_epsilon"))? as f32,
            tied_embeddings: !g.tensors.contains_key("output.weight"),
        };
        ensure!(
            n_heads.is_multiple_of(n_kv_heads) && d_model.is_multiple_of(n_heads),
            "inconsistent heads: {n_heads} query heads, {n_kv_heads} key/value heads, width {d_model}"
        );
        if let Ok(rot) = g.meta_u64(&key("rope.dimension_count")) {
            ensure!(
                rot as usize == cfg.head_dim,
                "partial rotary embeddings ({rot} of {} dims) are not supported",
                cfg.head_dim
            );
        }
        Ok(cfg)
    }

    pub fn n_params(&self) -> usize {
        let attn = self.d_model * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads);
        let ffn = 3 * self.d_model * self.d_ff;
        let emb = self.vocab_size * self.d_model;
        self.n_layers * (attn + ffn + 2 * self.d_model)
            + emb * if self.tied_embeddings { 1 } else { 2 }
            + self.d_model
    }
}

/// A `(rows, cols)` row-major float matrix; for a linear layer rows = out, cols = in.
#[derive(Debug, Clone)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Matrix {
    pub fn transposed(&self) -> Matrix {
        let mut data = vec![0f32; self.data.len()];
        for r in 0..self.rows {
            for c in 0..self.cols {
                data[c * self.rows + r] = self.data[r * self.cols + c];
            }
        }
        Matrix {
            rows: self.cols,
            cols: self.rows,
            data,
        }
    }
}

/// One decoder block, weights in PyTorch layout `(out, in)`, Q/K rows in rotate-half order.
#[derive(Debug, Clone)]
pub struct Block {
    pub attn_norm: Vec<f32>,
    pub wq: Matrix,
    pub wk: Matrix,
    pub wv: Matrix,
    pub wo: Matrix,
    pub ffn_norm: Vec<f32>,
    pub w_gate: Matrix,
    pub w_up: Matrix,
    pub w_down: Matrix,
}

/// All weights of a llama decoder, dequantized to float32.
#[derive(Debug, Clone)]
pub struct LlamaWeights {
    pub config: LlamaConfig,
    /// (vocab, d_model)
    pub embedding: Matrix,
    pub blocks: Vec<Block>,
    pub output_norm: Vec<f32>,
    /// (vocab, d_model); a copy of `embedding` when tied.
    pub lm_head: Matrix,
}

fn matrix(g: &Gguf, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
    let info = g.info(name)?;
    ensure!(
        info.ne == [cols, rows],
        "tensor {name} has dims {:?}, expected [{cols}, {rows}]",
        info.ne
    );
    Ok(Matrix {
        rows,
        cols,
        data: g.f32(name)?,
    })
}

fn vector(g: &Gguf, name: &str, n: usize) -> Result<Vec<f32>> {
    let v = g.f32(name)?;
    ensure!(
        v.len() == n,
        "tensor {name} has {} elements, expected {n}",
        v.len()
    );
    Ok(v)
}

/// Undoes llama.cpp's Q/K row permutation for `n_heads` heads of `head_dim` rows each.
///
/// Per head the GGUF rows are ordered `(head_dim/2, 2)`; the original order is `(2, head_dim/2)`:
/// original row `h·hd + half·hd/2 + i` is GGUF row `h·hd + 2i + half`.
pub fn unpermute_rope_rows(m: &Matrix, n_heads: usize) -> Matrix {
    move_rope_rows(m, n_heads, |orig, gguf| (orig, gguf))
}

/// llama.cpp's permutation (`convert_hf_to_gguf.py`'s `permute`), the inverse of
/// [`unpermute_rope_rows`]; used by tests.
pub fn permute_rope_rows(m: &Matrix, n_heads: usize) -> Matrix {
    move_rope_rows(m, n_heads, |orig, gguf| (gguf, orig))
}

/// Copies every row between its original and its GGUF position; `dst_src` picks the direction
/// from `(original row, GGUF row)`.
fn move_rope_rows(
    m: &Matrix,
    n_heads: usize,
    dst_src: impl Fn(usize, usize) -> (usize, usize),
) -> Matrix {
    let hd = m.rows / n_heads;
    let mut out = vec![0f32; m.data.len()];
    for h in 0..n_heads {
        for half in 0..2 {
            for i in 0..hd / 2 {
                let (dst, src) = dst_src(h * hd + half * hd / 2 + i, h * hd + 2 * i + half);
                out[dst * m.cols..(dst + 1) * m.cols]
                    .copy_from_slice(&m.data[src * m.cols..(src + 1) * m.cols]);
            }
        }
    }
    Matrix {
        rows: m.rows,
        cols: m.cols,
        data: out,
    }
}

impl LlamaWeights {
    /// Reads and dequantizes every weight; `rope_layout_fix` un-permutes Q and K rows.
    pub fn from_gguf(g: &Gguf, rope_layout_fix: bool) -> Result<LlamaWeights> {
        let c = LlamaConfig::from_gguf(g)?;
        let (d, hd) = (c.d_model, c.head_dim);
        let embedding = matrix(g, "token_embd.weight", c.vocab_size, d)?;
        // Every block is 9 tensors of the file: a block count beyond that is corrupt metadata,
        // reported by the first missing tensor rather than by reserving room for it.
        let mut blocks = Vec::with_capacity(c.n_layers.min(g.tensors.len() / 9));
        for l in 0..c.n_layers {
            let n = |s: &str| format!("blk.{l}.{s}.weight");
            let mut wq = matrix(g, &n("attn_q"), c.n_heads * hd, d)?;
            let mut wk = matrix(g, &n("attn_k"), c.n_kv_heads * hd, d)?;
            if rope_layout_fix {
                wq = unpermute_rope_rows(&wq, c.n_heads);
                wk = unpermute_rope_rows(&wk, c.n_kv_heads);
            }
            blocks.push(Block {
                attn_norm: vector(g, &n("attn_norm"), d)?,
                wq,
                wk,
                wv: matrix(g, &n("attn_v"), c.n_kv_heads * hd, d)?,
                wo: matrix(g, &n("attn_output"), d, c.n_heads * hd)?,
                ffn_norm: vector(g, &n("ffn_norm"), d)?,
                w_gate: matrix(g, &n("ffn_gate"), c.d_ff, d)?,
                w_up: matrix(g, &n("ffn_up"), c.d_ff, d)?,
                w_down: matrix(g, &n("ffn_down"), d, c.d_ff)?,
            });
        }
        let lm_head = if c.tied_embeddings {
            embedding.clone()
        } else {
            matrix(g, "output.weight", c.vocab_size, d)?
        };
        Ok(LlamaWeights {
            output_norm: vector(g, "output_norm.weight", d)?,
            config: c,
            embedding,
            blocks,
            lm_head,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// A llama GGUF with u32 metadata `kv` (after the architecture) and one F32 tensor,
    /// `token_embd.weight` of 4 × 8 zeros.
    fn gguf(kv: &[(&str, u32)]) -> Gguf {
        let string = |b: &mut Vec<u8>, s: &str| {
            b.extend((s.len() as u64).to_le_bytes());
            b.extend(s.as_bytes());
        };
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(1u64.to_le_bytes()); // tensors
        b.extend((kv.len() as u64 + 1).to_le_bytes());
        string(&mut b, "general.architecture");
        b.extend(8u32.to_le_bytes());
        string(&mut b, "llama");
        for (k, v) in kv {
            string(&mut b, k);
            b.extend(4u32.to_le_bytes());
            b.extend(v.to_le_bytes());
        }
        string(&mut b, "token_embd.weight");
        b.extend(2u32.to_le_bytes());
        b.extend(4u64.to_le_bytes());
        b.extend(8u64.to_le_bytes());
        b.extend(0u32.to_le_bytes()); // F32
        b.extend(0u64.to_le_bytes());
        b.resize(b.len().next_multiple_of(32) + 4 * 32, 0);
        Gguf::parse(Path::new("x.gguf"), b).unwrap()
    }

    /// Regressions from the GGUF fuzz target: a zero head count divided by zero, a huge block
    /// count reserved room for that many blocks.
    #[test]
    fn corrupt_hyper_parameters_are_errors() {
        let base = [
            ("llama.embedding_length", 4),
            ("llama.attention.head_count", 2),
            ("llama.vocab_size", 8),
            ("llama.block_count", 1),
            ("llama.feed_forward_length", 8),
            ("llama.context_length", 16),
            ("llama.attention.layer_norm_rms_epsilon", 0),
        ];
        let with = |k: &str, v: u32| {
            let kv: Vec<(&str, u32)> = base
                .iter()
                .map(|&(bk, bv)| (bk, if bk == k { v } else { bv }))
                .collect();
            gguf(&kv)
        };
        let err = |g: &Gguf| format!("{:#}", LlamaWeights::from_gguf(g, true).err().unwrap());
        // The base file is fine up to the first block's missing tensors.
        assert!(err(&with("", 0)).contains("blk.0.attn_q.weight is missing"));
        assert!(err(&with("llama.attention.head_count", 0)).contains("0 attention heads"));
        assert!(err(&with("llama.context_length", 0)).contains("context length 0"));
        let e = err(&with("llama.block_count", u32::MAX));
        assert!(e.contains("blk.0.attn_q.weight is missing"), "{e}");
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        let m = Matrix {
            rows: 16,
            cols: 3,
            data: (0..48).map(|x| x as f32).collect(),
        };
        let p = permute_rope_rows(&m, 2);
        assert_ne!(p.data, m.data);
        assert_eq!(unpermute_rope_rows(&p, 2).data, m.data);
        // Head 0, half 1, i 0 (original row 4) sits at GGUF row 1.
        assert_eq!(&p.data[3..6], &m.data[12..15]);
    }
}
