//! The exported graph, run by tract, against the plain-Rust reference forward pass of the same
//! GGUF weights; and the KV-cache path against the full-sequence path.

use quill::Decoder;

use crate::support::{argmax, gguf_weights, max_abs_diff, model};

const TEXT: &str =
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France, and";

/// Largest absolute difference between the logits of tract and of the reference; the f32 sums
/// run in different orders; measured here: 1.6e-4 on logits of magnitude up to about 30.
const TOLERANCE: f32 = 1e-3;

#[test]
fn tract_logits_match_the_reference_forward_pass() {
    let m = model();
    let ids = m.tokenizer.encode(TEXT, false);
    assert!(ids.len() >= 16, "{} tokens", ids.len());
    let vocab = m.manifest().config.vocab_size;

    let reference = xtask::reference::forward(gguf_weights(), &ids); // (n, vocab)
    let mut session = m.session().unwrap();
    let mut got = Vec::new();
    session.forward_all(&ids, &mut got).unwrap(); // (n, vocab)

    let diff = max_abs_diff(&got, &reference);
    eprintln!(
        "parity: {} positions × {vocab} logits, max |tract − reference| = {diff:.2e}",
        ids.len()
    );
    assert!(
        diff < TOLERANCE,
        "max difference {diff} exceeds {TOLERANCE}"
    );
    for (t, (g, r)) in got.chunks(vocab).zip(reference.chunks(vocab)).enumerate() {
        assert_eq!(argmax(g), argmax(r), "top-1 differs at position {t}");
    }
}

#[test]
fn kv_cache_decode_matches_the_full_sequence() {
    let m = model();
    let ids = m.tokenizer.encode(TEXT, false);
    let vocab = m.manifest().config.vocab_size;
    let mut full = Vec::new();
    m.session().unwrap().forward_all(&ids, &mut full).unwrap();

    // Prefill half, then one token at a time through the cache tract keeps in its state.
    let half = ids.len() / 2;
    let mut s = m.session().unwrap();
    let first = s.forward_last(&ids[..half]).unwrap().to_vec();
    let mut worst = max_abs_diff(&first, &full[(half - 1) * vocab..half * vocab]);
    for t in half..ids.len() {
        let row = s.forward_last(&ids[t..t + 1]).unwrap();
        worst = worst.max(max_abs_diff(row, &full[t * vocab..(t + 1) * vocab]));
    }
    assert_eq!(s.len(), ids.len());
    eprintln!("kv cache: max |step-by-step − full| = {worst:.2e}");
    assert!(
        worst < 1e-3,
        "decoding with the cache drifts from the full pass by {worst}"
    );

    // A reset session starts again from an empty cache.
    s.reset().unwrap();
    let again = s.forward_last(&ids[..half]).unwrap();
    assert!(max_abs_diff(again, &first) < 1e-5);
}

/// llama.cpp stores Q/K rows permuted for pairwise RoPE; the exporter swaps them back and uses
/// rotate-half RoPE. On the teacher's real layer-0 query weights: both conventions give the same
/// attention scores, and skipping the un-permutation does not.
#[test]
fn rope_row_permutation_is_undone() {
    use xtask::llama::unpermute_rope_rows;
    let w = gguf_weights();
    let c = &w.config;
    let hd = c.head_dim;
    let wq = &w.blocks[0].wq; // llama.cpp order
    let fixed = unpermute_rope_rows(wq, c.n_heads);
    let x: Vec<f32> = (0..c.d_model)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    let y: Vec<f32> = (0..c.d_model)
        .map(|i| ((i * 53 % 97) as f32 / 48.0) - 1.0)
        .collect();
    let mv = |m: &xtask::llama::Matrix, v: &[f32]| -> Vec<f32> {
        (0..m.rows)
            .map(|r| {
                m.data[r * m.cols..(r + 1) * m.cols]
                    .iter()
                    .zip(v)
                    .map(|(a, b)| a * b)
                    .sum()
            })
            .collect()
    };
    let angle = |i: usize, pos: usize| {
        pos as f64 * (c.rope_theta as f64).powf(-(2.0 * i as f64) / hd as f64)
    };
    let pairwise = |v: &mut [f32], pos: usize| {
        for i in 0..hd / 2 {
            let (s, co) = angle(i, pos).sin_cos();
            let (a, b) = (v[2 * i], v[2 * i + 1]);
            v[2 * i] = a * co as f32 - b * s as f32;
            v[2 * i + 1] = a * s as f32 + b * co as f32;
        }
    };
    let halves = |v: &mut [f32], pos: usize| {
        for i in 0..hd / 2 {
            let (s, co) = angle(i, pos).sin_cos();
            let (a, b) = (v[i], v[i + hd / 2]);
            v[i] = a * co as f32 - b * s as f32;
            v[i + hd / 2] = a * s as f32 + b * co as f32;
        }
    };
    // Score of head 0 between a query at position 7 and a key at position 3 (q·k with q = Wx, k = Wy).
    let score = |m: &xtask::llama::Matrix, rope: &dyn Fn(&mut [f32], usize)| -> f32 {
        let mut q = mv(m, &x)[..hd].to_vec();
        let mut k = mv(m, &y)[..hd].to_vec();
        rope(&mut q, 7);
        rope(&mut k, 3);
        q.iter().zip(&k).map(|(a, b)| a * b).sum()
    };
    let llama_cpp = score(wq, &pairwise);
    let quill = score(&fixed, &halves);
    let unfixed = score(wq, &halves);
    assert!(
        (llama_cpp - quill).abs() < 1e-3 * llama_cpp.abs().max(1.0),
        "{llama_cpp} vs {quill}"
    );
    assert!(
        (llama_cpp - unfixed).abs() > 1e-2 * llama_cpp.abs().max(1.0),
        "the permutation should matter"
    );
}

