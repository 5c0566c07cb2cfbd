//! quill's own int8 matrix kernel, applied to tract's model after loading.
//!
//! tract-linalg 0.23.9 multiplies int8 matrices on x86-64 only in 16×16 (AVX-512 VNNI) or 8×8
//! (AVX2) tiles. Decoding multiplies each weight matrix by a single activation row, so a tile
//! computes 16 columns to keep one, and int8 decode ends up compute-bound instead of reading
//! the weights at memory speed. [`Int8Linear`] replaces each int8 × int8 → int32 `EinSum` of the
//! decoder (`amk,kn->amn`, the form tract gives an ONNX `MatMulInteger` with a constant weight)
//! by a matrix-vector kernel that streams the weights once per group of up to
//! [`TOKENS_PER_PASS`] tokens. The ONNX file is untouched (it still runs in onnxruntime); the
//! rewrite happens in memory, before tract optimizes the rest of the graph.
//!
//! Weight layout, `(n/16, k/4, 16, 4)` i8: for each block of 16 output channels and each group
//! of 4 inputs, the 16 channels' 4 weights are 64 contiguous bytes — one AVX-512 register, which
//! `vpdpbusd` multiplies by the same 4 activations broadcast to every lane and accumulates into
//! 16 int32 sums, one per channel. `vpdpbusd` takes unsigned activations, so they are fed as
//! `x + 128` (a XOR with 0x80) and `128 · Σₖ w` is subtracted per channel at the end.
//!
//! The kernel runs where the CPU has AVX-512 VNNI (checked at run time); elsewhere the graph is
//! left to tract (whose aarch64 int8 kernels include a 64×1 matrix-vector one).

use std::sync::Arc;

use crate::arena::{Arena, Weights};
use crate::pool::Pool;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::einsum::EinSum;

/// Products smaller than this many multiply-adds stay on one thread. With rayon's pool the
/// threshold had to be 8 M (a decode step's 576×576 product took 65 µs alone, about 100 µs
/// split in two: the wake-up cost more than the half saved); quill's spinning helpers
/// ([`crate::pool`]) take a job in under a microsecond, so every decode product is split.
pub const MIN_MACS_TO_SPLIT: usize = 1 << 16;

/// Tokens multiplied per pass over a tile of weights in prefill (8: 16 accumulators and 2
/// weight registers of AVX-512's 32).
pub const TOKENS_PER_PASS: usize = 8;

/// Weights per tile in prefill: well inside L2 (1 MB on Zen 4, 512 kB on a Pi 5's cores).
pub const TILE_BYTES: usize = 128 << 10;

/// `y (…, m, n) i32 = x (…, m, k) i8 · W (k, n) i8`, W constant and pre-packed.
#[derive(Debug, Clone)]
pub struct Int8Linear {
    k: usize,
    n: usize,
    /// `(n/16, k/4, 16, 4)`, see the module docs; a range of the load's weight arena.
    packed: Arc<Weights>,
    /// `128 · Σₖ W[k][j]` per output channel j.
    // Read only by the x86-64 kernel; elsewhere the op is never installed.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    offset: Arc<Vec<i32>>,
    /// The threads products are split over (`--threads`); `None`: the calling thread only.
    pool: Option<Arc<Pool>>,
}

impl std::hash::Hash for Int8Linear {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (self.k, self.n, Arc::as_ptr(&self.packed) as usize).hash(state)
    }
}

impl PartialEq for Int8Linear {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.packed, &other.packed)
    }
}
impl Eq for Int8Linear {}

impl Int8Linear {
    /// Packs `w (k, n)` row-major into memory of its own; `None` if the shape does not fit the
    /// kernel's blocks (or the memory cannot be mapped).
    pub fn new(w: &[i8], k: usize, n: usize) -> Option<Int8Linear> {
        if !Self::fits(w, k, n) {
            return None;
        }
        Some(Self::pack(w, k, n, Weights::alone(k * n).ok()?))
    }

    /// Packs `w (k, n)` into the next `k × n` bytes of `arena`; `None` if the shape does not
    /// fit the kernel's blocks or the arena has no room.
    pub fn new_in(w: &[i8], k: usize, n: usize, arena: &Arc<Arena>) -> Option<Int8Linear> {
        if !Self::fits(w, k, n) {
            return None;
        }
        Some(Self::pack(w, k, n, arena.take(k * n)?))
    }

