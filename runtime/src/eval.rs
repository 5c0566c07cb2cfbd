//! `quill eval`: perplexity of a bundle on a text, and top-1 agreement with another bundle.
//!
//! The text's tokens are cut into windows of `context` tokens that start every `stride` tokens;
//! each window runs on a fresh sequence and scores only the positions no earlier window scored
//! (the first window scores all but its first token), so every scored token sees at least
//! `context − stride` tokens of history. `Mode::Prefill` runs each window as one batched
//! prefill; `Mode::Decode` feeds it one token at a time through the KV cache, as generation
//! does (quantized kernels can behave differently in the two).

use serde::Serialize;

use crate::error::GenerateError;
use crate::model::{Model, Session};
use crate::sampler::argmax;
use crate::tokenizer::TokenId;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Prefill,
    Decode,
}

#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub context: usize,
    pub stride: usize,
    /// Score at most this many tokens (0 = the whole text).
    pub max_tokens: usize,
    pub mode: Mode,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub text_tokens: usize,
    pub scored_tokens: usize,
    pub context: usize,
    pub stride: usize,
    pub mode: Mode,
    /// Mean negative log-likelihood per scored token (nats).
    pub nll: f64,
    pub perplexity: f64,
    /// With a second model: its perplexity, and how often both predict the same next token.
    pub other_perplexity: Option<f64>,
    pub top1_agreement: Option<f64>,
    /// Mean KL(other ‖ this) per scored token (nats): how far this model's next-token
    /// distribution is from the other's, a finer measure than agreement.
    pub kl_divergence: Option<f64>,
}

/// −log softmax(logits)[target], computed stably.
fn nll(logits: &[f32], target: TokenId) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    max + sum.ln() - logits[target as usize] as f64
}

/// KL(softmax(p) ‖ softmax(q)) for two logit rows, computed stably in f64.
fn kl(p: &[f32], q: &[f32]) -> f64 {
    let lse = |l: &[f32]| {
        let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        max + l.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln()
    };
    let (zp, zq) = (lse(p), lse(q));
    p.iter()
        .zip(q)
        .map(|(&a, &b)| {
            let lp = a as f64 - zp;
            lp.exp() * (lp - (b as f64 - zq))
        })
        .sum::<f64>()
        .max(0.0)
}

/// Logits (n, vocab) of every position of `tokens` on a fresh session.
fn window_logits(
    s: &mut Session,
    tokens: &[TokenId],
    mode: Mode,
    out: &mut Vec<f32>,
) -> Result<(), GenerateError> {
    s.reset()?;
    out.clear();
    match mode {
        Mode::Prefill => s.forward_all(tokens, out),
        Mode::Decode => {
            for t in tokens {
                out.extend_from_slice(s.forward_last(std::slice::from_ref(t))?);
            }
            Ok(())
        }
    }
}

/// Evaluates `model` (and optionally `other`, which must share its tokenizer) on `text`.
pub fn evaluate(
    model: &Model,
    other: Option<&Model>,
    text: &str,
    o: &EvalOptions,
) -> anyhow::Result<EvalReport> {
    anyhow::ensure!(o.context >= 2, "--context must be at least 2 tokens");
    // Windows overlap by at least one token, so each window's first scored token has a row.
    anyhow::ensure!(
        o.stride >= 1 && o.stride < o.context,
        "--stride must be at least 1 and less than --context ({}), got {}",
        o.context,
        o.stride
    );
    anyhow::ensure!(
        o.context <= model.manifest().context_length,
        "--context {} exceeds the model's {}-token context",
        o.context,
        model.manifest().context_length
    );
    let tokens = model.tokenizer.encode(text, false);
    anyhow::ensure!(
        tokens.len() >= 2,
        "the text has {} tokens; at least 2 are needed",
        tokens.len()
    );
    if let Some(b) = other {
        anyhow::ensure!(
            b.tokenizer.encode(text, false) == tokens,
            "the two bundles tokenize the text differently; agreement needs the same tokenizer"
        );
    }
    let vocab = model.manifest().config.vocab_size;
    let (mut sa, mut sb) = (model.session()?, other.map(|b| b.session()).transpose()?);
    let (mut la, mut lb) = (Vec::new(), Vec::new());
    let (mut nll_a, mut nll_b, mut agree, mut scored) = (0.0, 0.0, 0usize, 0usize);
    let mut kl_sum = 0.0;
    let limit = if o.max_tokens == 0 {
        usize::MAX
    } else {
        o.max_tokens
    };
    // `done`: positions < done have been scored (as targets).
    let mut done = 1;
    let mut start = 0;
    while done < tokens.len() && scored < limit {
        let end = (start + o.context).min(tokens.len());
        let window = &tokens[start..end];
        window_logits(&mut sa, window, o.mode, &mut la)?;
        if let Some(sb) = sb.as_mut() {
            window_logits(sb, window, o.mode, &mut lb)?;
        }
        // Position p of the text is predicted by row p − 1 − start of the window.
        for (p, &target) in tokens.iter().enumerate().take(end).skip(done) {
            if scored == limit {
                break;
            }
            let row = p - 1 - start;
            let a = &la[row * vocab..(row + 1) * vocab];
            nll_a += nll(a, target);
            if sb.is_some() {
                let b = &lb[row * vocab..(row + 1) * vocab];
                nll_b += nll(b, target);
                agree += (argmax(a) == argmax(b)) as usize;
                kl_sum += kl(b, a);
            }
            scored += 1;
        }
        done = end;
        if end == tokens.len() {
            break;
        }
        start += o.stride;
    }
    let n = scored as f64;
    Ok(EvalReport {
        text_tokens: tokens.len(),
        scored_tokens: scored,
        context: o.context,
        stride: o.stride,
        mode: o.mode,
        nll: nll_a / n,
        perplexity: (nll_a / n).exp(),
        other_perplexity: other.map(|_| (nll_b / n).exp()),
        top1_agreement: other.map(|_| agree as f64 / n),
        kl_divergence: other.map(|_| kl_sum / n),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nll_of_uniform_and_peaked_logits() {
        let uniform = [0.0f32; 4];
        assert!((nll(&uniform, 2) - 4f64.ln()).abs() < 1e-9);
        let peaked = [0.0f32, 50.0, 0.0];
        assert!(nll(&peaked, 1) < 1e-9);
        assert!(nll(&peaked, 0) > 49.0);
    }

    #[test]
    fn kl_is_zero_for_equal_rows_and_positive_otherwise() {
        let a = [1.0f32, 2.0, 3.0];
        assert!(kl(&a, &a).abs() < 1e-12);
        // Shifting all logits changes nothing.
        assert!(kl(&a, &[11.0, 12.0, 13.0]).abs() < 1e-9);
        let b = [3.0f32, 2.0, 1.0];
        let expected: f64 = {
            let z: f64 = a.iter().map(|&x| (x as f64).exp()).sum();
            let p: Vec<f64> = a.iter().map(|&x| (x as f64).exp() / z).collect();
            let q: Vec<f64> = b.iter().map(|&x| (x as f64).exp() / z).collect();
            p.iter().zip(&q).map(|(p, q)| p * (p / q).ln()).sum()
        };
        assert!((kl(&a, &b) - expected).abs() < 1e-9);
    }
}
