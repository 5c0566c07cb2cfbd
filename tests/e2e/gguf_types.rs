//! Checkpoints in the other GGUF tensor types quill accepts, written by llama.cpp's own `gguf`
//! Python package (an implementation independent of quill's reader): quill reads every tensor
//! back within the type's rounding error, and a re-quantized teacher exports and answers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use quill::{GenerateOptions, Generator, LoadOptions, Model, SamplingOptions, TokenBuf};
use xtask::export::{ExportOptions, QuantOptions};
use xtask::gguf::{Gguf, TensorType};

use crate::support::{python, teacher};

/// The converted files, by type.
static DONE: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());

fn convert_path(ty: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("teacher-{ty}.gguf"))
}

/// The teacher re-encoded as `ty`, converted once per test run (tests share the files).
fn convert(ty: &str) -> PathBuf {
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = done.get(ty) {
        return p.clone();
    }
    let dst = convert_path(ty);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/gguf_convert.py");
    let out = python()
        .arg(script)
        .arg(teacher())
        .arg(&dst)
        .arg(ty)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "gguf_convert.py {ty}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    done.insert(ty.to_string(), dst.clone());
    dst
}

/// Largest error allowed for an element of a 32-element block whose largest magnitude is `amax`.
fn tolerance(ty: TensorType, x: f32, amax: f32) -> f32 {
    // Block scales are stored as f16, which adds about 1e-3 relative error.
    match ty {
        TensorType::F32 => 0.0,
        TensorType::F16 => x.abs() * 1e-3 + 1e-7,
        TensorType::Q8_0 => amax / 127.0 + amax * 2e-3,
        // Scale = −amax/8; the code 16 does not exist, so one end may be off by a whole step.
        TensorType::Q4_0 => amax / 8.0 + amax * 2e-3,
        other => panic!("no tolerance for {other:?}"),
    }
}

#[test]
fn other_tensor_types_are_read_back_faithfully() {
    let source = Gguf::open(teacher()).unwrap();
    for (name, ty) in [
        ("F32", TensorType::F32),
        ("F16", TensorType::F16),
        ("Q8_0", TensorType::Q8_0),
        ("Q4_0", TensorType::Q4_0),
    ] {
        let g = Gguf::open(&convert(name)).unwrap();
        assert_eq!(g.tensors.len(), source.tensors.len());
        let mut worst = 0.0f32;
        for (tname, info) in &source.tensors {
            let got_info = g.info(tname).unwrap();
            assert_eq!(got_info.ne, info.ne, "{tname}");
            let want_ty = if info.ne.len() == 1 {
                TensorType::F32
            } else {
                ty
            };
            assert_eq!(got_info.ty, want_ty, "{tname} in the {name} file");
            let (a, b) = (source.f32(tname).unwrap(), g.f32(tname).unwrap());
            for (blk_a, blk_b) in a.chunks(32).zip(b.chunks(32)) {
                let amax = blk_a.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                for (x, y) in blk_a.iter().zip(blk_b) {
                    let err = (x - y).abs();
                    assert!(
                        err <= tolerance(want_ty, *x, amax),
                        "{tname} ({name}): {x} read back as {y}"
                    );
                    worst = worst.max(err);
                }
            }
        }
        eprintln!("{name}: every tensor read back, largest error {worst:.2e}");
        // Only this test reads the other types: free their disk space (up to 540 MB each;
        // CI runs on machines with little to spare). Q8_0 is shared with the next test.
        if name != "Q8_0" {
            DONE.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
            std::fs::remove_file(convert_path(name)).unwrap();
        }
    }
}

#[test]
fn a_requantized_teacher_exports_and_answers() {
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("teacher-q8_0");
    xtask::export::export(&ExportOptions {
        blocks: None,
        teacher: convert("Q8_0"),
        out_dir: out_dir.clone(),
        name: "teacher-q8_0".into(),
        quant: QuantOptions::f32(),
    })
    .unwrap();
    let m = Model::load(&out_dir, &LoadOptions::default()).unwrap();
    let mut s = m.session().unwrap();
    let ids = m.tokenizer.encode("The capital of France is", false);
    let mut history = TokenBuf::new();
    let opts = GenerateOptions {
        sampling: SamplingOptions::greedy(),
        max_tokens: 4,
        stop: vec![],
    };
    let eos = m.manifest().eos_token_ids.clone();
    let mut g = Generator::new(&mut s, &m.tokenizer, &eos, &mut history, &ids, &opts).unwrap();
    let mut text = String::new();
    g.run(|t| text.push_str(t)).unwrap();
    assert!(text.starts_with(" Paris"), "{text:?}");
    std::fs::remove_dir_all(&out_dir).unwrap();
}
