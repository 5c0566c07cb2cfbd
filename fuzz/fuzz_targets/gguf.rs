//! The GGUF reader (`xtask::gguf::Gguf::parse`) on arbitrary bytes, then everything the exporter
//! asks of a parsed file: every tensor dequantized, the llama config, the weights and the
//! tokenizer export.
//!
//! Beyond "no panic": allocations are bounded by the file (libFuzzer's `-malloc_limit_mb` turns a
//! length that is believed before it is checked into a crash), every tensor the reader accepts
//! lies inside the file and dequantizes to exactly `n_elements` floats.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use xtask::gguf::Gguf;

fuzz_target!(|data: &[u8]| {
    let len = data.len();
    let Ok(g) = Gguf::parse(Path::new("fuzz.gguf"), data.to_vec()) else {
        return;
    };
    for (name, info) in &g.tensors {
        assert!(
            info.offset + info.n_bytes <= len,
            "tensor {name} outside the file"
        );
        if let Ok(x) = g.f32(name) {
            assert_eq!(x.len(), info.n_elements(), "tensor {name}");
        }
    }
    for (k, _) in &g.metadata {
        let _ = g.meta_u64(k);
        let _ = g.meta_f64(k);
        let _ = g.meta_str(k);
    }
    let _ = xtask::llama::LlamaConfig::from_gguf(&g);
    let _ = xtask::tokenizer_export::from_gguf(&g);
    // The weights: bounded by the file, since every tensor was checked against it.
    let _ = xtask::llama::LlamaWeights::from_gguf(&g, true);
});
