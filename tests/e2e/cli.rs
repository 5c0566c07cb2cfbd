//! The `quill` binary as a user runs it: streamed text, JSON, chat, and errors a person can act on.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use crate::support::bundle_dir;

fn quill(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_quill"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting quill");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn generate_streams_the_answer_and_reports_stats() {
    let model = bundle_dir().to_str().unwrap();
    let out = quill(
        &[
            "generate",
            "--model",
            model,
            "--temperature",
            "0",
            "--max-tokens",
            "6",
            "The capital of France is",
        ],
        b"",
    );
    assert!(out.status.success(), "stderr:\n{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with(" Paris"),
        "stdout: {:?}",
        text(&out.stdout)
    );
    let err = text(&out.stderr);
    for want in ["prompt 5 tokens", "first token", "tok/s"] {
        assert!(err.contains(want), "stderr lacks {want:?}:\n{err}");
    }
}

#[test]
fn two_threads_give_the_same_answer() {
    let model = bundle_dir().to_str().unwrap();
    let args = [
        "generate",
        "--model",
        model,
        "--json",
        "--temperature",
        "0",
        "--max-tokens",
        "12",
    ];
    let one = quill(
        &[&args[..], &["--threads", "1", "The capital of France is"]].concat(),
        b"",
    );
    let two = quill(
        &[&args[..], &["--threads", "2", "The capital of France is"]].concat(),
        b"",
    );
    assert!(two.status.success(), "stderr:\n{}", text(&two.stderr));
    let text_of = |o: &Output| {
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["text"].clone()
    };
    assert_eq!(text_of(&one), text_of(&two));
}

#[test]
fn generate_json_reads_the_prompt_from_stdin() {
    let model = bundle_dir().to_str().unwrap();
    let out = quill(
        &[
            "generate",
            "--model",
            model,
            "--json",
            "--temperature",
            "0",
            "--max-tokens",
            "6",
        ],
        b"The capital of France is",
    );
    assert!(out.status.success(), "stderr:\n{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert!(v["text"].as_str().unwrap().starts_with(" Paris"), "{v}");
    assert_eq!(v["prompt_tokens"], 5);
    assert!(v["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn chat_keeps_the_conversation() {
    let model = bundle_dir().to_str().unwrap();
    let out = quill(
        &[
            "chat",
            "--model",
            model,
            "--json",
            "--temperature",
            "0",
            "--max-tokens",
            "24",
        ],
        b"What is the capital of France?\nAnd of Italy?\n",
    );
    assert!(out.status.success(), "stderr:\n{}", text(&out.stderr));
    let replies: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per reply"))
        .collect();
    assert_eq!(replies.len(), 2, "{replies:?}");
    assert!(
        replies[0]["text"].as_str().unwrap().contains("Paris"),
        "{}",
        replies[0]
    );
    assert!(
        replies[1]["text"].as_str().unwrap().contains("Rome"),
        "{}",
        replies[1]
    );
    // The second turn reuses the cache: only the new message is prefilled.
    assert!(
        replies[1]["prompt_tokens"].as_u64().unwrap() < 20,
        "{}",
        replies[1]
    );
}

#[test]
fn errors_a_person_can_act_on() {
    let out = quill(&["generate", "--model", "/nonexistent/bundle", "hi"], b"");
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("/nonexistent/bundle") && err.contains("cargo xtask export"),
        "{err}"
    );

    let model = bundle_dir().to_str().unwrap();
    let out = quill(&["generate", "--model", model], b"bad \xff\xfe utf-8");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("not valid UTF-8"),
        "{}",
        text(&out.stderr)
    );

    let long = " a".repeat(9000);
    let out = quill(&["generate", "--model", model, &long], b"");
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("9000 tokens") && err.contains("8192"), "{err}");

    let out = quill(&["generate", "--model", model, "--top-p", "0", "hi"], b"");
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("top-p"), "{}", text(&out.stderr));
}

