//! `quill::Model::load` on a mutated tiny bundle: the loader as a whole, tract included.
//!
//! The bundle is the tiny int8 export of `quill_fuzz::tiny_bundle` (same graph structure as the
//! real teacher's, a few kilobytes), written once per process. The first input byte chooses the
//! file the rest of the input replaces: 0 `model.onnx` (the graph protobuf), 1 `tokenizer.json`,
//! 2 `manifest.json`. For the first two the manifest's size and CRC-32 of the file are fixed
//! up, so it is the content checks (and tract) that see the mutation, not the checksum.
//!
//! A panic inside tract is contained by quill and reported as a damaged graph (tract 0.23.9
//! panics on a `Gather` of a shape with an out-of-range constant index: found here).
//!
//! Beyond "no panic, no abort": the load either succeeds or returns a `BundleError` whose
//! message names a file of the bundle, and a model that loads can tokenize and run one step
//! (a graph that tract optimizes but cannot run is an error, not a crash).

#![no_main]

use std::fs;
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use quill::bundle::{self, FileEntry, Manifest};
use quill::{LoadOptions, Model};

struct Fixture {
    dir: PathBuf,
    graph: Vec<u8>,
    tokenizer: Vec<u8>,
    manifest: Manifest,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        // quill contains panics inside tract (`Model::load` turns them into `BadGraph`), but
        // libfuzzer-sys's hook aborts on every panic, caught or not. Print instead: a panic
        // that escapes quill still aborts the run (libfuzzer-sys aborts when one reaches it).
        std::panic::set_hook(Box::new(|info| eprintln!("panic during the load: {info}")));
        let work = quill_fuzz::scratch_dir("bundle-loader");
        let dir = quill_fuzz::tiny_bundle(&work);
        let read = |name: &str| fs::read(dir.join(name)).expect("reading the tiny bundle");
        let manifest: Manifest = serde_json::from_slice(&read(bundle::MANIFEST_FILE))
            .expect("the tiny bundle's manifest parses");
        Fixture {
            graph: read(bundle::GRAPH_FILE),
            tokenizer: read(bundle::TOKENIZER_FILE),
            manifest,
            dir,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let Some((&which, content)) = data.split_first() else {
        return;
    };
    let mut manifest = f.manifest.clone();
    let mut graph = f.graph.as_slice();
    let mut tokenizer = f.tokenizer.as_slice();
    let mut manifest_bytes = None;
    match which % 3 {
        0 => graph = content,
        1 => tokenizer = content,
        _ => manifest_bytes = Some(content),
    }
    for entry in &mut manifest.files {
        if entry.name == bundle::GRAPH_FILE {
            *entry = FileEntry::of_bytes(bundle::GRAPH_FILE, graph);
        } else if entry.name == bundle::TOKENIZER_FILE {
            *entry = FileEntry::of_bytes(bundle::TOKENIZER_FILE, tokenizer);
        }
    }
    let fixed;
    let manifest_bytes = match manifest_bytes {
        Some(m) => m,
        None => {
            fixed = serde_json::to_vec(&manifest).expect("manifest serializes");
            &fixed
        }
    };
    fs::write(f.dir.join(bundle::GRAPH_FILE), graph).expect("write");
    fs::write(f.dir.join(bundle::TOKENIZER_FILE), tokenizer).expect("write");
    fs::write(f.dir.join(bundle::MANIFEST_FILE), manifest_bytes).expect("write");

    let opts = LoadOptions {
        threads: 1,
        verify: true,
        quill_kernels: true,
        quill_attention: true,
        // A process-wide allocator setting: leave it alone under the fuzzer.
        return_memory: false,
        context: Some(8),
        cache_dir: None,
        kv_cache: quill::cli::KvCacheFormat::F32,
        // As `quill generate` loads: the graph rewritten to the last position's logits.
        all_logits: false,
    };
    match Model::load(&f.dir, &opts) {
        Ok(model) => {
            let ids = model.tokenizer.encode("the", false);
            if !ids.is_empty()
                && let Ok(mut session) = model.session()
            {
                let _ = session.forward_last(&ids);
            }
        }
        Err(e) => {
            let msg = e.to_string();
            let dir = f.dir.display().to_string();
            assert!(
                msg.contains(&dir) || matches!(e, quill::BundleError::ContextTooLarge { .. }),
                "error that names no file of the bundle: {msg}"
            );
        }
    }
});
