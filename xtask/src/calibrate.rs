//! Optional calibration for int8 (`cargo xtask export --quant int8 --calibrate`): GPTQ.
//!
//! After the rotations, what int8 loses is mostly weight rounding (see models/README.md). GPTQ
//! (Frantar et al., 2023) rounds a linear's weights one input column at a time and pushes each
//! column's rounding error onto the columns not yet rounded, weighted by the inverse of the
//! Hessian `H = Σ xᵀx` of the layer's inputs, so the error that reaches the layer's *outputs*
//! on real text is minimised, not the error of the weights themselves. The scales stay one per
//! output channel: the graph and the kernels are exactly those of the calibration-free bundle.
//!
//! The Hessians are measured by tract itself: the rotated float32 model is exported once more
//! with one extra output per distinct linear input, `xᵀ·x` over the window (tract's matmul
//! kernels do the work), and run over windows of the *training* text (never the held-out text).

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use prost::Message;
use tract_onnx::prelude::*;

use crate::export::{QuantOptions, build_graph};
use crate::llama::{LlamaWeights, Matrix};
use crate::quant::{KronOrthogonal, QuantMatrix};

/// The Hessian `Σ xᵀx` of one linear's inputs, `(n, n)`, over `tokens` tokens.
#[derive(Debug, Clone)]
pub struct Hessian {
    pub n: usize,
    pub h: Vec<f64>,
    pub tokens: usize,
    /// GPTQ's factor of the inverse, once computed.
    u: std::sync::OnceLock<Vec<f64>>,
}

impl Hessian {
    pub fn new(n: usize, h: Vec<f64>, tokens: usize) -> Hessian {
        Hessian {
            n,
            h,
            tokens,
            u: std::sync::OnceLock::new(),
        }
    }
}

/// Hessians by linear weight name (`layers.3.wq`, `lm_head`, …); linears that read the same
/// value share one.
pub type Hessians = HashMap<String, std::sync::Arc<Hessian>>;

/// Runs the rotated float model over `windows` of `tokens` and returns every linear's Hessian.
pub fn collect(
    w: &LlamaWeights,
    ffn_rotation: Option<&KronOrthogonal>,
    tokens: &[u32],
    window: usize,
    windows: usize,
    work_dir: &Path,
) -> Result<Hessians> {
    let t0 = Instant::now();
    let (proto, data, capture) = build_graph(w, &QuantOptions::f32(), ffn_rotation, None, true);
    std::fs::create_dir_all(work_dir)?;
    let graph = work_dir.join(quill::bundle::GRAPH_FILE);
    std::fs::write(&graph, proto.encode_to_vec())?;
    std::fs::write(work_dir.join(quill::bundle::WEIGHTS_FILE), data)?;
    let model = tract_onnx::onnx()
        .model_for_path(&graph)
        .context("loading the calibration graph")?
        .into_optimized()
        .context("optimizing the calibration graph")?
        .into_runnable()?;
    let c = &w.config;
    ensure!(
        tokens.len() >= window * windows,
        "calibration needs {} tokens of text, found {}",
        window * windows,
        tokens.len()
    );
    let n_outputs = 1 + 2 * c.n_layers; // logits, present key/value per layer
    let mut sums: Vec<Hessian> = capture
        .iter()
        .map(|(_, n)| Hessian::new(*n, vec![0.0; n * n], 0))
        .collect();
    // Windows spread evenly over the text.
    let step = (tokens.len() - window) / windows.max(1);
    for i in 0..windows {
        let ids: Vec<i64> = tokens[i * step..i * step + window]
            .iter()
            .map(|&t| t as i64)
            .collect();
        let mut inputs: TVec<TValue> = tvec![Tensor::from_shape(&[1, window], &ids)?.into()];
        for _ in 0..2 * c.n_layers {
            inputs.push(Tensor::zero::<f32>(&[1, c.n_kv_heads, 0, c.head_dim])?.into());
        }
        let out = model.run(inputs)?;
        for (s, t) in sums.iter_mut().zip(&out[n_outputs..]) {
            let v = t.try_as_plain_ram()?.as_slice::<f32>()?;
            for (a, &b) in s.h.iter_mut().zip(v) {
                *a += b as f64;
            }
            s.tokens += window;
        }
    }
    let mut by_linear = Hessians::new();
    for ((names, _), h) in capture.into_iter().zip(sums) {
        let h = std::sync::Arc::new(h);
        for name in names {
            by_linear.insert(name, h.clone());
        }
    }
    eprintln!(
        "calibration: {windows} windows of {window} tokens, {} Hessians in {:.1} s",
        by_linear.len(),
        t0.elapsed().as_secs_f32()
    );
    Ok(by_linear)
}

