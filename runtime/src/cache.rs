//! The load cache: tract's prepared form of a bundle, kept on disk so that a restart skips most
//! of the load.
//!
//! Loading a bundle spends most of its time turning the ONNX graph into a graph tract can
//! optimize (parse, type, declutter, move the KV cache into tract's state: about 1.5 s of the
//! int8 teacher's 2.3 s on this machine). That form does not depend on the CPU, the thread count
//! or the context, so quill saves it once, as NNEF (tract's own serialization, with the
//! `tract_core`, `tract_transformers` and ONNX extensions), and later loads start from it.
//!
//! An entry is `<dir>/<bundle name>-<key CRC>.nnef.tar` with a `.key` file beside it holding the
//! full key — the bundle's files (names, sizes, CRC-32s from its verified manifest), quill's and
//! tract's versions and the target — and the tar's size and CRC-32. An entry is used only if its
//! key matches exactly and its bytes check; otherwise it is rebuilt and replaced. Entries are
//! written atomically. The cache can never make a load fail: an unreadable or unwritable cache
//! is reported in [`CacheUse`] and the bundle is loaded from its ONNX graph as without one.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use tract_nnef::internal::*;
use tract_onnx_opl::WithOnnx;
use tract_transformers::WithTractTransformers;

use crate::bundle::Bundle;

/// A reader or writer that computes the CRC-32 of the bytes passing through.
struct Crc<T> {
    inner: T,
    crc: crc32fast::Hasher,
}

impl<R: std::io::Read> std::io::Read for Crc<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }
}

impl<W: std::io::Write> std::io::Write for Crc<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The tract release quill is built with (Cargo.toml pins it; a test checks Cargo.lock agrees):
/// a cached graph is only read back by the release that wrote it.
pub const TRACT_VERSION: &str = "0.23.9";

/// What the cache did during a load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheUse {
    /// No cache directory configured.
    Off,
    /// Loaded from the cache.
    Hit,
    /// Not in the cache (or stale): loaded from the ONNX graph and saved.
    Stored,
    /// Loaded from the ONNX graph; the cache could not be read or written (why).
    Failed(String),
}

/// The default cache directory: `$QUILL_CACHE_DIR`, else `$XDG_CACHE_HOME/quill/plans`, else
/// `$HOME/.cache/quill/plans`; `None` if none of them is set.
pub fn default_dir() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("QUILL_CACHE_DIR")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("quill/plans")))
        .or_else(|| var("HOME").map(|d| d.join(".cache/quill/plans")))
}

fn nnef() -> tract_nnef::framework::Nnef {
    tract_nnef::nnef().with_tract_transformers().with_onnx()
}

/// One bundle's entry in a cache directory.
pub struct Entry {
    tar: PathBuf,
    key_file: PathBuf,
    key: String,
    /// `<bundle name>-`: entries of earlier versions of the bundle start with it.
    prefix: String,
}

impl Entry {
    pub fn new(dir: &Path, bundle: &Bundle) -> Entry {
        let m = &bundle.manifest;
        let mut key = format!(
            "quill {}\ntract {}\ntarget {}-{}\n",
            env!("CARGO_PKG_VERSION"),
            TRACT_VERSION,
            std::env::consts::ARCH,
            std::env::consts::OS
        );
        for f in &m.files {
            key.push_str(&format!("file {} {} {:08x}\n", f.name, f.bytes, f.crc32));
        }
        let stem: String = m
            .name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let base = format!("{stem}-{:08x}", crc32fast::hash(key.as_bytes()));
        Entry {
            tar: dir.join(format!("{base}.nnef.tar")),
            key_file: dir.join(format!("{base}.key")),
            key,
            prefix: format!("{stem}-"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.tar
    }

    /// The cached model, `Ok(None)` if there is no valid entry. The tar is streamed into tract
    /// (never held whole in memory) while its CRC-32 is computed; a model whose bytes do not
    /// match the key file is dropped.
    pub fn load(&self) -> anyhow::Result<Option<TypedModel>> {
        let Ok(stored) = std::fs::read_to_string(&self.key_file) else {
            return Ok(None);
        };
        let Some((key, check)) = stored.rsplit_once("entry ") else {
            return Ok(None);
        };
        if key != self.key {
            return Ok(None);
        }
        let Ok(file) = std::fs::File::open(&self.tar) else {
            return Ok(None);
        };
        let size = file.metadata()?.len();
        if !check.starts_with(&format!("{size} ")) {
            return Ok(None);
        }
        let mut r = Crc {
            inner: std::io::BufReader::with_capacity(1 << 20, file),
            crc: crc32fast::Hasher::new(),
        };
        let model = nnef()
            .model_for_read(&mut r)
            .map_err(|e| anyhow::anyhow!("{e:#}"));
        // Whatever tract did not need (tar padding) still counts.
        std::io::copy(&mut r, &mut std::io::sink())?;
        if check.trim() != format!("{size} {:08x}", r.crc.finalize()) {
            return Ok(None);
        }
        Ok(Some(model?))
    }

    /// Saves `model` (atomically: a reader sees the old entry or the new one), and removes the
    /// entries of other versions of the same bundle (same name, other files or releases), so
    /// the cache holds one entry per bundle name.
    pub fn store(&self, model: &TypedModel) -> anyhow::Result<()> {
        if let Some(dir) = self.tar.parent() {
            std::fs::create_dir_all(dir)?;
            for e in std::fs::read_dir(dir)?.flatten() {
                let path = e.path();
                let name = e.file_name().to_string_lossy().into_owned();
                let ours = path == self.tar || path == self.key_file;
                let entry_file = name.ends_with(".nnef.tar") || name.ends_with(".key");
                // `<prefix><8 hex digits>.…`: the same bundle name, not a longer one.
                let same_bundle = name.strip_prefix(&self.prefix).is_some_and(|rest| {
                    rest.split_once('.').is_some_and(|(hash, _)| {
                        hash.len() == 8 && hash.chars().all(|c| c.is_ascii_hexdigit())
                    })
                });
                if !ours && entry_file && same_bundle {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        // The key goes last: until it is written, the old key (if any) does not match the new
        // tar's CRC, so a crash in between leaves an entry that is ignored, never a wrong one.
        let _ = std::fs::remove_file(&self.key_file);
        let tmp = crate::atomic::staging_path(&self.tar);
        let written = (|| -> anyhow::Result<(u64, u32)> {
            let file = std::fs::File::create(&tmp)?;
            let w = Crc {
                inner: std::io::BufWriter::with_capacity(1 << 20, file),
                crc: crc32fast::Hasher::new(),
            };
            let mut w = nnef()
                .write_to_tar(model, w)
                .map_err(|e| anyhow::anyhow!("{e:#}"))?;
            w.inner.flush()?;
            let crc = w.crc.finalize();
            let file = w.inner.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            let size = file.metadata()?.len();
            crate::atomic::commit_file(&tmp, &self.tar)?;
            Ok((size, crc))
        })();
        let (size, crc) = match written {
            Ok(w) => w,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let key = format!("{}entry {size} {crc:08x}\n", self.key);
        crate::atomic::write_file(&self.key_file, key.as_bytes())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tract_version_is_the_locked_one() {
        let lock =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock")).unwrap();
        let at = lock.find("name = \"tract-core\"\nversion = \"").unwrap();
        let rest = &lock[at..];
        let v = rest.lines().nth(1).unwrap();
        assert_eq!(v, format!("version = \"{TRACT_VERSION}\""));
    }
}
