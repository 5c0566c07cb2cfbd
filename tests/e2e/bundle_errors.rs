//! Every way a bundle can be broken gets a clear error naming the file, never a panic.

use std::fs;
use std::path::{Path, PathBuf};

use quill::bundle::{GRAPH_FILE, MANIFEST_FILE, Manifest, TOKENIZER_FILE, WEIGHTS_FILE};
use quill::{BundleError, LoadOptions, Model};

use crate::support::bundle_dir;

/// A scratch directory, deleted when the test is done with it (CI machines may have little
/// disk to spare: these copies added up to 3 GB).
struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A scratch copy of the bundle: the manifest copied, the other files hard-linked (cheap, and
/// the tests replace rather than modify them).
fn scratch(name: &str) -> Scratch {
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
    Scratch(dir)
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

        // Without the size and CRC checks, the graph check or tract must still fail cleanly.
        let err = Model::load(
            &dir,
            &LoadOptions {
                verify: false,
                ..Default::default()
            },
        )
        .err()
        .unwrap();
        if name == GRAPH_FILE {
            assert!(matches!(err, BundleError::BadGraph { .. }), "{err:?}");
        } else {
            assert!(matches!(err, BundleError::BadWeights { .. }), "{err:?}");
        }
        assert_names(&err, name);
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
    // The graph builds from these bytes while the checksums are checked on another thread:
    // it must not reach the load cache, where a later load of the repaired bundle (same
    // manifest, same key) would find it.
    let cache = dir.join("cache");
    let err = Model::load(
        &dir,
        &LoadOptions {
            cache_dir: Some(cache.clone()),
            ..Default::default()
        },
    )
    .expect_err("a broken bundle must not load");
    assert!(
        matches!(err, BundleError::ChecksumMismatch { .. }),
        "{err:?}"
    );
    let cached: Vec<_> = fs::read_dir(&cache)
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(
        cached.is_empty(),
        "cache written from a corrupt file: {cached:?}"
    );
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

// ---- Corrupted variants of a small real bundle (two blocks of the teacher, int8) ----

/// Two blocks of the teacher as an int8 bundle: a real graph and real weights, small enough
/// (about 33 MB) to copy and corrupt many times.
fn small_bundle() -> &'static Path {
    static B: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    B.get_or_init(|| {
        let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("small-int8");
        xtask::export::export(&xtask::export::ExportOptions {
            blocks: Some(vec![0, 29]),
            teacher: crate::support::teacher().to_owned(),
            out_dir: out_dir.clone(),
            name: "small-int8".into(),
            quant: xtask::export::QuantOptions::new(xtask::export::WeightFormat::Int8),
        })
        .expect("exporting the small bundle");
        out_dir
    })
}

/// A private copy of the small bundle: every file copied, so it can be changed in place.
fn small_scratch(name: &str) -> Scratch {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("broken-small")
        .join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    for f in [MANIFEST_FILE, GRAPH_FILE, WEIGHTS_FILE, TOKENIZER_FILE] {
        fs::copy(small_bundle().join(f), dir.join(f)).unwrap();
    }
    Scratch(dir)
}

/// Loads without the size/CRC checks, so the parsers and the graph checks face the damage.
fn load_unverified(dir: &Path) -> Result<Model, BundleError> {
    Model::load(
        dir,
        &LoadOptions {
            verify: false,
            ..Default::default()
        },
    )
}

fn graph_proto(dir: &Path) -> tract_onnx::pb::ModelProto {
    use prost::Message;
    tract_onnx::pb::ModelProto::decode(fs::read(dir.join(GRAPH_FILE)).unwrap().as_slice()).unwrap()
}

fn write_graph(dir: &Path, proto: &tract_onnx::pb::ModelProto) {
    use prost::Message;
    replace_consistently(dir, GRAPH_FILE, &proto.encode_to_vec());
}

fn initializer<'a>(
    proto: &'a mut tract_onnx::pb::ModelProto,
    name: &str,
) -> &'a mut tract_onnx::pb::TensorProto {
    proto
        .graph
        .as_mut()
        .unwrap()
        .initializer
        .iter_mut()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no initializer {name}"))
}

