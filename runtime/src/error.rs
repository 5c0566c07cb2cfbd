//! quill's error types. Each message says what was expected, what was found, and what to do.

use std::path::PathBuf;

/// Something is wrong with a model bundle on disk.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error(
        "no model bundle at {path}: build one with `cargo xtask fetch-teacher && cargo xtask export` \
         or pass --model DIR"
    )]
    Missing { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not a valid quill manifest: {reason}; re-export the bundle with `cargo xtask export`"
    )]
    BadManifest { path: PathBuf, reason: String },
    #[error(
        "{path} is manifest version {found} but this quill reads version {supported}; \
         re-export the bundle with this quill's `cargo xtask export`"
    )]
    UnsupportedVersion {
        path: PathBuf,
        found: u64,
        supported: u32,
    },
    #[error("{path} describes a {found:?} model; this quill runs {expected:?} decoders")]
    WrongArchitecture {
        path: PathBuf,
        found: String,
        expected: &'static str,
    },
    #[error(
        "{path} has {found} bytes but the manifest says {expected}: the file is truncated or \
         was replaced; re-export the bundle"
    )]
    SizeMismatch {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error(
        "{path} is corrupted: CRC-32 {found:08x}, the manifest says {expected:08x}; re-export the bundle"
    )]
    ChecksumMismatch {
        path: PathBuf,
        expected: u32,
        found: u32,
    },
    #[error("{path}: {reason}")]
    BadTokenizer { path: PathBuf, reason: String },
    #[error("{path} does not load as the expected decoder graph: {reason}")]
    BadGraph { path: PathBuf, reason: String },
    #[error("{path} does not hold the weights its graph describes: {reason}")]
    BadWeights { path: PathBuf, reason: String },
    #[error(
        "the model's context is {model} tokens but this quill was built for at most {capacity} \
         (quill::MAX_CONTEXT); rebuild quill with a larger MAX_CONTEXT"
    )]
    ContextTooLarge { model: usize, capacity: usize },
}

/// Generation failed.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(
        "the prompt is {prompt} tokens but the context holds {context} (with room for at least one new \
         token); shorten the prompt"
    )]
    PromptTooLong { prompt: usize, context: usize },
    #[error("the prompt is empty: give at least one character of text")]
    EmptyPrompt,
    #[error("the context is full ({context} tokens); start a new conversation")]
    ContextFull { context: usize },
    #[error("invalid sampling option: {0}")]
    BadOption(String),
    #[error(
        "the model produced NaN or infinite logits at position {position}: its weights are \
         damaged or overflow; generation stopped (re-export the bundle, or report it)"
    )]
    NonFiniteLogits { position: usize },
    #[error("tract failed while running the model: {0:#}")]
    Tract(#[from] anyhow::Error),
}
