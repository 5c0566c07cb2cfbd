//! `cargo xtask export`: a GGUF checkpoint → a quill model bundle directory.
//!
//! The bundle holds `model.onnx` (the decoder with a KV cache, standard ONNX opset 23, its
//! weights in the ONNX external data file `model.onnx.data`),
//! `tokenizer.json` (Hugging Face `tokenizers` format, so independent tools can read it) and
//! `manifest.json` (see `quill::bundle::Manifest`).
//!
//! Graph, for `S` new tokens after `P` cached ones (`T = P + S`), batch fixed at 1:
//! ```text
//! input_ids (1, S) i64 ─ Gather(embedding) ─ x (1, S, D)
//! P = shape(past_key_values.0.value)[2];  qpos = P..T;  mask (S, T) = 0 where kpos ≤ qpos, else −∞
//! per layer l:
//!   h = RMSNorm(x)                                                   (1, S, D)
//!   q = rope(h·Wq) (1, H, S, hd)   k = rope(h·Wk) (1, KV, S, hd)   v = h·Wv (1, KV, S, hd)
//!   a, present.l.key, present.l.value =
//!       Attention(q, k, v, mask, past_key_values.l.key, past_key_values.l.value)
//!       (1, H, S, hd), (1, KV, T, hd), (1, KV, T, hd)      — GQA: H/KV query heads per KV head
//!   x += a·Wo ;  x += (silu(h'·Wg) ⊙ h'·Wu)·Wd  with h' = RMSNorm(x)
//! logits = RMSNorm(x)·Wlmᵀ                                            (1, S, V)
//! ```
//! The standard `Attention` operator (opset 23) is what lets tract fuse attention and grow the KV
//! cache in place (`InPlaceKvSdpa`) instead of copying it at every step. The mask is built with
//! `LessOrEqual` and `Where` (tract cannot analyse a shape-derived `Trilu` offset), and RoPE is
//! written as rotate-half so tract recognises it (`ApplyRope`).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use prost::Message;
use quill::atomic;
use quill::bundle::{self, FileEntry, Manifest, ModelConfig, SourceInfo};

use crate::calibrate::Hessians;
use crate::gguf::Gguf;
use crate::llama::{Block, LlamaWeights, Matrix};
use crate::onnx::{Attr, Dim, Elem, GraphBuilder};
use crate::quant::{self, KronOrthogonal, Rotation};
use crate::tokenizer_export;

/// How the exported graph stores its weights and computes its linears.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WeightFormat {
    /// float32 weights and arithmetic.
    F32,
    /// float16 weights and matmuls (for CPUs with fp16 arithmetic); norms, rotary tables,
    /// softmax and the residual stream stay float32.
    F16,
    /// int8 weights (one symmetric scale per output channel), activations quantized per token at
    /// run time, the matmuls as ONNX `MatMulInteger` (int8 × int8 → int32).
    Int8,
}

impl WeightFormat {
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::F32 => "f32",
            WeightFormat::F16 => "f16",
            WeightFormat::Int8 => "int8",
        }
    }
}

/// The linears of the model, by role; [`QuantOptions::keep_float`] names them.
pub const LINEAR_KINDS: [&str; 9] = [
    "q",
    "k",
    "v",
    "o",
    "gate",
    "up",
    "down",
    "lm_head",
    "embedding",
];

/// Quantization choices for [`export`].
#[derive(Debug, Clone)]
pub struct QuantOptions {
    pub format: WeightFormat,
    /// Orthogonal rotations folded into the weights (see [`crate::quant`]); exact in float, they
    /// only change how well the int8 form approximates the model.
    pub rotation: Rotation,
    /// Study aid: linears of these kinds ([`LINEAR_KINDS`]) stay float32.
    pub keep_float: Vec<String>,
    /// Study aid: quantize the weights only (the graph dequantizes them and multiplies in
    /// float32), to separate weight error from activation error. Not a deployable bundle.
    pub weights_only: bool,
    /// int8 only: round the weights with GPTQ against Hessians measured on this many windows
    /// of 512 tokens of the training text ([`crate::calibrate`]); `None` = calibration-free.
    pub calibrate: Option<usize>,
}

