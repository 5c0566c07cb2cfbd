//! The pipeline behind `cargo xtask distill`: choose, heal, export, card (see the module above).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, ensure};

use super::model::Decoder;
use super::{card, importance, train};
use crate::export::{ExportOptions, QuantOptions, WeightFormat};
use crate::gguf::Gguf;
use crate::llama::LlamaWeights;
use crate::preset::Preset;

/// Options of one `cargo xtask distill` run beyond the preset.
#[derive(Debug, Clone, Default)]
pub struct DistillOptions {
    /// Ignore (and replace) an existing checkpoint.
    pub fresh: bool,
    /// Override the preset's token budget: a reduced run of the same pipeline, whose bundle is
    /// `<bundle name>-reduced` and whose card stays in the work directory.
    pub tokens: Option<usize>,
    /// Where the bundle goes [default: models/bundles/<preset's bundle name>].
    pub out: Option<PathBuf>,
    /// Work directory [default: target/distill/<preset>, or <preset>-reduced].
    pub work: Option<PathBuf>,
    /// Model card directory [default: models/<preset>]; `None` with `no_card` skips it.
    pub card: Option<PathBuf>,
    pub no_card: bool,
    /// How much the card measures.
    pub measure: card::Measure,
    /// Stop after this many steps of this run, as Ctrl-C does (checkpoint saved; the next run
    /// resumes): training in slices.
    pub stop_after: Option<usize>,
}

/// What a finished distillation produced.
#[derive(Debug)]
pub struct Distilled {
    pub bundle: PathBuf,
    pub kept: Vec<usize>,
    pub progress: train::Progress,
    pub card: Option<PathBuf>,
}

/// Token ids of the training and held-out texts, with the tokenizer that made them.
pub struct Texts {
    pub train: Vec<u32>,
    pub eval: Vec<u32>,
    pub eval_text: String,
}

fn texts(g: &Gguf) -> Result<Texts> {
    let tok = crate::tokenizer_export::from_gguf(g)?;
    let tok = quill::Tokenizer::from_json(&tok.json).map_err(anyhow::Error::msg)?;
    let split = crate::text::shakespeare()?;
    let train = std::fs::read_to_string(&split.train)?;
    let eval_text = std::fs::read_to_string(&split.eval)?;
    Ok(Texts {
        train: tok.encode(&train, false),
        eval: tok.encode(&eval_text, false),
        eval_text,
    })
}

/// `n` windows of `len` tokens spread evenly over `ids`.
pub fn spread_windows(ids: &[u32], len: usize, n: usize) -> Vec<&[u32]> {
    if ids.len() < len || n == 0 {
        return Vec::new();
    }
    let room = ids.len() - len;
    (0..n)
        .map(|i| {
            let start = if n == 1 { 0 } else { room * i / (n - 1) };
            &ids[start..start + len]
        })
        .collect()
}

