//! Board profiles (`boards/*.toml`): what quill needs to know about the machine it runs on, and
//! the memory estimate that decides whether a bundle fits it.
//!
//! The files in `boards/` are compiled in, so `--board rpi5` works wherever the binary goes; a
//! path to a `.toml` file (a copy edited for another board) works too. The build step
//! (`cargo xtask build|emulate|bundle --board`) reads the same files.

use std::path::Path;

use serde::Deserialize;

use crate::bundle::Manifest;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cpu {
    /// The core, e.g. `Cortex-A76`.
    pub model: String,
    /// Instruction-set features quill's kernels care about: `neon`, `dotprod`, `fp16`.
    pub features: Vec<String>,
    /// qemu's `-cpu` for it (qemu-aarch64).
    pub qemu: String,
    /// qemu's `-cpu` for the 32-bit build (qemu-arm), when there is one.
    #[serde(default)]
    pub qemu_32bit: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Serial {
    pub device: String,
    pub baud: u32,
}

/// The bundle a board should run.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recommended {
    /// A build preset (`teacher` = the teacher, int8; distilled presets come with issue #4).
    pub preset: String,
    pub quant: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Board {
    pub name: String,
    pub description: String,
    /// Rust target triple of the 64-bit OS.
    pub target: String,
    /// Rust target triple of the 32-bit OS, where one is common (32-bit Raspberry Pi OS).
    #[serde(default)]
    pub target_32bit: Option<String>,
    pub cores: usize,
    /// Default `--threads`.
    pub threads: usize,
    pub ram_mb: u64,
    /// What quill may use, in MB (10^6 bytes): the rest is for the OS.
    pub memory_budget_mb: u64,
    /// Default context in tokens (the KV cache's size at the budget).
    pub context: usize,
    pub cpu: Cpu,
    pub serial: Serial,
    pub bundle: Recommended,
}

/// The built-in profiles, from `boards/`.
pub const BUILTIN: &[(&str, &str)] = &[
    ("rpi-zero-2w", include_str!("../../boards/rpi-zero-2w.toml")),
    ("rpi3", include_str!("../../boards/rpi3.toml")),
    ("rpi4", include_str!("../../boards/rpi4.toml")),
    ("rpi5", include_str!("../../boards/rpi5.toml")),
    ("jetson-nano", include_str!("../../boards/jetson-nano.toml")),
    (
        "jetson-orin-nano",
        include_str!("../../boards/jetson-orin-nano.toml"),
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum BoardError {
    #[error("no board called `{0}`; the built-in boards are {names}, or give a path to a .toml file", names = names())]
    Unknown(String),
    #[error("cannot read the board file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the board file {path} is not a valid board profile: {message}")]
    Invalid { path: String, message: String },
}

fn names() -> String {
    BUILTIN
        .iter()
        .map(|(n, _)| *n)
        .collect::<Vec<_>>()
        .join(", ")
}

impl Board {
    /// A built-in board by name, or a board file by path (anything containing `/` or ending in
    /// `.toml`).
    pub fn load(name_or_path: &str) -> Result<Board, BoardError> {
        let (origin, text) = if name_or_path.contains('/') || name_or_path.ends_with(".toml") {
            let text = std::fs::read_to_string(Path::new(name_or_path)).map_err(|source| {
                BoardError::Read {
                    path: name_or_path.to_owned(),
                    source,
                }
            })?;
            (name_or_path.to_owned(), text)
        } else {
            let (_, text) = BUILTIN
                .iter()
                .find(|(n, _)| *n == name_or_path)
                .ok_or_else(|| BoardError::Unknown(name_or_path.to_owned()))?;
            (format!("boards/{name_or_path}.toml"), (*text).to_owned())
        };
        Board::parse(&origin, &text)
    }

    pub fn parse(origin: &str, text: &str) -> Result<Board, BoardError> {
        let invalid = |message: String| BoardError::Invalid {
            path: origin.to_owned(),
            message,
        };
        let b: Board = toml::from_str(text).map_err(|e| invalid(e.message().to_owned()))?;
        if b.threads == 0 || b.threads > b.cores {
            return Err(invalid(format!(
                "threads must be between 1 and cores ({}), got {}",
                b.cores, b.threads
            )));
        }
        if b.memory_budget_mb == 0 || b.memory_budget_mb > b.ram_mb {
            return Err(invalid(format!(
                "memory_budget_mb must be between 1 and ram_mb ({}), got {}",
                b.ram_mb, b.memory_budget_mb
            )));
        }
        if b.context == 0 {
            return Err(invalid("context must be at least 1 token".into()));
        }
        Ok(b)
    }

    pub fn budget_bytes(&self) -> u64 {
        self.memory_budget_mb * 1_000_000
    }

    pub fn has_feature(&self, f: &str) -> bool {
        self.cpu.features.iter().any(|x| x == f)
    }
}

/// Working memory beyond the weights and the KV cache: the binary, the tokenizer, tract's plan
/// and activations. Calibrated on measured peak RSS of `quill generate` (x86-64, 1 thread): int8
/// 237 MB for 172 MB of bundle, f32 783 MB for 657 MB.
const BASE_BYTES: u64 = 48_000_000;
/// Activations and packing scratch grow with the model: a share of the weights' bytes.
const WEIGHT_SCRATCH_PERCENT: u64 = 15;

/// What a bundle needs in memory, by part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryEstimate {
    pub weights: u64,
    pub kv_cache: u64,
    pub working: u64,
    pub context: usize,
}

impl MemoryEstimate {
    /// For a bundle at a context of `context` tokens, with an f32 KV cache.
    pub fn of(m: &Manifest, context: usize) -> MemoryEstimate {
        Self::with_cache(m, context, crate::attention::KvCacheFormat::F32)
    }

    /// For a bundle at a context of `context` tokens, with a KV cache in `format`.
    pub fn with_cache(
        m: &Manifest,
        context: usize,
        format: crate::attention::KvCacheFormat,
    ) -> MemoryEstimate {
        let weights: u64 = m
            .files
            .iter()
            .filter(|f| f.name != crate::bundle::TOKENIZER_FILE)
            .map(|f| f.bytes)
            .sum();
        let c = &m.config;
        // Keys and values, every layer: (layer, 2, kv_heads, context, head_dim), plus int8's
        // f32 scale per vector.
        let per_vector = c.head_dim * format.bytes_per_value()
            + if format == crate::attention::KvCacheFormat::Int8 {
                4
            } else {
                0
            };
        let kv_cache = (c.n_layers * 2 * c.n_kv_heads * per_vector) as u64 * context as u64;
        let working = BASE_BYTES + weights * WEIGHT_SCRATCH_PERCENT / 100;
        MemoryEstimate {
            weights,
            kv_cache,
            working,
            context,
        }
    }

    pub fn total(&self) -> u64 {
        self.weights + self.kv_cache + self.working
    }
}

impl std::fmt::Display for MemoryEstimate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mb = |b: u64| b as f64 / 1e6;
        write!(
            f,
            "{:.0} MB (weights {:.0} MB + KV cache {:.0} MB for {} tokens + working memory {:.0} MB)",
            mb(self.total()),
            mb(self.weights),
            mb(self.kv_cache),
            self.context,
            mb(self.working)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_board_parses_and_is_named_after_its_file() {
        for (name, text) in BUILTIN {
            let b = Board::parse(name, text).unwrap();
            assert_eq!(&b.name, name);
            assert!(b.target.ends_with("-linux-gnu"), "{name}: {}", b.target);
            assert!(b.has_feature("neon"));
        }
        assert!(Board::load("rpi5").unwrap().has_feature("dotprod"));
        assert!(!Board::load("rpi4").unwrap().has_feature("dotprod"));
    }

    #[test]
    fn bad_boards_are_named() {
        let e = Board::load("rpi9").unwrap_err().to_string();
        assert!(
            e.contains("no board called `rpi9`") && e.contains("rpi5"),
            "{e}"
        );
        let rpi5 = BUILTIN.iter().find(|(n, _)| *n == "rpi5").unwrap().1;
        let e = Board::parse("x.toml", &rpi5.replace("threads = 4", "threads = 9"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("threads must be between 1 and cores (4), got 9"),
            "{e}"
        );
        let e = Board::parse("x.toml", &format!("{rpi5}\nturbo = true"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `turbo`"), "{e}");
    }
}