/// The largest initializer kept in the weights file.
fn largest_external(proto: &mut tract_onnx::pb::ModelProto) -> &mut tract_onnx::pb::TensorProto {
    proto
        .graph
        .as_mut()
        .unwrap()
        .initializer
        .iter_mut()
        .filter(|t| t.data_location == Some(1))
        .max_by_key(|t| t.dims.iter().product::<i64>())
        .unwrap()
}

fn external(t: &tract_onnx::pb::TensorProto, key: &str) -> u64 {
    t.external_data
        .iter()
        .find(|e| e.key == key)
        .unwrap()
        .value
        .parse()
        .unwrap()
}

fn set_external(t: &mut tract_onnx::pb::TensorProto, key: &str, value: String) {
    t.external_data
        .iter_mut()
        .find(|e| e.key == key)
        .unwrap()
        .value = value;
}

/// A named corruption and a phrase its error must contain.
type Case<T> = (&'static str, Box<dyn Fn(&mut T)>, &'static str);

/// Offsets to cut a file of `n` bytes at: the first bytes, then spread over the whole file.
fn cut_points(n: usize, spread: usize) -> Vec<usize> {
    let mut cuts = vec![0, 1, 2, 7, 64];
    cuts.extend((1..spread).map(|i| n * i / spread));
    cuts.push(n - 1);
    cuts.retain(|&c| c < n);
    cuts
}

#[test]
fn truncated_anywhere_with_a_matching_manifest_is_a_clear_error() {
    let dir = small_scratch("truncated");
    let original: Vec<(&str, Vec<u8>)> = [MANIFEST_FILE, GRAPH_FILE, TOKENIZER_FILE]
        .iter()
        .map(|f| (*f, fs::read(dir.join(f)).unwrap()))
        .collect();
    let mut tried = 0;
    for (name, bytes) in &original {
        for cut in cut_points(bytes.len(), 12) {
            if *name == MANIFEST_FILE {
                fs::write(dir.join(name), &bytes[..cut]).unwrap();
            } else {
                replace_consistently(&dir, name, &bytes[..cut]);
            }
            let err = match load_unverified(&dir) {
                Ok(_) => panic!("{name} cut at {cut} of {} bytes loaded", bytes.len()),
                Err(e) => e,
            };
            assert_names(&err, name);
            tried += 1;
            // Put it back for the next file's cuts.
            if *name == MANIFEST_FILE {
                fs::write(dir.join(name), bytes).unwrap();
            } else {
                replace_consistently(&dir, name, bytes);
            }
        }
    }
    // The weights file: cut in place (the manifest's size no longer matches, which the
    // unverified load does not look at; the graph check must catch it).
    let weights = dir.join(WEIGHTS_FILE);
    let n = fs::metadata(&weights).unwrap().len() as usize;
    for cut in cut_points(n, 8).into_iter().rev() {
        fs::OpenOptions::new()
            .write(true)
            .open(&weights)
            .unwrap()
            .set_len(cut as u64)
            .unwrap();
        let Err(err) = load_unverified(&dir) else {
            panic!("a weights file cut at {cut} of {n} bytes loaded")
        };
        assert!(matches!(err, BundleError::BadWeights { .. }), "{err:?}");
        assert_names(&err, WEIGHTS_FILE);
        assert!(err.to_string().contains("truncated"), "{err}");
        tried += 1;
    }
    eprintln!("{tried} truncated bundles, each refused with a clear error");
}

