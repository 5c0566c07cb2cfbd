//! Fake quantization: the int8 export's rounding, seen by the student while it heals.
//!
//! The int8 bundle ([`crate::quant`], [`crate::export`]) folds every RMSNorm gain into the
//! linears that read the norm, rotates the residual stream by a randomized Hadamard `Q` (order
//! D), each value head by `H` (order head_dim) and the input of `ffn_down` by `H_f` (order d_ff,
//! online), then rounds every block linear to int8 with one scale per output row and the input
//! of every linear to int8 with one scale per token (round to nearest, symmetric, 127 levels).
//!
//! With fake quantization on, the student's forward pass computes exactly those roundings — in
//! the rotated basis, mapped back — and the backward pass treats them as the identity (the
//! straight-through estimator):
//!
//! - weight `W` (folded with its gain `g` when it reads a norm), rotation `L·W·R`:
//!   `W_eff = W + stopgrad(Lᵀ·round(L·W·R)·Rᵀ − W)`, refreshed after every optimizer step;
//! - activation `x` entering a linear, rotation `R`: `x + stopgrad(round(x·R)·Rᵀ − x)`.
//!
//! Not simulated: the tied embedding and head weights (frozen during healing, so their int8
//! error is fixed; the head's *input* is fake-quantized like every other linear's).

use candle_core::{D, Device, Result, Tensor, Var};

use crate::llama::LlamaConfig;
use crate::quant::KronOrthogonal;

/// Which rotation an activation is quantized in.
#[derive(Debug, Clone, Copy)]
pub enum Site {
    /// The normed residual stream (inputs of wq/wk/wv, w_gate/w_up and the head): `Q`.
    Residual,
    /// The attention output (input of wo): `H` per head.
    AttentionOut,
    /// The FFN activation (input of w_down): `H_f`.
    Ffn,
}

/// A rotation as a dense matrix and its transpose.
struct Rot {
    m: Tensor,
    t: Tensor,
}

impl Rot {
    fn new(data: Vec<f32>, n: usize) -> Result<Rot> {
        let m = Tensor::from_vec(data, (n, n), &Device::Cpu)?;
        let t = m.t()?.contiguous()?;
        Ok(Rot { m, t })
    }
}

/// `K` as a dense row-major matrix: row `i` is `e_i · K`.
fn dense(k: &KronOrthogonal) -> Vec<f32> {
    let n = k.order();
    let mut m = vec![0f32; n * n];
    for (i, row) in m.chunks_exact_mut(n).enumerate() {
        row[i] = 1.0;
        k.apply(row);
    }
    m
}

/// `copies` copies of the `(k, k)` matrix `h` on the diagonal; `transpose` puts `hᵀ` there.
fn block_diag(h: &[f32], k: usize, copies: usize, transpose: bool) -> Vec<f32> {
    let n = k * copies;
    let mut m = vec![0f32; n * n];
    for c in 0..copies {
        for i in 0..k {
            for j in 0..k {
                let v = if transpose {
                    h[j * k + i]
                } else {
                    h[i * k + j]
                };
                m[(c * k + i) * n + c * k + j] = v;
            }
        }
    }
    m
}

/// Symmetric int8 rounding of each row of `t (…, n)` with the scale `max|row| / 127`, returned
/// dequantized (what the int8 graph computes with, in float).
pub fn round_rows(t: &Tensor) -> Result<Tensor> {
    let amax = t.abs()?.max_keepdim(D::Minus1)?.maximum(1e-12)?;
    let scale = (amax / 127.0)?;
    t.broadcast_div(&scale)?.round()?.broadcast_mul(&scale)
}

/// The rotations of one model's export, and the current weight corrections.
pub struct FakeQuant {
    residual: Rot,
    /// `Qᵀ`, the left factor of the writers into the residual stream (wo, w_down).
    residual_t: Rot,
    /// `H` per query head on the diagonal: (H·hd, H·hd).
    heads: Rot,
    /// `Hᵀ` per key/value head on the diagonal: (KV·hd, KV·hd), the left factor of `wv`.
    value_rows: Rot,
    ffn: Rot,
    /// (D) of ones: RMSNorm without a gain.
    pub ones: Tensor,
    /// Per block, `W_eff − W` for wq, wk, wv, wo, w_gate, w_up, w_down (readers folded with
    /// their gain); constants.
    deltas: Vec<[Tensor; 7]>,
}

