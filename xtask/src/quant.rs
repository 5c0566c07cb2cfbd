//! Weight quantization, and the orthogonal rotations that make a llama decoder's activations
//! quantizable.
//!
//! int8 in quill is symmetric: weights with one scale per output channel ([`quantize_rows`]),
//! activations with one scale per token, computed at run time by the graph. A per-token scale is
//! set by the token's largest channel, so a few outlier channels (llama models have them in the
//! residual stream and, much larger, at the input of `ffn_down`) leave every other channel with a
//! handful of levels. [`Rotation`] removes the outliers without changing what the model computes:
//! multiplying a vector by an orthogonal Hadamard matrix spreads every channel over all of them,
//! and the inverse rotation is folded into the weights that read it (QuaRot, Ashkboos et al. 2024).
//!
//! - **Residual stream** (offline): the RMSNorm gains are folded into the linears that read the
//!   norm, then every reader `W (out, D)` becomes `W·Q`, every writer (`wo`, `ffn_down`, the
//!   embedding rows) becomes `Qᵀ·W`; RMSNorm without a gain commutes with `Q` (it keeps norms).
//! - **Attention values** (offline): each key/value head's `wv` rows become `Hᵀ·Wv`, and the
//!   matching `wo` columns of each query head `Wo·H`: attention mixes value rows linearly, so the
//!   rotation passes through it.
//! - **FFN** (online): the input of `ffn_down` is rotated in the graph by a Kronecker-factored
//!   Hadamard (`Aᵀ·X·B` with `X` the activation seen as a `(a, b)` matrix — two small matmuls,
//!   about a quarter of `ffn_down`'s own work), and `ffn_down` becomes `W·H`.
//!
//! Hadamard orders here are `12^a · 2^b` (Sylvester doubling, Paley's order 12), which covers the
//! SmolLM2 shapes (576 = 12²·4, 1536 = 12·128, 64 = 2⁶).

use anyhow::{Result, bail};

use crate::llama::{LlamaWeights, Matrix};

/// Symmetric int8 with one scale per row (per output channel): `w[r][c] ≈ q[r][c] · scale[r]`.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    pub rows: usize,
    pub cols: usize,
    /// (rows, cols), values in −127..=127.
    pub q: Vec<i8>,
    /// (rows)
    pub scale: Vec<f32>,
}

/// Quantizes each row of `m` to int8 with the scale `max|row| / 127` (round to nearest).
pub fn quantize_rows(m: &Matrix) -> QuantMatrix {
    let mut q = Vec::with_capacity(m.data.len());
    let mut scale = Vec::with_capacity(m.rows);
    for row in m.data.chunks_exact(m.cols) {
        let amax = row.iter().fold(0f32, |a, &x| a.max(x.abs()));
        let s = if amax > 0.0 { amax / 127.0 } else { 1.0 };
        q.extend(
            row.iter()
                .map(|&x| (x / s).round().clamp(-127.0, 127.0) as i8),
        );
        scale.push(s);
    }
    QuantMatrix {
        rows: m.rows,
        cols: m.cols,
        q,
        scale,
    }
}

impl QuantMatrix {
    /// The int8 values transposed to `(cols, rows)`, the `(in, out)` layout of a MatMul's B.
    pub fn q_transposed(&self) -> Vec<i8> {
        let mut t = vec![0i8; self.q.len()];
        for r in 0..self.rows {
            for c in 0..self.cols {
                t[c * self.rows + r] = self.q[r * self.cols + c];
            }
        }
        t
    }

    pub fn dequantize(&self) -> Matrix {
        let data = self
            .q
            .chunks_exact(self.cols)
            .zip(&self.scale)
            .flat_map(|(row, &s)| row.iter().map(move |&q| q as f32 * s))
            .collect();
        Matrix {
            rows: self.rows,
            cols: self.cols,
            data,
        }
    }
}

/// Paley's construction (q = 11): a ±1 Hadamard matrix of order 12.
fn paley12() -> Vec<f64> {
    let residue = |a: usize| [1, 3, 4, 5, 9].contains(&a);
    let chi = |a: usize| -> f64 {
        match a % 11 {
            0 => 0.0,
            r if residue(r) => 1.0,
            _ => -1.0,
        }
    };
    let mut h = vec![0f64; 144];
    for i in 0..12 {
        for j in 0..12 {
            // S = [[0, 1ᵀ], [−1, Q]] with Q[i][j] = χ(j − i); H = I + S.
            let s = match (i, j) {
                (0, 0) => 0.0,
                (0, _) => 1.0,
                (_, 0) => -1.0,
                _ => chi(j + 11 - i),
            };
            h[i * 12 + j] = s + if i == j { 1.0 } else { 0.0 };
        }
    }
    h
}

