//! quill's own attention over the KV cache, replacing tract-transformers' `InPlaceKvSdpa`.
//!
//! After `detect_kv_cache` and optimization, every layer's attention is one stateful
//! `InPlaceKvSdpa` node: it keeps K and V in its state and runs tract-transformers' flash
//! attention over them. That kernel works in 32 × 32 tiles of `ndarray` arrays and allocates
//! several of them per tile; decoding has a single query row, so at 1024 cached tokens it spent
//! about 40 ms per step on 35 M multiply-adds (int8 teacher: decode at position 1024 ran at a
//! third of decode at position 32). [`KvAttention`] takes the node's place with the same inputs
//! and the same state contract, and computes attention directly on the cache:
//!
//! - Cache, per layer: K and V each in blocks of [`KV_BLOCK`] = 64 positions, a block
//!   `(kv_heads, 64, head_dim)` f32. A step writes its vectors into the last block, opening a
//!   new one every 64 tokens; nothing already cached is ever copied. Within a block one kv
//!   head's vectors are contiguous, so attention streams them.
//! - Grouped-query attention without expanding K/V: the `heads / kv_heads` query heads sharing
//!   a kv head are computed together, block by block, so each cached vector is read from memory
//!   once per step (the block stays in L1 across the group). For query row `i` of head `h`:
//!   `s_j = scale · q·K[j] (+ mask_j)`, `p = softmax(s)` over the visible positions (causal:
//!   `j ≤ past + i`), `o = Σ_j p_j V[j]`. Scores live in a scratch buffer kept in the state.
//! - Threads: a step's (kv head, query row) pairs are split in contiguous runs over quill's
//!   kernel threads ([`crate::pool`]), each with its own scratch ([`Work`]); each pair is
//!   computed exactly as on one thread, so the output does not depend on the thread count.
//!   With an int8 cache a pair's positions are always computed in two halves put together
//!   after ([`attend_q8`], [`merge_halves`]), and a decode step splits the halves themselves
//!   over the threads (its three kv heads left one of two threads idle half the time).
//! - Kernels: the dot products in `std::arch` (AVX2 + FMA on x86-64, chosen at run time; NEON
//!   on aarch64), four vector accumulators and one horizontal sum; the softmax's `exp` is a
//!   polynomial within 2 ulp of `f32::exp` that vectorizes; the weighted sum of values keeps a
//!   64-wide output row in registers. Other CPUs (armv7, x86-64 without AVX2) run the same
//!   code in portable Rust.
//!
//! Same results: on the f32 teacher, `quill eval` perplexity is equal to five digits with and
//! without this op (only the summation order differs). With int8 activations, quantized per
//! step, a last-bit difference can move an activation across a rounding boundary, so greedy
//! text may part ways at a near-tie (see the note in `BENCHMARKS.md`).
//!
//! The ONNX file is untouched; the rewrite is applied to tract's optimized model in memory.

use half::f16;
use half::slice::HalfFloatSliceExt;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_transformers::ops::dyn_kv_cache::DynKeyValueCacheState;
use tract_transformers::ops::inplace_kv_cache::InPlaceKvSdpa;

/// Fused KV cache + attention of one layer. Inputs `[Q (1, H, S, D), K_new (1, Hkv, S, D),
/// V_new (1, Hkv, S, D)]` and an optional additive mask `(1, H | 1, S, past + S)`; output
/// `(1, H, S, D)`, Q's type.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KvAttention {
    /// The state name and past-length fact of the cache this op replaced (tract resolves the
    /// past-length symbol from them).
    name: String,
    past_sequence_fact: TypedFact,
    causal: bool,
    /// `None`: `1 / √head_dim`.
    scale_bits: Option<u32>,
    /// Positions to reserve room for when a sequence starts.
    capacity: usize,
    /// The cache's number format.
    format: KvCacheFormat,
    /// quill's kernel threads: the (kv head, query row) pairs of a step are split over them.
    pool: Threads,
}

/// The op's handle on quill's kernel threads; not part of the op's identity (hash, equality).
#[derive(Clone, Debug, Default)]
pub struct Threads(pub Option<std::sync::Arc<crate::pool::Pool>>);

impl PartialEq for Threads {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for Threads {}
impl std::hash::Hash for Threads {
    fn hash<H: std::hash::Hasher>(&self, _: &mut H) {}
}

impl KvAttention {
    fn scale(&self, head_dim: usize) -> f32 {
        self.scale_bits
            .map_or((head_dim as f32).sqrt().recip(), f32::from_bits)
    }
}

impl Op for KvAttention {
    fn name(&self) -> StaticName {
        "QuillKvAttention".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "causal={} scale={:?} capacity={} cache={}",
            self.causal,
            self.scale_bits.map(f32::from_bits),
            self.capacity,
            self.format.name()
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for KvAttention {
    not_out_of_plan!();

    fn state(&self, _ctx: &EvalContext) -> TractResult<Option<Box<dyn OpState>>> {
        Ok(Some(Box::new(KvAttentionState {
            op: self.clone(),
            k: Blocks::new(self.format, true),
            v: Blocks::new(self.format, false),
            len: 0,
            row: 0,
            work: Vec::new(),
            halves: Vec::new(),
        })))
    }
}

impl TypedOp for KvAttention {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(
            matches!(inputs.len(), 3 | 4),
            "attention expects Q, K, V and an optional mask"
        );
        Ok(tvec!(inputs[0].without_value()))
    }

    as_op!();
}

/// One sequence's cache for one layer.
#[derive(Clone, Debug)]
pub struct KvAttentionState {
    op: KvAttention,
    /// Blocks of [`KV_BLOCK`] positions, each `(kv_heads, KV_BLOCK, head_dim)` f32 or f16.
    k: Blocks,
    v: Blocks,
    /// Cached positions.
    len: usize,
    /// `kv_heads · head_dim`, fixed by the first step (0 before it).
    row: usize,
    /// Scratch of each thread a step is split over (one without quill's kernel threads),
    /// sized by the first step and reused.
    work: Vec<WorkSlot>,
    /// A decode step's halves over an int8 cache ([`Step::halves`]), reused.
    halves: Vec<f32>,
}

/// A [`Work`] one thread at a time (the parts of a step each lock their own: never contended).
#[derive(Debug, Default)]
struct WorkSlot(std::sync::Mutex<Work>);

impl WorkSlot {
    fn lock(&self) -> std::sync::MutexGuard<'_, Work> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Clone for WorkSlot {
    fn clone(&self) -> WorkSlot {
        WorkSlot(std::sync::Mutex::new(self.lock().clone()))
    }
}

/// One thread's scratch for [`Step::rows`].
#[derive(Clone, Debug, Default)]
struct Work {
    /// Softmax scratch, one score per visible position and query head of a group.
    scores: Vec<f32>,
    /// One group's query rows and outputs, `(heads / kv_heads, head_dim)`.
    qs: Vec<f32>,
    os: Vec<f32>,
    /// One head's block of an f16 cache, converted: `(KV_BLOCK, head_dim)` f32.
    scratch: Vec<f32>,
    /// The group's query rows quantized, for an int8 cache.
    q8: Query8,
    /// One half's `(2, group)` maxima and sums ([`Step::halves`]).
    stats: Vec<f32>,
}

/// One step's attention: what [`Step::rows`] needs to compute any (kv head, query row) pair.
struct Step<'a> {
    /// Q `(heads, s, d)`.
    q: &'a [f32],
    k: &'a Blocks,
    v: &'a Blocks,
    /// The mask `(heads | 1, s, total)` and its head count, if any.
    mask: Option<(&'a [f32], usize)>,
    group: usize,
    s: usize,
    d: usize,
    past: usize,
    total: usize,
    causal: bool,
    scale: f32,
}

/// The output `(heads, s, d)` shared by the threads of a step, each writing its own rows.
type OutPtr = crate::pool::SendPtr<f32>;

impl Step<'_> {
    /// Pairs `items` (item = kv head · s + query row) into `out`.
    ///
    /// # Safety
    /// `out` points to `heads · s · d` writable f32 of which no one else writes these pairs'
    /// rows.
    unsafe fn rows(&self, items: std::ops::Range<usize>, w: &mut Work, out: &OutPtr) {
        let (s, d, group) = (self.s, self.d, self.group);
        w.scratch.resize(KV_BLOCK * d, 0.0);
        for item in items {
            let (g, i) = (item / s, item % s);
            let at = self.pair(g, i, w);
            attend(
                &w.qs,
                self.k,
                self.v,
                at,
                &mut w.scores,
                &mut w.scratch,
                &mut w.os,
                &mut w.q8,
            );
            for t in 0..group {
                let h = g * group + t;
                // SAFETY: row (h, i) is within `out` and belongs to this pair only.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        w.os[t * d..].as_ptr(),
                        out.0.add((h * s + i) * d),
                        d,
                    )
                };
            }
        }
    }

    /// A decode step over an int8 cache: halves `items` (item = kv head · 2 + half, see
    /// [`attend_q8`]), each half's sums `(group, d)` then stats `(2, group)` into slot `item`
    /// of `halves`, for [`Step::merge`].
    ///
    /// # Safety
    /// `halves` points to `kv_heads · 2` slots of [`Step::half_slot`] writable f32 of which no
    /// one else writes these items'.
    unsafe fn halves(&self, items: std::ops::Range<usize>, w: &mut Work, halves: &OutPtr) {
        let (Blocks::Keys8(k), Blocks::Values8(v)) = (self.k, self.v) else {
            unreachable!("halves only for an int8 cache");
        };
        let slot = self.half_slot();
        let (d, group) = (self.d, self.group);
        w.stats.resize(2 * group, 0.0);
        for item in items {
            let (g, half) = (item / 2, item % 2);
            let at = self.pair(g, 0, w);
            let mid = split_point(at.visible);
            let at = if half == 0 {
                Cache {
                    visible: mid,
                    then: next_after_first_half(mid, at.visible, g),
                    ..at
                }
            } else {
                Cache {
                    first: mid,
                    then: (0, g + 1),
                    ..at
                }
            };
            attend_q8(
                &w.qs,
                k,
                v,
                at,
                &mut w.scores,
                &mut w.os,
                &mut w.stats,
                &mut w.q8,
                true,
            );
            // SAFETY: slot `item` is within `halves` and belongs to this item only.
            unsafe {
                let to = halves.0.add(item * slot);
                std::ptr::copy_nonoverlapping(w.os.as_ptr(), to, group * d);
                std::ptr::copy_nonoverlapping(w.stats.as_ptr(), to.add(group * d), 2 * group);
            }
        }
    }

    /// f32 per slot of [`Step::halves`].
    fn half_slot(&self) -> usize {
        self.group * (self.d + 2)
    }

    /// Puts the halves of every kv head together into `out (heads, 1, d)`.
    fn merge(&self, halves: &[f32], out: &mut [f32]) {
        let (d, group, slot) = (self.d, self.group, self.half_slot());
        for (g, o) in out.chunks_exact_mut(group * d).enumerate() {
            let (h0, h1) = (
                &halves[2 * g * slot..][..slot],
                &halves[(2 * g + 1) * slot..][..slot],
            );
            o.copy_from_slice(&h0[..group * d]);
            merge_halves(o, &h0[group * d..], &h1[..group * d], &h1[group * d..], d);
        }
    }

    /// Copies the group's query rows of pair (kv head `g`, query row `i`) into `w.qs` and
    /// returns its view of the cache (every visible position).
    fn pair(&self, g: usize, i: usize, w: &mut Work) -> Cache<'_> {
        let (s, d, group) = (self.s, self.d, self.group);
        w.qs.resize(group * d, 0.0);
        w.os.resize(group * d, 0.0);
        // Causal: query i (absolute position past + i) sees positions 0..=past + i.
        let visible = if self.causal {
            self.past + i + 1
        } else {
            self.total
        };
        for t in 0..group {
            let h = g * group + t;
            w.qs[t * d..][..d].copy_from_slice(&self.q[(h * s + i) * d..][..d]);
        }
        // Mask rows of this query row: (heads | 1, s, total) → the group's first row and
        // the distance between heads' rows (0 when all heads share one).
        let total = self.total;
        let mask = match self.mask {
            Some((md, 1)) => Some((&md[i * total..], 0)),
            Some((md, _)) => Some((&md[(g * group * s + i) * total..], s * total)),
            None => None,
        };
        Cache {
            head: g,
            first: 0,
            visible,
            then: (0, g + 1),
            head_dim: d,
            scale: self.scale,
            mask,
        }
    }
}

