//! The distillation loss as one fused candle op with its closed-form gradient.
//!
//! Composed from candle's elementwise ops, `α·T²·KL + (1−α)·CE` over a 49,152-token vocabulary
//! made about fifteen passes over (N, V) tensors, each a fresh 200 MB allocation for N = 1024;
//! here it is two passes (forward, backward) row by row, in parallel. Per row, with
//! `p_T = softmax(s/T)`, `q_T = softmax(t/T)`, `p = softmax(s)`:
//!
//! - loss = α·T²·Σ q_T (log q_T − log p_T) + (1−α)·(logsumexp(s) − s[target])
//! - ∂loss/∂s = α·T·(p_T − q_T) + (1−α)·(p − onehot(target))
//!
//! both averaged over the N rows.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Student logits (N, V) → `[loss, kl, ce]`; only `loss` carries a gradient.
pub struct KdLoss {
    /// Teacher logits (N, V), row-major.
    pub teacher: Arc<Vec<f32>>,
    /// Next-token targets (N).
    pub targets: Arc<Vec<u32>>,
    pub temperature: f32,
    pub alpha: f32,
}

fn lse(row: &[f32], scale: f32) -> f32 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x * scale));
    let sum: f32 = row.iter().map(|&x| (x * scale - max).exp()).sum();
    max + sum.ln()
}

fn student<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let (Some((a, b)), CpuStorage::F32(s)) = (layout.contiguous_offsets(), storage) else {
        candle_core::bail!("KdLoss needs contiguous float32 logits");
    };
    Ok(&s[a..b])
}

impl KdLoss {
    fn dims(&self, layout: &Layout) -> Result<(usize, usize)> {
        let (n, v) = layout.shape().dims2()?;
        if n * v != self.teacher.len() || n != self.targets.len() {
            candle_core::bail!(
                "KdLoss: student logits ({n}, {v}) but {} teacher logits and {} targets",
                self.teacher.len(),
                self.targets.len()
            );
        }
        Ok((n, v))
    }
}

impl CustomOp1 for KdLoss {
    fn name(&self) -> &'static str {
        "kd-loss"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, v) = self.dims(layout)?;
        let s = student(storage, layout)?;
        let inv_t = 1.0 / self.temperature;
        let (kl, ce) = s
            .par_chunks(v)
            .zip(self.teacher.par_chunks(v))
            .zip(self.targets.par_iter())
            .map(|((s, t), &target)| {
                let (ls, lt) = (lse(s, inv_t), lse(t, inv_t));
                let mut kl = 0f64;
                for (&sj, &tj) in s.iter().zip(t) {
                    let log_q = tj * inv_t - lt;
                    kl += (log_q.exp() * (log_q - (sj * inv_t - ls))) as f64;
                }
                let ce = (lse(s, 1.0) - s[target as usize]) as f64;
                (kl, ce)
            })
            .reduce(|| (0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
        let (kl, ce) = (kl / n as f64, ce / n as f64);
        let (a, t) = (self.alpha as f64, self.temperature as f64);
        let loss = a * t * t * kl + (1.0 - a) * ce;
        Ok((
            CpuStorage::F32(vec![loss as f32, kl as f32, ce as f32]),
            Shape::from(3),
        ))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let g = grad_res.to_vec1::<f32>()?[0];
        let (storage, layout) = arg.storage_and_layout();
        let candle_core::Storage::Cpu(storage) = &*storage else {
            candle_core::bail!("KdLoss runs on the CPU");
        };
        let (n, v) = self.dims(layout)?;
        let s = student(storage, layout)?;
        let inv_t = 1.0 / self.temperature;
        let scale = g / n as f32;
        let (ka, kc) = (
            self.alpha * self.temperature * scale,
            (1.0 - self.alpha) * scale,
        );
        let mut grad = vec![0f32; n * v];
        grad.par_chunks_mut(v)
            .zip(s.par_chunks(v))
            .zip(self.teacher.par_chunks(v))
            .zip(self.targets.par_iter())
            .for_each(|(((out, s), t), &target)| {
                let (ls_t, lt, ls) = (lse(s, inv_t), lse(t, inv_t), lse(s, 1.0));
                for ((o, &sj), &tj) in out.iter_mut().zip(s).zip(t) {
                    let p_t = (sj * inv_t - ls_t).exp();
                    let q_t = (tj * inv_t - lt).exp();
                    let p = (sj - ls).exp();
                    *o = ka * (p_t - q_t) + kc * p;
                }
                out[target as usize] -= kc;
            });
        Ok(Some(Tensor::from_vec(grad, (n, v), arg.device())?))
    }
}

