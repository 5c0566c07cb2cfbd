//! The load cache: tract's prepared form of a bundle, kept on disk so that a restart skips most
//! of the load.
//!
//! Loading a bundle spends most of its time turning the ONNX graph into a graph tract can
//! optimize (parse, type, declutter, move the KV cache into tract's state: about 1.5 s of the
//! int8 teacher's 2.3 s on this machine). That form does not depend on the thread count or the
//! context, so quill saves it once, as NNEF (tract's own serialization, with the `tract_core`,
//! `tract_transformers`, ONNX and `quill` extensions), and later loads start from it.
//!
//! The saved graph has quill's own ops installed (`packed.rs`). Where quill's int8 kernels run
//! (AVX-512 VNNI), their packed weights go into a file of their own beside the tar: a warm load
//! reads those 135 MB straight into memory where they stay, instead of reading them as tract
//! tensors and packing them again (int8 teacher, 1 thread: load 0.50 → 0.27 s). The int8
//! embedding's table goes into a third file, which a warm load memory-maps. Binary ops are
//! written so that tract reads them back without the casts it would put around each operand
//! ([`crate::saved_binary`]: a third fewer nodes to read).
//!
//! An entry is `<dir>/<bundle name>-<ops>-<key CRC>.nnef.tar`, maybe `.weights` and `.tables`
//! files, and a `.key` file holding the full key — the bundle's files (names, sizes, CRC-32s
//! from its verified manifest), quill's and tract's versions, the format of quill's files
//! ([`FORMAT`]), the target and which of quill's ops the graph holds — and the three files'
//! sizes and CRC-32s. An entry is used only if its key matches exactly and its bytes check;
//! otherwise it is rebuilt and replaced (one entry per bundle name and set of ops). Entries are
//! written atomically. The cache can never make a load fail: an unreadable or unwritable cache
//! is reported in [`CacheUse`] and the bundle is loaded from its ONNX graph as without one.
//!
//! The tables file is mapped, not read: quill never writes into an entry's files (it renames
//! new ones over them), and nothing else may either while quill runs — a file truncated under
//! the mapping would end the process at its next lookup.

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

/// The version of quill's own cached forms: the packed weights' layout, the NNEF forms of
/// quill's ops and the tables file. Part of every key; raise it whenever one of them changes,
/// so that older entries (which would still check) are rebuilt. (2: binary ops written as
/// `quill_binary`, [`crate::saved_binary`].)
pub const FORMAT: u32 = 2;

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
    tract_nnef::nnef()
        .with_tract_transformers()
        .with_onnx()
        .with_registry(crate::packed::registry())
}

/// One bundle's entry in a cache directory.
pub struct Entry {
    tar: PathBuf,
    /// The packed int8 weights of the tar's quill ops (see `packed.rs`), when it has any.
    weights: PathBuf,
    /// The embedding tables of the tar's quill ops, when it has any (memory-mapped).
    tables: PathBuf,
    key_file: PathBuf,
    key: String,
    /// `<bundle name>-<ops>-`: entries of earlier versions of the bundle start with it.
    prefix: String,
    /// `<bundle name>-`: entries written before the ops were part of the name.
    legacy_prefix: String,
}