impl KvAttentionState {
    /// The cache's shape as the replaced op reported it, `(1, kv_heads, len, head_dim)`.
    fn cache_shape(&self, kv_heads: usize) -> Option<[usize; 4]> {
        (self.row > 0).then(|| [1, kv_heads, self.len, self.row / kv_heads])
    }

    /// Appends `new (1, Hkv, S, D)` to a cache holding `len` positions, opening a block
    /// (zeroed) when a position starts one.
    fn append(cache: &mut Blocks, len: usize, new: &[f32], heads: usize, s: usize, d: usize) {
        for t in 0..s {
            let pos = len + t;
            if pos.is_multiple_of(KV_BLOCK) {
                cache.open(heads, d);
            }
            for h in 0..heads {
                let from = (h * s + t) * d;
                cache.write(
                    pos / KV_BLOCK,
                    (h * KV_BLOCK + pos % KV_BLOCK) * d,
                    &new[from..from + d],
                );
            }
        }
    }
}

impl OpState for KvAttentionState {
    fn init_tensor_fact(&self) -> Option<(String, TypedFact)> {
        Some((self.op.name.clone(), self.op.past_sequence_fact.clone()))
    }

    fn has_init_tensor_fact(&self) -> bool {
        true
    }

    fn resolve_symbols(&mut self, state: &mut TurnState) -> TractResult<()> {
        let kv_heads = self.op.past_sequence_fact.shape[1]
            .to_usize()
            .unwrap_or(1)
            .max(1);
        DynKeyValueCacheState::resolve_symbols(
            state,
            self.op.past_sequence_fact.clone(),
            self.cache_shape(kv_heads).as_ref().map(|s| &s[..]),
        )
    }

    fn eval(
        &mut self,
        _ctx: &EvalContext,
        _op: &dyn Op,
        inputs: TVec<TValue>,
    ) -> TractResult<TVec<TValue>> {
        ensure!(
            matches!(inputs.len(), 3 | 4),
            "attention expects Q, K, V and an optional mask"
        );
        let out_dt = inputs[0].datum_type();
        let q = inputs[0].cast_to::<f32>()?;
        let k_new = inputs[1].cast_to::<f32>()?;
        let v_new = inputs[2].cast_to::<f32>()?;
        let (&[b, heads, s, d], &[kb, kv_heads, ks, kd]) = (q.shape(), k_new.shape()) else {
            bail!(
                "attention expects rank-4 Q and K, got {:?} and {:?}",
                q.shape(),
                k_new.shape()
            );
        };
        ensure!(
            b == 1 && kb == 1 && ks == s && kd == d && v_new.shape() == k_new.shape(),
            "attention shapes: Q {:?}, K {:?}, V {:?}",
            q.shape(),
            k_new.shape(),
            v_new.shape()
        );
        ensure!(
            kv_heads > 0 && heads.is_multiple_of(kv_heads),
            "{heads} query heads over {kv_heads} kv heads"
        );
        self.op.format.check_head_dim(d)?;
        let row = kv_heads * d;
        if self.row == 0 {
            self.row = row;
            let blocks = self.op.capacity.max(s).div_ceil(KV_BLOCK);
            self.k.reserve_exact(blocks);
            self.v.reserve_exact(blocks);
        }
        if self.work.is_empty() {
            let threads = self.op.pool.0.as_ref().map_or(1, |p| p.threads());
            self.work = (0..threads)
                .map(|_| {
                    let mut w = Work::default();
                    w.scores
                        .reserve_exact(self.op.capacity.max(s) * (heads / kv_heads));
                    WorkSlot(std::sync::Mutex::new(w))
                })
                .collect();
        }
        ensure!(
            self.row == row,
            "the cache holds rows of {}, the step gives {row}",
            self.row
        );
        let past = self.len;
        Self::append(
            &mut self.k,
            past,
            k_new.try_as_plain_ram()?.as_slice::<f32>()?,
            kv_heads,
            s,
            d,
        );
        Self::append(
            &mut self.v,
            past,
            v_new.try_as_plain_ram()?.as_slice::<f32>()?,
            kv_heads,
            s,
            d,
        );
        self.len += s;
        let total = self.len;

        // The mask as (heads | 1, s, total), if any.
        let mask = match inputs.get(3) {
            Some(m) => {
                let m = m.cast_to::<f32>()?.into_owned();
                let mh = match m.shape() {
                    [1, mh, ms, mt] if *ms == s && *mt == total => *mh,
                    [1, ms, mt] if *ms == s && *mt == total => 1,
                    other => bail!(
                        "attention mask of shape {other:?} for {s} queries over {total} positions"
                    ),
                };
                ensure!(
                    mh == 1 || mh == heads,
                    "mask for {mh} heads, attention has {heads}"
                );
                Some((m, mh))
            }
            None => None,
        };
        let mask_data = match &mask {
            Some((m, _)) => Some(m.try_as_plain_ram()?.as_slice::<f32>()?),
            None => None,
        };

        let step = Step {
            q: q.try_as_plain_ram()?.as_slice::<f32>()?,
            k: &self.k,
            v: &self.v,
            mask: match (&mask, mask_data) {
                (Some((_, mh)), Some(md)) => Some((md, *mh)),
                _ => None,
            },
            group: heads / kv_heads,
            s,
            d,
            past,
            total,
            causal: self.op.causal,
            scale: self.op.scale(d),
        };
        let mut out = vec![0f32; heads * s * d];
        // A decode step over an int8 cache goes by halves of kv heads (three kv heads would
        // leave one of two threads idle half the time), put together after.
        let by_halves = s == 1 && matches!(step.k, Blocks::Keys8(_));
        let items = if by_halves {
            kv_heads * 2
        } else {
            kv_heads * s
        };
        if by_halves {
            self.halves.resize(items * step.half_slot(), 0.0);
        }
        let to = crate::pool::SendPtr(if by_halves {
            self.halves.as_mut_ptr()
        } else {
            out.as_mut_ptr()
        });
        // SAFETY (both): `to` holds every item's output, and the parts' ranges are disjoint.
        let run = |range: std::ops::Range<usize>, w: &mut Work| unsafe {
            if by_halves {
                step.halves(range, w, &to)
            } else {
                step.rows(range, w, &to)
            }
        };
        let work = &self.work;
        match &self.op.pool.0 {
            // Each thread takes a contiguous run of items.
            Some(pool) if pool.threads() > 1 && items >= 2 && work.len() == pool.threads() => {
                let parts = pool.threads();
                pool.run(&|part| {
                    let mut w = work[part].lock();
                    run(items * part / parts..items * (part + 1) / parts, &mut w)
                });
            }
            _ => run(0..items, &mut work[0].lock()),
        }
        if by_halves {
            step.merge(&self.halves, &mut out);
        }
        let out = Tensor::from_shape(&[1, heads, s, d], &out)?;
        Ok(tvec!(out.cast_to_dt(out_dt)?.into_owned().into_tvalue()))
    }

    /// The cache as two state tensors `(1, kv_heads, len, head_dim)`, K then V.
    fn save_to(&self, states: &mut Vec<TValue>) -> TractResult<()> {
        if self.len == 0 {
            return Ok(());
        }
        let kv_heads = self.op.past_sequence_fact.shape[1].to_usize()?;
        let d = self.row / kv_heads;
        for cache in [&self.k, &self.v] {
            let mut t = vec![0f32; self.len * self.row];
            for p in 0..self.len {
                for h in 0..kv_heads {
                    vector(cache, p, h, &mut t[(h * self.len + p) * d..][..d]);
                }
            }
            states.push(Tensor::from_shape(&[1, kv_heads, self.len, d], &t)?.into_tvalue());
        }
        Ok(())
    }

    fn load_from(
        &mut self,
        state: &mut TurnState,
        states: &mut dyn Iterator<Item = TValue>,
    ) -> TractResult<()> {
        if let Some(k) = states.next() {
            let v = states
                .next()
                .context("attention state: a K cache without its V")?;
            let (k, v) = (k.cast_to::<f32>()?, v.cast_to::<f32>()?);
            let &[1, kv_heads, len, d] = k.shape() else {
                bail!("attention state of shape {:?}", k.shape());
            };
            ensure!(v.shape() == k.shape(), "K and V caches of different shapes");
            self.op.format.check_head_dim(d)?;
            self.k.clear();
            self.v.clear();
            self.row = kv_heads * d;
            Self::append(
                &mut self.k,
                0,
                k.try_as_plain_ram()?.as_slice::<f32>()?,
                kv_heads,
                len,
                d,
            );
            Self::append(
                &mut self.v,
                0,
                v.try_as_plain_ram()?.as_slice::<f32>()?,
                kv_heads,
                len,
                d,
            );
            self.len = len;
        }
        self.resolve_symbols(state)
    }

    fn reset_lanes(&mut self, _lanes: &[LaneId]) -> TractResult<()> {
        bail!("quill's attention holds one sequence: its cache has no lane axis")
    }
}

/// Positions per cache block. Within a block each kv head's vectors are contiguous, so
/// attention streams one head's keys as 16 kB runs (head_dim 64) instead of picking 256 B out
/// of every position's row; appending opens one block every 64 tokens.
pub const KV_BLOCK: usize = 64;

/// The KV cache's number format (`--kv-cache`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum KvCacheFormat {
    /// As the graph computes it: attention is the same as tract's up to summation order.
    #[default]
    F32,
    /// Half the memory and the bytes a step reads; each value rounded to f16.
    F16,
    /// A quarter of f32: each cached vector as int8 codes with one f32 scale (symmetric,
    /// `max |x| / 127`); query rows are quantized the same way for `Q·Kᵀ`, which runs on
    /// integer dot products (AVX-512 VNNI where the CPU has it).
    Int8,
}

impl KvCacheFormat {
    pub fn name(self) -> &'static str {
        match self {
            KvCacheFormat::F32 => "f32",
            KvCacheFormat::F16 => "f16",
            KvCacheFormat::Int8 => "int8",
        }
    }

    /// Whether a cache in this format holds vectors of `d` values: int8 packs keys 4
    /// components at a time.
    pub fn check_head_dim(self, d: usize) -> TractResult<()> {
        ensure!(
            self != KvCacheFormat::Int8 || d.is_multiple_of(4),
            "an int8 KV cache needs a head size that is a multiple of 4, this model's is {d}: \
             use --kv-cache f16 or f32"
        );
        Ok(())
    }

    /// Bytes one cached value takes (the int8 scales add 4 / head_dim).
    pub fn bytes_per_value(self) -> usize {
        match self {
            KvCacheFormat::F32 => 4,
            KvCacheFormat::F16 => 2,
            KvCacheFormat::Int8 => 1,
        }
    }
}