/// A ±1 Hadamard matrix of order `n` (row-major), if `n = 12^a · 2^b` with a ≤ 1 after
/// doubling; `None` otherwise.
fn hadamard_pm(n: usize) -> Option<Vec<f64>> {
    if n == 1 {
        return Some(vec![1.0]);
    }
    if n == 12 {
        return Some(paley12());
    }
    if n.is_multiple_of(2)
        && let Some(h) = hadamard_pm(n / 2)
    {
        let m = n / 2;
        let mut out = vec![0f64; n * n];
        for i in 0..m {
            for j in 0..m {
                let v = h[i * m + j];
                out[i * n + j] = v;
                out[i * n + j + m] = v;
                out[(i + m) * n + j] = v;
                out[(i + m) * n + j + m] = -v;
            }
        }
        return Some(out);
    }
    None
}

/// An orthonormal Hadamard matrix of order `n` (entries ±1/√n).
pub fn hadamard(n: usize) -> Option<Matrix> {
    let h = hadamard_pm(n)?;
    let norm = 1.0 / (n as f64).sqrt();
    Some(Matrix {
        rows: n,
        cols: n,
        data: h.iter().map(|&v| (v * norm) as f32).collect(),
    })
}

/// An orthogonal matrix `diag(signs) · (F₀ ⊗ F₁ ⊗ …)` kept in factored form, so applying it to
/// a vector of length n costs `n · Σ orderᵢ` instead of n².
#[derive(Debug, Clone)]
pub struct KronOrthogonal {
    pub factors: Vec<Matrix>,
    /// ±1 per coordinate, applied before the factors (all +1 when not randomized).
    pub signs: Vec<f32>,
}

impl KronOrthogonal {
    /// The Hadamard transform of order `n`, as factors of order 12 and one power of two.
    pub fn hadamard(n: usize) -> Result<KronOrthogonal> {
        let mut rest = n;
        let mut factors = Vec::new();
        while rest.is_multiple_of(12) && hadamard(rest / 12).is_some() {
            factors.push(hadamard(12).expect("order 12"));
            rest /= 12;
        }
        match hadamard(rest) {
            Some(h) if rest.is_power_of_two() => factors.push(h),
            _ => bail!(
                "no Hadamard rotation of order {n} (quill builds orders 12^a·2^b); \
                 export with --rotate none"
            ),
        }
        Ok(KronOrthogonal {
            signs: vec![1.0; n],
            factors,
        })
    }

    /// The same transform with random ±1 signs in front (a "randomized Hadamard"), seeded.
    pub fn with_random_signs(mut self, seed: u64) -> KronOrthogonal {
        let mut s = seed ^ 0x9E37_79B9_7F4A_7C15;
        for sign in &mut self.signs {
            // splitmix64
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            *sign = if z & 1 == 0 { 1.0 } else { -1.0 };
        }
        self
    }

    pub fn order(&self) -> usize {
        self.signs.len()
    }

    /// `x ← x · Q` for a row vector `x`.
    pub fn apply(&self, x: &mut [f32]) {
        for (v, s) in x.iter_mut().zip(&self.signs) {
            *v *= s;
        }
        self.apply_factors(x, false);
    }

    /// `x ← x · Qᵀ` for a row vector `x`.
    pub fn apply_transpose(&self, x: &mut [f32]) {
        self.apply_factors(x, true);
        for (v, s) in x.iter_mut().zip(&self.signs) {
            *v *= s;
        }
    }

