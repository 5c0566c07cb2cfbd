//! A power cut or a `kill -9` in the middle of an export leaves the old bundle or the new one,
//! whole, never half of each: the export is killed at pseudo-random points and the bundle is
//! checked after every kill.
//!
//! The writer is this same test binary, re-run as a child process that only exports
//! (`QUILL_ATOMIC_CHILD_OUT` tells it where), so the kill interrupts real export code.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use quill::bundle::Bundle;
use xtask::export::{ExportOptions, QuantOptions, WeightFormat};

use crate::support::teacher;

const TEST: &str = "atomic::an_export_killed_at_any_point_leaves_a_whole_bundle";

/// Runs the export in a child process named `name`; returns the running child.
fn spawn_writer(out: &Path, name: &str) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env("QUILL_ATOMIC_CHILD_OUT", out)
        .env("QUILL_ATOMIC_CHILD_NAME", name)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// The child's whole job: one export of a small real model (two blocks, int8).
fn child_export(out: PathBuf, name: String) {
    xtask::export::export(&ExportOptions {
        blocks: Some(vec![0, 29]),
        teacher: teacher().to_owned(),
        out_dir: out,
        name,
        quant: QuantOptions::new(WeightFormat::Int8),
    })
    .expect("the child's export");
}

/// The bundle's name after checking every file's size and CRC-32 against its manifest.
fn whole_bundle_name(out: &Path) -> String {
    match Bundle::open(out) {
        Ok(b) => b.manifest.name,
        Err(e) => panic!("after a kill, {} is not a whole bundle: {e}", out.display()),
    }
}

#[test]
fn an_export_killed_at_any_point_leaves_a_whole_bundle() {
    if let (Some(out), Some(name)) = (
        std::env::var_os("QUILL_ATOMIC_CHILD_OUT"),
        std::env::var("QUILL_ATOMIC_CHILD_NAME").ok(),
    ) {
        return child_export(out.into(), name);
    }
    teacher(); // fetched once here, not by every child
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("atomic-export");
    let _ = std::fs::remove_dir_all(&out);

    // A first, complete export, timed: the kills are spread over that duration.
    let t0 = Instant::now();
    let status = spawn_writer(&out, "gen-0").wait().unwrap();
    assert!(status.success(), "the first export failed: {status}");
    let full = t0.elapsed();
    assert_eq!(whole_bundle_name(&out), "gen-0");

    let mut current = "gen-0".to_string();
    let (mut kept_old, mut got_new) = (0, 0);
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for i in 1..=12 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        // Half the kills anywhere in the export, half in its last 40% where the files and the
        // swap are written.
        let u = (rng >> 11) as f64 / (1u64 << 53) as f64;
        let fraction = if i % 2 == 0 { u * 1.05 } else { 0.6 + 0.45 * u };
        let delay = full.mul_f64(fraction);
        let name = format!("gen-{i}");
        let mut child = spawn_writer(&out, &name);
        std::thread::sleep(delay);
        let _ = child.kill(); // SIGKILL: no destructor, no cleanup runs
        let status = child.wait().unwrap();
        let found = whole_bundle_name(&out);
        eprintln!(
            "kill {i} at {:.0}% of the export ({:?}): bundle is {found} ({status})",
            fraction * 100.0,
            delay
        );
        if found == name {
            got_new += 1;
            current = found;
        } else {
            assert_eq!(
                found, current,
                "the bundle is neither the old nor the new one"
            );
            kept_old += 1;
        }
    }
    eprintln!("{kept_old} kills kept the old bundle, {got_new} found the new one");
    assert!(
        kept_old > 0,
        "no kill landed inside an export (each took {full:?}): the test proved nothing"
    );

    // What a killed export leaves beside the bundle is removed by the next one.
    let status = spawn_writer(&out, "final").wait().unwrap();
    assert!(status.success());
    assert_eq!(whole_bundle_name(&out), "final");
    let leftovers: Vec<_> = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("atomic-export") && n != "atomic-export")
        .collect();
    assert!(
        leftovers.is_empty(),
        "left beside the bundle: {leftovers:?}"
    );
}