/// Dot product with eight independent partial sums, so the compiler can vectorize it.
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// Cholesky factor `L` (lower, row-major) of a symmetric positive definite `a (n, n)`.
fn cholesky(a: &[f64], n: usize) -> Result<Vec<f64>> {
    let mut l = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let v = a[i * n + j] - dot(&l[i * n..i * n + j], &l[j * n..j * n + j]);
            if i == j {
                ensure!(v > 0.0, "calibration Hessian is not positive definite");
                l[i * n + i] = v.sqrt();
            } else {
                l[i * n + j] = v / l[j * n + j];
            }
        }
    }
    Ok(l)
}

/// `U` (upper, row-major) with `H⁻¹ = Uᵀ·U`, as GPTQ uses it; `h` is damped first.
fn inverse_cholesky_upper(h: &[f64], n: usize) -> Result<Vec<f64>> {
    let l = cholesky(h, n)?;
    // L⁻¹ by forward substitution on the identity, stored transposed (row `c` holds column
    // `c` of L⁻¹) so every inner loop runs over contiguous memory.
    let mut lit = vec![0f64; n * n];
    for c in 0..n {
        let col = &mut lit[c * n..(c + 1) * n];
        col[c] = 1.0 / l[c * n + c];
        for i in c + 1..n {
            let s = dot(&l[i * n + c..i * n + i], &col[c..i]);
            col[i] = -s / l[i * n + i];
        }
    }
    // H⁻¹ = L⁻ᵀ·L⁻¹: entry (i, j) is the dot product of columns i and j of L⁻¹.
    let mut hinv = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let (a, b) = (&lit[i * n..(i + 1) * n], &lit[j * n..(j + 1) * n]);
            let s = dot(&a[i..], &b[i..]);
            hinv[i * n + j] = s;
            hinv[j * n + i] = s;
        }
    }
    // H⁻¹ = Uᵀ·U with U = chol(H⁻¹)ᵀ.
    let lower = cholesky(&hinv, n)?;
    let mut u = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            u[j * n + i] = lower[i * n + j];
        }
    }
    Ok(u)
}

impl Hessian {
    /// GPTQ's `U` for this Hessian (damped by 1% of its mean diagonal), computed once.
    fn inverse_factor(&self) -> Result<&[f64]> {
        if let Some(u) = self.u.get() {
            return Ok(u);
        }
        let n = self.n;
        let mut hm: Vec<f64> = self.h.iter().map(|v| v / self.tokens as f64).collect();
        let mean_diag = (0..n).map(|i| hm[i * n + i]).sum::<f64>() / n as f64;
        for i in 0..n {
            // 1% damping (GPTQ's default); inputs never seen get the damping alone.
            hm[i * n + i] += 0.01 * mean_diag.max(1e-12);
        }
        let u = inverse_cholesky_upper(&hm, n)?;
        Ok(self.u.get_or_init(|| u))
    }
}