/// A layer's K or V cache: blocks of `(kv_heads, KV_BLOCK, head_dim)`, f32, f16 or int8. The
/// cache grows one block (48 kB in f32 for SmolLM2's 3 × 64) at a time and never moves what it
/// holds; a finished sequence's blocks are freed to the allocator, which hands the same sizes
/// to the next. An f16 cache halves the bytes a step reads (`--kv-cache f16`): attention
/// converts one head's block at a time into a 16 kB f32 scratch that stays in L1 (F16C on
/// x86-64, FP16 on aarch64, through `half`, chosen at run time). An int8 cache
/// (`--kv-cache int8`) quarters them: keys are read as int8 by [`block_dots`], values
/// converted in registers by [`weigh_values_q8`].
#[derive(Clone, Debug)]
pub enum Blocks {
    F32(Vec<Box<[f32]>>),
    F16(Vec<Box<[f16]>>),
    /// Keys, each head's 64 positions in four groups of 16 packed for `vpdpbusd`
    /// ([`key_index`]).
    Keys8(Vec<I8Block>),
    /// Values, row-major like f32.
    Values8(Vec<I8Block>),
}

/// One block of an int8 cache.
#[derive(Clone, Debug)]
pub struct I8Block {
    /// `(kv_heads, KV_BLOCK, head_dim)` codes (keys: each head's part packed, [`key_index`]).
    codes: Box<[i8]>,
    /// `(kv_heads, KV_BLOCK)`: a vector is `codes · scale`.
    scales: Box<[f32]>,
}

/// Where component `c` of position `p` (of a block) sits in one head's `KV_BLOCK · d` key codes:
/// positions in groups of 16, each group `(d / 4, 16, 4)`, so 64 contiguous bytes hold 4
/// components of 16 positions, the operand of one `vpdpbusd` against 4 query components
/// broadcast to every lane.
#[inline(always)]
fn key_index(p: usize, c: usize, d: usize) -> usize {
    (p / 16) * 16 * d + (c / 4) * 64 + (p % 16) * 4 + c % 4
}

/// Symmetric int8 codes of `x` into `codes` (as long), returning the scale (`max |x| / 127`; 0
/// for a zero vector or one so small (`max |x|` < 4e-37) that `127 / max |x|` overflows, NaN
/// if `x` holds one, so the result carries it as f32 would). In AVX-512 where the CPU has it,
/// else in portable code: the same codes and scale (`quantize_matches_its_plain_definition`).
fn quantize(x: &[f32], codes: &mut [i8]) -> f32 {
    assert_eq!(x.len(), codes.len());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512 F.
        return unsafe { quantize_avx512(x, codes) };
    }
    quantize_portable(x, codes)
}

/// [`quantize`] in portable code.
fn quantize_portable(x: &[f32], codes: &mut [i8]) -> f32 {
    let (inv, scale) = inverse_and_scale(amax_of(x));
    for (q, v) in codes.iter_mut().zip(x) {
        *q = round_to_i8(v * inv);
    }
    scale
}

/// `max |x|`, NaN if `x` holds one. Exact in any order: sixteen lanes (it vectorizes);
/// `f32::max` skips a NaN, so NaNs are counted in the same pass.
fn amax_of(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut nans = [0u32; 16];
    let (xc, xr) = x.as_chunks::<16>();
    for c in xc {
        for l in 0..16 {
            acc[l] = acc[l].max(c[l].abs());
            nans[l] |= u32::from(c[l].is_nan());
        }
    }
    if nans.iter().any(|&n| n != 0) || xr.iter().any(|v| v.is_nan()) {
        f32::NAN
    } else {
        acc.into_iter()
            .chain(xr.iter().map(|v| v.abs()))
            .fold(0f32, f32::max)
    }
}

/// The factor codes are made with and the scale they are read with, for `max |x|` = `amax`.
#[inline(always)]
fn inverse_and_scale(amax: f32) -> (f32, f32) {
    let inv = 127.0 / amax;
    if amax > 0.0 && inv.is_finite() {
        (inv, amax / 127.0)
    } else if amax.is_nan() {
        (0.0, f32::NAN)
    } else {
        (0.0, 0.0)
    }
}

/// [`quantize`] sixteen values at a time (the portable loop took about 8 cycles a value: a
/// fifth of a prefill's attention, its queries and cache rows). The last 1–15 values masked.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn quantize_avx512(x: &[f32], codes: &mut [i8]) -> f32 {
    use std::arch::x86_64::*;
    let (xc, xr) = x.as_chunks::<16>();
    let tail = tail_mask(xr.len());
    let mut acc = _mm512_setzero_ps();
    let mut nan: __mmask16 = 0;
    let mut take = |v: __m512| {
        nan |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
        // `vmaxps` returns its second operand when the first is NaN: a NaN is skipped.
        acc = _mm512_max_ps(_mm512_abs_ps(v), acc);
    };
    for c in xc {
        // SAFETY: 16 f32 (unaligned load).
        take(unsafe { _mm512_loadu_ps(c.as_ptr()) });
    }
    if !xr.is_empty() {
        // SAFETY: a masked load of the `xr.len()` values only; the others read as 0.
        take(unsafe { _mm512_maskz_loadu_ps(tail, xr.as_ptr()) });
    }
    let amax = if nan != 0 {
        f32::NAN
    } else {
        _mm512_reduce_max_ps(acc)
    };
    let (inv, scale) = inverse_and_scale(amax);
    let inv = _mm512_set1_ps(inv);
    let (cc, cr) = codes.as_chunks_mut::<16>();
    for (c, q) in xc.iter().zip(cc) {
        // SAFETY: 16 f32 in, 16 bytes out (unaligned).
        unsafe {
            let y = _mm512_mul_ps(_mm512_loadu_ps(c.as_ptr()), inv);
            _mm_storeu_si128(q.as_mut_ptr().cast(), round_to_i8_avx512(y));
        }
    }
    if !xr.is_empty() {
        let mut out = [0i8; 16];
        // SAFETY: a masked load of the `xr.len()` values; 16 bytes into `out`.
        unsafe {
            let y = _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, xr.as_ptr()), inv);
            _mm_storeu_si128(out.as_mut_ptr().cast(), round_to_i8_avx512(y));
        }
        cr.copy_from_slice(&out[..cr.len()]);
    }
    scale
}

/// The mask of the first `len` (< 16) lanes of an AVX-512 register of f32.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn tail_mask(len: usize) -> std::arch::x86_64::__mmask16 {
    debug_assert!(len < 16);
    (1u16 << len) - 1
}

/// [`round_to_i8`] of 16 lanes, as bytes: the same clamp, truncation and step away from zero.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn round_to_i8_avx512(y: std::arch::x86_64::__m512) -> std::arch::x86_64::__m128i {
    use std::arch::x86_64::*;
    // `vmaxps` / `vminps` return their second operand when either is NaN: a NaN stays.
    let y = _mm512_min_ps(
        _mm512_set1_ps(127.0),
        _mm512_max_ps(_mm512_set1_ps(-127.0), y),
    );
    // Toward zero; a NaN becomes i32::MIN, whose low byte (all `vpmovdb` keeps) is 0, and its
    // fraction compares false.
    let t = _mm512_cvttps_epi32(y);
    let f = _mm512_sub_ps(y, _mm512_cvtepi32_ps(t));
    let one = _mm512_set1_epi32(1);
    let up = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(f, _mm512_set1_ps(0.5));
    let down = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(f, _mm512_set1_ps(-0.5));
    let t = _mm512_mask_add_epi32(t, up, t, one);
    _mm512_cvtepi32_epi8(_mm512_mask_sub_epi32(t, down, t, one))
}

/// `y.round().clamp(-127.0, 127.0) as i8` (to nearest, ties away from zero; NaN → 0) without
/// `f32::round`, which is a call to `roundf` on baseline x86-64 (no SSE4.1): it was most of the
/// cost of quantizing a step's queries and cache rows. Clamping first gives the same result
/// (rounding is monotonic and ±127 are integers); then `y - trunc(y)` is exact (|y| ≤ 127),
/// and the fraction decides the step away from zero.
#[inline(always)]
fn round_to_i8(y: f32) -> i8 {
    // `f32::clamp` keeps a NaN, and `as` maps it to 0; its fraction compares false.
    let y = y.clamp(-127.0, 127.0);
    let t = y as i32;
    let f = y - t as f32;
    (t + i32::from(f >= 0.5) - i32::from(f <= -0.5)) as i8
}

impl Blocks {
    fn new(format: KvCacheFormat, keys: bool) -> Blocks {
        match format {
            KvCacheFormat::F32 => Blocks::F32(Vec::new()),
            KvCacheFormat::F16 => Blocks::F16(Vec::new()),
            KvCacheFormat::Int8 if keys => Blocks::Keys8(Vec::new()),
            KvCacheFormat::Int8 => Blocks::Values8(Vec::new()),
        }
    }

    fn reserve_exact(&mut self, blocks: usize) {
        match self {
            Blocks::F32(b) => b.reserve_exact(blocks),
            Blocks::F16(b) => b.reserve_exact(blocks),
            Blocks::Keys8(b) | Blocks::Values8(b) => b.reserve_exact(blocks),
        }
    }

    fn clear(&mut self) {
        match self {
            Blocks::F32(b) => b.clear(),
            Blocks::F16(b) => b.clear(),
            Blocks::Keys8(b) | Blocks::Values8(b) => b.clear(),
        }
    }

    /// Opens a zeroed block for `heads` heads of `d` values.
    fn open(&mut self, heads: usize, d: usize) {
        let size = KV_BLOCK * heads * d;
        match self {
            Blocks::F32(b) => b.push(vec![0.0; size].into_boxed_slice()),
            Blocks::F16(b) => b.push(vec![f16::ZERO; size].into_boxed_slice()),
            Blocks::Keys8(b) | Blocks::Values8(b) => b.push(I8Block {
                codes: vec![0; size].into_boxed_slice(),
                scales: vec![0.0; KV_BLOCK * heads].into_boxed_slice(),
            }),
        }
    }

    /// Stores the vector `src` at offset `at = (head · KV_BLOCK + position) · d` of block
    /// `block` (rounded to nearest when f16, quantized when int8).
    fn write(&mut self, block: usize, at: usize, src: &[f32]) {
        let d = src.len();
        match self {
            Blocks::F32(b) => b[block][at..][..d].copy_from_slice(src),
            Blocks::F16(b) => b[block][at..][..d].convert_from_f32_slice(src),
            Blocks::Keys8(b) => {
                let (row, blk) = (at / d, &mut b[block]);
                let (head, p) = (row / KV_BLOCK, row % KV_BLOCK);
                let codes = &mut blk.codes[head * KV_BLOCK * d..][..KV_BLOCK * d];
                // Quantized in a row, then placed four components at a time (contiguous in
                // the packed layout); a head wider than the buffer goes value by value.
                let mut row_codes = [0i8; 256];
                if let Some(q) = row_codes.get_mut(..d) {
                    blk.scales[row] = quantize(src, q);
                    for (c4, q4) in q.chunks_exact(4).enumerate() {
                        codes[key_index(p, 4 * c4, d)..][..4].copy_from_slice(q4);
                    }
                } else {
                    let (inv, scale) = inverse_and_scale(amax_of(src));
                    for (c, v) in src.iter().enumerate() {
                        codes[key_index(p, c, d)] = round_to_i8(v * inv);
                    }
                    blk.scales[row] = scale;
                }
            }
            Blocks::Values8(b) => {
                let blk = &mut b[block];
                blk.scales[at / d] = quantize(src, &mut blk.codes[at..][..d]);
            }
        }
    }