impl QuantOptions {
    pub fn f32() -> QuantOptions {
        QuantOptions::new(WeightFormat::F32)
    }

    /// The defaults for a format: int8 gets every rotation.
    pub fn new(format: WeightFormat) -> QuantOptions {
        QuantOptions {
            format,
            rotation: if format == WeightFormat::Int8 {
                Rotation::ALL
            } else {
                Rotation::NONE
            },
            keep_float: Vec::new(),
            weights_only: false,
            calibrate: None,
        }
    }
}

pub struct ExportOptions {
    pub teacher: PathBuf,
    pub out_dir: PathBuf,
    pub name: String,
    pub quant: QuantOptions,
    /// Keep only these blocks of the checkpoint, in this order (a pruned, unhealed student;
    /// the cross-build tests use two blocks as a small real model). `None`: all of them.
    pub blocks: Option<Vec<usize>>,
}

/// The default bundle name for a format: `smollm2-135m-instruct-<format>`.
pub fn default_name(format: WeightFormat) -> String {
    format!("smollm2-135m-instruct-{}", format.name())
}

/// Exports a bundle; returns the manifest written.
pub fn export(opts: &ExportOptions) -> Result<Manifest> {
    let t0 = Instant::now();
    let g = Gguf::open(&opts.teacher)?;
    let mut weights = LlamaWeights::from_gguf(&g, true)?;
    eprintln!(
        "read {} ({} tensors, {:.1} M parameters) in {:.1} s",
        opts.teacher.display(),
        g.tensors.len(),
        weights.config.n_params() as f64 / 1e6,
        t0.elapsed().as_secs_f32()
    );
    if let Some(keep) = &opts.blocks {
        let n = weights.blocks.len();
        anyhow::ensure!(
            !keep.is_empty() && keep.windows(2).all(|w| w[0] < w[1]) && keep.iter().all(|&b| b < n),
            "blocks to keep must be increasing indices below {n}, got {keep:?}"
        );
        let mut all: Vec<Option<Block>> = std::mem::take(&mut weights.blocks)
            .into_iter()
            .map(Some)
            .collect();
        weights.blocks = keep.iter().filter_map(|&b| all[b].take()).collect();
        weights.config.n_layers = keep.len();
    }
    write_bundle(opts, &g, weights, t0)
}

/// Exports weights made elsewhere (a distilled student) with the tokenizer and source
/// description of `opts.teacher`, the checkpoint they descend from; `opts.blocks` is ignored.
pub fn export_weights(opts: &ExportOptions, weights: LlamaWeights) -> Result<Manifest> {
    let g = Gguf::open(&opts.teacher)?;
    write_bundle(opts, &g, weights, Instant::now())
}

