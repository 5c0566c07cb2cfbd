//! Intel AMX tiles for [`crate::kernels::Int8Linear`]'s prefill products.
//!
//! A prompt multiplies each weight matrix by up to 128 token rows at once: a matrix-matrix
//! product, compute-bound. AVX-512 VNNI does 64 int8 multiply-adds per `vpdpbusd`; one AMX
//! `tdpbssd` multiplies a 16 × 64 tile of activations by a 64 × 16 tile of weights (16,384
//! multiply-adds) into a 16 × 16 tile of int32 sums. Where the CPU has AMX-INT8 (Intel Xeon
//! from Sapphire Rapids on) and Linux grants the process its tile state, the products of 16 or
//! more rows go through the tiles; the rest (decode's single row, a chunk's last rows) stay on
//! the VNNI kernel.
//!
//! The weights need no other packing: `Int8Linear`'s layout `(n/16, k/4, 16, 4)` is AMX's
//! "VNNI layout" for the right-hand tile — for 16 output channels and 64 inputs, 16 rows of
//! 64 bytes (each row 4 consecutive inputs of the 16 channels), contiguous. `tdpbssd` takes
//! both operands signed, so the activations go in as they are (no `+128` offset). The sums are
//! exact int32, so the result is the VNNI kernel's bit for bit.
//!
//! Rust's AMX intrinsics are unstable; the instructions are written as inline assembly, one
//! `asm!` block per step. The compiler never uses the tile registers, so tiles keep their
//! contents between blocks; each product configures the tiles (`ldtilecfg`) on its thread and
//! releases them (`tilerelease`) before returning, so a thread holds tile state only while it
//! multiplies.
//!
//! `QUILL_AMX=0` in the environment turns the tiles off (for comparisons).

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
use std::arch::asm;

/// Rows of a tile: tokens per left-hand tile, output channels per right-hand tile.
pub const TILE_ROWS: usize = 16;
/// Bytes per tile row: inputs consumed per `tdpbssd` step.
pub const TILE_K: usize = 64;

/// Whether the AMX kernel runs here: the CPU has AMX-TILE and AMX-INT8, Linux granted this
/// process the tile data state, and `QUILL_AMX` is not `0`. Asked once per process.
pub fn available() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            if std::env::var_os("QUILL_AMX").is_some_and(|v| v == "0") {
                return false;
            }
            // CPUID leaf 7, sub-leaf 0: EDX bit 24 AMX-TILE, bit 25 AMX-INT8.
            // Leaf 7 exists on every CPU with AMX; where it does not, the bits read are
            // another leaf's, and the permission request below fails anyway.
            if std::arch::x86_64::__cpuid(0).eax < 7 {
                return false;
            }
            let id = std::arch::x86_64::__cpuid_count(7, 0);
            if id.edx & (1 << 24) == 0 || id.edx & (1 << 25) == 0 {
                return false;
            }
            // The tile data (XFEATURE 18) is off for a process until it asks for it.
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: arch_prctl with these arguments only changes this process's permission.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_arch_prctl,
                    ARCH_REQ_XCOMP_PERM,
                    XFEATURE_XTILEDATA,
                )
            };
            r == 0
        })
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        false
    }
}

/// The tile configuration: palette 1, tiles 0–7 all 16 rows × 64 bytes.
/// Tiles 0–3 hold sums (2 × 2 blocks of 16 × 16 int32), 4–5 activations, 6–7 weights.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
impl TileConfig {
    fn all_full() -> TileConfig {
        let mut c = [0u8; 64];
        c[0] = 1; // palette 1
        for t in 0..8 {
            // colsb[t] (u16 at 16 + 2t), rows[t] (u8 at 48 + t)
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&(TILE_K as u16).to_le_bytes());
            c[48 + t] = TILE_ROWS as u8;
        }
        TileConfig(c)
    }
}