    /// [`Self::new_in`], giving `w`'s pages back as they are packed when `release` is true.
    ///
    /// # Safety
    /// With `release`, nothing reads `w` after this call.
    unsafe fn new_in_releasing(
        w: &[i8],
        k: usize,
        n: usize,
        arena: &Arc<Arena>,
        release: bool,
    ) -> Option<Int8Linear> {
        if !Self::fits(w, k, n) {
            return None;
        }
        let weights = arena.take(k * n)?;
        // SAFETY: `w` is `k · n` bytes (`fits`); the caller's promise covers `release`.
        Some(unsafe { Self::pack_releasing(w.as_ptr(), k, n, weights, release) })
    }

    fn fits(w: &[i8], k: usize, n: usize) -> bool {
        k > 0 && n > 0 && k.is_multiple_of(4) && n.is_multiple_of(32) && w.len() == k * n
    }

    fn pack(w: &[i8], k: usize, n: usize, weights: Weights) -> Int8Linear {
        assert_eq!(w.len(), k * n);
        // SAFETY: `w` is `k · n` readable bytes; `release` is false.
        unsafe { Self::pack_releasing(w.as_ptr(), k, n, weights, false) }
    }

    /// [`Self::pack`] of the `k · n` bytes at `src`, giving their pages back to the system as
    /// they are consumed when `release` is true. A raw pointer, not a slice: the bytes change
    /// (to zeros) under the call, which no reference may see.
    ///
    /// # Safety
    /// `src` points to `k · n` readable bytes; with `release`, nothing reads them after this
    /// call (their pages read as zeros).
    unsafe fn pack_releasing(
        src: *const i8,
        k: usize,
        n: usize,
        mut weights: Weights,
        release: bool,
    ) -> Int8Linear {
        // Packed layout: for each block of 16 output channels and each group of 4 inputs, the
        // 16 × 4 bytes a VNNI `vpdpbusd` consumes, lane-major: index
        // ((block · k/4 + group) · 16 + lane) · 4 + kk.
        // Written in order, block by block (a block reads 16 bytes of each of the k rows:
        // k cache lines, reused by the next three blocks), in chunks of columns two pages
        // wide: once a chunk is packed, the source pages it covered in every row can be given
        // back, so a load holds little more than one copy of even the 28 MB head (its rows
        // are 12 pages long). A load of the teacher packs 135 MB here.
        const CHUNK_COLUMNS: usize = 8192;
        let packed = weights.as_mut_slice();
        let mut blocks = packed.as_chunks_mut::<64>().0.chunks_exact_mut(k / 4);
        // 128 · Σ_k w[k][j]: the VNNI kernel adds 128 to the activations to make them unsigned.
        let mut offset = vec![0i32; n];
        // Per row: the bytes given back so far.
        let mut given = vec![0usize; if release { k } else { 0 }];
        for c0 in (0..n).step_by(CHUNK_COLUMNS) {
            let c1 = (c0 + CHUNK_COLUMNS).min(n);
            // SAFETY: the caller's; this view ends before any of its pages is given back.
            let w = unsafe { std::slice::from_raw_parts(src, k * n) };
            for (j0, dst) in (c0..c1).step_by(16).zip(blocks.by_ref()) {
                for (group, d) in dst.iter_mut().enumerate() {
                    let row = |r: usize| -> &[i8; 16] {
                        (&w[(4 * group + r) * n + j0..][..16])
                            .try_into()
                            .expect("16 bytes")
                    };
                    interleave4(row(0), row(1), row(2), row(3), d);
                }
            }
            for row in w.chunks_exact(n) {
                for (o, &v) in offset[c0..c1].iter_mut().zip(&row[c0..c1]) {
                    *o += v as i32;
                }
            }
            if release {
                for (r, given) in given.iter_mut().enumerate() {
                    // SAFETY: row r is inside the caller's bytes, its columns up to c1 are
                    // read for the last time, and no view of them is alive.
                    *given = unsafe { give_back(src.add(r * n), n, c1, *given) };
                }
            }
        }
        offset.iter_mut().for_each(|o| *o *= 128);
        Int8Linear {
            k,
            n,
            packed: Arc::new(weights),
            offset: Arc::new(offset),
            pool: None,
        }
    }

    /// An op over weights packed earlier (the load cache's weights file): `packed` holds
    /// `k · n` bytes in the layout of [`Self::pack`], `offset` its `128 · Σₖ W[k][j]`; `None`
    /// if the sizes disagree or the shape does not fit the kernel's blocks.
    pub(crate) fn from_packed(
        k: usize,
        n: usize,
        packed: Weights,
        offset: Vec<i32>,
    ) -> Option<Int8Linear> {
        let fits = k > 0 && n > 0 && k.is_multiple_of(4) && n.is_multiple_of(32);
        (fits && packed.len() == k * n && offset.len() == n).then(|| Int8Linear {
            k,
            n,
            packed: Arc::new(packed),
            offset: Arc::new(offset),
            pool: None,
        })
    }

