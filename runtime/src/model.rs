//! Loading a bundle into tract, optimizing it once, and running it step by step.
//!
//! Load: check the bundle (manifest, sizes, CRC-32) → parse the ONNX graph → type it →
//! `detect_kv_cache` (tract-transformers) moves every `past_key_values.* → Concat → present.*`
//! pair into tract's own state, so quill feeds only token ids and reads only logits → optimize.
//!
//! A [`Session`] is one sequence: it owns tract's state (the KV cache) and the position.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use prost::Message;
use tract_linalg::multithread::Executor;
use tract_onnx::pb::ModelProto;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::runtime::RunOptions;

use crate::bundle::{self, Bundle, Manifest};
use crate::cache::{self, CacheUse};
use crate::error::{BundleError, GenerateError};
use crate::tokenizer::{TokenId, Tokenizer};

/// The most tokens a sequence can hold: the capacity of quill's fixed token buffers. A bundle
/// whose context is longer is refused at load.
pub const MAX_CONTEXT: usize = 8192;

/// A prompt is fed to tract in chunks of at most this many tokens, bounding the size of the
/// activations and, with [`LoadOptions::all_logits`], of the logits: (1, chunk, vocab) f32 is
/// 25 MB at 128 tokens.
pub const PREFILL_CHUNK: usize = 128;

type Plan = TypedSimplePlan;
type State = TypedSimpleState;

/// glibc allocator tuning around a model load: the mmap threshold `mmap` and the trim threshold
/// (twice it); process-wide, a no-op off glibc.
///
/// Loading copies the weights a few times (parsing, decluttering, packing) and frees the
/// copies. glibc raises its mmap threshold after such frees (up to 32 MB), so the copies' memory
/// stayed in the process heap: the int8 teacher peaked at 377 MB instead of 237 MB. During a
/// load ([`LoadOptions::return_memory`]) every block of 128 kB or more gets its own mapping,
/// returned to the system by `free`; after it, the threshold is fixed at 32 MB, glibc's own
/// ceiling, so the forward pass's activations are recycled in the heap as before (mapping
/// them afresh at every step cost about a fifth of prefill speed).
///
/// Fixing the mmap threshold also fixes the trim threshold (glibc moves it to twice the mmap
/// threshold only while it adjusts that itself), which stayed at 128 kB: each prefill chunk
/// gave its activations back to the system at the top of the heap and faulted them in
/// afresh for the next. So it is set to twice the mmap threshold, where glibc would have put it:
/// prefill of a 1,372-token prompt 362 → 406 tok/s (f32 cache) and 641 → 755 (int8 cache), peak
/// RSS within 3 MB of what it was.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_heap_thresholds(mmap: i32) {
    // SAFETY: mallopt only tunes the allocator; any positive M_MMAP_THRESHOLD and
    // M_TRIM_THRESHOLD are valid.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, mmap);
        libc::mallopt(libc::M_TRIM_THRESHOLD, mmap.saturating_mul(2));
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_heap_thresholds(_mmap: i32) {}

/// Returns the free pages of every glibc arena to the system. The load's second thread (file
/// checks, tokenizer) allocates in an arena of its own, whose freed memory glibc otherwise
/// keeps: 12 MB of a warm load's steady RSS.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub(crate) fn trim_heap() {
    // SAFETY: malloc_trim only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(crate) fn trim_heap() {}

/// How to prepare a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Threads for tract's matrix products (1 = the calling thread only).
    pub threads: usize,
    /// Check every file's CRC-32 before loading (about 0.1 s per GB).
    pub verify: bool,
    /// Run int8 matrix products in quill's own kernel where the CPU has one
    /// ([`crate::kernels`]); `false` leaves them to tract.
    pub quill_kernels: bool,
    /// Run attention over the KV cache in quill's op ([`crate::attention`]) instead of
    /// tract-transformers' `InPlaceKvSdpa`.
    pub quill_attention: bool,
    /// Have the C allocator return the load's temporary copies of the weights to the system
    /// (glibc only; changes a process-wide allocator setting, see `set_heap_thresholds`).
    pub return_memory: bool,
    /// Most tokens a session holds (default: the bundle's context). A board with little memory
    /// uses less: the KV cache grows with every token.
    pub context: Option<usize>,
    /// Keep tract's prepared graph in this directory and start from it next time
    /// ([`crate::cache`]); used only with `verify`, whose checksums key the entries.
    pub cache_dir: Option<std::path::PathBuf>,
    /// The KV cache's number format (quill's attention only): f16 halves the memory and the
    /// bytes a decode step reads from it, int8 quarters them; perplexity measured in
    /// `BENCHMARKS.md`.
    pub kv_cache: crate::attention::KvCacheFormat,
    /// Compute the logits of every position of a chunk (what `quill eval` scores). `false`
    /// computes only the last position's, all that generation reads: the final norm and the
    /// vocabulary-wide head run on one row instead of up to [`PREFILL_CHUNK`] (on the teacher,
    /// a fifth of a prompt's multiply-adds and a 25 MB logits tensor).
    pub all_logits: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            threads: 1,
            verify: true,
            quill_kernels: true,
            quill_attention: true,
            return_memory: true,
            context: None,
            cache_dir: None,
            kv_cache: crate::attention::KvCacheFormat::F32,
            all_logits: true,
        }
    }
}

