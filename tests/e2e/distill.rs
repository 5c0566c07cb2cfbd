//! The distillation pipeline on a tiny budget, on the real teacher and real text: choose two
//! blocks, heal them for a few steps in two slices (the second resumes the first's checkpoint;
//! the last half with fake quantization, and a control run of those steps without it),
//! export int8, write the model card, and generate with the bundle.

use std::path::Path;

use quill::{GenerateOptions, Generator, LoadOptions, Model, SamplingOptions, TokenBuf};
use xtask::distill::card::Measure;
use xtask::distill::{DistillConfig, DistillOptions, distill};
use xtask::export::WeightFormat;
use xtask::preset::Preset;

use crate::support;

#[test]
fn a_tiny_student_is_distilled_resumed_exported_and_generates() {
    let config = DistillConfig {
        keep_blocks: 2,
        importance_windows: 2,
        tokens: 6 * 2 * 2 * 32,
        seq_len: 32,
        batch: 2,
        accumulate: 2,
        lr: 1e-3,
        min_lr: 1e-4,
        warmup_steps: 1,
        checkpoint_every: 2,
        eval_every: 3,
        eval_windows: 2,
        // Steps 3–5 with fake quantization; the resume at step 4 turns it back on.
        qat_fraction: 0.5,
        ..DistillConfig::tiny_for_tests()
    };
    let preset = Preset {
        name: "ci-tiny".into(),
        description: "two blocks, six steps: the pipeline's CI test".into(),
        quant: "int8".into(),
        calibrate: 0,
        distill: Some(config),
    };
    let scratch = Path::new(env!("CARGO_TARGET_TMPDIR")).join("distill-ci");
    let _ = std::fs::remove_dir_all(&scratch);
    let opts = DistillOptions {
        work: Some(scratch.join("work")),
        out: Some(scratch.join("bundle")),
        card: Some(scratch.join("card")),
        measure: Measure {
            eval_tokens: 384,
            bench_runs: 1,
            bench_tokens: 4,
            teacher_f32: Some(support::bundle_dir().to_owned()),
            teacher_int8: Some(support::quant_bundle_dir(WeightFormat::Int8).to_owned()),
            qat_control: true,
        },
        stop_after: Some(4),
        ..Default::default()
    };

    // First slice: four of six steps, then stop as Ctrl-C would.
    assert!(distill(&preset, &opts).unwrap().is_none());
    let ck = xtask::distill::train::load_checkpoint(&scratch.join("work/checkpoint.safetensors"))
        .unwrap();
    assert_eq!(ck.progress.step, 4);
    // The checkpoint taken when fake quantization began, for the control run.
    let snap = xtask::distill::train::load_checkpoint(&scratch.join("work/qat-start.safetensors"))
        .unwrap();
    assert_eq!(snap.progress.step, 3);
    let first_rows = ck.progress.train.clone();

    // Second: resumes at step 4 and finishes.
    let d = distill(
        &preset,
        &DistillOptions {
            stop_after: None,
            ..opts.clone()
        },
    )
    .unwrap()
    .expect("the run finishes");
    let p = &d.progress;
    assert_eq!(p.step, 6);
    assert_eq!(p.train.len(), 6, "the history survives the resume");
    assert_eq!(
        &p.train[..4],
        &first_rows[..],
        "the first slice's rows are kept as they were"
    );
    assert_eq!(d.kept.len(), 2);
    // The loss falls: training loss of the last step below the first, held-out too.
    let (first, last) = (p.train[0][2], p.train[5][2]);
    assert!(last < first, "training loss {first} -> {last}");
    let (h0, h1) = (p.eval[0][1], p.eval.last().unwrap()[1]);
    assert!(h1 < h0, "held-out loss {h0} -> {h1}");

    // The bundle loads in quill and generates text.
    let m = Model::load(&d.bundle, &LoadOptions::default()).unwrap();
    assert_eq!(m.manifest().config.n_layers, 2);
    assert_eq!(m.manifest().weights, "int8");
    let mut s = m.session().unwrap();
    let ids = m.tokenizer.encode("To be, or not to be", false);
    let mut history = TokenBuf::new();
    let opts = GenerateOptions {
        sampling: SamplingOptions::greedy(),
        max_tokens: 6,
        stop: vec![],
    };
    let mut g = Generator::new(&mut s, &m.tokenizer, &[], &mut history, &ids, &opts).unwrap();
    let mut text = String::new();
    g.run(|t| text.push_str(t)).unwrap();
    assert_eq!(history.len(), ids.len() + 6);
    assert!(!text.is_empty());

    // The card: figures and the loss curves.
    let card = std::fs::read_to_string(scratch.join("card/README.md")).unwrap();
    for needle in [
        "held-out perplexity",
        "before healing",
        "top-1 agreement",
        "decode tok/s",
        "**",
        "| without (control) |",
    ] {
        assert!(card.contains(needle), "card lacks {needle:?}:\n{card}");
    }
    let png = std::fs::read(scratch.join("card/loss.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    // Checkpoints with their optimizer moments and four bundles: about 1.5 GB of disk.
    std::fs::remove_dir_all(&scratch).unwrap();
}