    /// `(k, n)`: the input and output widths.
    pub(crate) fn dims(&self) -> (usize, usize) {
        (self.k, self.n)
    }

    /// The packed weights (a range of the load's arena).
    pub(crate) fn packed(&self) -> &Weights {
        &self.packed
    }

    /// `128 · Σₖ W[k][j]` per output channel j.
    pub(crate) fn column_offsets(&self) -> &[i32] {
        &self.offset
    }

    /// The same product, split over `pool`'s threads when it is big enough.
    pub fn with_pool(mut self, pool: Option<Arc<Pool>>) -> Int8Linear {
        self.pool = pool;
        self
    }

    /// The output shape `(…, n)` for an input `(…, k)`.
    pub fn output_shape(&self, x: &[usize]) -> TractResult<TVec<usize>> {
        let mut shape: TVec<usize> = x.into();
        let last = shape.last_mut().context("a rank-0 input")?;
        ensure!(*last == self.k, "input width {} for k={}", *last, self.k);
        *last = self.n;
        Ok(shape)
    }

    /// The threads products are split over, if any.
    pub fn pool(&self) -> Option<&Pool> {
        self.pool.as_deref()
    }

    /// Inputs per output channel.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Output channels.
    pub fn n(&self) -> usize {
        self.n
    }

    /// `out (m, n) = x (m, k) · W`, with the best kernel this CPU has, on the calling thread.
    pub fn run(&self, x: &[i8], out: &mut [i32]) {
        self.run_on(x, out, None);
    }

    /// [`Int8Linear::run`], with the output channels split over `pool`'s threads.
    pub fn run_on(&self, x: &[i8], out: &mut [i32], pool: Option<&Pool>) {
        let m = x.len() / self.k;
        assert_eq!(x.len(), m * self.k);
        assert_eq!(out.len(), m * self.n);
        #[cfg(target_arch = "x86_64")]
        if vnni_available() {
            // Several rows (prefill): `vpdpbusd` takes the activations unsigned, so their sign
            // bits are flipped once here (m·k bytes) and the kernel broadcasts each group of
            // four straight from memory. Flipped in the loop, each group cost a scalar xor and
            // a broadcast from a general register, which competes with the products for port
            // 5: prefill's products ran at half the rate `vpdpbusd` allows. One row (decode)
            // is flipped in the loop, where memory, not the ports, bounds the kernel; nothing
            // is allocated for it.
            let flipped: Vec<u8> = if m > 1 {
                x.iter().map(|&v| v as u8 ^ 0x80).collect()
            } else {
                Vec::new()
            };
            let xu = &flipped[..];
            let pairs = self.n / 32;
            let out_ptr = crate::pool::SendPtr(out.as_mut_ptr());
            if let Some(pool) = pool
                && pool.threads() > 1
                && pairs >= 2 * pool.threads()
                && m * self.k * self.n >= MIN_MACS_TO_SPLIT
            {
                let parts = pool.threads();
                let out_ptr = &out_ptr;
                pool.run(&|i| {
                    let range = pairs * i / parts..pairs * (i + 1) / parts;
                    // SAFETY: the CPU has the kernel's features (checked above); `x` and `out`
                    // have the asserted sizes, and the parts write disjoint columns.
                    unsafe { self.run_vnni(x, xu, out_ptr.0, m, range) }
                });
            } else {
                // SAFETY: as above, one part covering every column.
                unsafe { self.run_vnni(x, xu, out_ptr.0, m, 0..pairs) };
            }
            return;
        }
        let _ = pool;
        self.run_portable(x, out);
    }

    /// Plain Rust, on the same packed layout (any CPU; also the tests' reference).
    pub fn run_portable(&self, x: &[i8], out: &mut [i32]) {
        let (k, n) = (self.k, self.n);
        for (xr, yr) in x.chunks_exact(k).zip(out.chunks_exact_mut(n)) {
            for block in 0..n / 16 {
                let mut acc = [0i32; 16];
                for group in 0..k / 4 {
                    let w = &self.packed[(block * (k / 4) + group) * 64..][..64];
                    for (lane, a) in acc.iter_mut().enumerate() {
                        for kk in 0..4 {
                            *a += xr[group * 4 + kk] as i32 * w[lane * 4 + kk] as i32;
                        }
                    }
                }
                yr[block * 16..][..16].copy_from_slice(&acc);
            }
        }
    }