/// `[loss, kl, ce]` (3) for student logits (N, V), teacher logits (N, V), targets (N).
pub fn kd_loss(
    student: &Tensor,
    teacher: &Tensor,
    targets: &[u32],
    temperature: f64,
    alpha: f64,
) -> Result<Tensor> {
    let op = KdLoss {
        teacher: Arc::new(teacher.flatten_all()?.to_vec1::<f32>()?),
        targets: Arc::new(targets.to_vec()),
        temperature: temperature as f32,
        alpha: alpha as f32,
    };
    student.contiguous()?.apply_op1(op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{D, Device, Var};

    /// The fused op against the same loss composed from candle's differentiable ops, values and
    /// gradients.
    #[test]
    fn matches_the_composed_loss_and_its_gradient() {
        let dev = Device::Cpu;
        let (n, v) = (5, 37);
        let s: Vec<f32> = (0..n * v)
            .map(|i| ((i * 7919 % 101) as f32 - 50.0) / 9.0)
            .collect();
        let t: Vec<f32> = (0..n * v)
            .map(|i| ((i * 104_729 % 89) as f32 - 44.0) / 7.0)
            .collect();
        let targets: Vec<u32> = (0..n as u32).map(|i| (i * 11) % v as u32).collect();
        let (temp, alpha) = (2.0, 0.3);
        let sv = Var::from_tensor(&Tensor::from_vec(s, (n, v), &dev).unwrap()).unwrap();
        let tt = Tensor::from_vec(t, (n, v), &dev).unwrap();
        let grad_of = |g: &candle_core::backprop::GradStore| -> Vec<f32> {
            let g = g.get(sv.as_tensor()).unwrap();
            g.flatten_all().unwrap().to_vec1().unwrap()
        };

        let fused = kd_loss(sv.as_tensor(), &tt, &targets, temp, alpha).unwrap();
        let f: Vec<f32> = fused.to_vec1().unwrap();
        let gf = fused.get(0).unwrap().backward().unwrap();
        let gf = grad_of(&gf);

        let log_ps =
            candle_nn::ops::log_softmax(&(sv.as_tensor() / temp).unwrap(), D::Minus1).unwrap();
        let log_pt = candle_nn::ops::log_softmax(&(&tt / temp).unwrap(), D::Minus1).unwrap();
        let kl = ((log_pt.exp().unwrap() * (log_pt - log_ps).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            / n as f64)
            .unwrap();
        let tg = Tensor::from_vec(targets.clone(), n, &dev).unwrap();
        let ce = super::super::model::cross_entropy(sv.as_tensor(), &tg).unwrap();
        let total =
            ((&kl * (alpha * temp * temp)).unwrap() + (&ce * (1.0 - alpha)).unwrap()).unwrap();
        let gc = total.backward().unwrap();
        let gc = grad_of(&gc);

        let close = |a: f32, b: f32| (a - b).abs() <= 1e-5 + 1e-4 * b.abs();
        assert!(close(f[0], total.to_scalar::<f32>().unwrap()), "{f:?}");
        assert!(close(f[1], kl.to_scalar::<f32>().unwrap()));
        assert!(close(f[2], ce.to_scalar::<f32>().unwrap()));
        for (a, b) in gf.iter().zip(&gc) {
            assert!(close(*a, *b), "gradient {a} vs {b}");
        }
    }
}