#[test]
fn info_describes_the_bundle() {
    let model = bundle_dir().to_str().unwrap();
    let out = quill(&["info", "--model", model], b"");
    assert!(out.status.success(), "stderr:\n{}", text(&out.stderr));
    let s = text(&out.stdout);
    for want in ["llama", "30 layers", "49152 tokens", "model.onnx", "ok"] {
        assert!(s.contains(want), "info lacks {want:?}:\n{s}");
    }
}

#[test]
fn bench_reports_medians_as_json() {
    let model = bundle_dir().to_str().unwrap();
    let args = [
        "bench",
        "--model",
        model,
        "--runs",
        "2",
        "--prompt-tokens",
        "16",
        "--gen-tokens",
        "4",
        "--decode-at",
        "0,24,100000",
        "--json",
    ];
    let out = quill(&args, b"");
    assert!(out.status.success(), "stderr:\n{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
    // Positions the context cannot hold are left out.
    let at: Vec<u64> = v["decode_at"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["position"].as_u64().unwrap())
        .collect();
    assert_eq!(at, [0, 24], "{v}");
    // The limit is bandwidth over the weights a step reads: the f32 teacher's 134.5 M
    // parameters, 4 bytes each; the embedding's gathered-only copy is not counted.
    let bytes = v["weight_bytes_per_token"].as_f64().unwrap();
    assert!((5.3e8..5.5e8).contains(&bytes), "{v}");
    let limit = v["bandwidth_gb_s"]["median"].as_f64().unwrap() * 1e9 / bytes;
    assert!((v["decode_limit_tokens_per_s"].as_f64().unwrap() - limit).abs() < 1e-6 * limit);
    assert_eq!(v["runs"], 2);
    assert_eq!(v["prompt_tokens"], 16);
    for key in [
        "load_s",
        "time_to_first_token_ms",
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
        "bandwidth_gb_s",
    ] {
        let s = &v[key];
        let (min, med, max) = (
            s["min"].as_f64().unwrap(),
            s["median"].as_f64().unwrap(),
            s["max"].as_f64().unwrap(),
        );
        assert!(0.0 < min && min <= med && med <= max, "{key}: {s}");
    }
    assert!(v["peak_rss_mb"]["median"].as_f64().unwrap() > 100.0, "{v}");
}

#[test]
fn int8_info_and_profile_show_the_quantization_and_the_kernels() {
    use xtask::export::WeightFormat;
    let model = crate::support::quant_bundle_dir(WeightFormat::Int8)
        .to_str()
        .unwrap();
    let out = quill(&["info", "--model", model], b"");
    assert!(out.status.success(), "stderr:\n{}", text(&out.stderr));
    let s = text(&out.stdout);
    for want in [
        "weights       int8",
        "MatMulInteger",
        "residual, values, ffn",
    ] {
        assert!(s.contains(want), "info lacks {want:?}:\n{s}");
    }

    let args = [
        "bench",
        "--model",
        model,
        "--runs",
        "1",
        "--prompt-tokens",
        "8",
        "--gen-tokens",
        "3",
        "--profile",
        "--json",
    ];
    let out = quill(&args, b"");
    assert!(out.status.success(), "stderr:\n{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
    let decode = v["profile"]["decode"].as_array().expect("a decode profile");
    let names: Vec<&str> = decode.iter().map(|o| o["op"].as_str().unwrap()).collect();
    // The int8 products run in quill's kernel where the CPU has one, else in tract's.
    let matmul = if quill::kernels::vnni_available() {
        "QuillQuantizedLinear"
    } else {
        "OptMatMul"
    };
    assert!(names.contains(&matmul), "{names:?}");
    let calls = decode.iter().find(|o| o["op"] == matmul).unwrap()["calls"]
        .as_f64()
        .unwrap();
    assert!(calls >= 211.0, "{calls} {matmul} per decode step");
    let share: f64 = decode.iter().map(|o| o["share"].as_f64().unwrap()).sum();
    assert!(
        share > 0.5 && share <= 1.0 + 1e-9,
        "op shares sum to {share}"
    );
}
