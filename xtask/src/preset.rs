//! Build presets (`models/presets/NAME.toml`): which bundle a board gets.
//!
//! A preset names the weight format and calibration of a bundle; the distillation step
//! (issue #4) adds its student and budget to the same files.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::export::{self, ExportOptions, QuantOptions, WeightFormat};

#[derive(Debug, Clone, Deserialize)]
pub struct Preset {
    pub name: String,
    pub description: String,
    pub quant: String,
    #[serde(default)]
    pub calibrate: usize,
    /// A distilled student ([`crate::distill`]); absent: the teacher itself.
    #[serde(default)]
    pub distill: Option<crate::distill::DistillConfig>,
}

impl Preset {
    pub fn load(name: &str) -> Result<Preset> {
        let path = crate::workspace_root()
            .join("models/presets")
            .join(format!("{name}.toml"));
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("no preset `{name}`: cannot read {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("{} is not a valid preset", path.display()))
    }

    pub fn format(&self) -> Result<WeightFormat> {
        Ok(match self.quant.as_str() {
            "int8" => WeightFormat::Int8,
            "f16" => WeightFormat::F16,
            "f32" => WeightFormat::F32,
            other => anyhow::bail!(
                "preset {}: quant must be int8, f16 or f32, got {other}",
                self.name
            ),
        })
    }

    /// The name of the preset's bundle under `models/bundles/`.
    pub fn bundle_name(&self) -> String {
        match &self.distill {
            Some(_) => format!("smollm2-135m-{}-{}", self.name, self.quant),
            None => {
                let mut name = format!("smollm2-135m-instruct-{}", self.quant);
                if self.calibrate > 0 {
                    name.push_str("-gptq");
                }
                name
            }
        }
    }

    /// The preset's bundle under `models/bundles/`, made now (exported, or distilled) if it is
    /// not there yet.
    pub fn bundle(&self) -> Result<PathBuf> {
        let format = self.format()?;
        if self.distill.is_some() {
            let dir = export::default_out_dir(&crate::workspace_root(), &self.bundle_name());
            if quill::bundle::Bundle::open(&dir).is_ok() {
                return Ok(dir);
            }
            #[cfg(feature = "distill")]
            {
                let d = crate::distill::distill(self, &crate::distill::DistillOptions::default())?;
                return d
                    .map(|d| d.bundle)
                    .context("distillation interrupted; run it again to resume");
            }
            #[cfg(not(feature = "distill"))]
            anyhow::bail!(
                "preset {} is a distilled student and this xtask was built without the \
                 `distill` feature",
                self.name
            );
        }
        let mut quant = QuantOptions::new(format);
        let name = self.bundle_name();
        if self.calibrate > 0 {
            quant.calibrate = Some(self.calibrate);
        }
        let dir = export::default_out_dir(&crate::workspace_root(), &name);
        if quill::bundle::Bundle::open(&dir).is_ok() {
            return Ok(dir);
        }
        export::export(&ExportOptions {
            teacher: crate::fetch::teacher()?,
            out_dir: dir.clone(),
            name,
            quant,
            blocks: None,
        })?;
        Ok(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_board_recommends_a_preset_that_exists() {
        for (name, text) in quill::board::BUILTIN {
            let board = quill::board::Board::parse(name, text).unwrap();
            let p = Preset::load(&board.bundle.preset).unwrap();
            assert_eq!(p.name, board.bundle.preset);
            assert_eq!(p.quant, board.bundle.quant);
            assert!(p.format().is_ok());
        }
        let e = Preset::load("nope").unwrap_err().to_string();
        assert!(e.contains("no preset `nope`"), "{e}");
    }

    #[test]
    fn every_preset_file_is_valid_and_the_distilled_ones_are_smaller() {
        let dir = crate::workspace_root().join("models/presets");
        let mut distilled = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_stem().unwrap().to_str().unwrap().to_string();
            let p = Preset::load(&name).unwrap();
            assert_eq!(p.name, name, "{}: name must match the file", path.display());
            assert!(p.format().is_ok());
            if let Some(d) = &p.distill {
                // SmolLM2-135M has 30 blocks.
                d.check(30).unwrap();
                assert!(d.keep_blocks < 30);
                assert_eq!(p.bundle_name(), format!("smollm2-135m-{name}-int8"));
                distilled.push(name);
            }
        }
        distilled.sort();
        assert_eq!(distilled, ["balanced", "tiny"]);
        let e = Preset::load("nope").unwrap_err().to_string();
        assert!(e.contains("no preset `nope`"), "{e}");
    }
}