/// A loaded, optimized model with its tokenizer.
#[derive(Debug)]
pub struct Model {
    pub bundle: Bundle,
    pub tokenizer: Tokenizer,
    plan: Arc<Plan>,
    /// Time from opening the bundle to a runnable plan.
    pub load_time: Duration,
    /// Of `load_time`, the integrity checks: every file's size and CRC-32 against the
    /// manifest, and the graph's tensors against their data ([`crate::graph_check`]).
    pub check_time: Duration,
    /// `load_time` phase by phase, in order ("checks", "tokenizer", "parse", "optimize", …).
    pub load_phases: Vec<(&'static str, Duration)>,
    /// Whether the load started from the cache ([`LoadOptions::cache_dir`]).
    pub cache: CacheUse,
    /// Matrix products running in quill's int8 kernel ([`crate::kernels`]).
    pub quill_kernel_ops: usize,
    /// FFN rotations running in quill's op ([`crate::rotation`]): one per layer of a rotated
    /// int8 bundle where the CPU has AVX-512, else 0.
    pub quill_rotation_ops: usize,
    /// Attention nodes running in quill's op ([`crate::attention`]): one per layer, or 0.
    pub quill_attention_ops: usize,
    /// Most tokens a session holds: the bundle's context, or less ([`LoadOptions::context`]).
    pub context: usize,
}

/// The part of a model a generator needs: one step of the decoder.
///
/// [`crate::generate::Generator`] is written against this trait so that tests can observe
/// what happens inside the model step (for instance, count its allocations).
pub trait Decoder {
    /// Feeds `tokens` after the cached ones and returns the logits of the last position.
    fn forward(&mut self, tokens: &[TokenId]) -> Result<&[f32], GenerateError>;
    /// Tokens in the cache.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The model's maximum sequence length.
    fn context(&self) -> usize;
}

impl Model {
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Model, BundleError> {
        let t0 = Instant::now();
        let bundle = Bundle::open_unverified(dir)?;
        let mut check_time = t0.elapsed();
        let m = &bundle.manifest;
        if m.context_length > MAX_CONTEXT {
            return Err(BundleError::ContextTooLarge {
                model: m.context_length,
                capacity: MAX_CONTEXT,
            });
        }
        // With an entry in the load cache, the graph and its weights file are not read: the
        // entry, built from them once they had passed their checks and keyed by their
        // checksums, is (its own files are checked as it is read). So their sizes are checked
        // and their CRC-32s left: 170 MB of the int8 teacher's that a warm load used to read
        // for nothing (a kiosk restarting from a cold page cache on an SD card reading 40 MB/s
        // would spend about 4 s on them). Should the entry prove damaged, the graph's files
        // are checked in full before the graph is read (`prepare_cached`).
        let entry = cache_entry(&bundle, opts);
        let graph_cached = entry.as_ref().is_some_and(cache::Entry::is_present);
        // A second thread checks the files' sizes and CRC-32s and reads the tokenizer while
        // this one loads the graph (36 + 41 ms of a warm load on one core; the boards have
        // four). The load cache is keyed by the manifest's checksums, so it does not wait for
        // the check; a file that fails it fails the load whatever the graph did, and a graph
        // built while the check runs is written to the cache only once the check has passed.
        let tokenizer_path = bundle.path(bundle::TOKENIZER_FILE);
        let (checked_tx, checked_rx) = std::sync::mpsc::channel::<bool>();
        let files_ok = || checked_rx.recv().unwrap_or(false);
        let helper_work = || {
            let t = Instant::now();
            let verified = if opts.verify {
                bundle.manifest.files.iter().try_for_each(|f| {
                    if graph_cached && is_graph_file(f) {
                        bundle.check_size(f)
                    } else {
                        bundle.verify_file(f)
                    }
                })
            } else {
                Ok(())
            };
            let verify_time = t.elapsed();
            let _ = checked_tx.send(verified.is_ok());
            let t = Instant::now();
            let r = Tokenizer::from_file(&tokenizer_path);
            (verified, verify_time, r, t.elapsed())
        };
        // Off x86-64 the checks and the tokenizer come first, on this thread: creating a thread
        // hangs under qemu-user's aarch64 emulation, where CI runs the boards' builds (a
        // two-line scoped spawn never returns there), and the boards' loads are checked only
        // through it.
        let parallel = cfg!(target_arch = "x86_64");
        let (verified, tokenizer, tokenizer_time, built, cache_use, mut load_phases) =
            std::thread::scope(|s| {
                let pending = if parallel {
                    Err(s.spawn(helper_work))
                } else {
                    Ok(helper_work())
                };
                let (built, cache_use, load_phases) = self::build(
                    &bundle,
                    opts,
                    (entry, graph_cached),
                    &mut check_time,
                    &files_ok,
                );
                let (verified, verify_time, tokenizer, time) = match pending {
                    Ok(done) => done,
                    Err(helper) => match helper.join() {
                        Ok(r) => r,
                        Err(p) => std::panic::resume_unwind(p),
                    },
                };
                check_time += verify_time;
                let verified = verified.map(|()| verify_time);
                (verified, tokenizer, time, built, cache_use, load_phases)
            });
        if opts.return_memory {
            trim_heap();
        }
        let verify_time = verified?;
        let tokenizer = tokenizer?;
        load_phases.insert(1, ("file checks ∥", verify_time));
        load_phases.insert(2, ("tokenizer ∥", tokenizer_time));
        if tokenizer.vocab_size() != m.config.vocab_size {
            return Err(BundleError::BadTokenizer {
                path: bundle.path(bundle::TOKENIZER_FILE),
                reason: format!(
                    "{} tokens, but the manifest says the model has {}",
                    tokenizer.vocab_size(),
                    m.config.vocab_size
                ),
            });
        }
        let (plan, quill_kernel_ops, quill_rotation_ops, quill_attention_ops) = built?;
        let context = opts.context.map_or(bundle.manifest.context_length, |c| {
            c.min(bundle.manifest.context_length)
        });
        Ok(Model {
            bundle,
            tokenizer,
            plan,
            load_time: t0.elapsed(),
            check_time,
            load_phases,
            cache: cache_use,
            quill_kernel_ops,
            quill_rotation_ops,
            quill_attention_ops,
            context,
        })
    }
}

/// What [`finish_plan`] returns: the plan and how many ops of each of quill's kinds it holds.
type Built = (Arc<Plan>, usize, usize, usize);

/// The runnable plan of `bundle`, through the load cache's `entry` when `opts` has one
/// (`graph_cached`: it was there when the load started, see [`prepare_cached`]), with how the
/// cache was used and the load's phases.
fn build(
    bundle: &Bundle,
    opts: &LoadOptions,
    (entry, graph_cached): (Option<cache::Entry>, bool),
    check_time: &mut Duration,
    files_ok: &dyn Fn() -> bool,
) -> (
    Result<Built, BundleError>,
    CacheUse,
    Vec<(&'static str, Duration)>,
) {
    let m = &bundle.manifest;
    {
        let graph = bundle.path(bundle::GRAPH_FILE);
        // tract's fused attention spreads its heads over rayon's global pool (every core,
        // whatever `--threads` says). Waking the pool 30 times per decode step cost more than
        // the attention itself: 13.5 ms per step on 2 threads against 8.1 ms on one (int8
        // teacher, about 160 cached tokens), and prefill gained 5%. Keep it on the calling
        // thread; the environment variable still overrides. Process-wide; ignored if something
        // set it differently before.
        let _ = tract_onnx::tract_core::internal::tract_data::knobs::set_config_global(
            "TRACT_FLASH_SDPA_ST",
            "true",
        );
        if opts.return_memory {
            set_heap_thresholds(128 << 10);
        }
        let mut load_phases = vec![("checks", *check_time)];
        let (built, mut cache_use, pending) = prepare_cached(
            bundle,
            opts,
            (entry, graph_cached),
            check_time,
            &mut load_phases,
        );
        // Writes the load cache's entry, at most once; whether it was attempted.
        let mut pending = pending;
        let mut store = |model: &TypedModel| match pending.take() {
            Some(p) => {
                cache_use = p.store(model, files_ok);
                true
            }
            None => false,
        };
        let built = built.and_then(|typed| {
            contain_panic("building the model", || {
                finish_plan(typed, m, opts, &mut load_phases, &mut store)
            })
            .and_then(|r| r)
            .map_err(|e| BundleError::BadGraph {
                path: graph.clone(),
                reason: format!("{e:#}"),
            })
        });
        if opts.return_memory {
            set_heap_thresholds(32 << 20);
        }
        (built, cache_use, load_phases)
    }
}

impl Model {
    pub fn manifest(&self) -> &Manifest {
        &self.bundle.manifest
    }

    /// A new, empty sequence.
    pub fn session(&self) -> Result<Session, GenerateError> {
        Session::new(self.plan.clone(), self.manifest(), self.context)
    }

    /// The optimized tract model, for inspection.
    pub fn typed_model(&self) -> &TypedModel {
        self.plan.model()
    }
}

/// Decodes the graph's protobuf and checks its tensors against the weights file
/// ([`crate::graph_check`]) before tract builds anything from it.
fn read_graph(path: &Path, dir: &Path) -> Result<ModelProto, BundleError> {
    let bytes = std::fs::read(path).map_err(|source| BundleError::Io {
        path: path.to_owned(),
        source,
    })?;
    let proto = ModelProto::decode(bytes.as_slice()).map_err(|e| BundleError::BadGraph {
        path: path.to_owned(),
        reason: format!("not an ONNX protobuf ({e}); the file is damaged, re-export the bundle"),
    })?;
    crate::graph_check::check(&proto, dir).map_err(|fault| {
        let path = dir.join(fault.file);
        if fault.file == bundle::WEIGHTS_FILE {
            BundleError::BadWeights {
                path,
                reason: fault.reason,
            }
        } else {
            BundleError::BadGraph {
                path,
                reason: fault.reason,
            }
        }
    })?;
    Ok(proto)
}

/// The bundle's entry in the load cache, if `opts` has a cache (with `verify` only: the
/// manifest's checksums key it).
fn cache_entry(bundle: &Bundle, opts: &LoadOptions) -> Option<cache::Entry> {
    // The cached graph holds the ops `finish_plan` installs before it is stored.
    // (`vnni`: quill's int8 kernels for AVX-512 VNNI and its embedding; `quill`: the embedding;
    // `tract`: none.)
    let ops = match (opts.quill_kernels, crate::kernels::vnni_available()) {
        (true, true) => "vnni",
        (true, false) => "quill",
        (false, _) => "tract",
    };
    match &opts.cache_dir {
        Some(dir) if opts.verify => Some(cache::Entry::new(dir, bundle, ops)),
        _ => None,
    }
}

/// The files a load from the cache does not read: the ONNX graph and its weights.
fn is_graph_file(f: &bundle::FileEntry) -> bool {
    f.name == bundle::GRAPH_FILE || f.name == bundle::WEIGHTS_FILE
}

/// tract's prepared graph of the bundle — from the cache's `entry` if it is valid, else from
/// the ONNX graph (then saved) — and what the cache did. Errors are the bundle's, never the
/// cache's. `graph_cached`: the entry was there when the load started, so the graph's files
/// have had only their sizes checked; they are checked in full here before they are read.
fn prepare_cached(
    bundle: &Bundle,
    opts: &LoadOptions,
    (entry, graph_cached): (Option<cache::Entry>, bool),
    check_time: &mut Duration,
    phases: &mut Vec<(&'static str, Duration)>,
) -> (
    Result<TypedModel, BundleError>,
    CacheUse,
    Option<PendingStore>,
) {
    let mut failed = None;
    if let Some(e) = &entry {
        let t = Instant::now();
        match contain_panic("reading the load cache", || e.load()).and_then(|r| r) {
            Ok(Some(mut model)) => {
                phases.push(("cache read", t.elapsed()));
                if opts.return_memory {
                    trim_heap();
                }
                // NNEF spells some ops out in primitives (about 1,600 casts to the same type,
                // the quantized products' reshapes): quill's kernels match the decluttered
                // form, so declutter here, timed on its own. All of tract's declutter passes
                // but `ChangeAxes`: on this graph it costs 245 of 313 ms, and the full declutter
                // that starts tract's optimization runs it anyway, on the graph quill's kernels
                // have already made smaller (74 ms there). Same plan, same logits.
                let t = Instant::now();
                if let Err(err) = contain_panic("decluttering the cached graph", || {
                    let mut passes = tract_onnx::tract_core::optim::Optimizer::declutter();
                    passes
                        .passes
                        .retain(|p| !format!("{p:?}").starts_with("ChangeAxes"));
                    passes.optimize(&mut model)
                })
                .and_then(|r| r.map_err(|e| anyhow::anyhow!("{e:#}")))
                {
                    failed = Some(format!("{}: {err:#}", e.path().display()));
                } else {
                    phases.push(("declutter", t.elapsed()));
                    return (Ok(model), CacheUse::Hit, None);
                }
            }
            Ok(None) => {}
            Err(err) => failed = Some(format!("reading {}: {err:#}", e.path().display())),
        }
    }
    let graph = bundle.path(bundle::GRAPH_FILE);
    let t_graph = Instant::now();
    if graph_cached {
        // The entry was there but did not check: the graph's files are read after all.
        let mut files = bundle.manifest.files.iter().filter(|f| is_graph_file(f));
        if let Err(e) = files.try_for_each(|f| bundle.verify_file(f)) {
            return (Err(e), CacheUse::Off, None);
        }
    }
    let proto = match read_graph(&graph, &bundle.dir) {
        Ok(p) => p,
        Err(e) => return (Err(e), CacheUse::Off, None),
    };
    *check_time += t_graph.elapsed();
    phases[0].1 = *check_time;
    let typed = contain_panic("building the model", || {
        prepare(&proto, &bundle.dir, &bundle.manifest, phases)
    })
    .and_then(|r| r)
    .map_err(|e| BundleError::BadGraph {
        path: graph.clone(),
        reason: format!("{e:#}"),
    });
    drop(proto);
    // Stored later, once quill's kernels are in the graph (`finish_plan`).
    let pending = match (entry, &typed) {
        (Some(e), Ok(_)) => Some(PendingStore { entry: e, failed }),
        _ => None,
    };
    (typed, CacheUse::Off, pending)
}

/// A cache entry to write once the graph has quill's int8 kernels (they are cached with it).
struct PendingStore {
    entry: cache::Entry,
    /// Why the entry could not be read, if it could not.
    failed: Option<String>,
}

impl PendingStore {
    /// Writes `model` to the cache if the bundle's files passed their checks (they are
    /// checked on another thread meanwhile; the load fails with the check's error otherwise).
    fn store(self, model: &TypedModel, files_ok: &dyn Fn() -> bool) -> CacheUse {
        if !files_ok() {
            return CacheUse::Off;
        }
        let e = self.entry;
        match contain_panic("writing the load cache", || e.store(model)).and_then(|r| r) {
            Ok(()) => CacheUse::Stored,
            Err(err) => CacheUse::Failed(format!(
                "{}writing {}: {err:#}",
                self.failed.map(|f| f + "; ").unwrap_or_default(),
                e.path().display()
            )),
        }
    }
}

/// The ONNX graph as tract's typed, decluttered model with the KV cache in tract's state: what
/// the cache keeps (it depends on nothing but the bundle).
fn prepare(
    proto: &ModelProto,
    dir: &Path,
    m: &Manifest,
    phases: &mut Vec<(&'static str, Duration)>,
) -> anyhow::Result<TypedModel> {
    let mut t = Instant::now();
    let mut lap = |name: &'static str| {
        phases.push((name, t.elapsed()));
        t = Instant::now();
    };
    let parsed = tract_onnx::onnx()
        .parse(proto, dir.to_str())
        .context("parsing the ONNX graph")?;
    anyhow::ensure!(
        parsed.unresolved_inputs.is_empty(),
        "the graph reads values nothing produces: {:?}",
        parsed.unresolved_inputs
    );
    lap("parse");
    let mut model = parsed.model.into_typed().context("analysing the graph")?;
    lap("type");
    let n_inputs = 1 + 2 * m.config.n_layers;
    anyhow::ensure!(
        model.inputs.len() == n_inputs,
        "the graph has {} inputs, expected {n_inputs} (input_ids and a key and a value per layer)",
        model.inputs.len()
    );
    let kv = tract_onnx::tract_core::transform::get_transform("transformers_detect_all")?
        .context("tract-transformers' transformers_detect_all transform is not linked in")?;
    model.declutter()?;
    lap("declutter");
    kv.transform(&mut model)
        .context("moving the KV cache into tract's state")?;
    lap("detect KV cache");
    Ok(model)
}

/// Feeds only the last position of the sequence axis into the graph's final norm: everything
/// from there on (norm, head) works token by token, so the last row's logits are the same
/// values, bit for bit, and the output becomes `(1, 1, vocab)` for any chunk. The final norm is
/// the last `RmsNorm` in evaluation order, whose input is the residual stream `(1, S, d)`;
/// a graph without one is left as it is.
fn last_position_only(model: &mut TypedModel) -> TractResult<()> {
    use tract_onnx::tract_core::ops::array::Slice;
    let Some(norm) = model
        .eval_order()?
        .into_iter()
        .rfind(|&id| model.node(id).op.name() == "RmsNorm")
    else {
        return Ok(());
    };
    let node = model.node(norm);
    let fact = model.outlet_fact(node.inputs[0])?;
    let s = match fact.shape.dims() {
        [one, s, _] if one.is_one() => s.clone(),
        _ => return Ok(()),
    };
    let mut patch = TypedModelPatch::default();
    let mut inputs = patch.taps(model, &node.inputs)?;
    inputs[0] = patch.wire_node(
        format!("{}.last_position", node.name),
        Slice::new(1, s.clone() - 1, s),
        &inputs[0..1],
    )?[0];
    let out = patch.wire_node(&node.name, node.op.clone(), &inputs)?[0];
    patch.shunt_outside(model, OutletId::new(norm, 0), out)?;
    patch.apply(model)?;
    // The nodes after the norm still carry facts with S rows.
    model.refresh_output_facts()?;
    Ok(())
}

/// Quill's kernels, tract's optimization and the runnable plan, for this machine and `opts`.
fn finish_plan(
    mut model: TypedModel,
    m: &Manifest,
    opts: &LoadOptions,
    phases: &mut Vec<(&'static str, Duration)>,
    store: &mut dyn FnMut(&TypedModel) -> bool,
) -> anyhow::Result<(Arc<Plan>, usize, usize, usize)> {
    let threads = opts.threads;
    let mut t = Instant::now();
    let mut lap = |name: &'static str| {
        phases.push((name, t.elapsed()));
        t = Instant::now();
    };
    anyhow::ensure!(
        model.inputs.len() == 1 && model.outputs.len() == 1,
        "after KV-cache detection the graph has {} inputs and {} outputs, expected 1 and 1: \
         the past/present pairs are not in the expected Input → Concat → Output form",
        model.inputs.len(),
        model.outputs.len()
    );
    // quill's kernels split their products over their own spinning threads (see `pool.rs`);
    // tract's pool still takes its own ops (the FFN's rotation, 39 → 23 ms of a 128-token
    // prefill on 2 threads).
    let pool = (threads > 1).then(|| Arc::new(crate::pool::Pool::new(threads)));
    let quill_kernel_ops = if opts.quill_kernels {
        if opts.return_memory {
            trim_heap();
        }
        let n = crate::kernels::use_int8_kernels(&mut model, pool.clone())
            .context("installing quill's int8 kernel")?;
        lap("int8 packing");
        crate::embedding::use_embedding(&mut model).context("installing quill's embedding")?;
        lap("embedding");
        // The load cache keeps the graph from here: the int8 kernels installed, their weights
        // packed (a warm load reads them as they are), the embedding table in a file of its
        // own (a warm load maps it), see `packed.rs`.
        if store(&model) {
            lap("cache write");
        }
        crate::qlinear::fuse_quantization(&mut model)
            .context("fusing the int8 quantization into quill's kernel")?;
        n
    } else {
        if store(&model) {
            lap("cache write");
        }
        0
    };
    lap("int8 kernels");
    let quill_rotation_ops = if opts.quill_kernels {
        crate::rotation::use_kron_rotation(&mut model, pool.clone())
            .context("installing quill's FFN rotation")?
    } else {
        0
    };
    lap("rotation");
    if !opts.all_logits {
        last_position_only(&mut model).context("keeping the last position's logits only")?;
    }
    let mut model = model.into_optimized().context("optimizing the graph")?;
    lap("optimize");
    let mut quill_attention_ops = 0;
    if opts.quill_attention {
        let capacity = opts
            .context
            .map_or(m.context_length, |c| c.min(m.context_length));
        quill_attention_ops =
            crate::attention::use_kv_attention(&mut model, capacity, opts.kv_cache, pool)
                .context("installing quill's attention")?;
    }
    if opts.quill_kernels {
        crate::rope::use_rope(&mut model).context("installing quill's rotary embedding")?;
        crate::unicast::use_unicast(&mut model)
            .context("installing quill's element-wise Add and Mul")?;
    }
    let options = RunOptions {
        executor: (threads > 1).then(|| Executor::multithread(threads)),
        ..RunOptions::default()
    };
    lap("attention");
    let plan = model.into_runnable_with_options(&options)?;
    lap("plan");
    Ok((
        plan,
        quill_kernel_ops,
        quill_rotation_ops,
        quill_attention_ops,
    ))
}

/// Runs tract code, turning a panic into an error (the outer `Err`).
///
/// tract 0.23.9 indexes out of bounds on some malformed graphs: the `bundle_loader` fuzzer
/// found a `Gather` whose constant indices exceed the shape tensor they index, which panics
/// while tract types the graph. A kiosk must get a clear error for a damaged bundle, not a
/// crash. The panic message still reaches stderr through the panic hook.
fn contain_panic<T>(what: &str, f: impl FnOnce() -> T) -> anyhow::Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|payload| {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        anyhow::anyhow!("tract failed (panicked) while {what}: {msg}")
    })
}

/// Time spent per operator kind over profiled runs ([`Session::forward_profiled`]).
#[derive(Debug, Default, Clone)]
pub struct OpProfile {
    /// Operator name → (time, evaluations).
    pub by_op: std::collections::BTreeMap<String, (Duration, u64)>,
    /// Wall time of the profiled runs, including tract's own bookkeeping between nodes.
    pub total: Duration,
    pub runs: u64,
}

impl OpProfile {
    /// Operator kinds by decreasing time.
    pub fn sorted(&self) -> Vec<(&str, Duration, u64)> {
        let mut v: Vec<_> = self
            .by_op
            .iter()
            .map(|(k, &(d, n))| (k.as_str(), d, n))
            .collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.1));
        v
    }
}

