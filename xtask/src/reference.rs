//! A plain-Rust float32 forward pass of a llama GGUF, independent of the exported graph.
//!
//! It works on the weights exactly as llama.cpp stores them: Q/K rows in llama.cpp's permuted
//! order, with RoPE rotating adjacent pairs `(x[2i], x[2i+1])` as llama.cpp does. The exporter
//! instead un-permutes the rows and rotates halves; agreement between the two is the proof that
//! the un-permutation is right. Written for clarity, not speed (about 1 s per 16 tokens).

use crate::llama::{LlamaWeights, Matrix};

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight partial sums so the compiler can vectorize.
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for i in 0..chunks {
        for j in 0..8 {
            acc[j] += a[i * 8 + j] * b[i * 8 + j];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        s += a[i] * b[i];
    }
    s
}

/// `W x` for a PyTorch-layout `(out, in)` matrix.
fn matvec(w: &Matrix, x: &[f32]) -> Vec<f32> {
    (0..w.rows)
        .map(|r| dot(&w.data[r * w.cols..(r + 1) * w.cols], x))
        .collect()
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, g)| v * r * g).collect()
}

/// llama.cpp's "normal" RoPE on one head: rotates adjacent pairs.
fn rope_pairs(x: &mut [f32], pos: usize, theta: f32) {
    let hd = x.len();
    for i in 0..hd / 2 {
        let freq = (theta as f64).powf(-(2.0 * i as f64) / hd as f64);
        let (s, c) = (pos as f64 * freq).sin_cos();
        let (a, b) = (x[2 * i], x[2 * i + 1]);
        x[2 * i] = a * c as f32 - b * s as f32;
        x[2 * i + 1] = a * s as f32 + b * c as f32;
    }
}

/// Logits for every position of `tokens`, (n, vocab) row-major. `w` must be loaded without the
/// RoPE layout fix (`LlamaWeights::from_gguf(g, false)`).
pub fn forward(w: &LlamaWeights, tokens: &[u32]) -> Vec<f32> {
    let c = &w.config;
    let (d, hd, nh, nkv) = (c.d_model, c.head_dim, c.n_heads, c.n_kv_heads);
    let group = nh / nkv;
    let n = tokens.len();
    // (n, D)
    let mut x: Vec<Vec<f32>> = tokens
        .iter()
        .map(|&t| w.embedding.data[t as usize * d..(t as usize + 1) * d].to_vec())
        .collect();
    for blk in &w.blocks {
        // Per position: q (H·hd), k and v (KV·hd).
        let mut qs = Vec::with_capacity(n);
        let mut ks = Vec::with_capacity(n);
        let mut vs = Vec::with_capacity(n);
        for (pos, xt) in x.iter().enumerate() {
            let h = rms_norm(xt, &blk.attn_norm, c.rms_eps);
            let mut q = matvec(&blk.wq, &h);
            let mut k = matvec(&blk.wk, &h);
            for head in q.chunks_mut(hd) {
                rope_pairs(head, pos, c.rope_theta);
            }
            for head in k.chunks_mut(hd) {
                rope_pairs(head, pos, c.rope_theta);
            }
            qs.push(q);
            ks.push(k);
            vs.push(matvec(&blk.wv, &h));
        }
        for t in 0..n {
            let mut attn = vec![0f32; nh * hd];
            for h in 0..nh {
                let kvh = h / group;
                let q = &qs[t][h * hd..(h + 1) * hd];
                let scores: Vec<f32> = (0..=t)
                    .map(|s| dot(q, &ks[s][kvh * hd..(kvh + 1) * hd]) / (hd as f32).sqrt())
                    .collect();
                let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f32 = e.iter().sum();
                for (s, p) in e.iter().enumerate() {
                    let v = &vs[s][kvh * hd..(kvh + 1) * hd];
                    for i in 0..hd {
                        attn[h * hd + i] += p / sum * v[i];
                    }
                }
            }
            let o = matvec(&blk.wo, &attn);
            for i in 0..d {
                x[t][i] += o[i];
            }
            let h = rms_norm(&x[t], &blk.ffn_norm, c.rms_eps);
            let gate = matvec(&blk.w_gate, &h);
            let up = matvec(&blk.w_up, &h);
            let act: Vec<f32> = gate
                .iter()
                .zip(&up)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let down = matvec(&blk.w_down, &act);
            for i in 0..d {
                x[t][i] += down[i];
            }
        }
    }
    let mut logits = Vec::with_capacity(n * c.vocab_size);
    for xt in &x {
        let h = rms_norm(xt, &w.output_norm, c.rms_eps);
        logits.extend(matvec(&w.lm_head, &h));
    }
    logits
}