impl Entry {
    /// The entry of `bundle` in `dir`; `ops` names the quill ops the load installs before the
    /// cached form, in letters, digits and `-` (the cached graph holds them: quill's int8
    /// kernels with their weights packed for this CPU, its embedding).
    pub fn new(dir: &Path, bundle: &Bundle, ops: &str) -> Entry {
        let m = &bundle.manifest;
        let mut key = format!(
            "quill {}\ntract {}\nquill-format {FORMAT}\ntarget {}-{}\nops {ops}\n",
            env!("CARGO_PKG_VERSION"),
            TRACT_VERSION,
            std::env::consts::ARCH,
            std::env::consts::OS,
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
        let base = format!("{stem}-{ops}-{:08x}", crc32fast::hash(key.as_bytes()));
        Entry {
            tar: dir.join(format!("{base}.nnef.tar")),
            weights: dir.join(format!("{base}.weights")),
            tables: dir.join(format!("{base}.tables")),
            key_file: dir.join(format!("{base}.key")),
            key,
            prefix: format!("{stem}-{ops}-"),
            legacy_prefix: format!("{stem}-"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.tar
    }

    /// Whether the directory holds an entry for this key (its files are not checked: [`load`]
    /// does that, and may still find them damaged).
    ///
    /// [`load`]: Entry::load
    pub fn is_present(&self) -> bool {
        self.stored_check().is_some()
    }

    /// The key file's sizes and CRC-32s of the entry's files, if it holds this entry's key.
    fn stored_check(&self) -> Option<String> {
        let stored = std::fs::read_to_string(&self.key_file).ok()?;
        let (key, check) = stored.rsplit_once("entry ")?;
        (key == self.key).then(|| check.to_string())
    }

    /// The cached model, `Ok(None)` if there is no valid entry. The tar is streamed into tract
    /// (never held whole in memory) while its CRC-32 is computed, and the weights file, if the
    /// entry has one, is read into an arena on a second thread meanwhile; a model whose bytes
    /// do not match the key file is dropped.
    pub fn load(&self) -> anyhow::Result<Option<TypedModel>> {
        let Some(check) = self.stored_check() else {
            return Ok(None);
        };
        // `<tar size> <tar crc> weights <size> <crc> tables <size> <crc>`
        let fields: Vec<&str> = check.split_whitespace().collect();
        let [
            size,
            crc,
            "weights",
            weights_size,
            weights_crc,
            "tables",
            tables_size,
            tables_crc,
        ] = fields[..]
        else {
            return Ok(None);
        };
        let (Ok(size), Ok(weights_size), Ok(weights_crc), Ok(tables_size), Ok(tables_crc)) = (
            size.parse::<u64>(),
            weights_size.parse::<usize>(),
            u32::from_str_radix(weights_crc, 16),
            tables_size.parse::<usize>(),
            u32::from_str_radix(tables_crc, 16),
        ) else {
            return Ok(None);
        };
        let Ok(file) = std::fs::File::open(&self.tar) else {
            return Ok(None);
        };
        if file.metadata()?.len() != size {
            return Ok(None);
        }
        let read_tar = || -> anyhow::Result<Option<TypedModel>> {
            let mut r = Crc {
                inner: std::io::BufReader::with_capacity(1 << 20, file),
                crc: crc32fast::Hasher::new(),
            };
            let model = nnef()
                .model_for_read(&mut r)
                .map_err(|e| anyhow::anyhow!("{e:#}"));
            // tract may stop before the end: the rest still counts.
            std::io::copy(&mut r, &mut std::io::sink())?;
            if format!("{:08x}", r.crc.finalize()) != crc {
                return Ok(None);
            }
            Ok(Some(model?))
        };
        // `Some((weights, tables))` if both check, each `None` where the entry has none.
        let read_weights = || -> anyhow::Result<Option<_>> {
            let weights = match weights_size {
                0 => None,
                len => match crate::packed::read_weights(&self.weights, len, weights_crc)? {
                    Some(w) => Some(w),
                    None => return Ok(None),
                },
            };
            let tables = match tables_size {
                0 => None,
                len => match crate::packed::map_tables(&self.tables, len, tables_crc)? {
                    Some(t) => Some(t),
                    None => return Ok(None),
                },
            };
            Ok(Some((weights, tables)))
        };
        // Only entries with quill's int8 kernels have weights (x86-64 with AVX-512 VNNI), so
        // no thread is made where there is nothing to read (nor under qemu, see model.rs).
        let (model, weights) = if weights_size == 0 {
            (read_tar()?, read_weights()?)
        } else {
            std::thread::scope(|s| {
                let weights = s.spawn(read_weights);
                let model = read_tar();
                let weights = weights
                    .join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("reading the weights panicked")));
                anyhow::Ok((model?, weights?))
            })?
        };
        let (Some(mut model), Some((weights, tables))) = (model, weights) else {
            return Ok(None);
        };
        crate::packed::install(&mut model, weights, tables)?;
        Ok(Some(model))
    }

    /// Saves `model` (atomically: a reader sees the old entry or the new one), and removes the
    /// entries of other versions of the same bundle with the same ops (same name, other files
    /// or releases) and the staging files of writers that crashed, so the cache holds one entry
    /// per bundle name and set of ops.
    pub fn store(&self, model: &TypedModel) -> anyhow::Result<()> {
        if let Some(dir) = self.tar.parent() {
            std::fs::create_dir_all(dir)?;
            for e in std::fs::read_dir(dir)?.flatten() {
                let path = e.path();
                let name = e.file_name().to_string_lossy().into_owned();
                let ours =
                    [&self.tar, &self.key_file, &self.weights, &self.tables].contains(&&path);
                // A staging file a crashed writer left: `<file>.partial-<pid>` of a process
                // that is gone.
                let (name, left_behind) = match name.rsplit_once(".partial-") {
                    Some((file, pid)) => (file.to_owned(), writer_is_gone(pid)),
                    None => (name, true),
                };
                let entry_file = [".nnef.tar", ".key", ".weights", ".tables"]
                    .iter()
                    .any(|ext| name.ends_with(ext));
                // `<prefix><8 hex digits>.…`: the same bundle name (and ops), not a longer one.
                let hashed = |prefix: &str| {
                    name.strip_prefix(prefix).is_some_and(|rest| {
                        rest.split_once('.').is_some_and(|(hash, _)| {
                            hash.len() == 8 && hash.chars().all(|c| c.is_ascii_hexdigit())
                        })
                    })
                };
                let same_bundle = hashed(&self.prefix) || hashed(&self.legacy_prefix);
                if !ours && entry_file && same_bundle && left_behind {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        // The key goes last: until it is written, the old key (if any) does not match the new
        // tar's CRC, so a crash in between leaves an entry that is ignored, never a wrong one.
        let _ = std::fs::remove_file(&self.key_file);
        let (weights_size, weights_crc) = write_crc(&self.weights, |w| {
            crate::packed::write_weights(model, w)?;
            Ok(())
        })?;
        let (tables_size, tables_crc) = write_crc(&self.tables, |w| {
            crate::packed::write_tables(model, w)?;
            Ok(())
        })?;
        let (size, crc) = write_crc(&self.tar, |w| {
            nnef()
                .write_to_tar(&crate::saved_binary::for_saving(model)?, &mut *w)
                .map_err(|e| anyhow::anyhow!("{e:#}"))?;
            Ok(())
        })?;
        for (size, path) in [(weights_size, &self.weights), (tables_size, &self.tables)] {
            if size == 0 {
                let _ = std::fs::remove_file(path);
            }
        }
        let key = format!(
            "{}entry {size} {crc:08x} weights {weights_size} {weights_crc:08x} \
             tables {tables_size} {tables_crc:08x}\n",
            self.key
        );
        crate::atomic::write_file(&self.key_file, key.as_bytes())?;
        Ok(())
    }
}

/// Whether the process that named a staging file `….partial-<pid>` has ended (on Linux, where
/// `/proc` tells; elsewhere the file is left alone). Never this process.
fn writer_is_gone(pid: &str) -> bool {
    let Ok(pid) = pid.parse::<u32>() else {
        return false;
    };
    cfg!(target_os = "linux")
        && pid != std::process::id()
        && !Path::new(&format!("/proc/{pid}")).exists()
}

/// Writes `path` atomically with `write`, returning its size and CRC-32.
fn write_crc(
    path: &Path,
    write: impl FnOnce(&mut Crc<std::io::BufWriter<std::fs::File>>) -> anyhow::Result<()>,
) -> anyhow::Result<(u64, u32)> {
    let tmp = crate::atomic::staging_path(path);
    let written = (|| -> anyhow::Result<(u64, u32)> {
        let file = std::fs::File::create(&tmp)?;
        let mut w = Crc {
            inner: std::io::BufWriter::with_capacity(1 << 20, file),
            crc: crc32fast::Hasher::new(),
        };
        write(&mut w)?;
        w.inner.flush()?;
        let crc = w.crc.finalize();
        let file = w.inner.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        let size = file.metadata()?.len();
        crate::atomic::commit_file(&tmp, path)?;
        Ok((size, crc))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
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
