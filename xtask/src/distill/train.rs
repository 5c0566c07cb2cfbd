//! Healing by knowledge distillation: the training loop, its optimizer and its checkpoints.
//!
//! Loss per token: `α·T²·KL(softmax(teacher/T) ‖ softmax(student/T)) + (1−α)·CE(student, next)`.
//! AdamW (decoupled weight decay on matrices only), linear warm-up then cosine decay to
//! `min_lr`, gradient accumulation over `accumulate` micro-batches, clipping of the global norm.
//!
//! A checkpoint is one safetensors file: the student's tensors, the optimizer's moments
//! (`adam.m.*`, `adam.v.*`) and, in its metadata, the [`Progress`] (step, data cursor, loss
//! history) and the configuration it was started with. It is written atomically every
//! `checkpoint_every` steps and when Ctrl-C is pressed, so an interrupt loses at most one
//! interval and a resumed run continues exactly where the checkpoint left off.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::DistillConfig;
use super::kd;
use super::model::{self, Decoder};

/// Where training stands; saved in every checkpoint.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Progress {
    /// Optimizer steps taken.
    pub step: usize,
    /// Training tokens consumed (inputs of all micro-batches).
    pub tokens: usize,
    /// Wall time spent training, summed over resumed runs (s).
    pub seconds: f64,
    /// One row per step: (step, tokens, loss, kl, ce, lr).
    pub train: Vec<[f64; 6]>,
    /// Held-out cross-entropy (nats/token) at (step, loss); step 0 = before healing.
    pub eval: Vec<[f64; 2]>,
}

/// AdamW with its moments kept as tensors, so that they go into checkpoints.
struct AdamW {
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    beta1: f64,
    beta2: f64,
    eps: f64,
}

impl AdamW {
    fn new(vars: &[(String, &Var)]) -> Result<AdamW> {
        let zeros = || -> Result<Vec<Tensor>> {
            vars.iter()
                .map(|(_, v)| Ok(v.as_tensor().zeros_like()?))
                .collect()
        };
        Ok(AdamW {
            m: zeros()?,
            v: zeros()?,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
        })
    }

    /// One update with gradients `g` (same order as the vars), after `step` earlier updates.
    fn update(
        &mut self,
        vars: &[(String, &Var)],
        g: &[Tensor],
        step: usize,
        lr: f64,
        wd: f64,
    ) -> Result<()> {
        let t = (step + 1) as i32;
        let (bc1, bc2) = (1.0 - self.beta1.powi(t), 1.0 - self.beta2.powi(t));
        for (i, (_, var)) in vars.iter().enumerate() {
            let m = ((&self.m[i] * self.beta1)? + (&g[i] * (1.0 - self.beta1))?)?;
            let v = ((&self.v[i] * self.beta2)? + (g[i].sqr()? * (1.0 - self.beta2))?)?;
            let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + self.eps)?)?;
            let w = var.as_tensor();
            // Decoupled weight decay, on matrices only (not on norm gains).
            let decay = if w.rank() == 2 { wd } else { 0.0 };
            let next = ((w * (1.0 - lr * decay))? - (update * lr)?)?;
            var.set(&next)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

/// Learning rate at `step` of `total`: linear warm-up, then cosine from `lr` to `min_lr`.
pub fn learning_rate(c: &DistillConfig, step: usize, total: usize) -> f64 {
    if step < c.warmup_steps {
        return c.lr * (step + 1) as f64 / c.warmup_steps as f64;
    }
    let span = total.saturating_sub(c.warmup_steps).max(1) as f64;
    let p = ((step - c.warmup_steps) as f64 / span).min(1.0);
    c.min_lr + 0.5 * (c.lr - c.min_lr) * (1.0 + (std::f64::consts::PI * p).cos())
}

/// A deterministic permutation of `n` items: Fisher–Yates driven by quill's sampling generator.
pub fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = quill::sampler::Rng::new(seed);
    let mut next = || rng.next_u64();
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// Mean next-token cross-entropy (nats) of `dec` over windows of `len + 1` tokens.
pub fn heldout_loss(dec: &Decoder, windows: &[&[u32]]) -> Result<f64> {
    let mut sum = 0.0;
    for w in windows {
        let input = model::batch(&[&w[..w.len() - 1]])?;
        let targets = Tensor::from_slice(&w[1..], w.len() - 1, &Device::Cpu)?;
        let logits = dec.forward(&input, None)?.squeeze(0)?.detach();
        sum += model::cross_entropy(&logits, &targets)?.to_scalar::<f32>()? as f64;
    }
    Ok(sum / windows.len().max(1) as f64)
}

/// Everything a training run works with.
pub struct Run<'a> {
    pub config: &'a DistillConfig,
    pub teacher: &'a Decoder,
    pub student: &'a Decoder,
    /// Training token ids (never held-out text).
    pub train_ids: &'a [u32],
    /// Held-out windows of `seq_len + 1` tokens for the evaluation curve.
    pub eval_windows: Vec<&'a [u32]>,
    pub checkpoint: PathBuf,
    /// Set by the Ctrl-C handler: save and stop after the current step.
    pub interrupted: Arc<AtomicBool>,
    /// Stop as Ctrl-C does after this many steps of this call.
    pub stop_after: Option<usize>,
    /// Where to save a copy of the checkpoint taken just before fake quantization starts (the
    /// starting point of the control run that measures what it brings).
    pub qat_snapshot: Option<PathBuf>,
}