/// The whole pipeline for a preset with a `[distill]` table. `None`: training stopped early
/// (Ctrl-C or `stop_after`) with its checkpoint saved; run it again to resume.
pub fn distill(preset: &Preset, opts: &DistillOptions) -> Result<Option<Distilled>> {
    let mut config = preset
        .distill
        .clone()
        .with_context(|| format!("preset {} has no [distill] table", preset.name))?;
    // A reduced budget (`--tokens`) is kept apart from the preset's own checkpoint, bundle and
    // card.
    let reduced = opts.tokens.is_some_and(|t| t != config.tokens);
    if let Some(t) = opts.tokens {
        config.tokens = t;
    }
    let work_name = if reduced {
        format!("{}-reduced", preset.name)
    } else {
        preset.name.clone()
    };
    let root = crate::workspace_root();
    let work = opts
        .work
        .clone()
        .unwrap_or_else(|| root.join("target/distill").join(&work_name));
    std::fs::create_dir_all(&work)?;
    let teacher_path = crate::fetch::teacher()?;
    let g = Gguf::open(&teacher_path)?;
    let weights = LlamaWeights::from_gguf(&g, true)?;
    config.check(weights.config.n_layers)?;
    ensure!(
        config.qat_fraction == 0.0 || preset.format()? == WeightFormat::Int8,
        "preset {}: qat_fraction simulates the int8 export; its format is {}",
        preset.name,
        preset.quant
    );
    let texts = texts(&g)?;
    eprintln!(
        "teacher: {} blocks, {:.1} M parameters; text: {} training and {} held-out tokens",
        weights.config.n_layers,
        weights.config.n_params() as f64 / 1e6,
        texts.train.len(),
        texts.eval.len()
    );

    // 1. Choose the blocks.
    let teacher = Decoder::new(&weights, false, false)?;
    let calib = spread_windows(&texts.train, config.seq_len, config.importance_windows);
    let scores = importance::score(&teacher, &calib)?;
    let kept = importance::keep(&scores, config.keep_blocks);
    importance::save(&work.join("importance.json"), &scores, &kept)?;
    eprintln!("keeping blocks {kept:?} of {}", scores.len());
    let mut student_w = weights.clone();
    student_w.blocks = kept.iter().map(|&b| weights.blocks[b].clone()).collect();
    student_w.config.n_layers = kept.len();
    let student = Decoder::new(&student_w, true, config.train_embedding)?;

    // 2. Heal, resuming from a checkpoint of the same configuration.
    let checkpoint = work.join("checkpoint.safetensors");
    let snapshot = work.join("qat-start.safetensors");
    let control_checkpoint = work.join("control.safetensors");
    if opts.fresh {
        let _ = std::fs::remove_file(&snapshot);
        let _ = std::fs::remove_file(&control_checkpoint);
    }
    let mut progress = train::Progress::default();
    let mut resumed = None;
    if checkpoint.exists() && !opts.fresh {
        let ck = train::load_checkpoint(&checkpoint)?;
        ensure!(
            ck.config == config,
            "{} was made with another configuration ({:?}); pass --fresh to start over, or \
             restore the preset it was made with",
            checkpoint.display(),
            ck.config
        );
        student.load(&ck.tensors)?;
        eprintln!(
            "resuming from {} at step {} ({} tokens)",
            checkpoint.display(),
            ck.progress.step,
            ck.progress.tokens
        );
        progress = ck.progress;
        resumed = Some(ck.tensors);
    }
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        // A second Ctrl-C while the checkpoint is written kills the process the usual way.
        let _ = ctrlc::set_handler(move || {
            if flag.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("\nCtrl-C: finishing this step and saving a checkpoint…");
        });
    }
    let eval_windows = spread_windows(&texts.eval, config.seq_len + 1, config.eval_windows);
    let run = train::Run {
        config: &config,
        teacher: &teacher,
        student: &student,
        train_ids: &texts.train,
        eval_windows,
        checkpoint: checkpoint.clone(),
        interrupted: interrupted.clone(),
        stop_after: opts.stop_after,
        qat_snapshot: Some(snapshot.clone()),
    };
    if run.train(&mut progress, resumed.as_ref())? == train::Outcome::Interrupted {
        return Ok(None);
    }
    drop(resumed);

    // 2b. What fake quantization brings: its steps again from the same checkpoint, without it.
    let control = if run.qat_start().is_some() && !opts.no_card && opts.measure.qat_control {
        let mut cfg = config.clone();
        cfg.qat_fraction = 0.0;
        let c_student = Decoder::new(&student_w, true, cfg.train_embedding)?;
        let from = if control_checkpoint.exists() {
            control_checkpoint.clone()
        } else {
            snapshot.clone()
        };
        let ck = train::load_checkpoint(&from).with_context(|| {
            format!(
                "the control run starts from {}, saved when fake quantization began; pass \
                 --fresh to redo the whole run",
                from.display()
            )
        })?;
        if from == control_checkpoint {
            ensure!(
                ck.config == cfg,
                "{} belongs to another configuration; pass --fresh to start over",
                from.display()
            );
        }
        c_student.load(&ck.tensors)?;
        eprintln!(
            "control: steps {}..{} again without fake quantization, from {}",
            ck.progress.step,
            run.total_steps(),
            from.display()
        );
        let mut c_progress = ck.progress;
        let c_run = train::Run {
            config: &cfg,
            student: &c_student,
            checkpoint: control_checkpoint.clone(),
            qat_snapshot: None,
            eval_windows: run.eval_windows.clone(),
            ..run
        };
        if c_run.train(&mut c_progress, Some(&ck.tensors))? == train::Outcome::Interrupted {
            return Ok(None);
        }
        Some(c_student.to_weights()?)
    } else {
        None
    };

    // 3. Export the healed student.
    let name = if reduced {
        format!("{}-reduced", preset.bundle_name())
    } else {
        preset.bundle_name()
    };
    let bundle = opts
        .out
        .clone()
        .unwrap_or_else(|| crate::export::default_out_dir(&root, &name));
    let healed = student.to_weights()?;
    drop(student);
    drop(teacher);
    crate::export::export_weights(
        &ExportOptions {
            teacher: teacher_path.clone(),
            out_dir: bundle.clone(),
            name,
            quant: QuantOptions::new(preset.format()?),
            blocks: None,
        },
        healed.clone(),
    )?;

    // 4. The model card.
    let card = if opts.no_card {
        None
    } else {
        let dir = match &opts.card {
            Some(d) => d.clone(),
            None if reduced => work.join("card"),
            None => root.join("models").join(&preset.name),
        };
        card::write(&card::Inputs {
            preset,
            config: &config,
            teacher_path: &teacher_path,
            teacher: &weights,
            pruned: &student_w,
            healed: &healed,
            bundle: &bundle,
            scores: &scores,
            kept: &kept,
            progress: &progress,
            eval_text: &texts.eval_text,
            work: &work,
            dir: &dir,
            measure: &opts.measure,
            control: control.as_ref(),
        })?;
        Some(dir)
    };
    Ok(Some(Distilled {
        bundle,
        kept,
        progress,
        card,
    }))
}

/// A float32 bundle of `w` in `dir` (for measurements), unless one is there already.
pub fn float_bundle(
    teacher: &std::path::Path,
    w: &LlamaWeights,
    dir: &std::path::Path,
    name: &str,
) -> Result<()> {
    if quill::bundle::Bundle::open(dir).is_ok() {
        return Ok(());
    }
    crate::export::export_weights(
        &ExportOptions {
            teacher: teacher.to_owned(),
            out_dir: dir.to_owned(),
            name: name.to_string(),
            quant: QuantOptions::new(WeightFormat::F32),
            blocks: None,
        },
        w.clone(),
    )?;
    Ok(())
}
