//! Board profiles on the runtime side: defaults taken from the board, the memory estimate, and
//! the refusal of a bundle that does not fit a board's budget. (Cross builds and qemu runs are
//! `cargo xtask cross-check`, in `.ci/run`.)

use std::process::Command;

use quill::board::{Board, MemoryEstimate};
use quill::bundle::Bundle;
use quill::cli::ModelArgs;
use xtask::export::WeightFormat;

use crate::support::{bundle_dir, quant_bundle_dir};

fn args(model: &std::path::Path, board: &str) -> ModelArgs {
    ModelArgs {
        model: Some(model.to_owned()),
        threads: None,
        tract_kernels: false,
        board: Some(board.to_owned()),
        context: None,
        no_cache: true,
        kv_cache: quill::cli::KvCacheFormat::F32,
    }
}

#[test]
fn a_board_sets_threads_and_context() {
    let int8 = quant_bundle_dir(WeightFormat::Int8);
    let r = args(int8, "rpi5").resolve().unwrap();
    assert_eq!(r.options.threads, 4);
    assert_eq!(r.options.context, Some(8192));
    let r = args(int8, "jetson-orin-nano").resolve().unwrap();
    assert_eq!(r.options.threads, 6);
    let r = args(int8, "rpi-zero-2w").resolve().unwrap();
    assert_eq!(r.options.context, Some(1024));
    assert!(r.estimate.total() <= Board::load("rpi-zero-2w").unwrap().budget_bytes());
    // Explicit options win over the board's.
    let mut a = args(int8, "rpi5");
    a.threads = Some(1);
    a.context = Some(512);
    let r = a.resolve().unwrap();
    assert_eq!((r.options.threads, r.options.context), (1, Some(512)));
}

#[test]
fn the_estimate_counts_weights_and_the_kv_cache() {
    let m = Bundle::open(quant_bundle_dir(WeightFormat::Int8))
        .unwrap()
        .manifest;
    let small = MemoryEstimate::of(&m, 1000);
    let large = MemoryEstimate::of(&m, 2000);
    // SmolLM2-135M: 30 layers × keys and values × 3 heads × 64 dims × 4 bytes per token.
    assert_eq!(large.kv_cache - small.kv_cache, 1000 * 30 * 2 * 3 * 64 * 4);
    let onnx: u64 = m
        .files
        .iter()
        .filter(|f| f.name.starts_with("model.onnx"))
        .map(|f| f.bytes)
        .sum();
    assert_eq!(small.weights, onnx);
}

#[test]
fn a_bundle_over_the_budget_is_refused_with_the_numbers() {
    let f32_dir = bundle_dir();
    // The f32 teacher on a Pi 3 (640 MB budget): refused before loading, with the numbers, a
    // context that would fit (none does here) and the board's recommended bundle.
    let err = args(f32_dir, "rpi3").resolve().unwrap_err().to_string();
    for want in [
        "needs about",
        "weights 65",
        "KV cache",
        "rpi3 board's memory budget is 640 MB",
        "preset `teacher` (int8)",
    ] {
        assert!(err.contains(want), "{want:?} missing from: {err}");
    }
    // A board file of one's own, tight enough that only a shorter context fits the int8 bundle.
    let int8 = quant_bundle_dir(WeightFormat::Int8);
    let rpi5 = quill::board::BUILTIN
        .iter()
        .find(|(n, _)| *n == "rpi5")
        .unwrap()
        .1;
    let tight = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("tight-board.toml");
    std::fs::write(
        &tight,
        rpi5.replace("memory_budget_mb = 2560", "memory_budget_mb = 300"),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_quill"))
        .args(["generate", "--max-tokens", "2", "--board"])
        .arg(&tight)
        .arg("--model")
        .arg(int8)
        .arg("Hello")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("budget is 300 MB"), "{err}");
    let fits: usize = err
        .split("--context ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no --context advice in: {err}"));
    // The advice works: that context is accepted on that board.
    let out = Command::new(env!("CARGO_BIN_EXE_quill"))
        .args([
            "generate",
            "--temperature",
            "0",
            "--max-tokens",
            "2",
            "--context",
        ])
        .arg(fits.to_string())
        .arg("--board")
        .arg(&tight)
        .arg("--model")
        .arg(int8)
        .arg("Hello")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // `quill info --board` shows the estimate and the verdict.
    let out = Command::new(env!("CARGO_BIN_EXE_quill"))
        .args(["info", "--board", "rpi-zero-2w", "--model"])
        .arg(f32_dir)
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&out.stdout);
    assert!(info.contains("memory        about"), "{info}");
    assert!(info.contains("budget 320 MB: DOES NOT FIT"), "{info}");
    assert!(
        info.contains("serial        /dev/serial0 at 115200 baud"),
        "{info}"
    );
}