    /// Starts loading `len` values of block `block` from offset `at` into the L2 cache, if
    /// the block exists (x86-64; elsewhere nothing): attention asks for the next block while it
    /// computes on this one. A head's 16 kB run spans four pages, and the hardware prefetchers
    /// stop at each page boundary.
    #[inline(always)]
    fn prefetch(&self, block: usize, at: usize, len: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};
            let bytes: &[u8] = match self {
                Blocks::F32(b) => match b.get(block).and_then(|b| b.get(at..at + len)) {
                    Some(v) => bytemuck_f32(v),
                    None => return,
                },
                Blocks::F16(b) => match b.get(block).and_then(|b| b.get(at..at + len)) {
                    // SAFETY: f16 is two plain bytes; the slice is reinterpreted in place.
                    Some(v) => unsafe {
                        std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), 2 * v.len())
                    },
                    None => return,
                },
                // `attend_q8` asks for int8 blocks line by line (`prefetch_line`).
                Blocks::Keys8(_) | Blocks::Values8(_) => return,
            };
            for line in bytes.chunks(64) {
                // SAFETY: a prefetch of an address inside the slice; SSE is part of the x86-64
                // baseline.
                unsafe { _mm_prefetch::<_MM_HINT_T1>(line.as_ptr().cast::<i8>()) };
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (block, at, len);
    }

    /// `len` values of block `block` from offset `at`, as f32: the block itself, or (f16) its
    /// values converted into `scratch`. Int8 blocks are read by `attend_q8` alone.
    fn read<'a>(
        &'a self,
        block: usize,
        at: usize,
        len: usize,
        scratch: &'a mut [f32],
    ) -> &'a [f32] {
        match self {
            Blocks::F32(b) => &b[block][at..][..len],
            Blocks::F16(b) => {
                f16_to_f32(&b[block][at..][..len], &mut scratch[..len]);
                &scratch[..len]
            }
            Blocks::Keys8(_) | Blocks::Values8(_) => {
                unreachable!("int8 blocks are read by attend_q8")
            }
        }
    }
}

/// The bytes of `v`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn bytemuck_f32(v: &[f32]) -> &[u8] {
    // SAFETY: f32 is four plain bytes, any byte is a valid u8; same allocation and lifetime.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), 4 * v.len()) }
}

/// `dst = src` as f32: eight at a time with F16C where the CPU has it (`half`'s slice
/// conversion calls a function per eight values, which made an f16 cache slower than f32),
/// else through `half` (FP16 on aarch64 when present, else portable code).
fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has F16C and AVX.
        return unsafe { f16_to_f32_f16c(src, dst) };
    }
    src.convert_to_f32_slice(dst);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "f16c,avx")]
fn f16_to_f32_f16c(src: &[f16], dst: &mut [f32]) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm256_cvtph_ps, _mm256_storeu_ps};
    assert_eq!(src.len(), dst.len());
    let (s8, s_rest) = src.as_chunks::<8>();
    let (d8, d_rest) = dst.as_chunks_mut::<8>();
    for (s, d) in s8.iter().zip(d8) {
        // SAFETY: `s` is 8 f16 (16 bytes) and `d` 8 f32 (32 bytes); unaligned loads/stores.
        unsafe {
            let v = _mm_loadu_si128(s.as_ptr().cast::<__m128i>());
            _mm256_storeu_ps(d.as_mut_ptr(), _mm256_cvtph_ps(v));
        }
    }
    s_rest.convert_to_f32_slice(d_rest);
}

/// The vector of position `pos`, kv head `head`, into `out` (head_dim values).
fn vector(cache: &Blocks, pos: usize, head: usize, out: &mut [f32]) {
    let d = out.len();
    let (block, p) = (pos / KV_BLOCK, pos % KV_BLOCK);
    let at = (head * KV_BLOCK + p) * d;
    match cache {
        Blocks::F32(b) => out.copy_from_slice(&b[block][at..][..d]),
        Blocks::F16(b) => f16_to_f32(&b[block][at..][..d], out),
        Blocks::Keys8(b) => {
            let blk = &b[block];
            let codes = &blk.codes[head * KV_BLOCK * d..][..KV_BLOCK * d];
            let s = blk.scales[head * KV_BLOCK + p];
            for (c, o) in out.iter_mut().enumerate() {
                *o = f32::from(codes[key_index(p, c, d)]) * s;
            }
        }
        Blocks::Values8(b) => {
            let blk = &b[block];
            let s = blk.scales[head * KV_BLOCK + p];
            for (o, &q) in out.iter_mut().zip(&blk.codes[at..][..d]) {
                *o = f32::from(q) * s;
            }
        }
    }
}

/// One kv head's view of a layer's cache.
#[derive(Clone, Copy)]
struct Cache<'m> {
    /// The kv head.
    head: usize,
    /// Positions the queries see: `first..visible` (`first` a block's first position; only an
    /// int8 cache computes a part of them, see [`attend_q8`]).
    first: usize,
    visible: usize,
    /// The block after this part's values in a step's order: (block, kv head), for
    /// prefetching (int8 cache).
    then: (usize, usize),
    head_dim: usize,
    scale: f32,
    /// Head 0's mask row and the distance to the next head's (0: shared), if any.
    mask: Option<(&'m [f32], usize)>,
}

/// Attention of the `qs.len() / d` query heads sharing one kv head, for one query row:
/// `o_t = softmax_j(scale · q_t·K[j] + mask_t[j]) · V`, `j < visible`. Each cached vector is
/// read once for the whole group. `mask`: head 0's row and the distance to the next head's.
/// The AVX2 + FMA copy where the CPU has it; an int8 cache goes to [`attend_q8`].
#[allow(clippy::too_many_arguments)]
fn attend(
    qs: &[f32],
    k: &Blocks,
    v: &Blocks,
    at: Cache<'_>,
    scores: &mut Vec<f32>,
    scratch: &mut [f32],
    os: &mut [f32],
    q8: &mut Query8,
) {
    if let (Blocks::Keys8(k), Blocks::Values8(v)) = (k, v) {
        // Both halves of the positions, one after the other, then put together: what a
        // decode step computes with the halves on two threads.
        let group = qs.len() / at.head_dim;
        let mid = split_point(at.visible);
        let mut stats = std::mem::take(&mut q8.stats);
        stats.resize(4 * group, 0.0);
        let (st0, st1) = stats.split_at_mut(2 * group);
        let mut o1 = std::mem::take(&mut q8.second);
        o1.resize(group * at.head_dim, 0.0);
        let first = Cache {
            visible: mid,
            then: next_after_first_half(mid, at.visible, at.head),
            ..at
        };
        attend_q8(qs, k, v, first, scores, os, st0, q8, true);
        let second = Cache {
            first: mid,
            then: (0, at.head + 1),
            ..at
        };
        // The queries as the first half quantized them.
        attend_q8(qs, k, v, second, scores, &mut o1, st1, q8, false);
        merge_halves(os, st0, &o1, st1, at.head_dim);
        q8.stats = stats;
        q8.second = o1;
        return;
    }
    debug_assert_eq!(
        at.first, 0,
        "only an int8 cache computes part of the positions"
    );
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { attend_avx2(qs, k, v, at, scores, scratch, os) };
    }
    attend_impl::<FUSED_BASELINE, { cfg!(target_arch = "aarch64") }>(
        qs, k, v, at, scores, scratch, os,
    )
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn attend_avx2(
    qs: &[f32],
    k: &Blocks,
    v: &Blocks,
    at: Cache<'_>,
    scores: &mut Vec<f32>,
    scratch: &mut [f32],
    os: &mut [f32],
) {
    attend_impl::<true, true>(qs, k, v, at, scores, scratch, os)
}

/// Whether `mul_add` is one instruction on the baseline target (aarch64); elsewhere the
/// baseline multiplies and adds, and only the AVX2 + FMA copy fuses.
const FUSED_BASELINE: bool = cfg!(target_arch = "aarch64");

#[inline(always)]
fn attend_impl<const FUSED: bool, const SIMD: bool>(
    qs: &[f32],
    k: &Blocks,
    v: &Blocks,
    at: Cache<'_>,
    scores: &mut Vec<f32>,
    scratch: &mut [f32],
    os: &mut [f32],
) {
    let d = at.head_dim;
    let group = qs.len() / d;
    let n = at.visible;
    // scores: (group, n)
    scores.clear();
    scores.resize(group * n, 0.0);
    // Block by block: this head's keys of one block are one contiguous (rows, d) run, read
    // once for the whole group.
    let run = at.head * KV_BLOCK * d;
    for start in (0..n).step_by(KV_BLOCK) {
        let rows = (n - start).min(KV_BLOCK);
        // The next block's run (or, after the last key block, the first value block's) is on
        // its way while this one is computed.
        match next_rows(n, start) {
            0 => v.prefetch(0, run, n.min(KV_BLOCK) * d),
            r => k.prefetch(start / KV_BLOCK + 1, run, r * d),
        }
        let keys = k.read(start / KV_BLOCK, run, rows * d, scratch);
        for (t, q) in qs.chunks_exact(d).enumerate() {
            let st = &mut scores[t * n + start..][..rows];
            for (s, kj) in st.iter_mut().zip(keys.chunks_exact(d)) {
                *s = if SIMD {
                    simd_dot(q, kj)
                } else {
                    dot::<FUSED>(q, kj)
                } * at.scale;
            }
        }
    }
    softmax(scores, n, at.mask);
    weigh_values::<FUSED>(scores, v, at, scratch, os);
}

/// Positions of the block after the one starting at `start`, of `n` visible.
#[inline(always)]
fn next_rows(n: usize, start: usize) -> usize {
    (n.saturating_sub(start + KV_BLOCK)).min(KV_BLOCK)
}

/// Scores `(group, n)` → probabilities, row by row: `+ mask`, then a softmax.
#[inline(always)]
fn softmax(scores: &mut [f32], n: usize, mask: Option<(&[f32], usize)>) {
    for (t, st) in scores.chunks_exact_mut(n).enumerate() {
        if let Some((m, stride)) = mask {
            for (s, &mj) in st.iter_mut().zip(&m[t * stride..][..n]) {
                *s += mj;
            }
        }
        let max = max(st);
        if max == f32::NEG_INFINITY {
            // Nothing visible (a fully masked row): zeros, as a softmax over nothing.
            st.fill(0.0);
            continue;
        }
        exp_shifted(st, max);
        let inv = sum(st).recip();
        for s in st.iter_mut() {
            *s *= inv;
        }
    }
}

/// `o_t = Σ_j p_tj V_j` for probabilities `ps (group, n)`, block by block, each value vector
/// read once for the group.
#[inline(always)]
fn weigh_values<const FUSED: bool>(
    ps: &[f32],
    v: &Blocks,
    at: Cache<'_>,
    scratch: &mut [f32],
    os: &mut [f32],
) {
    let (d, n) = (at.head_dim, at.visible);
    let run = at.head * KV_BLOCK * d;
    for o in os.iter_mut() {
        *o = 0.0;
    }
    for start in (0..n).step_by(KV_BLOCK) {
        let rows = (n - start).min(KV_BLOCK);
        v.prefetch(start / KV_BLOCK + 1, run, next_rows(n, start) * d);
        let values = v.read(start / KV_BLOCK, run, rows * d, scratch);
        // The block's values (16 kB at head_dim 64) stay in L1 across the group's heads.
        for (t, o) in os.chunks_exact_mut(d).enumerate() {
            let ps = &ps[t * n + start..][..rows];
            if let Ok(o) = <&mut [f32; 64]>::try_from(&mut *o) {
                // The usual head size: the output row stays in registers over the block.
                let mut acc = *o;
                for (&p, vj) in ps.iter().zip(values.as_chunks::<64>().0) {
                    for l in 0..64 {
                        acc[l] = madd::<FUSED>(p, vj[l], acc[l]);
                    }
                }
                *o = acc;
            } else {
                for (&p, vj) in ps.iter().zip(values.chunks_exact(d)) {
                    axpy::<FUSED>(p, vj, o);
                }
            }
        }
    }
}

/// A step's query rows quantized for an int8 cache (one thread's, reused).
#[derive(Clone, Debug, Default)]
pub struct Query8 {
    /// `(group, d)` codes.
    codes: Vec<i8>,
    /// Per row: `scale · q_scale`, the factor from integer dot product to score.
    factor: Vec<f32>,
    /// `(group, KV_BLOCK)` integer dot products of one block.
    dots: Vec<i32>,
    /// Both halves' `(2, group)` maxima and sums, and the second half's `(group, d)` sums
    /// ([`attend`]).
    stats: Vec<f32>,
    second: Vec<f32>,
}