    /// Contracts each axis of `x` seen as a tensor `(n₀, n₁, …)` with its factor; power-of-two
    /// factors (Sylvester, symmetric) use the fast Walsh–Hadamard butterfly.
    fn apply_factors(&self, x: &mut [f32], transpose: bool) {
        let n = x.len();
        assert_eq!(n, self.order());
        let mut tmp = vec![0f32; n];
        let mut inner = n;
        for f in &self.factors {
            let k = f.rows;
            inner /= k;
            let outer = n / (inner * k);
            if k.is_power_of_two() {
                let norm = 1.0 / (k as f32).sqrt();
                for o in 0..outer {
                    for i in 0..inner {
                        let at = |a: usize| o * k * inner + a * inner + i;
                        let mut h = 1;
                        while h < k {
                            for base in (0..k).step_by(2 * h) {
                                for a in base..base + h {
                                    let (u, v) = (x[at(a)], x[at(a + h)]);
                                    x[at(a)] = u + v;
                                    x[at(a + h)] = u - v;
                                }
                            }
                            h *= 2;
                        }
                        for a in 0..k {
                            x[at(a)] *= norm;
                        }
                    }
                }
                continue;
            }
            for o in 0..outer {
                for i in 0..inner {
                    let at = |a: usize| o * k * inner + a * inner + i;
                    for b in 0..k {
                        let mut acc = 0f32;
                        for a in 0..k {
                            let fab = if transpose {
                                f.data[b * k + a]
                            } else {
                                f.data[a * k + b]
                            };
                            acc += x[at(a)] * fab;
                        }
                        tmp[at(b)] = acc;
                    }
                }
            }
            x.copy_from_slice(&tmp);
        }
    }

    /// `W ← W · Q` for `W (rows, order)`: a reader of the rotated space.
    pub fn right_multiply(&self, w: &mut Matrix) {
        assert_eq!(w.cols, self.order());
        for row in w.data.chunks_exact_mut(w.cols) {
            self.apply(row);
        }
    }

    /// `W ← Qᵀ · W` for `W (order, cols)`: a writer into the rotated space.
    pub fn left_multiply_transpose(&self, w: &mut Matrix) {
        assert_eq!(w.rows, self.order());
        let mut t = w.transposed();
        self.right_multiply(&mut t);
        *w = t.transposed();
    }

    /// The two factors `(A, B)` such that `x·Q = Aᵀ·X·B` with `X` = x seen as `(A.rows, B.rows)`;
    /// later factors are multiplied out into `B`. Signs must be all +1.
    pub fn as_two_factors(&self) -> (Matrix, Matrix) {
        assert!(self.signs.iter().all(|&s| s == 1.0));
        let a = self.factors[0].clone();
        let mut b = Matrix {
            rows: 1,
            cols: 1,
            data: vec![1.0],
        };
        for f in &self.factors[1..] {
            b = kron(&b, f);
        }
        (a, b)
    }
}

fn kron(a: &Matrix, b: &Matrix) -> Matrix {
    let (n, m) = (a.rows * b.rows, a.cols * b.cols);
    let mut data = vec![0f32; n * m];
    for i in 0..a.rows {
        for j in 0..a.cols {
            for k in 0..b.rows {
                for l in 0..b.cols {
                    data[(i * b.rows + k) * m + j * b.cols + l] =
                        a.data[i * a.cols + j] * b.data[k * b.cols + l];
                }
            }
        }
    }
    Matrix {
        rows: n,
        cols: m,
        data,
    }
}

/// Which rotations [`rotate`] applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    pub residual: bool,
    pub values: bool,
    pub ffn: bool,
}

impl Rotation {
    pub const NONE: Rotation = Rotation {
        residual: false,
        values: false,
        ffn: false,
    };
    pub const ALL: Rotation = Rotation {
        residual: true,
        values: true,
        ffn: true,
    };
}

/// Folds every RMSNorm gain into the linears that read it (the gains become 1).
pub fn fold_norms(w: &mut LlamaWeights) {
    fn scale_cols(m: &mut Matrix, g: &[f32]) {
        for row in m.data.chunks_exact_mut(m.cols) {
            for (x, s) in row.iter_mut().zip(g) {
                *x *= s;
            }
        }
    }
    for b in &mut w.blocks {
        for m in [&mut b.wq, &mut b.wk, &mut b.wv] {
            scale_cols(m, &b.attn_norm);
        }
        for m in [&mut b.w_gate, &mut b.w_up] {
            scale_cols(m, &b.ffn_norm);
        }
        b.attn_norm.fill(1.0);
        b.ffn_norm.fill(1.0);
    }
    scale_cols(&mut w.lm_head, &w.output_norm);
    w.output_norm.fill(1.0);
}