/// GPTQ with one symmetric scale per row (`max|row| / 127`, as [`crate::quant::quantize_rows`]).
pub fn gptq(w: &Matrix, h: &Hessian) -> Result<QuantMatrix> {
    let n = w.cols;
    ensure!(
        h.n == n,
        "Hessian of order {} for a weight with {n} inputs",
        h.n
    );
    let u = h.inverse_factor()?;
    let rows = w.rows;
    let mut q = vec![0i8; rows * n];
    let mut scale = vec![0f32; rows];
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(8);
    let per = rows.div_ceil(threads);
    std::thread::scope(|s| {
        for ((wr, qr), sr) in w
            .data
            .chunks(per * n)
            .zip(q.chunks_mut(per * n))
            .zip(scale.chunks_mut(per))
        {
            s.spawn(move || {
                let mut row = vec![0f64; n];
                for ((src, dst), sc) in wr.chunks(n).zip(qr.chunks_mut(n)).zip(sr.iter_mut()) {
                    let amax = src.iter().fold(0f32, |a, &x| a.max(x.abs()));
                    let st = if amax > 0.0 { amax / 127.0 } else { 1.0 };
                    *sc = st;
                    let st = st as f64;
                    for (r, &x) in row.iter_mut().zip(src) {
                        *r = x as f64;
                    }
                    for i in 0..n {
                        let qi = (row[i] / st).round().clamp(-127.0, 127.0);
                        dst[i] = qi as i8;
                        let err = (row[i] - qi * st) / u[i * n + i];
                        let ui = &u[i * n..(i + 1) * n];
                        for j in i + 1..n {
                            row[j] -= err * ui[j];
                        }
                    }
                }
            });
        }
    });
    Ok(QuantMatrix {
        rows,
        cols: n,
        q,
        scale,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverse_cholesky_upper_factors_the_inverse() {
        let n = 3;
        let h = [4.0, 1.0, 0.5, 1.0, 3.0, 0.2, 0.5, 0.2, 2.0];
        let u = inverse_cholesky_upper(&h, n).unwrap();
        // (Uᵀ U) H = I
        for i in 0..n {
            for j in 0..n {
                let mut v = 0.0;
                for k in 0..n {
                    let hinv_ik: f64 = (0..n).map(|m| u[m * n + i] * u[m * n + k]).sum();
                    v += hinv_ik * h[k * n + j];
                }
                assert!((v - if i == j { 1.0 } else { 0.0 }).abs() < 1e-9);
            }
        }
    }

    #[test]
    fn gptq_beats_rounding_on_correlated_inputs() {
        // Inputs whose two halves are strongly correlated: GPTQ can cancel rounding errors.
        let (n, rows, tokens) = (16, 8, 400);
        let mut seed = 1u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f64 / (1u64 << 31) as f64) - 0.5
        };
        let xs: Vec<Vec<f64>> = (0..tokens)
            .map(|_| {
                let base: Vec<f64> = (0..n / 2).map(|_| rnd()).collect();
                (0..n).map(|i| base[i % (n / 2)] + 0.05 * rnd()).collect()
            })
            .collect();
        let mut h = vec![0f64; n * n];
        for x in &xs {
            for i in 0..n {
                for j in 0..n {
                    h[i * n + j] += x[i] * x[j];
                }
            }
        }
        let w = Matrix {
            rows,
            cols: n,
            data: (0..rows * n).map(|_| rnd() as f32).collect(),
        };
        let hs = Hessian::new(n, h, tokens);
        let out_err = |q: &QuantMatrix| -> f64 {
            let d = q.dequantize();
            xs.iter()
                .map(|x| {
                    (0..rows)
                        .map(|r| {
                            let e: f64 = (0..n)
                                .map(|i| (w.data[r * n + i] - d.data[r * n + i]) as f64 * x[i])
                                .sum();
                            e * e
                        })
                        .sum::<f64>()
                })
                .sum()
        };
        let rounded = crate::quant::quantize_rows(&w);
        let g = gptq(&w, &hs).unwrap();
        assert_eq!(g.scale, rounded.scale);
        assert!(
            out_err(&g) < 0.7 * out_err(&rounded),
            "{} vs {}",
            out_err(&g),
            out_err(&rounded)
        );
    }
}