#[test]
fn a_board_tarball_holds_binary_model_profile_unit_and_installer() {
    // The cross-built binary comes from `cargo xtask bundle` in CI; here the host binary stands
    // in for it, so that the packaging itself is tested with every `cargo test`.
    let int8 = quant_bundle_dir(WeightFormat::Int8);
    let (name, text) = quill::board::BUILTIN
        .iter()
        .find(|(n, _)| *n == "rpi5")
        .unwrap();
    let board = Board::parse(name, text).unwrap();
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("boards");
    let tarball = xtask::cross::write_tarball(
        "quill-rpi5",
        std::path::Path::new(env!("CARGO_BIN_EXE_quill")),
        &board,
        text,
        int8,
        &out,
    )
    .unwrap();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(
        std::fs::File::open(&tarball).unwrap(),
    ));
    let mut files = std::collections::BTreeMap::new();
    for entry in archive.entries().unwrap() {
        let mut e = entry.unwrap();
        let path = e.path().unwrap().to_string_lossy().into_owned();
        let mode = e.header().mode().unwrap();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut bytes).unwrap();
        files.insert(path, (mode, bytes));
    }
    for f in [
        "bin/quill",
        "model/manifest.json",
        "model/model.onnx",
        "model/model.onnx.data",
        "model/tokenizer.json",
        "board.toml",
        "quill-serial.service",
        "install.sh",
        "README.txt",
    ] {
        assert!(
            files.contains_key(&format!("quill-rpi5/{f}")),
            "quill-rpi5/{f} missing: {:?}",
            files.keys()
        );
    }
    assert_eq!(files["quill-rpi5/bin/quill"].0, 0o755);
    assert_eq!(files["quill-rpi5/install.sh"].0, 0o755);
    let unit = String::from_utf8(files["quill-rpi5/quill-serial.service"].1.clone()).unwrap();
    for want in [
        "ExecStart=/opt/quill/bin/quill serve --serial /dev/serial0 --baud 115200 --board /opt/quill/board.toml --model /opt/quill/model",
        "DeviceAllow=/dev/serial0 rw",
        "MemoryMax=2560M",
        "User=quill",
        "After=dev-serial0.device",
    ] {
        assert!(
            unit.lines().any(|l| l == want),
            "{want:?} missing from the unit:\n{unit}"
        );
    }
    // The model in the tarball is the bundle, byte for byte, and its board file is the board's.
    let weights = std::fs::read(int8.join("model.onnx.data")).unwrap();
    assert!(files["quill-rpi5/model/model.onnx.data"].1 == weights);
    assert_eq!(files["quill-rpi5/board.toml"].1, text.as_bytes());
    // A model over the board's budget is not packaged.
    let zero = Board::load("rpi-zero-2w").unwrap();
    let err = xtask::cross::write_tarball(
        "z",
        std::path::Path::new(env!("CARGO_BIN_EXE_quill")),
        &zero,
        "",
        bundle_dir(),
        &out,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("over the rpi-zero-2w board's budget of 320 MB"),
        "{err}"
    );
}

/// Every board's kiosk unit keeps systemd's exposure rating at 1.0 ("SAFE") or below, runs
/// unprivileged without network, and is restarted after a crash.
#[test]
fn every_boards_unit_is_least_privilege() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("units");
    for (name, text) in quill::board::BUILTIN {
        let board = Board::parse(name, text).unwrap();
        let unit = xtask::cross::systemd_unit(&board).unwrap();
        for want in [
            "User=quill",
            "Restart=on-failure",
            "StartLimitIntervalSec=0",
            // A restart starts from the load cache, in the one writable directory.
            "CacheDirectory=quill",
            "Environment=QUILL_CACHE_DIR=/var/cache/quill",
            "PrivateNetwork=yes",
            "RestrictAddressFamilies=none",
            "ProtectSystem=strict",
            "NoNewPrivileges=yes",
            &format!("MemoryMax={}M", board.memory_budget_mb),
            &format!("DeviceAllow={} rw", board.serial.device),
        ] {
            assert!(
                unit.lines().any(|l| l == want),
                "{name}: {want:?} missing from the unit:\n{unit}"
            );
        }
        // systemd-analyze names the unit after the file, so each board gets its own directory.
        let path = dir.join(name).join("quill-serial.service");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &unit).unwrap();
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(&path)
            .output()
            .expect("systemd-analyze runs (.ci/run installs systemd)");
        let report = String::from_utf8_lossy(&out.stdout);
        let exposure: f64 = report
            .lines()
            .find_map(|l| {
                l.split("Overall exposure level for quill-serial.service: ")
                    .nth(1)
            })
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|x| x.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "{name}: no exposure level in systemd-analyze's report:\n{report}\n{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        assert!(
            exposure <= 1.0,
            "{name}: exposure {exposure} is above 1.0; systemd-analyze says:\n{report}"
        );
    }
}