/// One sequence being decoded: tract's state holds its KV cache.
pub struct Session {
    plan: Arc<Plan>,
    state: State,
    /// Tokens in the cache.
    len: usize,
    context: usize,
    vocab: usize,
    /// Logits of the last position, (vocab).
    logits: Vec<f32>,
    /// The (1, 1) token input, reused across decode steps: tract releases its reference at the
    /// end of every run, so it can be rewritten in place.
    one_token: Arc<Tensor>,
    /// How many token-input tensors were allocated (prefill chunks, or a decode step whose
    /// reused input was still shared); the allocation test checks decode steps add none.
    input_allocations: u64,
}

impl Session {
    fn new(plan: Arc<Plan>, m: &Manifest, context: usize) -> Result<Session, GenerateError> {
        let state = plan.spawn()?;
        Ok(Session {
            plan,
            state,
            len: 0,
            context,
            vocab: m.config.vocab_size,
            logits: vec![0.0; m.config.vocab_size],
            one_token: Arc::new(Tensor::zero::<i64>(&[1, 1])?),
            input_allocations: 0,
        })
    }

    /// Forgets the sequence (drops the KV cache).
    pub fn reset(&mut self) -> Result<(), GenerateError> {
        self.state = self.plan.spawn()?;
        self.len = 0;
        Ok(())
    }