    /// Output columns `32·pairs.start .. 32·pairs.end` of `out (m, n)` (written through a raw
    /// pointer so that several threads can each own a range of columns).
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW and VNNI; `x` holds `m` rows of `k`, and `xu` the same rows
    /// with their sign bits flipped when `m > 1` (else nothing); `out` points to `m × n`
    /// writable i32 of which no one else touches these columns; `pairs.end ≤ n / 32`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn run_vnni(
        &self,
        x: &[i8],
        xu: &[u8],
        out: *mut i32,
        m: usize,
        pairs: std::ops::Range<usize>,
    ) {
        // Prefill: the columns go in tiles of about TILE_BYTES of weights, and every token
        // passes through a tile before the next one is read, so the weights come from memory
        // once per product and from L2 for each group of tokens (one pass per group over all
        // of them read 4.3 GB per 128-token chunk of the int8 teacher). Decode: one tile.
        let pair_bytes = 2 * self.k * 16;
        let tile = if m <= TOKENS_PER_PASS {
            pairs.len().max(1)
        } else {
            (TILE_BYTES / pair_bytes).max(1)
        };
        // Where the CPU has AMX, whole groups of 16 rows go through its tiles (the same exact
        // int32 sums); the rows left over, and decode's one row, come here.
        let mut first = 0;
        #[cfg(target_os = "linux")]
        if m >= crate::amx::TILE_ROWS
            && self.k.is_multiple_of(crate::amx::TILE_K)
            && crate::amx::available()
        {
            first = m / crate::amx::TILE_ROWS * crate::amx::TILE_ROWS;
            // SAFETY: AMX is available (checked); `first` rows of k bytes, k a multiple of
            // 64; `out` and `pairs` as this function's own contract.
            unsafe {
                crate::amx::product(&self.packed, self.k, self.n, x, out, first, pairs.clone())
            };
        }
        let mut start = pairs.start;
        while start < pairs.end {
            let cols = start..(start + tile).min(pairs.end);
            let mut t = first;
            while t < m {
                let rows = (m - t).min(TOKENS_PER_PASS);
                let xs = &x[t * self.k..(t + rows) * self.k];
                let xs_u = if rows > 1 {
                    &xu[t * self.k..(t + rows) * self.k]
                } else {
                    &[]
                };
                // SAFETY: same features as this function; rows t..t+rows exist in `out`.
                unsafe {
                    let ys = out.add(t * self.n);
                    match rows {
                        1 => self.pass_vnni_one(xs, ys, cols.clone()),
                        2 => self.pass_vnni::<2, false>(xs_u, ys, cols.clone()),
                        3 => self.pass_vnni::<3, false>(xs_u, ys, cols.clone()),
                        4 => self.pass_vnni::<4, false>(xs_u, ys, cols.clone()),
                        5 => self.pass_vnni::<5, false>(xs_u, ys, cols.clone()),
                        6 => self.pass_vnni::<6, false>(xs_u, ys, cols.clone()),
                        7 => self.pass_vnni::<7, false>(xs_u, ys, cols.clone()),
                        _ => self.pass_vnni::<8, false>(xs_u, ys, cols.clone()),
                    }
                }
                t += rows;
            }
            start = cols.end;
        }
    }

    /// `T` tokens × the output channels of `pairs`, two blocks of 16 channels at a time (two
    /// independent accumulator chains per token hide `vpdpbusd`'s latency).
    ///
    /// # Safety
    /// As [`Int8Linear::run_vnni`], with `x` holding exactly `T` rows, their sign bits
    /// flipped (`x + 128` as unsigned bytes) unless `FLIP`, which flips them in the loop.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn pass_vnni<const T: usize, const FLIP: bool>(
        &self,
        x: &[u8],
        out: *mut i32,
        pairs: std::ops::Range<usize>,
    ) {
        use std::arch::x86_64::*;
        let (k, n) = (self.k, self.n);
        let groups = k / 4;
        let w = self.packed.as_ptr();
        for pair in pairs {
            let mut acc0 = [_mm512_setzero_si512(); T];
            let mut acc1 = [_mm512_setzero_si512(); T];
            // SAFETY: blocks 2·pair and 2·pair+1 exist (n is a multiple of 32), each holds
            // `groups` 64-byte rows; every x row has k = 4·groups bytes; `out` rows have n.
            unsafe {
                let w0 = w.add(2 * pair * groups * 64);
                let w1 = w0.add(groups * 64);
                for g in 0..groups {
                    let a = _mm512_loadu_si512(w0.add(g * 64) as *const _);
                    let b = _mm512_loadu_si512(w1.add(g * 64) as *const _);
                    for tt in 0..T {
                        let xp = x.as_ptr().add(tt * k + g * 4) as *const i32;
                        let flip = if FLIP { 0x8080_8080u32 as i32 } else { 0 };
                        let xv = _mm512_set1_epi32(xp.read_unaligned() ^ flip);
                        acc0[tt] = _mm512_dpbusd_epi32(acc0[tt], xv, a);
                        acc1[tt] = _mm512_dpbusd_epi32(acc1[tt], xv, b);
                    }
                }
                let off0 = _mm512_loadu_si512(self.offset.as_ptr().add(pair * 32) as *const _);
                let off1 = _mm512_loadu_si512(self.offset.as_ptr().add(pair * 32 + 16) as *const _);
                for tt in 0..T {
                    let y = out.add(tt * n + pair * 32);
                    _mm512_storeu_si512(y as *mut _, _mm512_sub_epi32(acc0[tt], off0));
                    _mm512_storeu_si512(y.add(16) as *mut _, _mm512_sub_epi32(acc1[tt], off1));
                }
            }
        }
    }
}