fn write_bundle(
    opts: &ExportOptions,
    g: &Gguf,
    mut weights: LlamaWeights,
    t0: Instant,
) -> Result<Manifest> {
    let tokenizer = tokenizer_export::from_gguf(g)?;
    let source_sha256 = crate::fetch::sha256_file(&opts.teacher)?;
    let source_bytes = fs::metadata(&opts.teacher)?.len();

    // Write into a sibling temporary directory, then swap it in: a crash never leaves a half
    // bundle. A `.partial` left by a killed export is removed here.
    let tmp = opts.out_dir.with_extension("partial");
    if tmp.exists() {
        fs::remove_dir_all(&tmp)?;
    }
    fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;

    let ffn_rotation = quant::rotate(&mut weights, opts.quant.rotation, ROTATION_SEED)?;
    let hessians = match opts.quant.calibrate {
        Some(windows) if opts.quant.format == WeightFormat::Int8 => {
            let text = std::fs::read_to_string(crate::text::shakespeare()?.train)?;
            let tok = quill::Tokenizer::from_json(&tokenizer.json).map_err(anyhow::Error::msg)?;
            let ids = tok.encode(&text, false);
            let work = tmp.join("calibration");
            let h = crate::calibrate::collect(
                &weights,
                ffn_rotation.as_ref(),
                &ids,
                CALIBRATION_WINDOW,
                windows,
                &work,
            )?;
            fs::remove_dir_all(&work)?;
            Some(h)
        }
        Some(_) => anyhow::bail!("--calibrate applies to --quant int8 only"),
        None => None,
    };
    let (model, weights_data, _) = build_graph(
        &weights,
        &opts.quant,
        ffn_rotation.as_ref(),
        hessians.as_ref(),
        false,
    );
    let mut files = Vec::new();
    for (name, bytes) in [
        (bundle::GRAPH_FILE, model.encode_to_vec()),
        (bundle::WEIGHTS_FILE, weights_data),
    ] {
        let path = tmp.join(name);
        atomic::write_synced(&path, &bytes)
            .with_context(|| format!("writing {}", path.display()))?;
        files.push(FileEntry::of_bytes(name, &bytes));
    }
    drop(model);

    let tok_bytes = serde_json::to_vec(&tokenizer.json)?;
    atomic::write_synced(&tmp.join(bundle::TOKENIZER_FILE), &tok_bytes)?;
    files.push(FileEntry::of_bytes(bundle::TOKENIZER_FILE, &tok_bytes));

    let c = &weights.config;
    let manifest = Manifest {
        format: bundle::FORMAT.to_string(),
        version: bundle::MANIFEST_VERSION,
        name: opts.name.clone(),
        architecture: bundle::ARCHITECTURE.to_string(),
        weights: opts.quant.format.name().to_string(),
        quantization: quantization_info(&opts.quant),
        config: ModelConfig {
            n_layers: c.n_layers,
            d_model: c.d_model,
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            d_ff: c.d_ff,
            vocab_size: c.vocab_size,
            rope_theta: c.rope_theta,
            rms_eps: c.rms_eps,
            n_params: c.n_params(),
        },
        context_length: c.context_length,
        eos_token_ids: tokenizer.eos_ids.clone(),
        chat: tokenizer.chat.clone(),
        source: SourceInfo {
            file: opts
                .teacher
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
            bytes: source_bytes,
            sha256: source_sha256,
            description: g.meta_str("general.name").unwrap_or("").to_string(),
        },
        files,
    };
    atomic::write_synced(
        &tmp.join(bundle::MANIFEST_FILE),
        &serde_json::to_vec_pretty(&manifest)?,
    )?;

    // One atomic swap: a reader (or a power cut) sees the old bundle or the new one.
    atomic::replace_dir(&tmp, &opts.out_dir)
        .with_context(|| format!("moving {} to {}", tmp.display(), opts.out_dir.display()))?;
    eprintln!(
        "wrote {} in {:.1} s",
        opts.out_dir.display(),
        t0.elapsed().as_secs_f32()
    );
    Ok(manifest)
}

/// The manifest's description of `q` (`None` for float32).
fn quantization_info(q: &QuantOptions) -> Option<bundle::QuantizationInfo> {
    let scheme = match q.format {
        WeightFormat::F32 => return None,
        WeightFormat::F16 => {
            "float16 weights and matmuls (ONNX MatMul on float16); norms, \
                              rotary tables, attention and the residual stream in float32"
        }
        WeightFormat::Int8 if q.weights_only => {
            "STUDY ONLY: int8 weights dequantized to float32 in the graph"
        }
        WeightFormat::Int8 => {
            "int8 weights, one symmetric scale per output channel (embedding: \
                               per row); activations quantized to int8 per token at run time; \
                               ONNX MatMulInteger; norms, rotary tables, attention in float32"
        }
    };
    let r = q.rotation;
    let rotations = [
        ("residual", r.residual),
        ("values", r.values),
        ("ffn", r.ffn),
    ]
    .iter()
    .filter(|(_, on)| *on)
    .map(|(n, _)| n.to_string())
    .collect();
    Some(bundle::QuantizationInfo {
        scheme: scheme.to_string(),
        rotations,
        calibration: q.calibrate.map(|w| {
            format!(
                "GPTQ, Hessians from {w} windows of {CALIBRATION_WINDOW} tokens of training text"
            )
        }),
        float_linears: q.keep_float.clone(),
    })
}