/// `out[r][32p .. 32p+32] = x[r] · W[:, 32p .. 32p+32]` for rows `r < m` and pairs `p` in
/// `pairs`, W in `Int8Linear`'s packed layout (`packed`, `k` inputs, `n` outputs).
///
/// # Safety
/// [`available`] returned true; `m` is a multiple of [`TILE_ROWS`] and `k` of [`TILE_K`];
/// `x` holds at least `m × k` bytes, `packed` `k × n`; `out` points to `m × n` writable i32 of
/// which no one else touches these columns; `pairs.end ≤ n / 32`.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub unsafe fn product(
    packed: &[i8],
    k: usize,
    n: usize,
    x: &[i8],
    out: *mut i32,
    m: usize,
    pairs: std::ops::Range<usize>,
) {
    debug_assert!(m.is_multiple_of(TILE_ROWS) && k.is_multiple_of(TILE_K));
    debug_assert!(x.len() >= m * k && packed.len() == k * n && pairs.end <= n / 32);
    let config = TileConfig::all_full();
    let steps = k / TILE_K;
    // One block of 16 channels is k/4 rows of 64 bytes; a step moves 16 of those rows.
    let block_bytes = k / 4 * 64;
    let (xs, cs) = (k, n * 4); // row strides in bytes: activations (m, k) i8, sums (m, n) i32
    let groups = m / TILE_ROWS;
    // SAFETY (all blocks below): the caller guarantees the features and the bounds: every
    // tile load reads 16 rows of 64 bytes inside `x` (rows < m, bytes < k) or inside
    // `packed` (one block's rows), every store writes 16 rows of 16 i32 inside `out`'s rows
    // < m and this part's columns.
    unsafe {
        asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly));
        for pair in pairs {
            let w0 = packed.as_ptr().add(2 * pair * block_bytes);
            let w1 = w0.add(block_bytes);
            let mut g = 0;
            while g < groups {
                let two = g + 1 < groups;
                let x0 = x.as_ptr().add(g * TILE_ROWS * k);
                let x1 = if two { x0.add(TILE_ROWS * k) } else { x0 };
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack, nomem)
                );
                for s in 0..steps {
                    // Sums (tokens × channels): tmm0 = x0·w0, tmm1 = x0·w1, tmm2 = x1·w0,
                    // tmm3 = x1·w1. With one group left, x1 = x0 and tmm2/3 are not stored.
                    asm!(
                        "tileloadd tmm4, [{x0} + {xs}*1]",
                        "tileloadd tmm6, [{w0} + {ws}*1]",
                        "tileloadd tmm7, [{w1} + {ws}*1]",
                        "tdpbssd tmm0, tmm4, tmm6",
                        "tdpbssd tmm1, tmm4, tmm7",
                        "tileloadd tmm5, [{x1} + {xs}*1]",
                        "tdpbssd tmm2, tmm5, tmm6",
                        "tdpbssd tmm3, tmm5, tmm7",
                        x0 = in(reg) x0.add(s * TILE_K),
                        x1 = in(reg) x1.add(s * TILE_K),
                        w0 = in(reg) w0.add(s * TILE_ROWS * 64),
                        w1 = in(reg) w1.add(s * TILE_ROWS * 64),
                        xs = in(reg) xs,
                        ws = in(reg) 64usize,
                        options(nostack, readonly)
                    );
                }
                let y0 = out.add(g * TILE_ROWS * n + pair * 32);
                asm!(
                    "tilestored [{y0} + {cs}*1], tmm0",
                    "tilestored [{y1} + {cs}*1], tmm1",
                    y0 = in(reg) y0,
                    y1 = in(reg) y0.add(16),
                    cs = in(reg) cs,
                    options(nostack)
                );
                if two {
                    let y2 = y0.add(TILE_ROWS * n);
                    asm!(
                        "tilestored [{y2} + {cs}*1], tmm2",
                        "tilestored [{y3} + {cs}*1], tmm3",
                        y2 = in(reg) y2,
                        y3 = in(reg) y2.add(16),
                        cs = in(reg) cs,
                        options(nostack)
                    );
                }
                g += 2;
            }
        }
        asm!("tilerelease", options(nostack, nomem));
    }
}