impl Int8Linear {
    /// One token (decode): four blocks of 16 channels per iteration, so four weight streams and
    /// four accumulator chains are in flight; a trailing pair goes to [`Int8Linear::pass_vnni`].
    ///
    /// # Safety
    /// As [`Int8Linear::run_vnni`], with `x` holding exactly one row.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn pass_vnni_one(&self, x: &[i8], out: *mut i32, pairs: std::ops::Range<usize>) {
        use std::arch::x86_64::*;
        let groups = self.k / 4;
        let w = self.packed.as_ptr();
        let quads = pairs.len() / 2;
        for q in 0..quads {
            let pair = pairs.start + 2 * q;
            // SAFETY: blocks 2·pair .. 2·pair+4 exist (pair + 1 < pairs.end ≤ n/32); x has k bytes.
            unsafe {
                let w0 = w.add(2 * pair * groups * 64);
                let (w1, w2, w3) = (
                    w0.add(groups * 64),
                    w0.add(2 * groups * 64),
                    w0.add(3 * groups * 64),
                );
                let mut acc = [_mm512_setzero_si512(); 4];
                for g in 0..groups {
                    let xp = x.as_ptr().add(g * 4) as *const i32;
                    let xv = _mm512_set1_epi32(xp.read_unaligned() ^ 0x8080_8080u32 as i32);
                    for (a, wb) in acc.iter_mut().zip([w0, w1, w2, w3]) {
                        let wv = _mm512_loadu_si512(wb.add(g * 64) as *const _);
                        *a = _mm512_dpbusd_epi32(*a, xv, wv);
                    }
                }
                for (b, a) in acc.iter().enumerate() {
                    let off = _mm512_loadu_si512(
                        self.offset.as_ptr().add(pair * 32 + b * 16) as *const _
                    );
                    let y = out.add(pair * 32 + b * 16);
                    _mm512_storeu_si512(y as *mut _, _mm512_sub_epi32(*a, off));
                }
            }
        }
        if pairs.len() % 2 == 1 {
            // SAFETY: as above, for the last pair; i8 and u8 have the same size and alignment.
            unsafe {
                let xu = std::slice::from_raw_parts(x.as_ptr().cast::<u8>(), x.len());
                self.pass_vnni::<1, true>(xu, out, pairs.end - 1..pairs.end)
            };
        }
    }
}

/// `d[4·l + r] = row_r[l]`: four rows of 16 bytes, interleaved byte by byte.
#[inline(always)]
fn interleave4(r0: &[i8; 16], r1: &[i8; 16], r2: &[i8; 16], r3: &[i8; 16], d: &mut [i8; 64]) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE2 is part of the x86-64 baseline; unaligned 16-byte loads and stores within
    // the arrays.
    unsafe {
        use std::arch::x86_64::*;
        let ld = |r: &[i8; 16]| _mm_loadu_si128(r.as_ptr().cast());
        let (a, b, c, e) = (ld(r0), ld(r1), ld(r2), ld(r3));
        // (a0 b0 a1 b1 …), then pairs of pairs: (a0 b0 c0 d0 a1 b1 c1 d1 …).
        let (ab_lo, ab_hi) = (_mm_unpacklo_epi8(a, b), _mm_unpackhi_epi8(a, b));
        let (cd_lo, cd_hi) = (_mm_unpacklo_epi8(c, e), _mm_unpackhi_epi8(c, e));
        let out = d.as_mut_ptr().cast::<__m128i>();
        _mm_storeu_si128(out, _mm_unpacklo_epi16(ab_lo, cd_lo));
        _mm_storeu_si128(out.add(1), _mm_unpackhi_epi16(ab_lo, cd_lo));
        _mm_storeu_si128(out.add(2), _mm_unpacklo_epi16(ab_hi, cd_hi));
        _mm_storeu_si128(out.add(3), _mm_unpackhi_epi16(ab_hi, cd_hi));
    }
    #[cfg(not(target_arch = "x86_64"))]
    for l in 0..16 {
        d[4 * l] = r0[l];
        d[4 * l + 1] = r1[l];
        d[4 * l + 2] = r2[l];
        d[4 * l + 3] = r3[l];
    }
}

