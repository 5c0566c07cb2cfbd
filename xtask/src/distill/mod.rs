//! `cargo xtask distill --preset NAME`: a smaller student from the teacher, healed by knowledge
//! distillation in Rust (candle, CPU), then quantized and exported like any other bundle.
//!
//! 1. **Choose**: every teacher block is scored on calibration windows of the training text by
//!    the angular distance between the residual stream entering and leaving it
//!    ([`importance`]); the `keep_blocks` most important blocks are kept, in order, with the
//!    embedding (tied head) and final norm.
//! 2. **Heal**: [`train`] — KL to the teacher at temperature `T` plus cross-entropy on the data.
//! 3. **Export**: the healed student goes through [`crate::export`] (rotations, int8) into
//!    `models/bundles/<bundle name>`.
//! 4. **Card**: [`card`] measures teacher and student with quill itself (held-out perplexity,
//!    agreement, `quill bench`) and writes `models/<preset>/README.md` with the loss curves.
//!
//! Work lives in `target/distill/<preset>/` (importance scores, checkpoint); a run interrupted
//! by Ctrl-C or a crash resumes from its checkpoint when the same command is run again.

#[cfg(feature = "distill")]
pub mod card;
#[cfg(feature = "distill")]
pub mod importance;
#[cfg(feature = "distill")]
pub mod kd;
#[cfg(feature = "distill")]
pub mod model;
#[cfg(feature = "distill")]
pub mod plot;
#[cfg(feature = "distill")]
pub mod progress;
#[cfg(feature = "distill")]
pub mod qat;
#[cfg(feature = "distill")]
pub mod train;

#[cfg(feature = "distill")]
mod pipeline;
#[cfg(feature = "distill")]
pub use pipeline::*;

use anyhow::{Result, ensure};
use serde::{Deserialize, Serialize};

/// The `[distill]` table of a preset: the student and its healing budget.
///
/// The defaults are sized for a 2-core CPU; on a bigger machine raise `tokens` (the budget),
/// `batch` and `accumulate` — nothing else in the pipeline depends on the machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillConfig {
    /// Teacher blocks the student keeps (the most important ones).
    pub keep_blocks: usize,
    /// Calibration windows (of `seq_len` training tokens) for the block importance scores.
    #[serde(default = "defaults::importance_windows")]
    pub importance_windows: usize,
    /// Training budget in tokens (inputs seen by the student).
    pub tokens: usize,
    /// Tokens per training sequence.
    pub seq_len: usize,
    /// Sequences per micro-batch, and micro-batches per optimizer step.
    pub batch: usize,
    pub accumulate: usize,
    /// Peak and final learning rate (cosine decay), linear warm-up steps.
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: usize,
    #[serde(default = "defaults::weight_decay")]
    pub weight_decay: f64,
    /// Clip the global gradient norm to this.
    #[serde(default = "defaults::clip")]
    pub clip: f64,
    /// Distillation temperature `T` and weight `α` of the KL term (1 − α on cross-entropy).
    pub temperature: f64,
    pub alpha: f64,
    /// Train the (tied) embedding too: 28 M more parameters to update; off by default.
    #[serde(default)]
    pub train_embedding: bool,
    /// Save a checkpoint every this many steps (and at the end, and on Ctrl-C).
    pub checkpoint_every: usize,
    /// Measure the held-out loss every this many steps (0: only before and after).
    pub eval_every: usize,
    /// Held-out windows (of `seq_len + 1` tokens) for that curve.
    #[serde(default = "defaults::eval_windows")]
    pub eval_windows: usize,
    /// Order of the training windows.
    #[serde(default)]
    pub seed: u64,
    /// Fake-quantize weights and activations as the int8 export will ([`qat`]) during this
    /// last fraction of the steps (0: never). Only for int8 presets.
    #[serde(default)]
    pub qat_fraction: f64,
}

mod defaults {
    pub fn importance_windows() -> usize {
        8
    }
    pub fn weight_decay() -> f64 {
        0.01
    }
    pub fn clip() -> f64 {
        1.0
    }
    pub fn eval_windows() -> usize {
        8
    }
}

impl DistillConfig {
    /// A minimal configuration for unit tests.
    pub fn tiny_for_tests() -> DistillConfig {
        DistillConfig {
            keep_blocks: 2,
            importance_windows: 1,
            tokens: 64,
            seq_len: 16,
            batch: 2,
            accumulate: 1,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 1,
            weight_decay: 0.01,
            clip: 1.0,
            temperature: 2.0,
            alpha: 0.5,
            train_embedding: false,
            checkpoint_every: 1,
            eval_every: 1,
            eval_windows: 1,
            seed: 0,
            qat_fraction: 0.0,
        }
    }

    /// Refuses settings that cannot train: too many blocks, empty batches, bad rates.
    pub fn check(&self, teacher_blocks: usize) -> Result<()> {
        ensure!(
            (1..=teacher_blocks).contains(&self.keep_blocks),
            "keep_blocks must be between 1 and the teacher's {teacher_blocks} blocks, got {}",
            self.keep_blocks
        );
        ensure!(
            self.seq_len >= 2 && self.batch >= 1 && self.accumulate >= 1,
            "seq_len ≥ 2, batch ≥ 1 and accumulate ≥ 1 are required"
        );
        ensure!(
            self.temperature > 0.0 && (0.0..=1.0).contains(&self.alpha),
            "temperature must be positive and alpha within [0, 1]"
        );
        ensure!(
            self.lr > 0.0 && self.min_lr >= 0.0 && self.min_lr <= self.lr,
            "learning rates: 0 ≤ min_lr ≤ lr, lr > 0"
        );
        ensure!(
            (0.0..=1.0).contains(&self.qat_fraction),
            "qat_fraction must be within [0, 1], got {}",
            self.qat_fraction
        );
        Ok(())
    }
}