impl FakeQuant {
    /// The rotations [`crate::quant::rotate`] applies with every rotation on and `seed`.
    pub fn new(c: &LlamaConfig, seed: u64) -> anyhow::Result<FakeQuant> {
        let (d, hd) = (c.d_model, c.head_dim);
        let q = KronOrthogonal::hadamard(d)?.with_random_signs(seed);
        let h = dense(&KronOrthogonal::hadamard(hd)?);
        let f = KronOrthogonal::hadamard(c.d_ff)?;
        let residual = Rot::new(dense(&q), d)?;
        Ok(FakeQuant {
            residual_t: Rot {
                m: residual.t.clone(),
                t: residual.m.clone(),
            },
            residual,
            heads: Rot::new(block_diag(&h, hd, c.n_heads, false), hd * c.n_heads)?,
            value_rows: Rot::new(block_diag(&h, hd, c.n_kv_heads, true), hd * c.n_kv_heads)?,
            ffn: Rot::new(dense(&f), c.d_ff)?,
            ones: Tensor::ones(d, candle_core::DType::F32, &Device::Cpu)?,
            deltas: Vec::new(),
        })
    }

    /// `x (N, n)` as the int8 graph sees it at `site`, with a straight-through gradient.
    pub fn activation(&self, x: &Tensor, site: Site) -> Result<Tensor> {
        let r = match site {
            Site::Residual => &self.residual,
            Site::AttentionOut => &self.heads,
            Site::Ffn => &self.ffn,
        };
        let xd = x.detach();
        let seen = round_rows(&xd.matmul(&r.m)?)?.matmul(&r.t)?;
        x + (seen - xd)?
    }

    /// `W_eff − W` for `W` rotated as `L·W·R` before rounding its rows.
    fn delta(w: &Tensor, left: Option<&Rot>, right: &Rot) -> Result<Tensor> {
        let w = w.detach();
        let mut x = w.matmul(&right.m)?;
        if let Some(l) = left {
            x = l.m.matmul(&x)?;
        }
        let mut back = round_rows(&x)?.matmul(&right.t)?;
        if let Some(l) = left {
            back = l.t.matmul(&back)?;
        }
        back - w
    }

    /// Recomputes every block's weight corrections from the current weights (after a step).
    /// `blocks` in [`super::model::BLOCK_TENSORS`] order.
    pub fn refresh(&mut self, blocks: &[[Var; 9]]) -> Result<()> {
        self.deltas = blocks
            .iter()
            .map(|b| {
                let (ga, gf) = (&b[0], &b[5]);
                let (q, qt) = (&self.residual, &self.residual_t);
                let (hv, ho, hf) = (&self.value_rows, &self.heads, &self.ffn);
                Ok([
                    Self::delta(&fold(&b[1], ga)?, None, q)?,
                    Self::delta(&fold(&b[2], ga)?, None, q)?,
                    Self::delta(&fold(&b[3], ga)?, Some(hv), q)?,
                    // Writers into the residual stream: Qᵀ on the left.
                    Self::delta(b[4].as_tensor(), Some(qt), ho)?,
                    Self::delta(&fold(&b[6], gf)?, None, q)?,
                    Self::delta(&fold(&b[7], gf)?, None, q)?,
                    Self::delta(b[8].as_tensor(), Some(qt), hf)?,
                ])
            })
            .collect::<Result<_>>()?;
        Ok(())
    }

    /// Block `i`'s correction for tensor `j` of wq, wk, wv, wo, w_gate, w_up, w_down.
    pub fn delta_of(&self, block: usize, j: usize) -> &Tensor {
        &self.deltas[block][j]
    }
}