#[test]
fn flipped_header_bytes_never_panic() {
    let dir = small_scratch("flipped");
    let (mut refused, mut loaded) = (0, 0);
    for name in [GRAPH_FILE, TOKENIZER_FILE, MANIFEST_FILE] {
        let good = fs::read(dir.join(name)).unwrap();
        for at in (0..24).chain([good.len() / 2, good.len() - 2]) {
            let mut bad = good.clone();
            bad[at] ^= 0xa5;
            if name == MANIFEST_FILE {
                fs::write(dir.join(name), &bad).unwrap();
            } else {
                replace_consistently(&dir, name, &bad);
            }
            // A flip in a name or a comment may leave a loadable file; a panic or abort would
            // end this test binary.
            match load_unverified(&dir) {
                Ok(_) => loaded += 1,
                Err(e) => {
                    assert_names(&e, name);
                    refused += 1
                }
            }
            if name == MANIFEST_FILE {
                fs::write(dir.join(name), &good).unwrap();
            } else {
                replace_consistently(&dir, name, &good);
            }
        }
    }
    eprintln!("flipped bytes: {refused} refused with an error naming the file, {loaded} loaded");
    assert!(refused > 0);
}

#[test]
fn tensors_that_do_not_match_their_data_are_refused_before_any_allocation() {
    let cases: Vec<Case<tract_onnx::pb::TensorProto>> = vec![
        (
            "terabytes",
            Box::new(|t| t.dims = vec![1 << 20, 1 << 20, 1 << 10]),
            "bytes of data",
        ),
        (
            "overflow",
            Box::new(|t| t.dims = vec![i64::MAX, 4]),
            "too large",
        ),
        ("negative", Box::new(|t| t.dims[0] = -3), "negative"),
        ("shape", Box::new(|t| t.dims[0] *= 2), "bytes of data"),
        (
            "outside",
            Box::new(|t| set_external(t, "location", "../../../etc/passwd".into())),
            "beside the graph",
        ),
        (
            "offset",
            Box::new(|t| set_external(t, "offset", (u64::MAX - 10).to_string())),
            "truncated",
        ),
    ];
    for (name, corrupt, says) in cases {
        let dir = small_scratch(name);
        let mut proto = graph_proto(&dir);
        corrupt(largest_external(&mut proto));
        write_graph(&dir, &proto);
        // Verified load: the CRCs match (the graph was replaced consistently), so only the
        // graph check stands between this tensor and tract.
        let err = load(&dir);
        assert!(
            matches!(
                err,
                BundleError::BadGraph { .. } | BundleError::BadWeights { .. }
            ),
            "{name}: {err:?}"
        );
        assert!(err.to_string().contains(says), "{name}: {err}");
    }
}