/// How a call to [`Run::train`] ended.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    Finished,
    Interrupted,
}

impl Run<'_> {
    /// Optimizer steps of the whole budget.
    pub fn total_steps(&self) -> usize {
        let c = self.config;
        (c.tokens / (c.seq_len * c.batch * c.accumulate)).max(1)
    }

    /// The first step with fake quantization, if any: the last `qat_fraction` of the steps.
    pub fn qat_start(&self) -> Option<usize> {
        let total = self.total_steps();
        let n = (total as f64 * self.config.qat_fraction).round() as usize;
        (n > 0).then(|| total - n.min(total))
    }

    /// Trains from `progress` (fresh or resumed) to the end of the budget or an interrupt.
    pub fn train(
        &self,
        progress: &mut Progress,
        adam_state: Option<&HashMap<String, Tensor>>,
    ) -> Result<Outcome> {
        let c = self.config;
        let vars = self.student.named_vars();
        let mut adam = AdamW::new(&vars)?;
        if let Some(state) = adam_state {
            for (i, (name, _)) in vars.iter().enumerate() {
                adam.m[i] = state
                    .get(&format!("adam.m.{name}"))
                    .with_context(|| format!("checkpoint has no adam.m.{name}"))?
                    .clone();
                adam.v[i] = state
                    .get(&format!("adam.v.{name}"))
                    .with_context(|| format!("checkpoint has no adam.v.{name}"))?
                    .clone();
            }
        }
        let total = self.total_steps();
        let win = c.seq_len + 1;
        let n_windows = self.train_ids.len() / win;
        ensure!(
            n_windows >= c.batch,
            "the training text has {} tokens, fewer than one batch of {} × {win}",
            self.train_ids.len(),
            c.batch
        );
        let order = shuffled(n_windows, c.seed);
        let window = |k: usize| {
            let i = order[k % n_windows];
            &self.train_ids[i * win..(i + 1) * win]
        };
        if progress.eval.is_empty() {
            let l = heldout_loss(self.student, &self.eval_windows)?;
            progress.eval.push([0.0, l]);
        }
        let bar = super::progress::Bar::new(
            total as u64,
            progress.step as u64,
            c.seq_len * c.batch * c.accumulate,
        );
        let seconds_at_start = progress.seconds;
        let first_step = progress.step;
        let started = Instant::now();
        let qat_start = self.qat_start();
        while progress.step < total {
            if qat_start.is_some_and(|s| progress.step >= s) && !self.student.fake_quant_on() {
                if Some(progress.step) == qat_start
                    && let Some(path) = &self.qat_snapshot
                {
                    self.save_to(path, progress, &vars, &adam)?;
                }
                self.student.enable_fake_quant()?;
                bar.note(&format!(
                    "step {}: fake quantization (int8, as exported) on for the last {} steps",
                    progress.step,
                    total - progress.step
                ));
            }
            let step_start = Instant::now();
            let lr = learning_rate(c, progress.step, total);
            let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
            let (mut loss_sum, mut kl_sum, mut ce_sum) = (0.0, 0.0, 0.0);
            for micro in 0..c.accumulate {
                let first = (progress.step * c.accumulate + micro) * c.batch;
                let wins: Vec<&[u32]> = (first..first + c.batch).map(window).collect();
                let inputs: Vec<&[u32]> = wins.iter().map(|w| &w[..c.seq_len]).collect();
                let targets: Vec<u32> = wins.iter().flat_map(|w| w[1..].iter().copied()).collect();
                let input = model::batch(&inputs)?;
                let n = c.batch * c.seq_len;
                let t_logits = self
                    .teacher
                    .forward(&input, None)?
                    .reshape((n, ()))?
                    .detach();
                let s_logits = self.student.forward(&input, None)?.reshape((n, ()))?;
                // [loss, kl, ce]
                let l = kd::kd_loss(&s_logits, &t_logits, &targets, c.temperature, c.alpha)?;
                drop(t_logits);
                let total = l.get(0)?;
                let g = total.backward()?;
                for (i, (_, var)) in vars.iter().enumerate() {
                    // Detached: candle leaves a variable's gradient attached to the graph when
                    // the variable feeds an op directly (fake quantization folds norm gains into
                    // weights with a plain product), and a gradient with a history would chain
                    // every step's graph through the Adam moments: 1.3 GB more per step.
                    if let Some(gi) = g.get(var.as_tensor()).map(|t| t.detach()) {
                        grads[i] = Some(match grads[i].take() {
                            Some(acc) => (acc + gi)?,
                            None => gi,
                        });
                    }
                }
                let l: Vec<f32> = l.to_vec1()?;
                loss_sum += l[0] as f64;
                kl_sum += l[1] as f64;
                ce_sum += l[2] as f64;
            }
            // Mean over micro-batches, then clip the global norm.
            let k = c.accumulate as f64;
            let grads: Vec<Tensor> = grads
                .into_iter()
                .zip(&vars)
                .map(|(g, (_, v))| match g {
                    Some(g) => Ok((g / k)?),
                    None => v.as_tensor().zeros_like(),
                })
                .collect::<candle_core::Result<_>>()?;
            let mut sq = 0.0f64;
            for g in &grads {
                sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            }
            let norm = sq.sqrt();
            let grads = if norm > c.clip {
                let s = c.clip / norm;
                grads
                    .iter()
                    .map(|g| g * s)
                    .collect::<candle_core::Result<Vec<_>>>()?
            } else {
                grads
            };
            adam.update(&vars, &grads, progress.step, lr, c.weight_decay)?;
            self.student.refresh_fake_quant()?;
            progress.step += 1;
            progress.tokens += c.accumulate * c.batch * c.seq_len;
            let (loss, kl, ce) = (loss_sum / k, kl_sum / k, ce_sum / k);
            progress.train.push([
                progress.step as f64,
                progress.tokens as f64,
                loss,
                kl,
                ce,
                lr,
            ]);
            let dt = step_start.elapsed().as_secs_f64();
            progress.seconds = seconds_at_start + started.elapsed().as_secs_f64();
            bar.step(
                progress.step as u64,
                loss,
                ce,
                (c.accumulate * c.batch * c.seq_len) as f64 / dt,
            );
            let finished = progress.step == total;
            if c.eval_every > 0 && (progress.step.is_multiple_of(c.eval_every) || finished) {
                let l = heldout_loss(self.student, &self.eval_windows)?;
                progress.eval.push([progress.step as f64, l]);
                bar.note(&format!(
                    "step {}: held-out loss {l:.3} (perplexity {:.1})",
                    progress.step,
                    l.exp()
                ));
            }
            let sliced = self
                .stop_after
                .is_some_and(|k| progress.step - first_step >= k);
            let interrupted = self.interrupted.load(Ordering::SeqCst) || sliced;
            let due = c.checkpoint_every > 0 && progress.step.is_multiple_of(c.checkpoint_every);
            if due || finished || interrupted {
                self.save_to(&self.checkpoint, progress, &vars, &adam)?;
            }
            if interrupted && !finished {
                bar.finish(&format!(
                    "stopped at step {} of {total}: checkpoint {} saved; run the same command to resume",
                    progress.step,
                    self.checkpoint.display()
                ));
                return Ok(Outcome::Interrupted);
            }
        }
        bar.finish(&format!(
            "healed: {} steps, {} tokens in {:.0} s",
            progress.step, progress.tokens, progress.seconds
        ));
        Ok(Outcome::Finished)
    }

    fn save_to(
        &self,
        path: &Path,
        progress: &Progress,
        vars: &[(String, &Var)],
        adam: &AdamW,
    ) -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> = self.student.named_tensors();
        for (i, (name, _)) in vars.iter().enumerate() {
            tensors.push((format!("adam.m.{name}"), adam.m[i].clone()));
            tensors.push((format!("adam.v.{name}"), adam.v[i].clone()));
        }
        let meta = HashMap::from([
            (
                "quill.progress".to_string(),
                serde_json::to_string(progress)?,
            ),
            (
                "quill.config".to_string(),
                serde_json::to_string(self.config)?,
            ),
        ]);
        let bytes = safetensors::serialize(tensors, Some(meta))?;
        quill::atomic::write_synced(path, &bytes)
            .with_context(|| format!("writing checkpoint {}", path.display()))?;
        Ok(())
    }
}

