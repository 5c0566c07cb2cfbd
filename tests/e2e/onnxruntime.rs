//! The exported graph is standard ONNX: onnxruntime runs it and agrees with tract.

use crate::support::{argmax, bundle_dir, model, python};

#[test]
fn onnxruntime_runs_the_graph_and_agrees_with_tract() {
    let m = model();
    let ids = m.tokenizer.encode(
        "The capital of France is Paris, and the capital of Italy is",
        false,
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/ort_logits.py");
    let out = python()
        .arg(script)
        .arg(bundle_dir())
        .args(ids.iter().map(|i| i.to_string()))
        .output()
        .expect("running python3 (is it installed?)");
    assert!(
        out.status.success(),
        "onnxruntime failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ort: Vec<f32> = serde_json::from_slice(&out.stdout).expect("a JSON array of logits");
    let tract = m.session().unwrap().forward_last(&ids).unwrap().to_vec();
    assert_eq!(ort.len(), tract.len());
    let diff = ort
        .iter()
        .zip(&tract)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    eprintln!("onnxruntime vs tract, last position: max |Δ| = {diff:.2e}");
    assert_eq!(argmax(&ort), argmax(&tract));
    assert!(diff < 1e-2, "onnxruntime and tract differ by {diff}");
}