/// Tokens per calibration window.
pub const CALIBRATION_WINDOW: usize = 512;

/// Seed of the random signs of the residual-stream rotation (fixed: exports are reproducible).
pub const ROTATION_SEED: u64 = 0x0071_7569_6c6c; // "quill"

/// Cosine and sine tables for rotate-half RoPE: (context, head_dim), each half repeated.
pub fn rope_tables(context: usize, head_dim: usize, theta: f32) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let mut cos = vec![0f32; context * head_dim];
    let mut sin = vec![0f32; context * head_dim];
    for p in 0..context {
        for i in 0..half {
            // Computed in f64 so long positions do not lose precision before the cast.
            let inv_freq = (theta as f64).powf(-(2.0 * i as f64) / head_dim as f64);
            let angle = p as f64 * inv_freq;
            for j in [i, i + half] {
                cos[p * head_dim + j] = angle.cos() as f32;
                sin[p * head_dim + j] = angle.sin() as f32;
            }
        }
    }
    (cos, sin)
}

struct Ctx<'a> {
    b: GraphBuilder,
    quant: &'a QuantOptions,
    /// GPTQ Hessians by linear name (int8 with `--calibrate`).
    hessians: Option<&'a Hessians>,
    /// Calibration export: one `xᵀ·x` output per distinct linear input, and for each the
    /// names of the linears reading it and its width.
    capture: Option<Vec<(String, Vec<String>, usize)>>,
    /// Per-token int8 quantization already wired for a value: (int8 values, scale (1, S, 1)).
    quantized: HashMap<String, (String, String)>,
}