    fn check_room(&self, n: usize) -> Result<(), GenerateError> {
        if self.len + n > self.context {
            return Err(if self.len == 0 {
                GenerateError::PromptTooLong {
                    prompt: n,
                    context: self.context,
                }
            } else {
                GenerateError::ContextFull {
                    context: self.context,
                }
            });
        }
        Ok(())
    }

    /// Runs one chunk, returns the (1, n, vocab) logits tensor.
    fn run_chunk(&mut self, tokens: &[TokenId]) -> Result<TValue, GenerateError> {
        self.run_chunk_profiled(tokens, None)
    }

    /// [`Session::run_chunk`], timing every node into `profile` when there is one.
    fn run_chunk_profiled(
        &mut self,
        tokens: &[TokenId],
        profile: Option<&mut OpProfile>,
    ) -> Result<TValue, GenerateError> {
        let input: TValue = if tokens.len() == 1 {
            // Steady-state decode: rewrite the reused (1, 1) tensor instead of allocating one.
            match Arc::get_mut(&mut self.one_token) {
                Some(t) => t.try_as_plain_ram_mut()?.as_slice_mut::<i64>()?[0] = tokens[0] as i64,
                // Only if tract kept a reference: correct, at the cost of an allocation.
                None => {
                    self.input_allocations += 1;
                    self.one_token = Arc::new(tensor2(&[[tokens[0] as i64]]));
                }
            }
            TValue::from_const(self.one_token.clone())
        } else {
            self.input_allocations += 1;
            let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
            Tensor::from_shape(&[1, tokens.len()], &ids)?.into_tvalue()
        };
        let state = &mut self.state;
        let run = match profile {
            None => contain_panic("running the model", || state.run(tvec![input])),
            Some(p) => contain_panic("running the model", || {
                let t0 = Instant::now();
                let out = state.run_plan_with_eval(tvec![input], |ctx, state, node, inputs| {
                    let t = Instant::now();
                    let r = tract_onnx::tract_core::plan::eval(ctx, state, node, inputs);
                    let e = p.by_op.entry(node.op.name().to_string()).or_default();
                    e.0 += t.elapsed();
                    e.1 += 1;
                    r
                })?;
                p.total += t0.elapsed();
                p.runs += 1;
                Ok(out)
            }),
        };
        let mut out = match run {
            Ok(r) => r?,
            Err(panicked) => {
                // tract's state may be half-updated: start the sequence over.
                self.reset()?;
                return Err(panicked.context("the conversation was reset").into());
            }
        };
        self.len += tokens.len();
        Ok(out.remove(0))
    }

