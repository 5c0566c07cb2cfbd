//! Every way a bundle can be broken gets a clear error naming the file, never a panic.

use std::fs;
use std::path::{Path, PathBuf};

use quill::bundle::{GRAPH_FILE, MANIFEST_FILE, Manifest, TOKENIZER_FILE, WEIGHTS_FILE};
use quill::{BundleError, LoadOptions, Model};

use crate::support::bundle_dir;

/// A scratch copy of the bundle: the manifest copied, the other files hard-linked (cheap, and
/// the tests replace rather than modify them).
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("broken")
        .join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let src = bundle_dir();
    fs::copy(src.join(MANIFEST_FILE), dir.join(MANIFEST_FILE)).unwrap();
    for f in [GRAPH_FILE, WEIGHTS_FILE, TOKENIZER_FILE] {
        fs::hard_link(src.join(f), dir.join(f)).unwrap();
    }
    dir
}

fn manifest(dir: &Path) -> Manifest {
    serde_json::from_slice(&fs::read(dir.join(MANIFEST_FILE)).unwrap()).unwrap()
}

fn edit_manifest(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join(MANIFEST_FILE)).unwrap()).unwrap();
    f(&mut v);
    fs::write(dir.join(MANIFEST_FILE), serde_json::to_vec(&v).unwrap()).unwrap();
}

/// Replaces a file by `bytes` and records its size and CRC in the manifest, so only the
/// content itself is wrong.
fn replace_consistently(dir: &Path, name: &str, bytes: &[u8]) {
    fs::remove_file(dir.join(name)).unwrap();
    fs::write(dir.join(name), bytes).unwrap();
    edit_manifest(dir, |v| {
        for f in v["files"].as_array_mut().unwrap() {
            if f["name"] == name {
                f["bytes"] = bytes.len().into();
                f["crc32"] = crc32(bytes).into();
            }
        }
    });
}

fn crc32(bytes: &[u8]) -> u32 {
    quill::bundle::FileEntry::of_bytes("x", bytes).crc32
}

fn load(dir: &Path) -> BundleError {
    Model::load(dir, &LoadOptions::default()).expect_err("a broken bundle must not load")
}

fn assert_names(err: &BundleError, file: &str) {
    let msg = err.to_string();
    assert!(msg.contains(file), "the error should name {file}: {msg}");
}

#[test]
fn missing_bundle_says_how_to_build_one() {
    let err = load(Path::new("/nonexistent/quill-bundle"));
    assert!(matches!(err, BundleError::Missing { .. }), "{err:?}");
    assert!(err.to_string().contains("cargo xtask export"), "{err}");
}

#[test]
fn missing_or_garbled_manifest() {
    let dir = scratch("no-manifest");
    fs::remove_file(dir.join(MANIFEST_FILE)).unwrap();
    let err = load(&dir);
    assert!(matches!(err, BundleError::Io { .. }), "{err:?}");
    assert_names(&err, MANIFEST_FILE);

    fs::write(dir.join(MANIFEST_FILE), b"{ not json").unwrap();
    let err = load(&dir);
    assert!(matches!(err, BundleError::BadManifest { .. }), "{err:?}");
    assert_names(&err, MANIFEST_FILE);
}

#[test]
fn foreign_format_unknown_version_other_architecture() {
    let dir = scratch("version");
    edit_manifest(&dir, |v| v["version"] = 99.into());
    let err = load(&dir);
    assert!(
        matches!(err, BundleError::UnsupportedVersion { found: 99, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("re-export"), "{err}");

    let dir = scratch("format");
    edit_manifest(&dir, |v| v["format"] = "something-else".into());
    assert!(matches!(load(&dir), BundleError::BadManifest { .. }));

    let dir = scratch("arch");
    edit_manifest(&dir, |v| v["architecture"] = "gpt2".into());
    let err = load(&dir);
    assert!(
        matches!(&err, BundleError::WrongArchitecture { found, .. } if found == "gpt2"),
        "{err:?}"
    );
}

/// Replaces `name` in `dir` by the first `len` bytes of the original.
fn truncate(dir: &Path, name: &str, len: impl FnOnce(usize) -> usize) {
    let full = fs::read(dir.join(name)).unwrap();
    fs::remove_file(dir.join(name)).unwrap();
    fs::write(dir.join(name), &full[..len(full.len())]).unwrap();
}

#[test]
fn truncated_weights_or_graph() {
    for name in [WEIGHTS_FILE, GRAPH_FILE] {
        let dir = scratch(&format!("truncated-{name}"));
        truncate(&dir, name, |n| n / 3);
        let err = load(&dir);
        assert!(matches!(err, BundleError::SizeMismatch { .. }), "{err:?}");
        assert_names(&err, name);
        assert!(err.to_string().contains("truncated"), "{err}");

        // Without the checks, tract itself must fail cleanly, not panic.
        let err = Model::load(
            &dir,
            &LoadOptions {
                verify: false,
                ..Default::default()
            },
        )
        .err()
        .unwrap();
        assert!(matches!(err, BundleError::BadGraph { .. }), "{err:?}");
        assert_names(&err, GRAPH_FILE);
    }
}

#[test]
fn corrupted_weight_bytes() {
    let dir = scratch("corrupted");
    let mut bytes = fs::read(dir.join(WEIGHTS_FILE)).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0x55; // inside a weight: only the checksum can tell
    fs::remove_file(dir.join(WEIGHTS_FILE)).unwrap();
    fs::write(dir.join(WEIGHTS_FILE), &bytes).unwrap();
    let err = load(&dir);
    assert!(
        matches!(err, BundleError::ChecksumMismatch { .. }),
        "{err:?}"
    );
    assert_names(&err, WEIGHTS_FILE);
}

#[test]
fn a_file_that_is_not_a_graph_or_not_a_tokenizer() {
    let dir = scratch("garbage-graph");
    replace_consistently(
        &dir,
        GRAPH_FILE,
        b"this is not an ONNX protobuf at all, just text",
    );
    let err = load(&dir);
    assert!(matches!(err, BundleError::BadGraph { .. }), "{err:?}");
    assert_names(&err, GRAPH_FILE);

    let dir = scratch("garbage-tokenizer");
    replace_consistently(&dir, TOKENIZER_FILE, br#"{"model": {"type": "Unigram"}}"#);
    let err = load(&dir);
    assert!(matches!(err, BundleError::BadTokenizer { .. }), "{err:?}");
    assert_names(&err, TOKENIZER_FILE);
    assert_eq!(manifest(&dir).files.len(), 3);
}