impl Ctx<'_> {
    fn format_of(&self, kind: &str) -> WeightFormat {
        if self.quant.keep_float.iter().any(|k| k == kind) {
            WeightFormat::F32
        } else {
            self.quant.format
        }
    }

    /// `x (…, in) · Wᵀ` for a PyTorch-layout weight `(out, in)`; `kind` is its role.
    fn linear(&mut self, x: &str, name: &str, kind: &str, w: &Matrix) -> String {
        if let Some(cap) = &mut self.capture {
            match cap.iter_mut().find(|(v, _, _)| v == x) {
                Some((_, names, _)) => names.push(name.to_string()),
                None => cap.push((x.to_string(), vec![name.to_string()], w.cols)),
            }
        }
        match self.format_of(kind) {
            WeightFormat::F32 => {
                let wt = w.transposed(); // (in, out)
                let w = self.b.init_f32(name, &[wt.rows, wt.cols], &wt.data);
                self.b.op("MatMul", &[x, &w], vec![])
            }
            WeightFormat::F16 => {
                let wt = w.transposed();
                let data: Vec<half::f16> =
                    wt.data.iter().map(|&v| half::f16::from_f32(v)).collect();
                let w = self.b.init_f16(name, &[wt.rows, wt.cols], &data);
                let x16 = self.b.cast(x, Elem::F16);
                let y = self.b.op("MatMul", &[&x16, &w], vec![]);
                self.b.cast(&y, Elem::F32)
            }
            WeightFormat::Int8 => {
                let q = match self.hessians.and_then(|h| h.get(name)) {
                    Some(h) => crate::calibrate::gptq(w, h).expect("GPTQ on a damped Hessian"),
                    None => quant::quantize_rows(w),
                };
                let wq = self.b.init_i8(name, &[q.cols, q.rows], &q.q_transposed()); // (in, out)
                let ws = self
                    .b
                    .init_f32(&format!("{name}.scale"), &[q.rows], &q.scale);
                if self.quant.weights_only {
                    let wf = self.b.cast(&wq, Elem::F32);
                    let wf = self.b.op("Mul", &[&wf, &ws], vec![]);
                    return self.b.op("MatMul", &[x, &wf], vec![]);
                }
                let (xq, xs) = self.quantize_per_token(x);
                let acc = self.b.op("MatMulInteger", &[&xq, &wq], vec![]); // (1, S, out) i32
                let y = self.b.cast(&acc, Elem::F32);
                let y = self.b.op("Mul", &[&y, &ws], vec![]);
                self.b.op("Mul", &[&y, &xs], vec![])
            }
        }
    }

    /// Symmetric int8 quantization of `x (1, S, K)` with one scale per token:
    /// `scale = max|x| / 127` over the last axis, `q = round(x / scale)`. Wired once per value.
    fn quantize_per_token(&mut self, x: &str) -> (String, String) {
        if let Some(done) = self.quantized.get(x) {
            return done.clone();
        }
        let b = &mut self.b;
        let abs = b.op("Abs", &[x], vec![]);
        let last = b.ints(&[-1]);
        let amax = b.op(
            "ReduceMax",
            &[&abs, &last],
            vec![("keepdims", Attr::Int(1))],
        ); // (1, S, 1)
        let tiny = b.float_scalar(1e-12);
        let amax = b.op("Max", &[&amax, &tiny], vec![]);
        let c127 = b.float_scalar(127.0);
        let inv = b.op("Div", &[&c127, &amax], vec![]);
        let scaled = b.op("Mul", &[x, &inv], vec![]);
        let rounded = b.op("Round", &[&scaled], vec![]);
        let q = b.cast(&rounded, Elem::I8);
        let scale = b.op("Div", &[&amax, &c127], vec![]);
        self.quantized
            .insert(x.to_string(), (q.clone(), scale.clone()));
        (q, scale)
    }

    /// The embedding lookup `table[ids]` → (1, S, D) float32.
    fn embedding(&mut self, ids: &str, table: &Matrix) -> String {
        let (v, d) = (table.rows, table.cols);
        let gather =
            |b: &mut GraphBuilder, t: &str| b.op("Gather", &[t, ids], vec![("axis", Attr::Int(0))]);
        match self.format_of("embedding") {
            WeightFormat::F32 => {
                let t = self.b.init_f32("embedding", &[v, d], &table.data);
                gather(&mut self.b, &t)
            }
            WeightFormat::F16 => {
                let data: Vec<half::f16> =
                    table.data.iter().map(|&x| half::f16::from_f32(x)).collect();
                let t = self.b.init_f16("embedding", &[v, d], &data);
                let e = gather(&mut self.b, &t);
                self.b.cast(&e, Elem::F32)
            }
            WeightFormat::Int8 => {
                let q = quant::quantize_rows(table);
                let t = self.b.init_i8("embedding", &[v, d], &q.q);
                let s = self.b.init_f32("embedding.scale", &[v, 1], &q.scale);
                let e = gather(&mut self.b, &t); // (1, S, D) i8
                let e = self.b.cast(&e, Elem::F32);
                let s = gather(&mut self.b, &s); // (1, S, 1)
                self.b.op("Mul", &[&e, &s], vec![])
            }
        }
    }

    /// `x (1, S, n) · Q` for the Kronecker-factored `Q = A ⊗ B`: `Aᵀ · X · B` on `X (1, S, a, b)`.
    fn rotate_online(&mut self, x: &str, name: &str, q: &KronOrthogonal) -> String {
        let (a, bm) = q.as_two_factors();
        let b = &mut self.b;
        let shape = b.ints(&[1, -1, a.rows as i64, bm.rows as i64]);
        let r = b.op("Reshape", &[x, &shape], vec![]);
        let bc = b.init_f32(&format!("{name}.b"), &[bm.rows, bm.cols], &bm.data);
        let r = b.op("MatMul", &[&r, &bc], vec![]);
        let at = a.transposed();
        let ac = b.init_f32(&format!("{name}.a_t"), &[at.rows, at.cols], &at.data);
        let r = b.op("MatMul", &[&ac, &r], vec![]);
        let flat = b.ints(&[1, -1, q.order() as i64]);
        b.op("Reshape", &[&r, &flat], vec![])
    }

    /// `x / sqrt(mean(x²) + eps) · w` over the last axis.
    fn rms_norm(&mut self, x: &str, name: &str, w: &[f32], eps: f32) -> String {
        let b = &mut self.b;
        let sq = b.op("Mul", &[x, x], vec![]);
        let last = b.ints(&[-1]);
        let ms = b.op(
            "ReduceMean",
            &[&sq, &last],
            vec![("keepdims", Attr::Int(1))],
        ); // (1, S, 1)
        let eps = b.float_scalar(eps);
        let var = b.op("Add", &[&ms, &eps], vec![]);
        let rms = b.op("Sqrt", &[&var], vec![]);
        let normed = b.op("Div", &[x, &rms], vec![]);
        if w.iter().all(|&g| g == 1.0) {
            return normed; // gains folded into the next linears
        }
        let w = b.init_f32(name, &[w.len()], w);
        b.op("Mul", &[&normed, &w], vec![])
    }

    /// Rotate-half RoPE on `x (1, heads, S, hd)` with `cos`, `sin` of shape (1, 1, S, hd).
    fn rope(&mut self, x: &str, cos: &str, sin: &str, head_dim: usize) -> String {
        let b = &mut self.b;
        let axes = b.ints(&[3]);
        let zero = b.ints(&[0]);
        let mid = b.ints(&[head_dim as i64 / 2]);
        // Slicing to the end must say INT64_MAX: tract rejects other out-of-range ends at run time.
        let end = b.ints(&[i64::MAX]);
        let x1 = b.op("Slice", &[x, &zero, &mid, &axes], vec![]);
        let x2 = b.op("Slice", &[x, &mid, &end, &axes], vec![]);
        let neg = b.op("Neg", &[&x2], vec![]);
        let rot = b.op("Concat", &[&neg, &x1], vec![("axis", Attr::Int(-1))]);
        let a = b.op("Mul", &[x, cos], vec![]);
        let r = b.op("Mul", &[&rot, sin], vec![]);
        b.op("Add", &[&a, &r], vec![])
    }

    /// `(1, S, heads·hd)` → `(1, heads, S, hd)`.
    fn split_heads(&mut self, x: &str, heads: usize, hd: usize) -> String {
        let shape = self.b.ints(&[1, -1, heads as i64, hd as i64]);
        let r = self.b.op("Reshape", &[x, &shape], vec![]);
        self.b.op(
            "Transpose",
            &[&r],
            vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))],
        )
    }
}