/// The optimized graph keeps its KV cache in tract's state and grows it in place, and the
/// attention, RoPE and RMSNorm patterns were recognised; quill's attention then takes the place
/// of tract's fused one (left in place with `quill_attention: false`), and quill's RoPE that of
/// tract's on x86-64.
#[test]
fn optimized_graph_uses_fused_attention_and_in_place_cache() {
    let m = model();
    let count = |name: &str| {
        m.typed_model()
            .nodes()
            .iter()
            .filter(|n| n.op.name() == name)
            .count()
    };
    let layers = m.manifest().config.n_layers;
    assert_eq!(
        count("QuillKvAttention"),
        layers,
        "one quill attention per layer"
    );
    assert_eq!(count("InPlaceKvSdpa"), 0, "every tract attention replaced");
    assert_eq!(
        count("DynamicKeyValueCache"),
        0,
        "no cache copied by concatenation"
    );
    // RoPE recognised in every layer (Q and K); on x86-64 quill's one-pass op then takes the
    // place of tract's `ApplyRope` (rope.rs).
    let quill_rope = if cfg!(target_arch = "x86_64") {
        2 * layers
    } else {
        0
    };
    assert_eq!(count("QuillRope"), quill_rope);
    assert_eq!(count("ApplyRope"), 2 * layers - quill_rope);
    assert_eq!(count("RmsNorm"), 2 * layers + 1);
    assert_eq!(
        m.typed_model().inputs.len(),
        1,
        "only the token ids are fed"
    );
}

/// Without quill's kernels the graph is tract's own: one fused in-place attention per layer,
/// and the same greedy tokens over a prompt longer than a cache block.
#[test]
fn tracts_attention_and_quills_agree() {
    let m = model();
    let plain = quill::Model::load(
        &m.bundle.dir,
        &quill::LoadOptions {
            quill_attention: false,
            ..quill::LoadOptions::default()
        },
    )
    .unwrap();
    let layers = m.manifest().config.n_layers;
    let count = |model: &quill::Model, name: &str| {
        model
            .typed_model()
            .nodes()
            .iter()
            .filter(|n| n.op.name() == name)
            .count()
    };
    assert_eq!(count(&plain, "InPlaceKvSdpa"), layers);
    assert_eq!(count(&plain, "QuillKvAttention"), 0);
    // 150 prompt tokens (past two 64-position blocks, in two prefill chunks), then 20 steps.
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(15);
    let ids = m.tokenizer.encode(&text, false);
    assert!(ids.len() > 2 * quill::attention::KV_BLOCK, "{}", ids.len());
    let last = [greedy(m, &ids, 20), greedy(&plain, &ids, 20)];
    assert_eq!(last[0].0, last[1].0, "greedy tokens");
    let worst = crate::support::max_abs_diff(&last[0].1, &last[1].1);
    assert!(worst < 1e-3, "final logits differ by up to {worst}");
}

/// An f16 KV cache (`--kv-cache f16`) stays close to the f32 one: same greedy tokens over a
/// prompt across cache blocks, final logits within a small margin.
#[test]
fn an_f16_kv_cache_stays_close_to_f32() {
    close_to_f32(quill::cli::KvCacheFormat::F16, 2e-3);
}

/// So does an int8 one (`--kv-cache int8`: keys and values as int8 codes with a scale per
/// vector, queries quantized for integer `Q·Kᵀ`), within a wider margin.
#[test]
fn an_int8_kv_cache_stays_close_to_f32() {
    close_to_f32(quill::cli::KvCacheFormat::Int8, 2e-2);
}

/// Greedy tokens and final logits with the cache in `format` against f32, logits within
/// `margin` of their range.
fn close_to_f32(format: quill::cli::KvCacheFormat, margin: f32) {
    let m = model();
    let other = quill::Model::load(
        &m.bundle.dir,
        &quill::LoadOptions {
            kv_cache: format,
            ..quill::LoadOptions::default()
        },
    )
    .unwrap();
    let tag = format!("cache={}", format.name());
    assert!(
        other
            .typed_model()
            .nodes()
            .iter()
            .filter(|n| n.op.name() == "QuillKvAttention")
            .all(|n| n.op.info().unwrap().join(" ").contains(&tag))
    );
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(15);
    let ids = m.tokenizer.encode(&text, false);
    let last = [greedy(m, &ids, 20), greedy(&other, &ids, 20)];
    assert_eq!(last[0].0, last[1].0, "greedy tokens");
    let worst = crate::support::max_abs_diff(&last[0].1, &last[1].1);
    let range = last[0].1.iter().fold(0f32, |a, x| a.max(x.abs()));
    eprintln!(
        "{} vs f32 KV cache: final logits differ by up to {worst:.2e} (|logit| ≤ {range:.1})",
        format.name()
    );
    assert!(
        worst < margin * range,
        "final logits differ by up to {worst} (|logit| ≤ {range})"
    );
}

/// `prompt`, then `n` greedy steps: the tokens chosen and the last step's logits.
fn greedy(model: &quill::Model, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<f32>) {
    let mut s = model.session().unwrap();
    let mut logits = s.forward_last(prompt).unwrap().to_vec();
    let mut tokens = Vec::new();
    for _ in 0..n {
        let next = crate::support::argmax(&logits) as u32;
        tokens.push(next);
        logits = s.forward_last(&[next]).unwrap().to_vec();
    }
    (tokens, logits)
}