/// Whether this CPU runs [`Int8Linear`]'s AVX-512 VNNI kernel.
pub fn vnni_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl Op for Int8Linear {
    fn name(&self) -> StaticName {
        "QuillInt8Linear".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("k={} n={}", self.k, self.n)])
    }

    op_as_typed_op!();
}

impl EvalOp for Int8Linear {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let shape = self.output_shape(x.shape())?;
        let x = x.try_as_plain_ram()?.as_slice::<i8>()?;
        let mut y = Tensor::zero::<i32>(&shape)?;
        self.run_on(
            x,
            y.try_as_plain_ram_mut()?.as_slice_mut::<i32>()?,
            self.pool.as_deref(),
        );
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for Int8Linear {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape: TVec<TDim> = inputs[0].shape.to_tvec();
        let rank = shape.len();
        shape[rank - 1] = self.n.into();
        Ok(tvec!(i32::fact(&shape)))
    }

    as_op!();
}

/// Replaces every int8 `EinSum` `amk,kn->amn` with a constant weight and no zero points or
/// scales by an [`Int8Linear`] splitting its products over `pool`; returns how many. Does
/// nothing without AVX-512 VNNI.
pub fn use_int8_kernels(model: &mut TypedModel, pool: Option<Arc<Pool>>) -> TractResult<usize> {
    if !vnni_available() {
        return Ok(0);
    }
    // A graph from the load cache holds its kernels already (`packed.rs`): they get the pool.
    let mut replaced = 0;
    for id in 0..model.nodes().len() {
        if let Some(op) = model.node(id).op_as::<Int8Linear>() {
            let op = op.clone().with_pool(pool.clone());
            model.node_mut(id).op = Box::new(op);
            replaced += 1;
        }
    }
    let found = int8_einsums(model)?;
    if found.is_empty() {
        return Ok(replaced);
    }
    // Every packed weight goes into one arena (huge pages, see `arena.rs`).
    let total = found.iter().map(|(_, w)| w.len()).sum();
    let arena = Arc::new(Arena::new(total).context("mapping memory for the int8 weights")?);
    // Packing is most of this phase (135 MB of the teacher's weights): two weights at a time,
    // one per thread (whatever `--threads` says: loading is not inference, and a kiosk waits
    // for it), each original released as soon as it is replaced, so loading holds two copies
    // of at most two weights (the 28 MB head is the high-water mark).
    let mut found = found.into_iter();
    loop {
        let batch: Vec<(usize, Arc<Tensor>, bool)> = found
            .by_ref()
            .take(2)
            .map(|(id, w)| {
                let release = only_reader(model, id, &w);
                (id, w, release)
            })
            .collect();
        if batch.is_empty() {
            break;
        }
        let pack = |(id, w, release): &(usize, Arc<Tensor>, bool)| {
            let (k, n) = (w.shape()[0], w.shape()[1]);
            let data = w.try_as_plain_ram()?.as_slice::<i8>()?;
            // SAFETY: with `release`, node `id` is the tensor's only reader (`only_reader`),
            // and it is replaced by the packed copy below, before anything runs.
            let op = unsafe { Int8Linear::new_in_releasing(data, k, n, &arena, *release) }
                .context("replaceable_weight checked the shape; the arena holds them all")?;
            TractResult::Ok((*id, op))
        };
        let (first, second) = batch.split_at(batch.len() / 2);
        let packed: Vec<(usize, Int8Linear)> = std::thread::scope(|s| {
            let other = s.spawn(|| second.iter().map(pack).collect::<TractResult<Vec<_>>>());
            let mut ops = first.iter().map(pack).collect::<TractResult<Vec<_>>>()?;
            ops.extend(
                other
                    .join()
                    .map_err(|_| anyhow!("packing weights panicked"))??,
            );
            TractResult::Ok(ops)
        })?;
        drop(batch);
        for (id, op) in packed {
            let op = op.with_pool(pool.clone());
            let input = model.node(id).inputs[0];
            let weight = model.node(id).inputs[1];
            let name = model.node(id).name.clone();
            let mut patch = TypedModelPatch::default();
            let x = patch.tap_model(model, input)?;
            let y = patch.wire_node(name, op, &[x])?[0];
            patch.shunt_outside(model, OutletId::new(id, 0), y)?;
            patch.apply(model)?;
            release_constant(model, weight);
            replaced += 1;
        }
    }
    model.compact()?;
    Ok(replaced)
}