/// A checkpoint read back: tensors by name, progress, and the configuration it was made with.
pub struct Checkpoint {
    pub tensors: HashMap<String, Tensor>,
    pub progress: Progress,
    pub config: DistillConfig,
}

/// Reads a checkpoint written by [`Run::train`].
pub fn load_checkpoint(path: &Path) -> Result<Checkpoint> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let what = || {
        format!(
            "{} is not a quill distillation checkpoint (expected a safetensors file with \
             quill.progress metadata); delete it or pass --fresh to start over",
            path.display()
        )
    };
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).with_context(what)?;
    let m = meta.metadata().as_ref().with_context(what)?;
    let progress: Progress =
        serde_json::from_str(m.get("quill.progress").with_context(what)?).with_context(what)?;
    let config: DistillConfig =
        serde_json::from_str(m.get("quill.config").with_context(what)?).with_context(what)?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).with_context(what)?;
    Ok(Checkpoint {
        tensors,
        progress,
        config,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let c = DistillConfig {
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 10,
            ..DistillConfig::tiny_for_tests()
        };
        assert!((learning_rate(&c, 0, 100) - 1e-4).abs() < 1e-12);
        assert!((learning_rate(&c, 9, 100) - 1e-3).abs() < 1e-12);
        assert!((learning_rate(&c, 10, 100) - 1e-3).abs() < 1e-12);
        let mid = learning_rate(&c, 55, 100);
        assert!((mid - 5.5e-4).abs() < 1e-9, "{mid}");
        assert!((learning_rate(&c, 100, 100) - 1e-4).abs() < 1e-12);
        let mut prev = f64::MAX;
        for s in 10..=100 {
            let lr = learning_rate(&c, s, 100);
            assert!(lr <= prev + 1e-15);
            prev = lr;
        }
    }

    #[test]
    fn shuffle_is_a_deterministic_permutation() {
        let a = shuffled(1000, 7);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        assert_eq!(a, shuffled(1000, 7));
        assert_ne!(a, shuffled(1000, 8));
    }
}