/// A calibration capture: for each distinct linear input, the linears reading it and its width.
pub type Capture = Vec<(Vec<String>, usize)>;

/// Builds the decoder graph described in the module docs; returns it, the bytes of its external
/// data file (`bundle::WEIGHTS_FILE`), which holds every large initializer, and the capture list.
/// int8 weights are rounded with GPTQ where `hessians` has theirs; with `capture`, the graph
/// also outputs `xᵀ·x` `(K, K)` per distinct linear input, after the usual outputs, as listed in
/// the returned [`Capture`].
pub fn build_graph(
    w: &LlamaWeights,
    quant: &QuantOptions,
    ffn_rotation: Option<&KronOrthogonal>,
    hessians: Option<&Hessians>,
    capture: bool,
) -> (tract_onnx::pb::ModelProto, Vec<u8>, Capture) {
    let c = &w.config;
    let (hd, nh, nkv) = (c.head_dim, c.n_heads, c.n_kv_heads);
    let mut cx = Ctx {
        b: GraphBuilder::new("quill-decoder").with_external_data(bundle::WEIGHTS_FILE),
        quant,
        quantized: HashMap::new(),
        hessians,
        capture: capture.then(Vec::new),
    };

    let ids = cx.b.input(
        bundle::INPUT_IDS,
        Elem::I64,
        &[Dim::Fixed(1), Dim::Named("sequence_length")],
    );
    let past_dims = [
        Dim::Fixed(1),
        Dim::Fixed(nkv as i64),
        Dim::Named("past_sequence_length"),
        Dim::Fixed(hd as i64),
    ];
    let mut past = Vec::with_capacity(c.n_layers);
    for l in 0..c.n_layers {
        let k = cx.b.input(&bundle::past_key(l), Elem::F32, &past_dims);
        let v = cx.b.input(&bundle::past_value(l), Elem::F32, &past_dims);
        past.push((k, v));
    }

    // Tied embeddings: the Gather and the lm_head MatMul get separate constants. tract does not
    // pre-pack a big constant that has several consumers, and would re-pack the 113 MB head on
    // every step.
    let mut x = cx.embedding(&ids, &w.embedding); // (1, S, D)

    let (cos_t, sin_t) = rope_tables(c.context_length, hd, c.rope_theta);
    let cos_t = cx.b.init_f32("rope_cos", &[c.context_length, hd], &cos_t);
    let sin_t = cx.b.init_f32("rope_sin", &[c.context_length, hd], &sin_t);
    let neg_inf = cx.b.float_scalar(f32::NEG_INFINITY);

    // Positions from the shapes: P from the past input, S from the ids.
    let b = &mut cx.b;
    let shape_past = b.op("Shape", &[&past[0].1], vec![]);
    let two = b.int_scalar(2);
    let past_len = b.op("Gather", &[&shape_past, &two], vec![("axis", Attr::Int(0))]); // P
    let shape_ids = b.op("Shape", &[&ids], vec![]);
    let one = b.int_scalar(1);
    let seq = b.op("Gather", &[&shape_ids, &one], vec![("axis", Attr::Int(0))]); // S
    let total = b.op("Add", &[&past_len, &seq], vec![]); // T
    let zero = b.int_scalar(0);
    let step = b.int_scalar(1);
    let qpos = b.op("Range", &[&past_len, &total, &step], vec![]); // (S)
    let kpos = b.op("Range", &[&zero, &total, &step], vec![]); // (T)
    let cos = b.op("Gather", &[&cos_t, &qpos], vec![("axis", Attr::Int(0))]); // (S, hd)
    let sin = b.op("Gather", &[&sin_t, &qpos], vec![("axis", Attr::Int(0))]);
    let ax01 = b.ints(&[0, 1]);
    let cos = b.op("Unsqueeze", &[&cos, &ax01], vec![]); // (1, 1, S, hd)
    let sin = b.op("Unsqueeze", &[&sin, &ax01], vec![]);
    let ax1 = b.ints(&[1]);
    let ax0 = b.ints(&[0]);
    let qcol = b.op("Unsqueeze", &[&qpos, &ax1], vec![]); // (S, 1)
    let krow = b.op("Unsqueeze", &[&kpos, &ax0], vec![]); // (1, T)
    let visible = b.op("LessOrEqual", &[&krow, &qcol], vec![]); // (S, T) bool
    let zero_f = b.float_scalar(0.0);
    let mask = b.op("Where", &[&visible, &zero_f, &neg_inf], vec![]); // (S, T) additive

    for (l, blk) in w.blocks.iter().enumerate() {
        let p = |s: &str| format!("layers.{l}.{s}");
        let h = cx.rms_norm(&x, &p("attn_norm"), &blk.attn_norm, c.rms_eps);
        let q = cx.linear(&h, &p("wq"), "q", &blk.wq);
        let k = cx.linear(&h, &p("wk"), "k", &blk.wk);
        let v = cx.linear(&h, &p("wv"), "v", &blk.wv);
        let q = cx.split_heads(&q, nh, hd); // (1, H, S, hd)
        let k = cx.split_heads(&k, nkv, hd); // (1, KV, S, hd)
        let v = cx.split_heads(&v, nkv, hd); // (1, KV, S, hd)

        let q = cx.rope(&q, &cos, &sin, hd);
        let k = cx.rope(&k, &cos, &sin, hd);
        // Standard ONNX attention: concatenates the cache (→ present.*), GQA, additive mask.
        let attn = format!("layers.{l}.attention");
        cx.b.node(
            "Attention",
            &[&q, &k, &v, &mask, &past[l].0, &past[l].1],
            vec![
                ("scale", Attr::Float(1.0 / (hd as f32).sqrt())),
                ("is_causal", Attr::Int(0)),
            ],
            &[&attn, &bundle::present_key(l), &bundle::present_value(l)],
        ); // (1, H, S, hd), (1, KV, T, hd) × 2
        let b = &mut cx.b;
        let o = b.op(
            "Transpose",
            &[&attn],
            vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))],
        );
        let dshape = b.ints(&[1, -1, (nh * hd) as i64]);
        let o = b.op("Reshape", &[&o, &dshape], vec![]); // (1, S, H·hd)
        let o = cx.linear(&o, &p("wo"), "o", &blk.wo);
        x = cx.b.op("Add", &[&x, &o], vec![]);

        let h = cx.rms_norm(&x, &p("ffn_norm"), &blk.ffn_norm, c.rms_eps);
        let gate = cx.linear(&h, &p("w_gate"), "gate", &blk.w_gate); // (1, S, F)
        let up = cx.linear(&h, &p("w_up"), "up", &blk.w_up);
        let sig = cx.b.op("Sigmoid", &[&gate], vec![]);
        let silu = cx.b.op("Mul", &[&gate, &sig], vec![]);
        let mut act = cx.b.op("Mul", &[&silu, &up], vec![]); // (1, S, F)
        if let Some(r) = ffn_rotation {
            act = cx.rotate_online(&act, &p("ffn_rotation"), r);
        }
        let down = cx.linear(&act, &p("w_down"), "down", &blk.w_down);
        x = cx.b.op("Add", &[&x, &down], vec![]);
    }

    let h = cx.rms_norm(&x, "output_norm", &w.output_norm, c.rms_eps);
    let logits = cx.linear(&h, "lm_head", "lm_head", &w.lm_head);
    cx.b.op_named("Identity", &[&logits], vec![], bundle::LOGITS);
    cx.b.output(bundle::LOGITS, Elem::F32);
    for l in 0..c.n_layers {
        cx.b.output(&bundle::present_key(l), Elem::F32);
        cx.b.output(&bundle::present_value(l), Elem::F32);
    }
    let mut captured = Capture::new();
    for (i, (x, names, k)) in cx
        .capture
        .take()
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        let b = &mut cx.b;
        let flat = b.ints(&[-1, k as i64]);
        let x2 = b.op("Reshape", &[&x, &flat], vec![]); // (S, K)
        let xt = b.op("Transpose", &[&x2], vec![("perm", Attr::Ints(vec![1, 0]))]);
        let out = format!("hessian.{i}");
        b.op_named("MatMul", &[&xt, &x2], vec![], &out); // (K, K)
        b.output(&out, Elem::F32);
        captured.push((names, k));
    }
    let (_, data) = cx.b.take_external_data().expect("built with external data");
    (cx.b.into_model("quill-xtask"), data, captured)
}

/// The default bundle directory for a name: `models/bundles/<name>` in the workspace.
pub fn default_out_dir(workspace: &Path, name: &str) -> PathBuf {
    workspace.join("models").join("bundles").join(name)
}
