//! Writes that a power cut cannot tear: a reader finds the old file (or directory) or the new
//! one, never half of one.
//!
//! The recipe is the usual one: write beside the destination under a temporary name, `fsync`
//! the data, `rename` over the destination, `fsync` the directory so the rename itself is
//! durable. A bundle is a directory of files that must change together, so it is staged whole
//! and swapped in with one `renameat2(RENAME_EXCHANGE)`.
//!
//! **Invariant:** everything quill and xtask write for later runs (bundles, the fetched
//! teacher, text splits, tarballs) goes through this module or stages into a directory that
//! [`replace_dir`] swaps in.

use std::ffi::CString;
use std::fs;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The temporary name a file is staged under before it replaces `path`: a sibling, so the
/// rename stays on one filesystem, named after this process so two writers never share it.
pub fn staging_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".partial-{}", std::process::id()));
    path.with_file_name(name)
}

/// Writes `bytes` to `path` atomically and durably.
pub fn write_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = staging_path(path);
    let result = (|| {
        write_synced(&tmp, bytes)?;
        commit_file(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Creates `path` with `bytes` and flushes them to the disk (for files inside a staged
/// directory, which [`replace_dir`] then swaps in).
pub fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Moves a fully written and synced `tmp` over `path` and makes the rename durable.
pub fn commit_file(tmp: &Path, path: &Path) -> io::Result<()> {
    fs::File::open(tmp)?.sync_all()?;
    fs::rename(tmp, path)?;
    sync_parent(path)
}

/// Flushes the directory entry of `path` (after a create or a rename in its directory).
pub fn sync_parent(path: &Path) -> io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fs::File::open(parent)?.sync_all()
}

/// Replaces the directory `dest` by the staged directory `staged` in one atomic step; the old
/// contents are deleted afterwards. Every file in `staged` must already be synced
/// ([`write_synced`]).
///
/// When `dest` exists the two are exchanged with `renameat2(RENAME_EXCHANGE)`: at every instant
/// `dest` is a whole bundle, old or new. On a filesystem without it (`EINVAL`), the old
/// directory is renamed aside first, which leaves a moment with no `dest` but never a mixed one.
pub fn replace_dir(staged: &Path, dest: &Path) -> io::Result<()> {
    fs::File::open(staged)?.sync_all()?;
    if !dest.exists() {
        fs::rename(staged, dest)?;
        return sync_parent(dest);
    }
    match exchange(staged, dest) {
        Ok(()) => {
            sync_parent(dest)?;
            // `staged` now holds the old contents.
            fs::remove_dir_all(staged)
        }
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) => {
            let old = staging_path(&dest.with_extension("old"));
            fs::rename(dest, &old)?;
            fs::rename(staged, dest)?;
            sync_parent(dest)?;
            fs::remove_dir_all(&old)
        }
        Err(e) => Err(e),
    }
}

/// Swaps two paths atomically (Linux `renameat2` with `RENAME_EXCHANGE`).
fn exchange(a: &Path, b: &Path) -> io::Result<()> {
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
    };
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: both pointers are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("quill-atomic-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_file_is_replaced_and_no_staging_file_remains() {
        let dir = scratch("file");
        let path = dir.join("f.bin");
        write_file(&path, b"old").unwrap();
        write_file(&path, b"new").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("f.bin")]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_directory_is_swapped_whole() {
        let dir = scratch("dir");
        let dest = dir.join("bundle");
        for generation in ["one", "two", "three"] {
            let staged = dir.join("bundle.partial");
            fs::create_dir_all(&staged).unwrap();
            write_synced(&staged.join("a"), generation.as_bytes()).unwrap();
            write_synced(&staged.join("b"), generation.as_bytes()).unwrap();
            replace_dir(&staged, &dest).unwrap();
            assert!(!staged.exists());
            assert_eq!(fs::read(dest.join("a")).unwrap(), generation.as_bytes());
            assert_eq!(fs::read(dest.join("b")).unwrap(), generation.as_bytes());
        }
        fs::remove_dir_all(&dir).unwrap();
    }
}