/// [`attend`] over an int8 cache: `s_tj = (q8_t·k8_j) · k_scale_j · (scale · q_scale_t)`, the
/// integer dot products exact (VNNI or portable: the same scores everywhere), then the
/// softmax and the values as f32 (each block's values converted once for the group; the same
/// sums wherever multiply-adds are fused: x86-64 with FMA and aarch64; armv7 and x86-64
/// without FMA round each product).
///
/// Over the positions `at.first..at.visible` only, one half of them ([`split_point`]): `os`
/// gets the unnormalized sums `Σ_j exp(s_tj − m_t) · v_j` and `stats (2, group)` the maxima
/// m_t and sums l_t ([`softmax_part`]); [`merge_halves`] puts the two halves together. A
/// decode step computes the halves of a kv head on two threads, so that a step's three kv
/// heads keep two threads equally busy. `fresh`: quantize `qs` into `q8` (else `q8` holds
/// them, as the first half of the same pair left them).
#[allow(clippy::too_many_arguments)]
fn attend_q8(
    qs: &[f32],
    k: &[I8Block],
    v: &[I8Block],
    at: Cache<'_>,
    scores: &mut Vec<f32>,
    os: &mut [f32],
    stats: &mut [f32],
    q8: &mut Query8,
    fresh: bool,
) {
    if at.first >= at.visible {
        // An empty half (everything fits in the first): it adds nothing.
        os.fill(0.0);
        let (m, l) = stats.split_at_mut(stats.len() / 2);
        m.fill(f32::NEG_INFINITY);
        l.fill(0.0);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        let vnni = crate::kernels::vnni_available();
        // SAFETY: the CPU has AVX2 and FMA (and, with `vnni`, AVX-512 F, BW and VNNI).
        return unsafe { attend_q8_avx2(qs, k, v, at, scores, os, stats, q8, fresh, vnni) };
    }
    attend_q8_impl::<FUSED_BASELINE>(qs, k, v, at, scores, os, stats, q8, fresh, false)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn attend_q8_avx2(
    qs: &[f32],
    k: &[I8Block],
    v: &[I8Block],
    at: Cache<'_>,
    scores: &mut Vec<f32>,
    os: &mut [f32],
    stats: &mut [f32],
    q8: &mut Query8,
    fresh: bool,
    vnni: bool,
) {
    attend_q8_impl::<true>(qs, k, v, at, scores, os, stats, q8, fresh, vnni)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_q8_impl<const FUSED: bool>(
    qs: &[f32],
    k: &[I8Block],
    v: &[I8Block],
    at: Cache<'_>,
    scores: &mut Vec<f32>,
    os: &mut [f32],
    stats: &mut [f32],
    q8: &mut Query8,
    fresh: bool,
    vnni: bool,
) {
    let d = at.head_dim;
    let group = qs.len() / d;
    // Positions `first..visible`, `n` of them; `scores` and the stream count from `first`.
    let first = at.first;
    let n = at.visible - first;
    q8.dots.resize(group * KV_BLOCK, 0);
    if fresh {
        q8.codes.resize(group * d, 0);
        q8.factor.resize(group, 0.0);
        for (t, q) in qs.chunks_exact(d).enumerate() {
            q8.factor[t] = at.scale * quantize(q, &mut q8.codes[t * d..][..d]);
        }
    }
    // Every score is written below: no need to clear them.
    if scores.len() < group * n {
        scores.resize(group * n, 0.0);
    }
    let scores = &mut scores[..group * n];
    let run = at.head * KV_BLOCK * d;
    let stream = Stream8 {
        k,
        v,
        first: first / KV_BLOCK,
        blocks: n.div_ceil(KV_BLOCK),
        head: at.head,
        d,
        then: at.then,
    };
    for start in (0..n).step_by(KV_BLOCK) {
        let rows = (n - start).min(KV_BLOCK);
        let blk = &k[(first + start) / KV_BLOCK];
        // The keys of the next block in the step's stream (this half's key blocks, its value
        // blocks, then the keys the step reads next) are asked for line by line as this
        // block's are computed (all at once, the misses queued up and stalled).
        let next = stream.codes(start / KV_BLOCK + 1);
        let codes = &blk.codes[run..][..KV_BLOCK * d];
        block_dots(codes, rows, &q8.codes, d, &mut q8.dots, vnni, next);
        let ks = &blk.scales[at.head * KV_BLOCK..][..rows];
        for t in 0..group {
            let f = q8.factor[t];
            let st = &mut scores[t * n + start..][..rows];
            for ((s, &dot), &kscale) in st.iter_mut().zip(&q8.dots[t * KV_BLOCK..]).zip(ks) {
                *s = dot as f32 * kscale * f;
            }
        }
    }
    let mask = at.mask.map(|(m, stride)| (&m[first..], stride));
    softmax_part(scores, n, mask, stats);
    weigh_values_q8::<FUSED>(scores, v, at, os, vnni, &stream)
}

/// The block a step reads after the first half's values (for prefetching): the second half's
/// first keys, or the next kv head's when the second half is empty.
fn next_after_first_half(mid: usize, visible: usize, head: usize) -> (usize, usize) {
    if mid < visible {
        (mid / KV_BLOCK, head)
    } else {
        (0, head + 1)
    }
}

/// Where [`attend_q8`] splits `visible` positions in two (a block boundary; the second half
/// is empty below two blocks). It depends on `visible` alone, so a query row gets the same
/// result whether its halves run on one thread or two, in prefill or in decode.
fn split_point(visible: usize) -> usize {
    (visible.div_ceil(KV_BLOCK).div_ceil(2) * KV_BLOCK).min(visible)
}

/// Scores `(group, n)` → `exp(s − m)` row by row after `+ mask`, with `stats (2, group)`
/// = each row's maximum m and sum l (m = −∞, l = 0 and zeros for a fully masked row): one
/// half of an int8-cache softmax, finished by [`merge_halves`].
#[inline(always)]
fn softmax_part(scores: &mut [f32], n: usize, mask: Option<(&[f32], usize)>, stats: &mut [f32]) {
    let group = stats.len() / 2;
    for (t, st) in scores.chunks_exact_mut(n).enumerate() {
        if let Some((m, stride)) = mask {
            for (s, &mj) in st.iter_mut().zip(&m[t * stride..][..n]) {
                *s += mj;
            }
        }
        let max = max(st);
        if max == f32::NEG_INFINITY {
            st.fill(0.0);
            stats[t] = f32::NEG_INFINITY;
            stats[group + t] = 0.0;
            continue;
        }
        exp_shifted(st, max);
        stats[t] = max;
        stats[group + t] = sum(st);
    }
}

/// `o = (o₀·w₀ + o₁·w₁) / (l₀·w₀ + l₁·w₁)` with `wᵢ = exp(mᵢ − max(m₀, m₁))`, per row of
/// `o0 (group, d)` (the first half's sums, overwritten) and `o1`, `statsᵢ (2, group)` their
/// maxima and sums ([`softmax_part`]): the softmax-weighted values over both halves. Zeros
/// where nothing is visible. (A NaN score weighs next to nothing, as in the f32 cache's softmax:
/// the maxima skip it and `exp` takes it as its lower bound.) The same operations in the same
/// order on every target.
fn merge_halves(o0: &mut [f32], stats0: &[f32], o1: &[f32], stats1: &[f32], d: usize) {
    let group = stats0.len() / 2;
    for (t, (o0, o1)) in o0.chunks_exact_mut(d).zip(o1.chunks_exact(d)).enumerate() {
        let (m0, l0, m1, l1) = (stats0[t], stats0[group + t], stats1[t], stats1[group + t]);
        let m = m0.max(m1);
        if m == f32::NEG_INFINITY {
            o0.fill(0.0);
            continue;
        }
        let weight = |mi: f32| {
            if mi == f32::NEG_INFINITY {
                0.0
            } else {
                exp_nonpositive(mi - m)
            }
        };
        let (w0, w1) = (weight(m0), weight(m1));
        let inv = (l0 * w0 + l1 * w1).recip();
        for (a, &b) in o0.iter_mut().zip(o1) {
            *a = (*a * w0 + b * w1) * inv;
        }
    }
}

/// The blocks one half of a (kv head, query row) pair of an int8-cache step reads, in
/// order: its key blocks, its value blocks, then the key block the step reads next; for
/// prefetching.
struct Stream8<'a> {
    k: &'a [I8Block],
    v: &'a [I8Block],
    /// The first block of the half, and how many it reads of keys (and of values).
    first: usize,
    blocks: usize,
    head: usize,
    d: usize,
    /// (block, kv head) read after the values.
    then: (usize, usize),
}

impl Stream8<'_> {
    /// Block `i` of the stream and this head's range of it, if there is one.
    fn block(&self, i: usize) -> Option<(&I8Block, usize)> {
        if i < self.blocks {
            self.k.get(self.first + i).map(|b| (b, self.head))
        } else if i < 2 * self.blocks {
            self.v
                .get(self.first + i - self.blocks)
                .map(|b| (b, self.head))
        } else if i == 2 * self.blocks {
            self.k.get(self.then.0).map(|b| (b, self.then.1))
        } else {
            None
        }
    }

    /// The codes of block `i` (empty past the end).
    fn codes(&self, i: usize) -> &[i8] {
        let len = KV_BLOCK * self.d;
        self.block(i)
            .and_then(|(b, h)| b.codes.get(h * len..(h + 1) * len))
            .unwrap_or(&[])
    }
}

/// [`weigh_values`] over int8 values: `o_t = Σ_j (p_tj · v_scale_j) · v8_j`, each block's
/// codes converted in registers. The same additions in the same order on every path (one
/// multiply-add per term, in position order per output component).
#[inline(always)]
fn weigh_values_q8<const FUSED: bool>(
    ps: &[f32],
    v: &[I8Block],
    at: Cache<'_>,
    os: &mut [f32],
    avx512: bool,
    stream: &Stream8<'_>,
) {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (avx512, stream);
    // Positions `first..visible`; `ps` counts from `first`.
    let (d, first, n) = (at.head_dim, at.first, at.visible - at.first);
    let run = at.head * KV_BLOCK * d;
    for o in os.iter_mut() {
        *o = 0.0;
    }
    for start in (0..n).step_by(KV_BLOCK) {
        let rows = (n - start).min(KV_BLOCK);
        let blk = &v[(first + start) / KV_BLOCK];
        let codes = &blk.codes[run..][..rows * d];
        let scales = &blk.scales[at.head * KV_BLOCK..][..rows];
        #[cfg(target_arch = "x86_64")]
        if avx512 && FUSED && d == 64 {
            // The next block of the step's stream (see `attend_q8_impl`).
            let next = stream.codes(stream.blocks + start / KV_BLOCK + 1);
            // SAFETY: `avx512` only where the CPU has AVX-512 F; the callee checks the shapes.
            unsafe { weigh_block_avx512(ps, n, start, codes, scales, os, next) };
            continue;
        }
        for (t, o) in os.chunks_exact_mut(d).enumerate() {
            let ps = &ps[t * n + start..][..rows];
            for ((&p, c), &s) in ps.iter().zip(codes.chunks_exact(d)).zip(scales) {
                let w = p * s;
                for (o, &c) in o.iter_mut().zip(c) {
                    *o = madd::<FUSED>(w, f32::from(c), *o);
                }
            }
        }
    }
}