    /// Feeds tokens in chunks like [`Session::forward_last`], timing every operator into
    /// `profile` (node by node, so a little slower than an unprofiled run).
    pub fn forward_profiled(
        &mut self,
        tokens: &[TokenId],
        profile: &mut OpProfile,
    ) -> Result<(), GenerateError> {
        self.check_room(tokens.len())?;
        for chunk in tokens.chunks(PREFILL_CHUNK) {
            self.run_chunk_profiled(chunk, Some(profile))?;
        }
        Ok(())
    }

    /// Feeds tokens (in chunks) and returns the logits of the last one, (vocab).
    pub fn forward_last(&mut self, tokens: &[TokenId]) -> Result<&[f32], GenerateError> {
        if tokens.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        self.check_room(tokens.len())?;
        let mut last = None;
        for chunk in tokens.chunks(PREFILL_CHUNK) {
            last = Some((self.run_chunk(chunk)?, chunk.len()));
        }
        let (logits, n) = last.expect("at least one chunk");
        // (1, n, vocab), or (1, 1, vocab) when the model computes the last position's only.
        let all = logits.try_as_plain_ram()?.as_slice::<f32>()?;
        let rows = if all.len() == self.vocab { 1 } else { n };
        let row = all
            .get((rows - 1) * self.vocab..rows * self.vocab)
            .filter(|_| all.len() == rows * self.vocab)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "the graph returned {} logits for {n} tokens, expected {} per token",
                    all.len(),
                    self.vocab
                )
            })?;
        self.logits.copy_from_slice(row);
        check_finite(&self.logits, self.len)?;
        Ok(&self.logits)
    }

    /// Feeds tokens and appends the logits of every position to `out`, (n, vocab) row-major.
    pub fn forward_all(
        &mut self,
        tokens: &[TokenId],
        out: &mut Vec<f32>,
    ) -> Result<(), GenerateError> {
        self.check_room(tokens.len())?;
        for chunk in tokens.chunks(PREFILL_CHUNK) {
            let logits = self.run_chunk(chunk)?;
            let logits = logits.try_as_plain_ram()?.as_slice::<f32>()?;
            if logits.len() != chunk.len() * self.vocab {
                return Err(anyhow::anyhow!(
                    "the model returned {} logits for {} tokens: it was loaded to compute the \
                     last position's only (LoadOptions::all_logits is false); load it with \
                     all_logits to score every position",
                    logits.len(),
                    chunk.len()
                )
                .into());
            }
            check_finite(logits, self.len)?;
            out.extend_from_slice(logits);
        }
        Ok(())
    }

    /// Token-input tensors allocated so far (see the field's doc).
    pub fn input_allocations(&self) -> u64 {
        self.input_allocations
    }
}

/// Logits must be finite numbers: NaN or infinity means damaged weights or a numerical
/// blow-up, and sampling from them would print garbage. About 10 µs per token.
fn check_finite(logits: &[f32], position: usize) -> Result<(), GenerateError> {
    if logits.iter().all(|x| x.is_finite()) {
        Ok(())
    } else {
        Err(GenerateError::NonFiniteLogits { position })
    }
}

impl Decoder for Session {
    fn forward(&mut self, tokens: &[TokenId]) -> Result<&[f32], GenerateError> {
        self.forward_last(tokens)
    }
    fn len(&self) -> usize {
        self.len
    }
    fn context(&self) -> usize {
        self.context
    }
}
