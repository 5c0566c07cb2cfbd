//! The model bundle: a directory with `manifest.json`, `model.onnx` (the graph),
//! `model.onnx.data` (its weights, as ONNX external data) and `tokenizer.json`.
//!
//! The manifest is versioned (`format` + `version`) and lists every other file with its size and
//! CRC-32, so a truncated or corrupted file is reported by name before tract ever parses it.
//! The names of the graph's inputs and outputs are fixed here and shared with the exporter.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::BundleError;

pub const FORMAT: &str = "quill-bundle";
/// Bumped whenever a reader of the previous version would misread a bundle.
pub const MANIFEST_VERSION: u32 = 1;
pub const ARCHITECTURE: &str = "llama";
pub const MANIFEST_FILE: &str = "manifest.json";
pub const GRAPH_FILE: &str = "model.onnx";
/// The weight formats this runtime reads (`Manifest::weights`).
pub const WEIGHT_FORMATS: [&str; 3] = ["f32", "f16", "int8"];

/// The graph's weights (ONNX external data, named inside the graph).
pub const WEIGHTS_FILE: &str = "model.onnx.data";
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Graph input: token ids, (1, sequence_length) i64.
pub const INPUT_IDS: &str = "input_ids";
/// Graph output: logits, (1, sequence_length, vocab) f32.
pub const LOGITS: &str = "logits";