/// Rotates `w` in place (see the module docs); the model computes the same function as long as
/// the graph applies the returned online rotation to the input of every `ffn_down`.
pub fn rotate(w: &mut LlamaWeights, which: Rotation, seed: u64) -> Result<Option<KronOrthogonal>> {
    let c = w.config.clone();
    if which.residual {
        fold_norms(w);
        let q = KronOrthogonal::hadamard(c.d_model)?.with_random_signs(seed);
        // The embedding rows are vectors of the residual stream: e ← e·Q.
        q.right_multiply(&mut w.embedding);
        q.right_multiply(&mut w.lm_head);
        for b in &mut w.blocks {
            for m in [&mut b.wq, &mut b.wk, &mut b.wv, &mut b.w_gate, &mut b.w_up] {
                q.right_multiply(m);
            }
            q.left_multiply_transpose(&mut b.wo);
            q.left_multiply_transpose(&mut b.w_down);
        }
    }
    if which.values {
        let h = KronOrthogonal::hadamard(c.head_dim)?;
        let hd = c.head_dim;
        for b in &mut w.blocks {
            for g in 0..c.n_kv_heads {
                let mut rows = Matrix {
                    rows: hd,
                    cols: b.wv.cols,
                    data: b.wv.data[g * hd * b.wv.cols..(g + 1) * hd * b.wv.cols].to_vec(),
                };
                h.left_multiply_transpose(&mut rows);
                b.wv.data[g * hd * b.wv.cols..(g + 1) * hd * b.wv.cols].copy_from_slice(&rows.data);
            }
            for row in b.wo.data.chunks_exact_mut(b.wo.cols) {
                for head in row.chunks_exact_mut(hd) {
                    h.apply(head);
                }
            }
        }
    }
    if which.ffn {
        let h = KronOrthogonal::hadamard(c.d_ff)?;
        for b in &mut w.blocks {
            h.right_multiply(&mut b.w_down);
        }
        return Ok(Some(h));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_orthonormal(m: &Matrix) -> bool {
        let n = m.rows;
        (0..n).all(|i| {
            (0..n).all(|j| {
                let dot: f32 = (0..n).map(|k| m.data[i * n + k] * m.data[j * n + k]).sum();
                (dot - if i == j { 1.0 } else { 0.0 }).abs() < 1e-5
            })
        })
    }

    #[test]
    fn hadamard_orders() {
        for n in [1, 2, 4, 12, 24, 64, 96, 128] {
            assert!(is_orthonormal(&hadamard(n).unwrap()), "order {n}");
        }
        assert!(hadamard(6).is_none());
        assert!(hadamard(20).is_none());
    }

    #[test]
    fn kron_transform_is_orthogonal_and_matches_dense() {
        for n in [576usize, 1536, 64] {
            let q = KronOrthogonal::hadamard(n).unwrap().with_random_signs(7);
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let mut y = x.clone();
            q.apply(&mut y);
            let norm = |v: &[f32]| v.iter().map(|a| (*a as f64).powi(2)).sum::<f64>();
            assert!((norm(&x) - norm(&y)).abs() / norm(&x) < 1e-5, "order {n}");
            q.apply_transpose(&mut y);
            for (a, b) in x.iter().zip(&y) {
                assert!((a - b).abs() < 1e-4);
            }
        }
        // Two-factor form: x·Q = Aᵀ·X·B.
        let q = KronOrthogonal::hadamard(1536).unwrap();
        let (a, b) = q.as_two_factors();
        assert_eq!((a.rows, b.rows), (12, 128));
        let x: Vec<f32> = (0..1536).map(|i| (i % 13) as f32 - 6.0).collect();
        let mut y = x.clone();
        q.apply(&mut y);
        for ai in 0..12 {
            for bi in 0..128 {
                let mut acc = 0f64;
                for k in 0..12 {
                    for l in 0..128 {
                        acc += (a.data[k * 12 + ai] * x[k * 128 + l] * b.data[l * 128 + bi]) as f64;
                    }
                }
                assert!((acc as f32 - y[ai * 128 + bi]).abs() < 1e-3);
            }
        }
    }

    #[test]
    fn quantize_rows_round_trips_within_half_a_step() {
        let m = Matrix {
            rows: 2,
            cols: 4,
            data: vec![1.0, -0.5, 0.25, 0.0, 0.0, 0.0, 0.0, 0.0],
        };
        let q = quantize_rows(&m);
        assert_eq!(q.q[..4], [127, -64, 32, 0]);
        assert_eq!(q.q[4..], [0, 0, 0, 0]);
        let d = q.dequantize();
        for (a, b) in m.data.iter().zip(&d.data) {
            assert!((a - b).abs() <= q.scale[0] / 2.0 + 1e-7);
        }
    }
}
