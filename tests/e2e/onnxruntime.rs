//! The exported graphs are standard ONNX: onnxruntime runs them and agrees with quill.

use xtask::export::WeightFormat;

use crate::support::{
    argmax, bundle_dir, max_abs_diff, model, python, quant_bundle_dir, quant_model,
};

/// onnxruntime's last-position logits for `ids` on the bundle in `dir`.
fn ort_logits(dir: &std::path::Path, ids: &[u32]) -> Vec<f32> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/ort_logits.py");
    let out = python()
        .arg(script)
        .arg(dir)
        .args(ids.iter().map(|i| i.to_string()))
        .output()
        .expect("running python3 (is it installed?)");
    assert!(
        out.status.success(),
        "onnxruntime failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("a JSON array of logits")
}

#[test]
fn onnxruntime_runs_the_graph_and_agrees_with_tract() {
    let m = model();
    let ids = m.tokenizer.encode(
        "The capital of France is Paris, and the capital of Italy is",
        false,
    );
    let ort = ort_logits(bundle_dir(), &ids);
    let tract = m.session().unwrap().forward_last(&ids).unwrap().to_vec();
    assert_eq!(ort.len(), tract.len());
    let diff = max_abs_diff(&ort, &tract);
    eprintln!("onnxruntime vs tract, last position: max |Δ| = {diff:.2e}");
    assert_eq!(argmax(&ort), argmax(&tract));
    assert!(diff < 1e-2, "onnxruntime and tract differ by {diff}");
}

/// The int8 graph is standard ONNX too (`MatMulInteger`, `DynamicQuantizeLinear`-free per-token
/// quantization): onnxruntime runs it and predicts what quill predicts. Rounding an activation
/// that sits on a half step can go either way in two runtimes, so this compares the distribution,
/// not bit patterns.
#[test]
fn onnxruntime_runs_the_int8_graph_and_agrees_with_quill() {
    let m = quant_model(WeightFormat::Int8);
    let ids = m.tokenizer.encode(
        "The capital of France is Paris, and the capital of Italy is",
        false,
    );
    let ort = ort_logits(quant_bundle_dir(WeightFormat::Int8), &ids);
    let quill = m.session().unwrap().forward_last(&ids).unwrap().to_vec();
    let diff = max_abs_diff(&ort, &quill);
    let f32_logits = model()
        .session()
        .unwrap()
        .forward_last(&ids)
        .unwrap()
        .to_vec();
    let quant_error = max_abs_diff(&quill, &f32_logits);
    eprintln!(
        "int8, last position: max |Δ| onnxruntime vs quill {diff:.2e}, quill int8 vs float32 \
         {quant_error:.2e}"
    );
    // One activation rounded the other way in an early layer perturbs every later layer by about
    // one quantization step, so the runtimes differ by up to about int8's own error, no more.
    assert_eq!(argmax(&ort), argmax(&quill));
    assert!(
        diff < 1.5 * quant_error,
        "onnxruntime and quill differ by {diff}, more than int8 differs from float32"
    );
    let softmax = |l: &[f32]| -> Vec<f64> {
        let m = l.iter().copied().fold(f32::MIN, f32::max);
        let e: Vec<f64> = l.iter().map(|&x| ((x - m) as f64).exp()).collect();
        let z: f64 = e.iter().sum();
        e.into_iter().map(|x| x / z).collect()
    };
    let (p, q) = (softmax(&ort), softmax(&quill));
    let kl: f64 = p
        .iter()
        .zip(&q)
        .map(|(a, b)| if *a > 0.0 { a * (a / b).ln() } else { 0.0 })
        .sum();
    eprintln!("int8: KL(onnxruntime ‖ quill) = {kl:.2e}");
    assert!(kl < 0.02, "KL(onnxruntime ‖ quill) = {kl}");
}