/// One block of [`weigh_values_q8`] at head size 64 in AVX-512: four query heads at a time, 16
/// accumulators, each position's 64 codes converted once for them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn weigh_block_avx512(
    ps: &[f32],
    n: usize,
    start: usize,
    codes: &[i8],
    scales: &[f32],
    os: &mut [f32],
    next: &[i8],
) {
    let group = os.len() / 64;
    let mut t0 = 0;
    while t0 < group {
        let g = (group - t0).min(4);
        let os = &mut os[t0 * 64..][..g * 64];
        let next = if t0 == 0 { next } else { &[] };
        match g {
            1 => weigh_chunk::<1>(ps, n, start, t0, codes, scales, os, next),
            2 => weigh_chunk::<2>(ps, n, start, t0, codes, scales, os, next),
            3 => weigh_chunk::<3>(ps, n, start, t0, codes, scales, os, next),
            _ => weigh_chunk::<4>(ps, n, start, t0, codes, scales, os, next),
        }
        t0 += g;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
fn weigh_chunk<const G: usize>(
    ps: &[f32],
    n: usize,
    start: usize,
    t0: usize,
    codes: &[i8],
    scales: &[f32],
    os: &mut [f32],
    next: &[i8],
) {
    use std::arch::x86_64::*;
    let rows = scales.len();
    assert!(codes.len() == rows * 64 && os.len() == G * 64);
    let p: [&[f32]; G] = std::array::from_fn(|t| &ps[(t0 + t) * n + start..][..rows]);
    let mut acc = [[_mm512_setzero_ps(); 4]; G];
    for (t, a) in acc.iter_mut().enumerate() {
        for (q, a) in a.iter_mut().enumerate() {
            // SAFETY: 16 of the 64 f32 of row t.
            *a = unsafe { _mm512_loadu_ps(os[t * 64 + q * 16..].as_ptr()) };
        }
    }
    // w_tj = p_tj · scale_j, sixteen at a time (as the portable loop computes each).
    let mut w = [[0f32; KV_BLOCK]; G];
    for t in 0..G {
        for (w, (&p, &s)) in w[t].iter_mut().zip(p[t].iter().zip(scales)) {
            *w = p * s;
        }
    }
    for (j, c) in codes.chunks_exact(64).enumerate() {
        // One line of the next block per line consumed.
        if let Some(line) = next.get(j * 64) {
            prefetch_line(line);
        }
        let mut x = [_mm512_setzero_ps(); 4];
        for (q, x) in x.iter_mut().enumerate() {
            // SAFETY: 16 of the 64 codes of position j.
            let b = unsafe { _mm_loadu_si128(c[q * 16..].as_ptr().cast()) };
            *x = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
        }
        for t in 0..G {
            let w = _mm512_set1_ps(w[t][j]);
            for q in 0..4 {
                acc[t][q] = _mm512_fmadd_ps(w, x[q], acc[t][q]);
            }
        }
    }
    for (t, a) in acc.iter().enumerate() {
        for (q, a) in a.iter().enumerate() {
            // SAFETY: as the loads.
            unsafe { _mm512_storeu_ps(os[t * 64 + q * 16..].as_mut_ptr(), *a) };
        }
    }
}

/// Integer dot products of the query rows `q (group, d)` with the first `rows` keys of one
/// head's block `codes` (packed, [`key_index`]) into `dots (group, KV_BLOCK)`; exact.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn block_dots(
    codes: &[i8],
    rows: usize,
    q: &[i8],
    d: usize,
    dots: &mut [i32],
    vnni: bool,
    next: &[i8],
) {
    #[cfg(target_arch = "x86_64")]
    if vnni && d <= 256 {
        // SAFETY: `vnni` only where the CPU has AVX-512 F, BW and VNNI.
        return unsafe { block_dots_vnni(codes, rows, q, d, dots, next) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (vnni, next);
    for (t, qt) in q.chunks_exact(d).enumerate() {
        let out = &mut dots[t * KV_BLOCK..][..KV_BLOCK];
        for g in 0..rows.div_ceil(16) {
            let mut acc = [0i32; 16];
            let part = &codes[g * 16 * d..][..16 * d];
            for (k4, q4) in part.chunks_exact(64).zip(qt.chunks_exact(4)) {
                for l in 0..16 {
                    for e in 0..4 {
                        acc[l] += i32::from(k4[l * 4 + e]) * i32::from(q4[e]);
                    }
                }
            }
            out[g * 16..][..16].copy_from_slice(&acc);
        }
    }
}

/// [`block_dots`] with `vpdpbusd`: 16 keys × 4 components per instruction. The instruction
/// multiplies unsigned by signed bytes, so keys go in with their sign bit flipped (`k + 128`)
/// and `128 · Σ q` comes off the sums.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn block_dots_vnni(codes: &[i8], rows: usize, q: &[i8], d: usize, dots: &mut [i32], next: &[i8]) {
    let group = q.len() / d;
    let mut t0 = 0;
    while t0 < group {
        let g = (group - t0).min(4);
        let (q, dots) = (
            &q[t0 * d..][..g * d],
            &mut dots[t0 * KV_BLOCK..][..g * KV_BLOCK],
        );
        let next = if t0 == 0 { next } else { &[] };
        match g {
            1 => dots_chunk::<1>(codes, rows, q, d, dots, next),
            2 => dots_chunk::<2>(codes, rows, q, d, dots, next),
            3 => dots_chunk::<3>(codes, rows, q, d, dots, next),
            _ => dots_chunk::<4>(codes, rows, q, d, dots, next),
        }
        t0 += g;
    }
}

/// [`block_dots_vnni`] for `G` query rows: each 64-byte run of keys loaded once for all.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn dots_chunk<const G: usize>(
    codes: &[i8],
    rows: usize,
    q: &[i8],
    d: usize,
    dots: &mut [i32],
    next: &[i8],
) {
    use std::arch::x86_64::*;
    assert!(d.is_multiple_of(4) && d <= 256 && codes.len() >= rows.div_ceil(16) * 16 * d);
    assert!(q.len() == G * d && dots.len() == G * KV_BLOCK);
    let flip = _mm512_set1_epi8(i8::MIN);
    let qt: [&[i8]; G] = std::array::from_fn(|t| &q[t * d..][..d]);
    // Each row's components 4 by 4 as the i32 `vpdpbusd` broadcasts (built once here: built
    // from bytes in the loop, they cost more than the products).
    let mut q4 = [[0i32; 64]; G]; // d ≤ 256
    for t in 0..G {
        for (x, c) in q4[t].iter_mut().zip(qt[t].chunks_exact(4)) {
            *x = i32::from_le_bytes([c[0] as u8, c[1] as u8, c[2] as u8, c[3] as u8]);
        }
    }
    let bias: [i32; G] =
        std::array::from_fn(|t| 128 * qt[t].iter().map(|&x| i32::from(x)).sum::<i32>());
    for g in 0..rows.div_ceil(16) {
        let part = &codes[g * 16 * d..][..16 * d];
        // Two accumulators per row (even and odd runs): `vpdpbusd`'s latency, not its
        // throughput, bounded one chain; integer sums are exact in any order.
        let mut acc = [[_mm512_setzero_si512(); 2]; G];
        for (i, k4) in part.chunks_exact(64).enumerate() {
            // One line of what comes next per line consumed.
            if let Some(line) = next.get((g * d / 4 + i) * 64) {
                prefetch_line(line);
            }
            // SAFETY: `k4` is 64 bytes (unaligned load).
            let kv = _mm512_xor_si512(unsafe { _mm512_loadu_si512(k4.as_ptr().cast()) }, flip);
            for t in 0..G {
                let qv = _mm512_set1_epi32(q4[t][i]);
                acc[t][i % 2] = _mm512_dpbusd_epi32(acc[t][i % 2], kv, qv);
            }
        }
        for t in 0..G {
            let a = _mm512_add_epi32(acc[t][0], acc[t][1]);
            let a = _mm512_sub_epi32(a, _mm512_set1_epi32(bias[t]));
            // SAFETY: `dots[t * KV_BLOCK + g * 16..]` holds 16 i32 (g < 4).
            unsafe {
                _mm512_storeu_si512(dots[t * KV_BLOCK + g * 16..][..16].as_mut_ptr().cast(), a)
            };
        }
    }
}

/// Asks for the cache line holding `byte` in the L2 cache (x86-64).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_line(byte: &i8) {
    // SAFETY: a prefetch of a valid address; SSE is baseline.
    unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(byte) };
}

/// `eˣ` for `x ≤ 0` (softmax arguments after subtracting the maximum), within 2 ulp of
/// `f32::exp`, in straight-line code that vectorizes: `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2`,
/// `eʳ` by a degree-7 minimax polynomial (Cephes' `expf`), `2ⁿ` through the
/// exponent bits. Below `-87` (where `eˣ` leaves the normal range) it returns 0.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in a part with few mantissa bits and the rest, so `n · LN2_HI` is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.max(-87.0);
    let n = (x * LOG2_E).round();
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // Cephes' minimax polynomial for expf on that range.
    let q = ((((1.987_569_2e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let p = q * r * r + r + 1.0;
    // n ∈ [-126, 0]: 2ⁿ is a normal float.
    let pow2 = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x <= -87.0 { 0.0 } else { p * pow2 }
}

/// `x = exp_nonpositive(x - max)` for every `x`: sixteen at a time in AVX-512 where the CPU
/// has it, the same operations as [`exp_nonpositive`] in the same order (bit-identical; it
/// was a third of attention at 1024 positions as the scalar loop the compiler made of it).
#[inline(always)]
fn exp_shifted(xs: &mut [f32], max: f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512 F.
        return unsafe { exp_shifted_avx512(xs, max) };
    }
    for x in xs.iter_mut() {
        *x = exp_nonpositive(*x - max);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn exp_shifted_avx512(xs: &mut [f32], max: f32) {
    use std::arch::x86_64::*;
    let (chunks, rest) = xs.as_chunks_mut::<16>();
    let c = |v: f32| _mm512_set1_ps(v);
    for ch in chunks {
        // SAFETY: 16 f32 (unaligned load and store).
        unsafe {
            let x = _mm512_sub_ps(_mm512_loadu_ps(ch.as_ptr()), c(max));
            _mm512_storeu_ps(ch.as_mut_ptr(), exp_avx512(x));
        }
    }
    if !rest.is_empty() {
        // The last 1–15 in the same registers, masked (the scalar copy's `round` is a call to
        // `roundf` here, and a prefill's rows end in such a tail at almost every half).
        let keep = tail_mask(rest.len());
        // SAFETY: the masked load reads, and the store writes, only the `rest.len()` values.
        unsafe {
            let x = _mm512_maskz_loadu_ps(keep, rest.as_ptr());
            let e = exp_avx512(_mm512_sub_ps(x, c(max)));
            _mm512_mask_storeu_ps(rest.as_mut_ptr(), keep, e);
        }
    }
}

/// [`exp_nonpositive`] of 16 lanes, the same operations in the same order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn exp_avx512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let c = |v: f32| _mm512_set1_ps(v);
    // `x.max(-87.0)`: `vmaxps` returns its second operand when the first is NaN, as
    // `f32::max` returns the number.
    let x = _mm512_max_ps(x, c(-87.0));
    // `(x · log2 e).round()`, halves away from zero, for y ≤ 0: t = trunc(y), and one
    // less where y - t ≤ -1/2 (y - t is exact: |y| < 2²³).
    let y = _mm512_mul_ps(x, c(std::f32::consts::LOG2_E));
    let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(y);
    let half_or_more = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(_mm512_sub_ps(y, t), c(-0.5));
    let n = _mm512_mask_sub_ps(t, half_or_more, t, c(1.0));
    let r = _mm512_sub_ps(
        _mm512_sub_ps(x, _mm512_mul_ps(n, c(0.693_359_4))),
        _mm512_mul_ps(n, c(-2.121_944_4e-4)),
    );
    let mut q = _mm512_add_ps(_mm512_mul_ps(c(1.987_569_2e-4), r), c(1.398_199_9e-3));
    q = _mm512_add_ps(_mm512_mul_ps(q, r), c(8.333_452e-3));
    q = _mm512_add_ps(_mm512_mul_ps(q, r), c(4.166_579_6e-2));
    q = _mm512_add_ps(_mm512_mul_ps(q, r), c(1.666_666_5e-1));
    q = _mm512_add_ps(_mm512_mul_ps(q, r), c(0.5));
    let p = _mm512_add_ps(
        _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(q, r), r), r),
        c(1.0),
    );
    let pow2 = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(
        _mm512_cvtps_epi32(n),
        _mm512_set1_epi32(127),
    )));
    let e = _mm512_mul_ps(p, pow2);
    let keep = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, c(-87.0));
    _mm512_maskz_mov_ps(keep, e)
}

