//! Choosing the next token from logits: greedy, or seeded sampling with the usual filters.
//!
//! Order of operations (as in llama.cpp): repetition penalty → temperature → top-k → top-p →
//! min-p → draw. Temperature 0 means argmax. Every buffer is sized once, at construction, for the
//! whole vocabulary: sampling a token allocates nothing.

use crate::error::GenerateError;
use crate::tokenizer::TokenId;

/// What the user asked for. `Default` is llama.cpp's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingOptions {
    /// 0 = greedy (argmax).
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 = no limit.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p`; 1 = no limit.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` × the most likely one; 0 = no limit.
    pub min_p: f32,
    /// Divide positive logits (multiply negative ones) of recently seen tokens; 1 = off.
    pub repeat_penalty: f32,
    /// How many of the last tokens (prompt included) the penalty looks at.
    pub repeat_window: usize,
    pub seed: u64,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        SamplingOptions {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_window: 64,
            seed: 0,
        }
    }
}

impl SamplingOptions {
    pub fn greedy() -> Self {
        SamplingOptions {
            temperature: 0.0,
            ..Default::default()
        }
    }

    pub fn validate(&self) -> Result<(), GenerateError> {
        let bad = |m: String| Err(GenerateError::BadOption(m));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(format!("temperature must be ≥ 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top-p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!("min-p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repeat_penalty > 0.0 && self.repeat_penalty.is_finite()) {
            return bad(format!(
                "repeat penalty must be > 0, got {}",
                self.repeat_penalty
            ));
        }
        Ok(())
    }
}

/// xoshiro256** seeded through SplitMix64: small, fast, and the same on every platform.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        Rng {
            s: [next(), next(), next(), next()],
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

#[derive(Debug, Clone)]
pub struct Sampler {
    opts: SamplingOptions,
    rng: Rng,
    /// Penalized logits, (vocab).
    logits: Vec<f32>,
    /// Candidates (token, logit, later probability), capacity vocab.
    cand: Vec<(TokenId, f32)>,
    /// `stamp[t] == epoch` marks a token already penalized at this step.
    stamp: Vec<u32>,
    epoch: u32,
}

impl Sampler {
    pub fn new(opts: SamplingOptions, vocab: usize) -> Result<Sampler, GenerateError> {
        opts.validate()?;
        Ok(Sampler {
            rng: Rng::new(opts.seed),
            opts,
            logits: vec![0.0; vocab],
            cand: Vec::with_capacity(vocab),
            stamp: vec![0; vocab],
            epoch: 0,
        })
    }

    /// Picks the next token. `history` is the sequence so far (for the repetition penalty).
    pub fn sample(&mut self, logits: &[f32], history: &[TokenId]) -> TokenId {
        let o = &self.opts;
        self.logits.copy_from_slice(logits);
        if o.repeat_penalty != 1.0 {
            self.epoch = self.epoch.wrapping_add(1);
            let start = history.len().saturating_sub(o.repeat_window);
            for &t in &history[start..] {
                let t = t as usize;
                if t < self.logits.len() && self.stamp[t] != self.epoch {
                    self.stamp[t] = self.epoch;
                    let l = &mut self.logits[t];
                    *l = if *l > 0.0 {
                        *l / o.repeat_penalty
                    } else {
                        *l * o.repeat_penalty
                    };
                }
            }
        }
        if o.temperature == 0.0 {
            return argmax(&self.logits);
        }

        let inv_t = 1.0 / o.temperature;
        self.cand.clear();
        self.cand.extend(
            self.logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as TokenId, l * inv_t)),
        );
        let by_logit_desc = |a: &(TokenId, f32), b: &(TokenId, f32)| b.1.total_cmp(&a.1);
        if o.top_k > 0 && o.top_k < self.cand.len() {
            self.cand.select_nth_unstable_by(o.top_k - 1, by_logit_desc);
            self.cand.truncate(o.top_k);
        }
        self.cand.sort_unstable_by(by_logit_desc);

        // Softmax over the survivors; cand[0] holds the largest logit.
        let max = self.cand[0].1;
        let mut sum = 0.0f32;
        for c in self.cand.iter_mut() {
            c.1 = (c.1 - max).exp();
            sum += c.1;
        }
        let mut keep = self.cand.len();
        if o.top_p < 1.0 {
            let mut cum = 0.0;
            for (i, c) in self.cand.iter().enumerate() {
                cum += c.1 / sum;
                if cum >= o.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        if o.min_p > 0.0 {
            // cand[0] has weight exp(0) = 1, so the threshold is simply min_p.
            keep = keep.min(
                self.cand
                    .iter()
                    .take_while(|c| c.1 >= o.min_p)
                    .count()
                    .max(1),
            );
        }
        self.cand.truncate(keep);
        let total: f32 = self.cand.iter().map(|c| c.1).sum();
        let mut r = self.rng.next_f32() * total;
        for c in &self.cand {
            r -= c.1;
            if r < 0.0 {
                return c.0;
            }
        }
        self.cand[keep - 1].0
    }
}

/// Index of the largest value (the first on ties).
pub fn argmax(xs: &[f32]) -> TokenId {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as TokenId
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.0, 0.5, 2.9]
    }

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplingOptions::greedy(), 5).unwrap();
        assert_eq!(s.sample(&logits(), &[]), 1);
    }

    #[test]
    fn repetition_penalty_demotes_recent_tokens() {
        let opts = SamplingOptions {
            repeat_penalty: 2.0,
            ..SamplingOptions::greedy()
        };
        let mut s = Sampler::new(opts, 5).unwrap();
        // Token 1 seen twice is penalized once: 3.0 / 2 = 1.5 < 2.9.
        assert_eq!(s.sample(&logits(), &[1, 1]), 4);
    }

    #[test]
    fn top_k_1_and_tiny_top_p_are_greedy() {
        for opts in [
            SamplingOptions {
                top_k: 1,
                ..Default::default()
            },
            SamplingOptions {
                top_k: 0,
                top_p: 0.01,
                min_p: 0.0,
                ..Default::default()
            },
        ] {
            let mut s = Sampler::new(opts, 5).unwrap();
            for _ in 0..50 {
                assert_eq!(s.sample(&logits(), &[]), 1);
            }
        }
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        let opts = SamplingOptions {
            top_k: 0,
            top_p: 1.0,
            min_p: 0.5,
            temperature: 1.0,
            ..Default::default()
        };
        let mut s = Sampler::new(opts, 5).unwrap();
        // exp(2.0 - 3.0) = 0.37 < 0.5: only tokens 1 and 4 survive.
        for _ in 0..200 {
            let t = s.sample(&logits(), &[]);
            assert!(t == 1 || t == 4, "{t}");
        }
    }

    #[test]
    fn same_seed_same_draws_and_sampling_covers_candidates() {
        let opts = SamplingOptions {
            temperature: 1.5,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 7,
            ..Default::default()
        };
        let draw = |seed| {
            let mut s = Sampler::new(
                SamplingOptions {
                    seed,
                    ..opts.clone()
                },
                5,
            )
            .unwrap();
            (0..100)
                .map(|_| s.sample(&logits(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        let d = draw(7);
        for t in 0..5 {
            assert!(d.contains(&t), "token {t} never drawn in {d:?}");
        }
    }

    #[test]
    fn rejects_bad_options() {
        assert!(
            Sampler::new(
                SamplingOptions {
                    top_p: 0.0,
                    ..Default::default()
                },
                5
            )
            .is_err()
        );
        assert!(
            Sampler::new(
                SamplingOptions {
                    temperature: -1.0,
                    ..Default::default()
                },
                5
            )
            .is_err()
        );
    }
}