/// Graph input: cached keys of layer `l`, (1, kv_heads, past_sequence_length, head_dim) f32.
pub fn past_key(l: usize) -> String {
    format!("past_key_values.{l}.key")
}
pub fn past_value(l: usize) -> String {
    format!("past_key_values.{l}.value")
}
/// Graph output: keys of layer `l` including the new tokens, (1, kv_heads, past + seq, head_dim).
pub fn present_key(l: usize) -> String {
    format!("present.{l}.key")
}
pub fn present_value(l: usize) -> String {
    format!("present.{l}.value")
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub n_layers: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub d_ff: usize,
    pub vocab_size: usize,
    pub rope_theta: f32,
    pub rms_eps: f32,
    pub n_params: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatTemplate {
    /// The template family quill renders natively; only `"chatml"` today.
    pub format: String,
    /// The system message the template inserts when a conversation has none.
    pub default_system: Option<String>,
    /// The original Jinja template, kept for reference.
    pub template: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceInfo {
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
    pub description: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub name: String,
    pub bytes: u64,
    pub crc32: u32,
}

impl FileEntry {
    pub fn of_bytes(name: &str, bytes: &[u8]) -> FileEntry {
        FileEntry {
            name: name.to_string(),
            bytes: bytes.len() as u64,
            crc32: crc32fast::hash(bytes),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub name: String,
    pub architecture: String,
    /// Weight storage and arithmetic of the linears: one of [`WEIGHT_FORMATS`].
    pub weights: String,
    /// How the weights were quantized (absent for float32).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<QuantizationInfo>,
    pub config: ModelConfig,
    /// The longest sequence (prompt + generated) the graph's position tables cover.
    pub context_length: usize,
    /// Tokens that end generation.
    pub eos_token_ids: Vec<u32>,
    pub chat: Option<ChatTemplate>,
    pub source: SourceInfo,
    pub files: Vec<FileEntry>,
}

/// Provenance of a quantized bundle, for people and tools reading the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantizationInfo {
    /// What is quantized and how, in words.
    pub scheme: String,
    /// Orthogonal rotations folded into the weights (`residual`, `values`, `ffn`).
    pub rotations: Vec<String>,
    /// The calibration pass, if any (e.g. GPTQ on 8 × 512 tokens of training text).
    pub calibration: Option<String>,
    /// Linears kept in float32 (a study aid; empty in a deployable bundle).
    #[serde(default)]
    pub float_linears: Vec<String>,
}

/// A bundle whose manifest has been read and whose files have been checked.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Bundle {
    /// Opens `dir`: reads and validates the manifest, checks each file's size and CRC-32.
    pub fn open(dir: &Path) -> Result<Bundle, BundleError> {
        let bundle = Self::open_unverified(dir)?;
        for entry in &bundle.manifest.files {
            bundle.verify_file(entry)?;
        }
        Ok(bundle)
    }

    /// Reads and validates the manifest only (used by `quill info`).
    pub fn open_unverified(dir: &Path) -> Result<Bundle, BundleError> {
        if !dir.is_dir() {
            return Err(BundleError::Missing {
                path: dir.to_owned(),
            });
        }
        let path = dir.join(MANIFEST_FILE);
        let text = fs::read_to_string(&path).map_err(|source| BundleError::Io {
            path: path.clone(),
            source,
        })?;
        let manifest = parse_manifest(&text, &path)?;
        Ok(Bundle {
            dir: dir.to_owned(),
            manifest,
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Checks one file's size against the manifest (a cut copy, a file replaced by another).
    pub fn check_size(&self, entry: &FileEntry) -> Result<(), BundleError> {
        let path = self.path(&entry.name);
        let len = fs::metadata(&path)
            .map_err(|source| BundleError::Io {
                path: path.clone(),
                source,
            })?
            .len();
        if len != entry.bytes {
            return Err(BundleError::SizeMismatch {
                path,
                expected: entry.bytes,
                found: len,
            });
        }
        Ok(())
    }

    /// Checks one file's size, then its CRC-32 (about 0.1 s per GB).
    pub fn verify_file(&self, entry: &FileEntry) -> Result<(), BundleError> {
        self.check_size(entry)?;
        let path = self.path(&entry.name);
        let io = |source| BundleError::Io {
            path: path.clone(),
            source,
        };
        let mut f = fs::File::open(&path).map_err(io)?;
        let mut h = crc32fast::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            h.update(buf.get(..n).unwrap_or_default());
        }
        let crc = h.finalize();
        if crc != entry.crc32 {
            return Err(BundleError::ChecksumMismatch {
                path,
                expected: entry.crc32,
                found: crc,
            });
        }
        Ok(())
    }
}

/// Parses and validates a manifest's text; `path` is where it came from, for the errors.
pub fn parse_manifest(text: &str, path: &Path) -> Result<Manifest, BundleError> {
    let path = path.to_owned();
    // Check the format and version before the full schema, so an old or foreign manifest
    // gets a message about its version rather than about a missing field.
    let header: serde_json::Value =
        serde_json::from_str(text).map_err(|e| BundleError::BadManifest {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    let format = header.get("format").and_then(|v| v.as_str()).unwrap_or("");
    if format != FORMAT {
        return Err(BundleError::BadManifest {
            path,
            reason: format!("\"format\" is {format:?}, expected {FORMAT:?}"),
        });
    }
    let version = header.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
    if version != MANIFEST_VERSION as u64 {
        return Err(BundleError::UnsupportedVersion {
            path,
            found: version,
            supported: MANIFEST_VERSION,
        });
    }
    let manifest: Manifest =
        serde_json::from_value(header).map_err(|e| BundleError::BadManifest {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    if manifest.architecture != ARCHITECTURE {
        return Err(BundleError::WrongArchitecture {
            path,
            found: manifest.architecture.clone(),
            expected: ARCHITECTURE,
        });
    }
    if !WEIGHT_FORMATS.contains(&manifest.weights.as_str()) {
        return Err(BundleError::BadManifest {
            path,
            reason: format!(
                "weights {:?} are not supported by this quill (it reads {}); \
                 re-export the bundle with `cargo xtask export --quant int8`",
                manifest.weights,
                WEIGHT_FORMATS.join(", ")
            ),
        });
    }
    // The files a bundle lists are the three it needs, each once, by plain name: a manifest
    // never makes quill read outside its own directory.
    for (i, f) in manifest.files.iter().enumerate() {
        if ![GRAPH_FILE, WEIGHTS_FILE, TOKENIZER_FILE].contains(&f.name.as_str()) {
            return Err(BundleError::BadManifest {
                path,
                reason: format!(
                    "it lists a file {:?}; a bundle holds only {GRAPH_FILE}, {WEIGHTS_FILE} and \
                     {TOKENIZER_FILE}, beside the manifest",
                    f.name
                ),
            });
        }
        if manifest.files.iter().take(i).any(|g| g.name == f.name) {
            return Err(BundleError::BadManifest {
                path,
                reason: format!("it lists {:?} twice", f.name),
            });
        }
    }
    let c = &manifest.config;
    let dims = [
        ("n_layers", c.n_layers),
        ("d_model", c.d_model),
        ("n_heads", c.n_heads),
        ("n_kv_heads", c.n_kv_heads),
        ("head_dim", c.head_dim),
        ("d_ff", c.d_ff),
        ("vocab_size", c.vocab_size),
    ];
    // Sizes are computed from these (memory estimates, buffers): each must be plausible.
    if let Some((name, v)) = dims.iter().find(|(_, v)| *v == 0 || *v > 1 << 20) {
        return Err(BundleError::BadManifest {
            path,
            reason: format!("config.{name} is {v}, expected between 1 and {}", 1 << 20),
        });
    }
    if !c.n_heads.is_multiple_of(c.n_kv_heads) {
        return Err(BundleError::BadManifest {
            path,
            reason: format!(
                "config.n_heads ({}) is not a multiple of config.n_kv_heads ({})",
                c.n_heads, c.n_kv_heads
            ),
        });
    }
    for needed in [GRAPH_FILE, WEIGHTS_FILE, TOKENIZER_FILE] {
        if !manifest.files.iter().any(|f| f.name == needed) {
            return Err(BundleError::BadManifest {
                path,
                reason: format!("no entry for {needed}"),
            });
        }
    }
    Ok(manifest)
}

/// The bundle `quill` uses when `--model` is not given: `$QUILL_MODEL`, else
/// `models/bundles/smollm2-135m-instruct-int8` under the current directory.
pub fn default_bundle_dir() -> PathBuf {
    std::env::var_os("QUILL_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("models/bundles").join(DEFAULT_BUNDLE_NAME))
}

pub const DEFAULT_BUNDLE_NAME: &str = "smollm2-135m-instruct-int8";