#[inline(always)]
fn madd<const FUSED: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FUSED { a.mul_add(b, c) } else { a * b + c }
}

/// `Σ a[i] · b[i]` with 32 independent partial sums (four vectors of eight on AVX2, eight of
/// four on NEON: enough chains to hide the multiply-add latency).
#[inline(always)]
fn dot<const FUSED: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 32];
    let (ac, ar) = a.as_chunks::<32>();
    let (bc, br) = b.as_chunks::<32>();
    for (x, y) in ac.iter().zip(bc) {
        for l in 0..32 {
            acc[l] = madd::<FUSED>(x[l], y[l], acc[l]);
        }
    }
    let mut s = tree_sum(acc);
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

/// `Σ a[i] · b[i]` in AVX2 + FMA: four vector accumulators, one horizontal sum.
///
/// Only called from code compiled with those features, after checking the CPU has them.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn simd_dot(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut i = 0;
    // SAFETY: every load reads 8 floats at i < n - 7 of both slices; the callers run with
    // AVX2 and FMA enabled and present.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); 4];
        while i + 32 <= n {
            for (u, a) in acc.iter_mut().enumerate() {
                let x = _mm256_loadu_ps(pa.add(i + 8 * u));
                let y = _mm256_loadu_ps(pb.add(i + 8 * u));
                *a = _mm256_fmadd_ps(x, y, *a);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i)),
                _mm256_loadu_ps(pb.add(i)),
                acc[0],
            );
            i += 8;
        }
        let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let x = _mm_add_ps(x, _mm_movehl_ps(x, x));
        let x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));
        let mut s = _mm_cvtss_f32(x);
        while i < n {
            s = a[i].mul_add(b[i], s);
            i += 1;
        }
        s
    }
}

/// `Σ a[i] · b[i]` in NEON: four vector accumulators, one horizontal sum.
#[cfg(target_arch = "aarch64")]
#[inline(always)]
fn simd_dot(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::aarch64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut i = 0;
    // SAFETY: every load reads 4 floats at i < n - 3 of both slices; NEON is part of the
    // aarch64 baseline.
    unsafe {
        let mut acc = [vdupq_n_f32(0.0); 4];
        while i + 16 <= n {
            for (u, a) in acc.iter_mut().enumerate() {
                *a = vfmaq_f32(
                    *a,
                    vld1q_f32(pa.add(i + 4 * u)),
                    vld1q_f32(pb.add(i + 4 * u)),
                );
            }
            i += 16;
        }
        while i + 4 <= n {
            acc[0] = vfmaq_f32(acc[0], vld1q_f32(pa.add(i)), vld1q_f32(pb.add(i)));
            i += 4;
        }
        let v = vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3]));
        let mut s = vaddvq_f32(v);
        while i < n {
            s = a[i].mul_add(b[i], s);
            i += 1;
        }
        s
    }
}

/// Elsewhere (armv7) the portable [`dot`] (never called: `SIMD` is false there).
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
#[inline(always)]
fn simd_dot(a: &[f32], b: &[f32]) -> f32 {
    dot::<false>(a, b)
}

/// The sum of 32 partial sums, pairwise (five vector adds, not 31 dependent scalar ones).
#[inline(always)]
fn tree_sum(mut acc: [f32; 32]) -> f32 {
    for w in [16, 8, 4, 2, 1] {
        for i in 0..w {
            acc[i] += acc[i + w];
        }
    }
    acc[0]
}

/// `max x` (ignoring NaN, as `f32::max`), in 16 lanes: one dependent `max` per element was
/// a third of the softmax's time at 1024 positions. The result does not depend on the order.
/// AVX-512 where the CPU has it: its last 1–15 values masked instead of one scalar `max`
/// each (a prefill's rows are short, and nearly all end in such a tail).
#[inline(always)]
fn max(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512 F.
        return unsafe { max_avx512(x) };
    }
    max_portable(x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn max_avx512(x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let (xc, xr) = x.as_chunks::<16>();
    let mut acc = _mm512_set1_ps(f32::NEG_INFINITY);
    for c in xc {
        // SAFETY: 16 f32 (unaligned load). `vmaxps` returns its second operand when the
        // first is NaN: a NaN is skipped.
        acc = _mm512_max_ps(unsafe { _mm512_loadu_ps(c.as_ptr()) }, acc);
    }
    if !xr.is_empty() {
        let tail = tail_mask(xr.len());
        // SAFETY: a masked load of the `xr.len()` values; the other lanes read as -∞.
        let v =
            unsafe { _mm512_mask_loadu_ps(_mm512_set1_ps(f32::NEG_INFINITY), tail, xr.as_ptr()) };
        acc = _mm512_max_ps(v, acc);
    }
    _mm512_reduce_max_ps(acc)
}

#[inline(always)]
fn max_portable(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let (xc, xr) = x.as_chunks::<16>();
    for c in xc {
        for l in 0..16 {
            acc[l] = acc[l].max(c[l]);
        }
    }
    acc.into_iter()
        .chain(xr.iter().copied())
        .fold(f32::NEG_INFINITY, f32::max)
}

/// `Σ x`, in 32 lanes.
#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 32];
    let (xc, xr) = x.as_chunks::<32>();
    for c in xc {
        for l in 0..32 {
            acc[l] += c[l];
        }
    }
    tree_sum(acc) + xr.iter().sum::<f32>()
}

/// `y += a · x`.
#[inline(always)]
fn axpy<const FUSED: bool>(a: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi = madd::<FUSED>(a, *xi, *yi);
    }
}