/// Whether node `id` (an `EinSum` about to be replaced) is the only reader of its weight `w`:
/// a `Const` read by nothing else and no model output, and no other holder of the tensor than
/// the `found` list, the `Const` and its fact (so its pages can be given back while packing).
fn only_reader(model: &TypedModel, id: usize, w: &Arc<Tensor>) -> bool {
    use tract_onnx::tract_core::ops::konst::Const;
    let outlet = model.node(id).inputs[1];
    let node = model.node(outlet.node);
    node.op_is::<Const>()
        && node.outputs.len() == 1
        && node.outputs[0].successors.iter().all(|s| s.node == id)
        && !model
            .outputs
            .iter()
            .any(|o| o.node == outlet.node || o.node == id)
        && Arc::strong_count(w) <= 3
}

/// Gives the whole pages of bytes `given..upto` of the `len` bytes at `w` back to the system
/// (`MADV_DONTNEED`; Linux), and returns the byte up to which they are now given back.
///
/// # Safety
/// `w` points to `len` bytes of one allocation, no reference to them is alive, and nothing
/// reads bytes `..upto` afterwards: those pages read as zeros from now on. (The allocation
/// stays live and is later freed as usual: freeing writes at most its header, which a
/// given-back page takes as a fresh zero page.)
#[cfg(target_os = "linux")]
unsafe fn give_back(w: *const i8, len: usize, upto: usize, given: usize) -> usize {
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let base = w as usize;
    let start = (base + given).next_multiple_of(page);
    let end = (base + upto.min(len)) / page * page;
    if end <= start {
        return given;
    }
    // SAFETY: [start, end) is whole pages inside `w`, which the caller no longer reads.
    if unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) } != 0 {
        return given;
    }
    end - base
}

#[cfg(not(target_os = "linux"))]
unsafe fn give_back(_w: *const i8, _len: usize, _upto: usize, given: usize) -> usize {
    given
}

/// Drops the constant tensor behind `outlet` if nothing but replaced nodes reads it: its
/// `Const` op and its fact hold the only references once the `found` list lets go. (The
/// nodes themselves go at the next `compact`; compacting after every batch took 45 ms.)
fn release_constant(model: &mut TypedModel, outlet: OutletId) {
    use tract_onnx::tract_core::ops::konst::Const;
    let node = model.node(outlet.node);
    if !node.op_is::<Const>() || node.outputs.len() != 1 {
        return;
    }
    // Every reader must be an EinSum already cut off from the graph's outputs: the patch
    // rewired its users, so it has none.
    let dead = node.outputs[0].successors.iter().all(|s| {
        let reader = model.node(s.node);
        reader.op_is::<EinSum>()
            && reader.outputs.iter().all(|o| o.successors.is_empty())
            && !model.outputs.iter().any(|o| o.node == s.node)
    });
    if !dead {
        return;
    }
    let empty = Arc::new(Tensor::zero::<i8>(&[0]).expect("an empty tensor"));
    let node = model.node_mut(outlet.node);
    if let Ok(c) = Const::new(empty) {
        node.op = Box::new(c);
    }
    node.outputs[0].fact.konst = None;
}

/// The int8 `EinSum`s that [`Int8Linear`] can replace, in evaluation order, with their weights.
fn int8_einsums(model: &TypedModel) -> TractResult<Vec<(usize, Arc<Tensor>)>> {
    let mut found = Vec::new();
    for id in model.eval_order()? {
        if let Some(w) = replaceable_weight(model, id)? {
            found.push((id, w));
        }
    }
    Ok(found)
}

