//! quill's build step as a library: read GGUF checkpoints, fetch the teacher, export bundles,
//! and an independent float reference forward pass (used by the tests to check the exported
//! graph), and the distillation of a smaller student.

pub mod calibrate;
pub mod cross;
pub mod distill;
pub mod export;
pub mod fetch;
pub mod gguf;
pub mod llama;
pub mod onnx;
pub mod preset;
pub mod quant;
pub mod reference;
pub mod text;
pub mod tokenizer_export;

use std::path::PathBuf;

/// The workspace root (the directory holding xtask/).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}