/// Replaces every `InPlaceKvSdpa` of an optimized model by a [`KvAttention`] reserving
/// `capacity` positions; returns how many.
pub fn use_kv_attention(
    model: &mut TypedModel,
    capacity: usize,
    format: KvCacheFormat,
    pool: Option<std::sync::Arc<crate::pool::Pool>>,
) -> TractResult<usize> {
    let ids: Vec<usize> = model
        .nodes()
        .iter()
        .filter(|n| n.op_is::<InPlaceKvSdpa>())
        .map(|n| n.id)
        .collect();
    for &id in &ids {
        let node = model.node(id);
        let Some(sdpa) = node.op_as::<InPlaceKvSdpa>() else {
            continue;
        };
        ensure!(
            sdpa.axis == 2,
            "attention cache grows along axis {}, expected 2",
            sdpa.axis
        );
        if let Some(d) = sdpa
            .past_sequence_fact
            .shape
            .get(3)
            .and_then(|d| d.to_usize().ok())
        {
            format.check_head_dim(d)?;
        }
        let op = KvAttention {
            name: sdpa.name.clone(),
            past_sequence_fact: sdpa.past_sequence_fact.clone(),
            causal: sdpa.causal,
            scale_bits: sdpa.scale.map(f32::to_bits),
            capacity,
            format,
            pool: Threads(pool.clone()),
        };
        let mut patch = TypedModelPatch::default();
        let taps = patch.taps(model, &node.inputs)?;
        let y = patch.wire_node(&node.name, op, &taps)?[0];
        patch.shunt_outside(model, OutletId::new(id, 0), y)?;
        patch.apply(model)?;
    }
    Ok(ids.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain softmax attention of `q` over positions `0..n` of kv head `g`, in f64, reading
    /// the cache through [`kv_index`].
    fn naive(q: &[f32], k: &Blocks, v: &Blocks, g: usize, n: usize) -> Vec<f32> {
        let d = q.len();
        let scale = 1.0 / (d as f64).sqrt();
        let get = |c: &Blocks, j: usize| {
            let mut out = vec![0f32; d];
            vector(c, j, g, &mut out);
            out
        };
        let s: Vec<f64> = (0..n)
            .map(|j| {
                let kj = get(k, j);
                (0..d).map(|i| q[i] as f64 * kj[i] as f64).sum::<f64>() * scale
            })
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let p: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = p.iter().sum();
        (0..d)
            .map(|i| ((0..n).map(|j| p[j] * get(v, j)[i] as f64).sum::<f64>() / z) as f32)
            .collect()
    }

    #[test]
    fn round_to_i8_is_round_then_clamp() {
        let reference = |y: f32| y.round().clamp(-127.0, 127.0) as i8;
        let mut specials = vec![
            0.0,
            -0.0,
            0.5,
            -0.5,
            1.5,
            -1.5,
            126.5,
            -126.5,
            127.0,
            -127.0,
            127.49,
            -127.51,
            128.0,
            1e9,
            -1e30,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MIN_POSITIVE,
            0.499_999_97,
            -0.499_999_97,
        ];
        // Every f32 within a few ulps of each half-integer up to ±130.
        for h in -261..=261 {
            let c = h as f32 / 2.0;
            for u in -4i32..=4 {
                specials.push(f32::from_bits((c.to_bits() as i32 + u) as u32));
            }
        }
        let mut rnd = uniform(11);
        specials.extend((0..100_000).map(|_| rnd() * 70.0));
        for &y in &specials {
            assert_eq!(round_to_i8(y), reference(y), "{y:e} ({:#x})", y.to_bits());
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            for ys in specials.chunks_exact(16) {
                let mut got = [0i8; 16];
                // SAFETY: the CPU has AVX-512 F; 16 f32 in, 16 bytes out.
                unsafe {
                    use std::arch::x86_64::*;
                    let v = round_to_i8_avx512(_mm512_loadu_ps(ys.as_ptr()));
                    _mm_storeu_si128(got.as_mut_ptr().cast(), v);
                }
                let want: Vec<i8> = ys.iter().map(|&y| reference(y)).collect();
                assert_eq!(got[..], want[..], "{ys:?}");
            }
        }
    }

    #[test]
    fn quantize_matches_its_plain_definition() {
        // The definition: NaN anywhere → NaN scale; else max |x| / 127, codes rounded half away.
        let reference = |x: &[f32]| -> (f32, Vec<i8>) {
            if x.iter().any(|v| v.is_nan()) {
                return (f32::NAN, vec![0; x.len()]);
            }
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let inv = 127.0 / amax;
            if !(amax > 0.0 && inv.is_finite()) {
                return (0.0, vec![0; x.len()]);
            }
            let codes = x.iter().map(|v| (v * inv).round() as i8).collect();
            (amax / 127.0, codes)
        };
        let mut rnd = uniform(5);
        for len in [1, 15, 16, 17, 64, 70] {
            for case in 0..6 {
                let mut x: Vec<f32> = (0..len).map(|_| rnd()).collect();
                match case {
                    1 => x[len - 1] = f32::NAN,
                    2 => x[0] = f32::NAN,
                    3 => x.iter_mut().for_each(|v| *v = 0.0),
                    4 => x[len / 2] = 1e-38,
                    5 => x.iter_mut().for_each(|v| *v *= 1e-38),
                    _ => {}
                }
                let (want_scale, want_codes) = reference(&x);
                let mut codes = vec![0i8; len];
                let scale = quantize(&x, &mut codes); // AVX-512 where the CPU has it
                assert_eq!(
                    scale.to_bits(),
                    want_scale.to_bits(),
                    "len {len}, case {case}"
                );
                assert_eq!(codes, want_codes, "len {len}, case {case}");
                let scale = quantize_portable(&x, &mut codes);
                assert_eq!(
                    scale.to_bits(),
                    want_scale.to_bits(),
                    "len {len}, case {case}"
                );
                assert_eq!(codes, want_codes, "portable, len {len}, case {case}");
            }
        }
    }

    #[test]
    fn max_is_the_portable_max() {
        let mut rnd = uniform(3);
        for len in 0..50 {
            for case in 0..4 {
                let mut x: Vec<f32> = (0..len).map(|_| rnd() * 10.0).collect();
                match (case, len) {
                    (_, 0) => {}
                    (1, _) => x[len - 1] = f32::NAN,
                    (2, _) => x.iter_mut().for_each(|v| *v = f32::NAN),
                    (3, _) => x[0] = f32::NEG_INFINITY,
                    _ => {}
                }
                let (got, want) = (max(&x), max_portable(&x));
                assert!(
                    got == want || got.is_nan() && want.is_nan(),
                    "{x:?}: {got} ≠ {want}"
                );
            }
        }
    }

    /// Uniform numbers in [-2, 2) from xorshift32 state `seed`.
    fn uniform(mut seed: u32) -> impl FnMut() -> f32 {
        move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            (seed as f32 / u32::MAX as f32) * 4.0 - 2.0
        }
    }

    /// A cache of `len` positions appended in chunks of 1 to 70 (crossing block boundaries
    /// mid-chunk), from `(1, kv_heads, chunk, d)` tensors as the graph gives them.
    pub(super) fn cache(
        len: usize,
        kv_heads: usize,
        d: usize,
        format: KvCacheFormat,
        keys: bool,
        rnd: &mut impl FnMut() -> f32,
    ) -> Blocks {
        let mut c = Blocks::new(format, keys);
        let mut pos = 0;
        let mut chunk = 1;
        while pos < len {
            let s = chunk.min(len - pos);
            let new: Vec<f32> = (0..kv_heads * s * d).map(|_| rnd()).collect();
            KvAttentionState::append(&mut c, pos, &new, kv_heads, s, d);
            pos += s;
            chunk = chunk * 7 % 71;
        }
        c
    }

    #[test]
    fn attend_matches_a_plain_softmax() {
        let mut rnd = uniform(7);
        // The f16 and int8 caches against the same softmax over their (rounded) contents; the
        // int8 cache's queries are quantized too, so the plain softmax gets them rounded.
        use KvCacheFormat::{F16, F32, Int8};
        for (d, kv_heads, group, len, format) in [
            (64, 3, 3, 1, F32),
            (64, 3, 3, 37, F32),
            (64, 3, 3, 200, F32),
            (60, 2, 1, 300, F32),
            (13, 1, 4, 5, F32),
            (64, 3, 3, 200, F16),
            (13, 1, 4, 70, F16),
            (64, 3, 3, 1, Int8),
            (64, 3, 3, 200, Int8),
            (8, 2, 2, 130, Int8),
        ] {
            let k = cache(len, kv_heads, d, format, true, &mut rnd);
            let v = cache(len, kv_heads, d, format, false, &mut rnd);
            for g in 0..kv_heads {
                let qs: Vec<f32> = (0..group * d).map(|_| rnd()).collect();
                for n in [1, len / 2 + 1, len] {
                    let mut scores = Vec::new();
                    let mut scratch = vec![f32::NAN; KV_BLOCK * d];
                    let mut os = vec![f32::NAN; group * d];
                    let at = Cache {
                        head: g,
                        first: 0,
                        then: (0, g + 1),
                        visible: n,
                        head_dim: d,
                        scale: (d as f32).sqrt().recip(),
                        mask: None,
                    };
                    let mut q8 = Query8::default();
                    attend(&qs, &k, &v, at, &mut scores, &mut scratch, &mut os, &mut q8);
                    for (q, o) in qs.chunks(d).zip(os.chunks(d)) {
                        let mut q = q.to_vec();
                        if format == Int8 {
                            let mut codes = vec![0i8; d];
                            let s = quantize(&q, &mut codes[..]);
                            for (x, c) in q.iter_mut().zip(codes) {
                                *x = f32::from(c) * s;
                            }
                        }
                        let want = naive(&q, &k, &v, g, n);
                        for (a, b) in o.iter().zip(&want) {
                            assert!(
                                (a - b).abs() < 1e-4,
                                "{format:?} d={d} len={len} n={n}: {a} vs {b}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_decode_step_by_halves_is_the_rows_computed_whole() {
        // An int8-cache decode step splits each kv head's positions over threads; any split
        // of the items gives what `rows` (both halves in turn, per pair) gives, bit for bit.
        let mut rnd = uniform(11);
        let (d, kv_heads, group) = (64, 3, 3);
        for len in [1, 64, 65, 200, 1000] {
            let k = cache(len, kv_heads, d, KvCacheFormat::Int8, true, &mut rnd);
            let v = cache(len, kv_heads, d, KvCacheFormat::Int8, false, &mut rnd);
            let q: Vec<f32> = (0..kv_heads * group * d).map(|_| rnd()).collect();
            let step = Step {
                q: &q,
                k: &k,
                v: &v,
                mask: None,
                group,
                s: 1,
                d,
                past: len - 1,
                total: len,
                causal: true,
                scale: 0.125,
            };
            let mut whole = vec![f32::NAN; kv_heads * group * d];
            let mut w = Work::default();
            // SAFETY: `whole` holds every row.
            unsafe {
                step.rows(
                    0..kv_heads,
                    &mut w,
                    &crate::pool::SendPtr(whole.as_mut_ptr()),
                )
            };
            for cut in 0..=2 * kv_heads {
                let mut halves = vec![f32::NAN; 2 * kv_heads * step.half_slot()];
                let to = crate::pool::SendPtr(halves.as_mut_ptr());
                // SAFETY: `halves` holds every item's slot; the two runs are disjoint.
                unsafe {
                    step.halves(0..cut, &mut Work::default(), &to);
                    step.halves(cut..2 * kv_heads, &mut Work::default(), &to);
                }
                let mut merged = vec![f32::NAN; kv_heads * group * d];
                step.merge(&halves, &mut merged);
                let same = merged
                    .iter()
                    .zip(&whole)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "len {len}, items cut at {cut}");
            }
        }
    }

    #[test]
    fn a_masked_position_is_not_attended() {
        let d = 8;
        let k = Blocks::F32(vec![vec![1.0f32; KV_BLOCK * d].into_boxed_slice()]);
        let mut v = vec![vec![0.0f32; KV_BLOCK * d].into_boxed_slice()];
        v[0][d..2 * d].fill(5.0); // position 1 is the only one with a non-zero value
        let v = Blocks::F32(v);
        let qs = vec![0.5f32; 2 * d]; // two heads
        // Both heads' outputs `(2, d)`.
        let run = |k: &Blocks, v: &Blocks, at: Cache<'_>| {
            let (mut scores, mut scratch) = (Vec::new(), vec![0.0; KV_BLOCK * d]);
            let mut os = vec![f32::NAN; 2 * d];
            let mut q8 = Query8::default();
            attend(&qs, k, v, at, &mut scores, &mut scratch, &mut os, &mut q8);
            os
        };
        // Head 0 may not see position 1; head 1 sees everything.
        let mask = [0.0, f32::NEG_INFINITY, 0.0, 0.0, 0.0, 0.0];
        let at = Cache {
            head: 0,
            first: 0,
            then: (0, 1),
            visible: 3,
            head_dim: d,
            scale: 1.0,
            mask: Some((&mask, 3)),
        };
        let os = run(&k, &v, at);
        assert!(os[..d].iter().all(|&x| x == 0.0), "{os:?}");
        assert!(
            os[d..].iter().all(|&x| (x - 5.0 / 3.0).abs() < 1e-6),
            "{os:?}"
        );
        // A mask shared by both heads (stride 0), every position masked: zeros.
        let all = [f32::NEG_INFINITY; 3];
        let at = Cache {
            mask: Some((&all, 0)),
            ..at
        };
        let os = run(&k, &v, at);
        assert!(os.iter().all(|&x| x == 0.0), "{os:?}");

        // An int8 cache over 130 positions (halves 0..128 and 128..130): the mask's columns
        // line up with the positions in both halves. Equal keys, values zero but at 100 (first
        // half) and 129 (second half).
        let n = 130;
        let ones: Vec<f32> = vec![1.0; n * d];
        let mut vals = vec![0.0f32; n * d];
        vals[100 * d..101 * d].fill(5.0);
        vals[129 * d..130 * d].fill(-3.0);
        let mut k = Blocks::new(KvCacheFormat::Int8, true);
        let mut v = Blocks::new(KvCacheFormat::Int8, false);
        KvAttentionState::append(&mut k, 0, &ones, 1, n, d);
        KvAttentionState::append(&mut v, 0, &vals, 1, n, d);
        // Head 0 may not see 100, head 1 not 129.
        let mut mask = vec![0.0f32; 2 * n];
        mask[100] = f32::NEG_INFINITY;
        mask[n + 129] = f32::NEG_INFINITY;
        let at = Cache {
            visible: n,
            mask: Some((&mask, n)),
            ..at
        };
        let os = run(&k, &v, at);
        let want = [-3.0 / 129.0, 5.0 / 129.0];
        for (t, w) in want.iter().enumerate() {
            let o = &os[t * d..][..d];
            assert!(
                o.iter().all(|&x| (x - w).abs() < 1e-3),
                "head {t}: {o:?}, want {w}"
            );
        }
    }

    #[test]
    fn the_vector_exp_is_the_scalar_one() {
        let mut xs: Vec<f32> = (0..200_000).map(|i| -(i as f32) * 0.000_61).collect();
        xs.extend([
            0.0,
            -0.0,
            -86.99,
            -87.0,
            -87.01,
            -1e30,
            f32::NAN,
            f32::NEG_INFINITY,
        ]);
        xs.extend((0..64).map(|i| -(i as f32) * std::f32::consts::LN_2 * 0.5));
        // Around x · log2 e = -1/2 and -(1/2 - 2⁻²⁵), where rounding schemes part ways.
        for y in [-0.5f32, -(0.5 - 2f32.powi(-25)), -1.5, -2.5] {
            let mut x = y / std::f32::consts::LOG2_E;
            for _ in 0..8 {
                x = x.next_up();
            }
            for _ in 0..16 {
                xs.push(x);
                x = x.next_down();
            }
        }
        for max in [0.0, 1.5, -3.25] {
            let want: Vec<u32> = xs
                .iter()
                .map(|&x| exp_nonpositive(x + max - max).to_bits())
                .collect();
            let mut got: Vec<f32> = xs.iter().map(|&x| x + max).collect();
            exp_shifted(&mut got, max);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.to_bits(), *w, "x = {} max = {max}", xs[i]);
            }
            // Every length of tail (masked in AVX-512), from the special values at the end;
            // what lies past the slice stays untouched.
            for len in 1..=33 {
                let from = xs.len() - 40;
                let mut got: Vec<f32> = xs[from..].iter().map(|&x| x + max).collect();
                let sentinel: Vec<u32> = got[len..].iter().map(|x| x.to_bits()).collect();
                exp_shifted(&mut got[..len], max);
                for (i, g) in got[..len].iter().enumerate() {
                    assert_eq!(
                        g.to_bits(),
                        want[from + i],
                        "len {len}, x = {}",
                        xs[from + i]
                    );
                }
                let after: Vec<u32> = got[len..].iter().map(|x| x.to_bits()).collect();
                assert_eq!(after, sentinel, "len {len}: past the end");
            }
        }
    }

    #[test]
    fn exp_is_within_two_ulp_of_std() {
        let mut x = 0.0f32;
        while x > -87.0 {
            let (got, want) = (exp_nonpositive(x), x.exp());
            let ulp = (got.to_bits() as i64 - want.to_bits() as i64).abs();
            assert!(ulp <= 2, "exp({x}) = {got}, std says {want} ({ulp} ulp)");
            x -= 0.000_37;
        }
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-100.0), 0.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
    }
}
