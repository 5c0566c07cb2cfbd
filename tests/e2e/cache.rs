//! The load cache (`quill::cache`) on the int8 teacher: the second load starts from the cache and
//! computes what a load from the ONNX graph computes (the packed int8 weights read back from the
//! entry's weights file included); a damaged entry is ignored and rebuilt; a cache that cannot
//! be written never stops a load.

use std::fs;
use std::path::Path;

use quill::cache::CacheUse;
use quill::{LoadOptions, Model};
use xtask::export::WeightFormat;

use crate::support::{self, max_abs_diff};

fn logits(m: &Model, ids: &[u32]) -> Vec<f32> {
    let mut out = Vec::new();
    m.session().unwrap().forward_all(ids, &mut out).unwrap();
    out
}

/// Flips the middle byte of the entry's tar in `cache`.
fn damage_tar(cache: &Path) {
    let tar = fs::read_dir(cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(".nnef.tar"))
        .expect("the cache holds the bundle's entry");
    let mut bytes = fs::read(&tar).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    fs::write(&tar, &bytes).unwrap();
}

#[test]
fn a_warm_load_starts_from_the_cache_and_computes_the_same() {
    let bundle = support::quant_bundle_dir(WeightFormat::Int8);
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("load-cache");
    let _ = fs::remove_dir_all(&cache);
    let opts = LoadOptions {
        cache_dir: Some(cache.clone()),
        ..Default::default()
    };
    let phases = |m: &Model| m.load_phases.iter().map(|p| p.0).collect::<Vec<_>>();

    let cold = Model::load(bundle, &opts).unwrap();
    assert_eq!(cold.cache, CacheUse::Stored);
    assert!(phases(&cold).contains(&"parse"), "{:?}", phases(&cold));
    drop(cold);
    let warm = Model::load(bundle, &opts).unwrap();
    assert_eq!(warm.cache, CacheUse::Hit);
    assert!(!phases(&warm).contains(&"parse"), "{:?}", phases(&warm));
    assert_eq!(
        warm.quill_kernel_ops,
        support::quant_model(WeightFormat::Int8).quill_kernel_ops
    );
    // The FFN rotation is found in the cached graph's form too (tract reloads it from NNEF as
    // plain products between merges and moves, not the batched products of the ONNX load).
    assert_eq!(
        warm.quill_rotation_ops,
        support::quant_model(WeightFormat::Int8).quill_rotation_ops
    );

    // Same logits as the model loaded from ONNX, at every position of a prompt.
    let plain = support::quant_model(WeightFormat::Int8);
    let ids = plain.tokenizer.encode(
        "The lighthouse keeper climbed the stairs every evening.",
        false,
    );
    // The embedding's table is read from a memory map of the entry's tables file.
    let embedding = warm
        .typed_model()
        .nodes()
        .iter()
        .find(|n| n.op.name() == "QuillEmbedding")
        .expect("quill's embedding in the cached graph");
    let info = embedding.op.info().unwrap().join(" ");
    assert!(info.contains("mapped"), "{info}");
    let d = max_abs_diff(&logits(plain, &ids), &logits(&warm, &ids));
    eprintln!("warm (cached) vs ONNX load: max |logit diff| {d:.2e}");
    assert!(
        d == 0.0,
        "max |diff| {d}: the cached graph computes other logits"
    );
    drop(warm);

    // A damaged entry (one byte of the tar flipped) is ignored and rebuilt.
    damage_tar(&cache);
    let rebuilt = Model::load(bundle, &opts).unwrap();
    assert_eq!(rebuilt.cache, CacheUse::Stored);
    drop(rebuilt);
    assert_eq!(Model::load(bundle, &opts).unwrap().cache, CacheUse::Hit);

    // The embedding table is a file of its own: one byte flipped and the entry is rebuilt.
    let entry_file = |ext: &str| {
        fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.to_string_lossy().ends_with(ext))
    };
    let tables = entry_file(".tables").expect("the entry's tables file");
    // What a writer killed mid-store leaves (a process that no longer exists), and what a
    // live one is writing (pid 1 stands for it): the next store removes the first only.
    let staged = |pid: u32| {
        let mut name = tables.file_name().unwrap().to_os_string();
        name.push(format!(".partial-{pid}"));
        tables.with_file_name(name)
    };
    let (dead, live) = (staged(99_999_999), staged(1));
    fs::write(&dead, b"left behind").unwrap();
    fs::write(&live, b"being written").unwrap();
    let mut bytes = fs::read(&tables).unwrap();
    bytes[12_345] ^= 0x10;
    fs::write(&tables, &bytes).unwrap();
    let rebuilt = Model::load(bundle, &opts).unwrap();
    assert_eq!(rebuilt.cache, CacheUse::Stored);
    drop(rebuilt);
    assert!(!dead.exists(), "a crashed writer's staging file is removed");
    assert!(live.exists(), "a live writer's staging file is left alone");
    fs::remove_file(&live).unwrap();

    // With quill's int8 kernels (AVX-512 VNNI), the packed weights are a file of their own:
    // one byte flipped, or the file cut short, and the entry is rebuilt too.
    let weights = entry_file(".weights");
    assert_eq!(
        weights.is_some(),
        quill::kernels::vnni_available(),
        "a weights file exactly where quill's int8 kernels run"
    );
    if let Some(weights) = weights {
        let mut bytes = fs::read(&weights).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        fs::write(&weights, &bytes).unwrap();
        let rebuilt = Model::load(bundle, &opts).unwrap();
        assert_eq!(rebuilt.cache, CacheUse::Stored);
        drop(rebuilt);
        let bytes = fs::read(&weights).unwrap();
        fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
        let rebuilt = Model::load(bundle, &opts).unwrap();
        assert_eq!(rebuilt.cache, CacheUse::Stored);
        drop(rebuilt);
        let warm = Model::load(bundle, &opts).unwrap();
        assert_eq!(warm.cache, CacheUse::Hit);
        assert_eq!(logits(plain, &ids), logits(&warm, &ids));
    }

    // A cache directory that cannot be created: the load works and says why it did not cache.
    let blocked = cache.join("a-file");
    fs::write(&blocked, b"not a directory").unwrap();
    let m = Model::load(
        bundle,
        &LoadOptions {
            cache_dir: Some(blocked.join("plans")),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(
        matches!(&m.cache, CacheUse::Failed(why) if why.contains("a-file")),
        "{:?}",
        m.cache
    );
}

/// A load from the cache does not read the bundle's graph or its weights file, so it checks
/// their sizes only: a flipped byte in them goes unnoticed while the entry serves (and changes
/// nothing it computes), a cut file fails the load, and once the entry fails its own check
/// the graph's files are checked in full before they are read.
#[test]
fn a_warm_load_checks_the_graph_files_it_does_not_read_by_size() {
    use quill::BundleError;
    use quill::bundle::{GRAPH_FILE, MANIFEST_FILE, TOKENIZER_FILE, WEIGHTS_FILE};
    let src = support::small_bundle_dir();
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("warm-checks");
    let _ = fs::remove_dir_all(&root);
    let (bundle, cache) = (root.join("bundle"), root.join("cache"));
    fs::create_dir_all(&bundle).unwrap();
    for f in [MANIFEST_FILE, GRAPH_FILE, WEIGHTS_FILE, TOKENIZER_FILE] {
        fs::copy(src.join(f), bundle.join(f)).unwrap();
    }
    let opts = LoadOptions {
        cache_dir: Some(cache.clone()),
        ..Default::default()
    };
    let cold = Model::load(&bundle, &opts).unwrap();
    assert_eq!(cold.cache, CacheUse::Stored);
    let ids = cold
        .tokenizer
        .encode("A kiosk restarts after a power cut.", false);
    let expected = logits(&cold, &ids);
    drop(cold);

    // One byte of the weights file flipped, its size unchanged: the entry serves, unchanged.
    let data = bundle.join(WEIGHTS_FILE);
    let good = fs::read(&data).unwrap();
    let mut flipped = good.clone();
    flipped[good.len() / 2] ^= 0x20;
    fs::write(&data, &flipped).unwrap();
    let warm = Model::load(&bundle, &opts).unwrap();
    assert_eq!(warm.cache, CacheUse::Hit);
    assert_eq!(logits(&warm, &ids), expected);
    drop(warm);

    // Cut one byte short: refused, cache or not.
    fs::write(&data, &flipped[..flipped.len() - 1]).unwrap();
    let err = Model::load(&bundle, &opts).expect_err("a weights file cut short");
    let expected_err = matches!(&err, BundleError::SizeMismatch { path, .. } if *path == data);
    assert!(expected_err, "{err}");

    // The entry damaged too: the graph is read after all, and its weights' CRC-32 fails.
    fs::write(&data, &flipped).unwrap();
    damage_tar(&cache);
    let err = Model::load(&bundle, &opts).expect_err("a flipped byte in the weights file");
    let expected_err = matches!(&err, BundleError::ChecksumMismatch { path, .. } if *path == data);
    assert!(expected_err, "{err}");

    // Mended: the entry is rebuilt and serves again.
    fs::write(&data, &good).unwrap();
    assert_eq!(Model::load(&bundle, &opts).unwrap().cache, CacheUse::Stored);
    let warm = Model::load(&bundle, &opts).unwrap();
    assert_eq!(warm.cache, CacheUse::Hit);
    assert_eq!(logits(&warm, &ids), expected);
}