#[test]
fn non_finite_weights_are_refused_and_non_finite_logits_stop_generation() {
    // NaN in a float tensor of the weights file: refused at load, naming the tensor.
    let dir = small_scratch("nan");
    let mut proto = graph_proto(&dir);
    let scale = initializer(&mut proto, "embedding.scale");
    let offset = external(scale, "offset");
    let mut data = fs::read(dir.join(WEIGHTS_FILE)).unwrap();
    data[offset as usize + 4..offset as usize + 8].copy_from_slice(&f32::NAN.to_le_bytes());
    replace_consistently(&dir, WEIGHTS_FILE, &data);
    let err = load(&dir);
    assert!(matches!(err, BundleError::BadWeights { .. }), "{err:?}");
    assert!(err.to_string().contains("embedding.scale"), "{err}");
    assert!(err.to_string().contains("NaN"), "{err}");

    // Finite but huge norm gains overflow inside the model: generation stops with an error
    // instead of sampling from infinities. (In an int8 graph the activation quantizer turns
    // them into zeros first, so this uses a float32 bundle.)
    let dir = Scratch(Path::new(env!("CARGO_TARGET_TMPDIR")).join("broken-small/huge-gain-f32"));
    let _ = fs::remove_dir_all(&dir);
    xtask::export::export(&xtask::export::ExportOptions {
        blocks: Some(vec![0, 29]),
        teacher: crate::support::teacher().to_owned(),
        out_dir: dir.to_path_buf(),
        name: "small-f32".into(),
        quant: xtask::export::QuantOptions::f32(),
    })
    .unwrap();
    let mut proto = graph_proto(&dir);
    let gain = initializer(&mut proto, "output_norm");
    let (offset, length) = (external(gain, "offset"), external(gain, "length"));
    let mut data = fs::read(dir.join(WEIGHTS_FILE)).unwrap();
    for i in 0..length as usize / 4 {
        let at = offset as usize + 4 * i;
        data[at..at + 4].copy_from_slice(&3.0e38f32.to_le_bytes());
    }
    replace_consistently(&dir, WEIGHTS_FILE, &data);
    let model = Model::load(&dir, &LoadOptions::default()).expect("finite weights load");
    let mut session = model.session().unwrap();
    let ids = model.tokenizer.encode("The capital of France is", false);
    let Err(err) = session.forward_last(&ids) else {
        panic!("logits of a model whose final norm overflows were accepted")
    };
    assert!(
        matches!(err, quill::GenerateError::NonFiniteLogits { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("NaN or infinite"), "{err}");
}

#[test]
fn manifests_with_missing_extra_or_wrong_typed_fields_or_foreign_paths() {
    let cases: Vec<Case<serde_json::Value>> = vec![
        (
            "missing",
            Box::new(|v| {
                v.as_object_mut().unwrap().remove("config");
            }),
            "missing field `config`",
        ),
        (
            "extra",
            Box::new(|v| v["surprise"] = 1.into()),
            "unknown field `surprise`",
        ),
        (
            "wrong-type",
            Box::new(|v| v["context_length"] = "2048".into()),
            "invalid type",
        ),
        (
            "outside",
            Box::new(|v| v["files"][0]["name"] = "../../../etc/passwd".into()),
            "a bundle holds only",
        ),
        (
            "absolute",
            Box::new(|v| v["files"][1]["name"] = "/etc/shadow".into()),
            "a bundle holds only",
        ),
        (
            "twice",
            Box::new(|v| {
                let first = v["files"][0].clone();
                v["files"].as_array_mut().unwrap().push(first);
            }),
            "twice",
        ),
        (
            "huge-dims",
            Box::new(|v| v["config"]["d_model"] = (1u64 << 40).into()),
            "config.d_model",
        ),
        (
            "zero-heads",
            Box::new(|v| v["config"]["n_kv_heads"] = 0.into()),
            "config.n_kv_heads",
        ),
    ];
    for (name, corrupt, says) in cases {
        let dir = small_scratch(&format!("manifest-{name}"));
        edit_manifest(&dir, |v| corrupt(v));
        let err = load(&dir);
        assert!(
            matches!(err, BundleError::BadManifest { .. }),
            "{name}: {err:?}"
        );
        assert_names(&err, MANIFEST_FILE);
        assert!(err.to_string().contains(says), "{name}: {err}");
        assert!(err.to_string().contains("re-export"), "{name}: {err}");
    }
}

/// Found by the `bundle_loader` fuzzer: a `Gather` of a shape tensor with an index far out of
/// range made tract 0.23.9 panic (index out of bounds) while typing the graph. quill contains
/// the panic and reports the graph as damaged.
#[test]
fn a_graph_that_makes_tract_panic_is_an_error() {
    let dir = small_scratch("gather-out-of-range");
    let mut proto = graph_proto(&dir);
    let graph = proto.graph.as_mut().unwrap();
    let shapes: Vec<String> = graph
        .node
        .iter()
        .filter(|n| n.op_type == "Shape")
        .flat_map(|n| n.output.clone())
        .collect();
    let indices = graph
        .node
        .iter()
        .find(|n| n.op_type == "Gather" && shapes.contains(&n.input[0]))
        .map(|n| n.input[1].clone())
        .expect("a Gather of a shape in the graph");
    let t = graph
        .initializer
        .iter_mut()
        .find(|t| t.name == indices)
        .expect("the Gather's indices are a constant");
    let far = 67_108_866i64;
    if t.raw_data.is_empty() {
        t.int64_data = vec![far];
    } else {
        t.raw_data = far.to_le_bytes().to_vec();
    }
    write_graph(&dir, &proto);
    let err = load(&dir);
    assert!(matches!(err, BundleError::BadGraph { .. }), "{err:?}");
    assert_names(&err, GRAPH_FILE);
    assert!(err.to_string().contains("panicked"), "{err}");
}
