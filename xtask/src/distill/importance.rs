//! Which teacher blocks matter: the angular distance between the residual stream entering a
//! block and leaving it, `arccos(cos(x_in, x_out)) / π`, averaged over calibration tokens
//! (Gromov et al., "The Unreasonable Ineffectiveness of the Deeper Layers", 2024; ShortGPT's
//! "block influence" is the same idea as 1 − cos). A block that barely turns the stream can go.

use std::path::Path;

use anyhow::Result;
use candle_core::D;
use serde::{Deserialize, Serialize};

use super::model::{self, Decoder};

/// Mean angular distance (0..1) per block of `dec` over the windows.
pub fn score(dec: &Decoder, windows: &[&[u32]]) -> Result<Vec<f64>> {
    let n = dec.blocks.len();
    let mut sums = vec![0.0f64; n];
    for w in windows {
        let mut hidden = Vec::new();
        dec.forward(&model::batch(&[w])?, Some(&mut hidden))?;
        for l in 0..n {
            // (1, T, D) each
            let (a, b) = (&hidden[l], &hidden[l + 1]);
            let dot = (a * b)?.sum(D::Minus1)?;
            let na = a.sqr()?.sum(D::Minus1)?.sqrt()?;
            let nb = b.sqr()?.sum(D::Minus1)?.sqrt()?;
            let cos = (dot / (na * nb)?)?.clamp(-1f32, 1f32)?;
            let cos: Vec<f32> = cos.flatten_all()?.to_vec1()?;
            let ang: f64 = cos
                .iter()
                .map(|&c| (c as f64).acos() / std::f64::consts::PI)
                .sum();
            sums[l] += ang / cos.len() as f64;
        }
    }
    let k = windows.len().max(1) as f64;
    Ok(sums.into_iter().map(|s| s / k).collect())
}

/// The `keep` blocks with the highest scores, in model order.
pub fn keep(scores: &[f64], keep: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut kept: Vec<usize> = order.into_iter().take(keep).collect();
    kept.sort();
    kept
}

#[derive(Serialize, Deserialize)]
struct Saved {
    method: String,
    scores: Vec<f64>,
    kept: Vec<usize>,
}

/// Writes the scores and the choice as JSON (atomically).
pub fn save(path: &Path, scores: &[f64], kept: &[usize]) -> Result<()> {
    let s = Saved {
        method: "mean angular distance between block input and output, arccos(cos)/pi".into(),
        scores: scores.to_vec(),
        kept: kept.to_vec(),
    };
    quill::atomic::write_file(path, &serde_json::to_vec_pretty(&s)?)?;
    Ok(())
}

/// Sanity of the scoring on a tensor level: identical input and output score 0.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_highest_scores_in_model_order() {
        assert_eq!(keep(&[0.3, 0.1, 0.5, 0.2, 0.4], 3), vec![0, 2, 4]);
        assert_eq!(keep(&[0.1, 0.1, 0.1], 2), vec![0, 1]);
    }
}