/// `W · diag(g)`: a reader of a norm with its gain folded in, as the export does.
pub fn fold(w: &Var, g: &Var) -> Result<Tensor> {
    w.as_tensor().broadcast_mul(&g.as_tensor().unsqueeze(0)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llama::{Block, LlamaWeights, Matrix};
    use crate::quant::{Rotation, quantize_rows, rotate};

    fn matrix(rows: usize, cols: usize, seed: usize) -> Matrix {
        let data = (0..rows * cols)
            .map(|i| {
                let x = ((i * 7919 + seed * 104_729) % 1009) as f32 / 1009.0 - 0.5;
                // A few large entries, as real weights have.
                if (i + seed).is_multiple_of(97) {
                    x * 8.0
                } else {
                    x
                }
            })
            .collect();
        Matrix { rows, cols, data }
    }

    fn small_model() -> LlamaWeights {
        let config = LlamaConfig {
            d_model: 24,
            d_ff: 48,
            // Order 12 (Paley) is not symmetric, so H and Hᵀ are told apart.
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 12,
            n_layers: 1,
            vocab_size: 10,
            context_length: 64,
            rope_theta: 10_000.0,
            rms_eps: 1e-5,
            tied_embeddings: true,
        };
        let (d, f, kv) = (24, 48, 12);
        let gain = |s: usize| (0..d).map(|i| 0.5 + ((i + s) % 5) as f32 * 0.3).collect();
        let block = Block {
            attn_norm: gain(1),
            wq: matrix(d, d, 1),
            wk: matrix(kv, d, 2),
            wv: matrix(kv, d, 3),
            wo: matrix(d, d, 4),
            ffn_norm: gain(2),
            w_gate: matrix(f, d, 5),
            w_up: matrix(f, d, 6),
            w_down: matrix(d, f, 7),
        };
        LlamaWeights {
            embedding: matrix(10, d, 8),
            lm_head: matrix(10, d, 8),
            blocks: vec![block],
            output_norm: gain(3),
            config,
        }
    }

    /// The corrected weights, rotated by the exporter's own code, are the exporter's int8
    /// weights: the simulation rounds what the export rounds.
    #[test]
    fn corrected_weights_are_the_exports_int8_weights() {
        let w = small_model();
        let seed = 42;
        let dec = super::super::model::Decoder::new(&w, true, false).unwrap();
        let mut fq = FakeQuant::new(&w.config, seed).unwrap();
        fq.refresh(&dec.blocks).unwrap();

        // The export: rotate, then round each row.
        let mut exported = w.clone();
        rotate(&mut exported, Rotation::ALL, seed).unwrap();
        // The simulation: corrected (folded) weights, then the same rotations (gains are 1).
        let b = &dec.blocks[0];
        let eff = |j: usize, t: Tensor| -> Matrix {
            let t = (t + fq.delta_of(0, j)).unwrap();
            let (rows, cols) = t.dims2().unwrap();
            Matrix {
                rows,
                cols,
                data: t.flatten_all().unwrap().to_vec1().unwrap(),
            }
        };
        let (ga, gf) = (&b[0], &b[5]);
        let mut sim = w.clone();
        let blk = &mut sim.blocks[0];
        blk.wq = eff(0, fold(&b[1], ga).unwrap());
        blk.wk = eff(1, fold(&b[2], ga).unwrap());
        blk.wv = eff(2, fold(&b[3], ga).unwrap());
        blk.wo = eff(3, b[4].as_tensor().clone());
        blk.w_gate = eff(4, fold(&b[6], gf).unwrap());
        blk.w_up = eff(5, fold(&b[7], gf).unwrap());
        blk.w_down = eff(6, b[8].as_tensor().clone());
        blk.attn_norm.fill(1.0);
        blk.ffn_norm.fill(1.0);
        rotate(&mut sim, Rotation::ALL, seed).unwrap();

        let (e, s) = (&exported.blocks[0], &sim.blocks[0]);
        for (name, a, b) in [
            ("wq", &e.wq, &s.wq),
            ("wk", &e.wk, &s.wk),
            ("wv", &e.wv, &s.wv),
            ("wo", &e.wo, &s.wo),
            ("w_gate", &e.w_gate, &s.w_gate),
            ("w_up", &e.w_up, &s.w_up),
            ("w_down", &e.w_down, &s.w_down),
        ] {
            let int8 = quantize_rows(a).dequantize();
            let step = quantize_rows(a).scale;
            for (r, (x, y)) in int8
                .data
                .chunks_exact(a.cols)
                .zip(b.data.chunks_exact(a.cols))
                .enumerate()
            {
                for (u, v) in x.iter().zip(y) {
                    assert!(
                        (u - v).abs() < 1e-3 * step[r].max(1e-3) + 1e-5,
                        "{name} row {r}: export {u}, simulation {v} (step {})",
                        step[r]
                    );
                }
            }
            // And the simulated weights differ from the float ones: rounding happened.
            assert!(
                a.data
                    .iter()
                    .zip(&b.data)
                    .any(|(u, v)| (u - v).abs() > 1e-4),
                "{name} was not rounded"
            );
        }
    }

    #[test]
    fn activations_are_rounded_per_token_in_the_rotated_basis() {
        let c = small_model().config;
        let fq = FakeQuant::new(&c, 7).unwrap();
        let x = matrix(3, 24, 9);
        let xt = Tensor::from_slice(&x.data, (3, 24), &Device::Cpu).unwrap();
        let var = Var::from_tensor(&xt).unwrap();
        let seen = fq.activation(var.as_tensor(), Site::Residual).unwrap();
        let q = KronOrthogonal::hadamard(24).unwrap().with_random_signs(7);
        let seen: Vec<f32> = seen.flatten_all().unwrap().to_vec1().unwrap();
        for (row, got) in x.data.chunks_exact(24).zip(seen.chunks_exact(24)) {
            // In the rotated basis the simulated row is an integer multiple of the token's step.
            let mut r = got.to_vec();
            q.apply(&mut r);
            let mut rot = row.to_vec();
            q.apply(&mut rot);
            let step = rot.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
            for (v, orig) in r.iter().zip(&rot) {
                let k = v / step;
                assert!((k - k.round()).abs() < 1e-2, "{k} is not on the grid");
                assert!((v - orig).abs() <= step / 2.0 + 1e-5);
            }
        }
        // Straight through: the gradient of sum(seen) is all ones.
        let g = fq
            .activation(var.as_tensor(), Site::Residual)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g: Vec<f32> = g
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(g.iter().all(|&v| (v - 1.0).abs() < 1e-6));
    }
}