/// The constant int8 weight of node `id` if it is an `EinSum` [`Int8Linear`] can replace.
fn replaceable_weight(model: &TypedModel, id: usize) -> TractResult<Option<Arc<Tensor>>> {
    let node = model.node(id);
    let Some(e) = node.op_as::<EinSum>() else {
        return Ok(None);
    };
    if e.q_params != Some(DatumType::I32) || e.axes.to_string() != "amk,kn,,,,,,,->amn" {
        return Ok(None);
    }
    let facts = model.node_input_facts(id)?;
    if facts.len() != 9 || facts[0].datum_type != DatumType::I8 {
        return Ok(None);
    }
    let Some(w) = &facts[1].konst else {
        return Ok(None);
    };
    // Zero points (inputs 2, 3, 5, 7: bias, a0, b0, c0) must be 0 and scales (4, 6, 8) 1.
    let trivial = |i: usize, one: bool| {
        facts[i].konst.as_ref().is_some_and(|t| {
            t.len() == 1
                && t.cast_to_scalar::<f32>()
                    .is_ok_and(|v| v == if one { 1.0 } else { 0.0 })
        })
    };
    if !([2, 3, 5, 7].iter().all(|&i| trivial(i, false))
        && [4, 6, 8].iter().all(|&i| trivial(i, true)))
    {
        return Ok(None);
    }
    if w.datum_type() != DatumType::I8 || w.rank() != 2 {
        return Ok(None);
    }
    let (k, n) = (w.shape()[0], w.shape()[1]);
    if k == 0 || n == 0 || !k.is_multiple_of(4) || !n.is_multiple_of(32) {
        return Ok(None);
    }
    Ok(Some(w.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[i8], w: &[i8], k: usize, n: usize) -> Vec<i32> {
        let m = x.len() / k;
        let mut y = vec![0i32; m * n];
        for r in 0..m {
            for j in 0..n {
                y[r * n + j] = (0..k)
                    .map(|kk| x[r * k + kk] as i32 * w[kk * n + j] as i32)
                    .sum();
            }
        }
        y
    }

    #[test]
    fn kernels_match_a_naive_product_including_extremes() {
        let mut s = 12345u32;
        let mut rnd = || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            s as i8
        };
        let pool = Pool::new(2);
        // n = 128: whole groups of four blocks; n = 96: three pairs, the last one alone;
        // 512 × 2048 at 8 rows: big enough (MIN_MACS_TO_SPLIT) to be split over the threads;
        // at 20 rows: several tiles of columns, each with three groups of tokens.
        for (k, n, rows) in [
            (72, 128, &[1, 2, 3, 4, 5, 9][..]),
            (64, 96, &[1, 3, 6]),
            (512, 2048, &[1, 8, 20]),
            // AMX tiles (where the CPU has them): 16-row groups in pairs, an odd last group,
            // and rows left over for the VNNI kernel.
            (128, 64, &[16, 32, 48, 35]),
            (576, 96, &[16, 64, 130]),
        ] {
            let mut w: Vec<i8> = (0..k * n).map(|_| rnd()).collect();
            w[0] = -128;
            w[1] = 127;
            let op = Int8Linear::new(&w, k, n).unwrap();
            for &m in rows {
                let mut x: Vec<i8> = (0..m * k).map(|_| rnd()).collect();
                x[0] = -128;
                x[1] = 127;
                let expected = naive(&x, &w, k, n);
                let mut y = vec![0i32; m * n];
                op.run_portable(&x, &mut y);
                assert_eq!(y, expected, "portable, {m}×{k}×{n}");
                let mut y = vec![0i32; m * n];
                op.run(&x, &mut y); // the SIMD kernel where the CPU has it
                assert_eq!(y, expected, "best kernel, {m}×{k}×{n}");
                let mut y = vec![0i32; m * n];
                op.run_on(&x, &mut y, Some(&pool));
                assert_eq!(y, expected, "best kernel on 2 threads, {m}×{k}×{n}");
            }
        }
        let w = vec![0i8; 72 * 48];
        assert!(
            Int8Linear::new(&w, 72, 48).is_none(),
            "n not a multiple of 32"
        );
    }

    /// Packing that gives the source's pages back as it goes packs the same bytes and sums,
    /// and (on Linux) really gives them back: rows several pages long, chunked over columns.
    #[test]
    fn packing_while_giving_the_source_back_packs_the_same() {
        let (k, n) = (40, 20_480); // rows of 5 pages, in chunks of 2 + 2 + 1
        let mut s = 99u32;
        let w: Vec<i8> = (0..k * n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as i8) | 1 // never 0, so a given-back page shows
            })
            .collect();
        let kept = Int8Linear::new(&w, k, n).unwrap();
        let source = w.clone();
        // SAFETY: `source` is k · n bytes, read again only to see that its pages went back.
        let given = unsafe {
            Int8Linear::pack_releasing(source.as_ptr(), k, n, Weights::alone(k * n).unwrap(), true)
        };
        assert!(given.packed[..] == kept.packed[..], "packed bytes");
        assert_eq!(given.offset, kept.offset, "column sums");
        if cfg!(target_os = "linux") {
            let zeros = source.iter().filter(|&&b| b == 0).count();
            assert!(
                zeros > k * n / 2,
                "{zeros} of {} source bytes given back",
                k * n
            );
        }
    }
}
