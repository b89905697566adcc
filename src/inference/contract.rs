//! `model.json`: the contract between the training recipe and the daemon
//! (see `docs/model-contract.md`). Loading it also checks that the ONNX file next to it
//! is the one it was written for.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::envelope::Envelope;

pub const FORMAT_V1: &str = "cspine-triage/model-contract/v1";

/// The seven cervical vertebrae, in the order of `vertebra_logits` and `attention` rows.
pub const VERTEBRAE: [&str; 7] = ["C1", "C2", "C3", "C4", "C5", "C6", "C7"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelContract {
    pub format: String,
    pub name: String,
    pub version: String,
    /// ONNX file name, relative to the directory of `model.json`.
    pub onnx: String,
    /// Hex sha256 of the ONNX file.
    pub sha256: String,
    pub input: InputSpec,
    pub outputs: OutputsSpec,
    pub thresholds: Thresholds,
    pub coverage: Coverage,
    /// The acquisitions the model was trained on; a series outside is `indeterminate`
    /// ([`super::envelope`]). Absent: no check (older contracts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envelope: Option<Envelope>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputSpec {
    pub name: String,
    pub dtype: String,
    pub layout: String,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub spacing_mm: SpacingMm,
    pub window: Window,
    pub pad_hu: f32,
    pub min_slices: usize,
    pub max_slices: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SpacingMm {
    pub slice: f64,
    pub row: f64,
    pub column: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Window {
    pub center: f64,
    pub width: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputsSpec {
    pub segmentation: SegmentationSpec,
    pub vertebra_logits: TensorSpec,
    pub patient_logit: TensorSpec,
    pub attention: TensorSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegmentationSpec {
    pub name: String,
    /// `["S", classes, h, w]`; kept as JSON values because `S` is symbolic.
    pub shape: Vec<serde_json::Value>,
    /// Model pixels per segmentation cell along each in-plane axis.
    pub stride: usize,
    /// `background` then `C1`..`C7`.
    pub classes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    pub patient: f32,
    /// Keyed `C1`..`C7`.
    pub vertebrae: BTreeMap<String, f32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Coverage {
    /// Fewer vertebrae present than this: the series does not cover the cervical spine.
    pub min_vertebrae: usize,
    /// Cells of one model slice that must have a vertebra as argmax for it to be present there.
    pub min_pixels: usize,
    /// Largest sideways tilt of the neck (degrees from the scanner's z axis in the coronal
    /// plane, measured from the segmentation) the model was validated for; beyond it the
    /// result is `indeterminate`. Absent: no pose check (contracts before 0.7.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lateral_tilt_deg: Option<f64>,
}

impl ModelContract {
    /// Reads `model.json` and checks it is a contract this build understands.
    pub fn load(path: &Path) -> Result<ModelContract> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read the model contract {} (set inference.model or --model to the \
                 model.json shipped with the ONNX file)",
                path.display()
            )
        })?;
        let contract: ModelContract = serde_json::from_str(&text)
            .with_context(|| format!("invalid model contract {}", path.display()))?;
        contract
            .validate()
            .with_context(|| format!("invalid model contract {}", path.display()))?;
        Ok(contract)
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.format == FORMAT_V1,
            "format is {:?}, this build understands {FORMAT_V1:?}",
            self.format
        );
        let i = &self.input;
        ensure!(
            i.dtype == "float32" && i.layout == "SCHW",
            "input must be float32 SCHW, got {} {}",
            i.dtype,
            i.layout
        );
        ensure!(
            i.channels == 3,
            "input.channels must be 3 (2.5D), got {}",
            i.channels
        );
        ensure!(
            i.height > 0 && i.width > 0,
            "input.height and input.width must be > 0"
        );
        for (what, v) in [
            ("slice", i.spacing_mm.slice),
            ("row", i.spacing_mm.row),
            ("column", i.spacing_mm.column),
        ] {
            ensure!(
                v.is_finite() && v > 0.0,
                "input.spacing_mm.{what} must be > 0"
            );
        }
        ensure!(i.window.width > 0.0, "input.window.width must be > 0");
        ensure!(
            i.min_slices >= 1 && i.max_slices >= i.min_slices,
            "input.min_slices must be >= 1 and <= input.max_slices"
        );
        let seg = &self.outputs.segmentation;
        ensure!(
            seg.classes.len() == 1 + VERTEBRAE.len(),
            "outputs.segmentation.classes must be background + C1..C7"
        );
        ensure!(
            seg.stride > 0
                && i.height.is_multiple_of(seg.stride)
                && i.width.is_multiple_of(seg.stride),
            "outputs.segmentation.stride must divide the input height and width"
        );
        for v in VERTEBRAE {
            ensure!(
                self.thresholds.vertebrae.contains_key(v),
                "thresholds.vertebrae has no {v}"
            );
        }
        if let Some(envelope) = &self.envelope {
            envelope.validate()?;
        }
        Ok(())
    }

    /// Segmentation grid (rows, columns).
    pub fn seg_grid(&self) -> (usize, usize) {
        let s = self.outputs.segmentation.stride;
        (self.input.height / s, self.input.width / s)
    }
}

/// A contract together with its verified ONNX file.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub contract: ModelContract,
    pub contract_path: PathBuf,
    pub onnx_path: PathBuf,
}

impl ModelFiles {
    /// Loads `model.json` and verifies the sha256 of the ONNX file it names: a model that
    /// is not the one its thresholds were chosen for must not run.
    pub fn load(contract_path: &Path) -> Result<ModelFiles> {
        let contract = ModelContract::load(contract_path)?;
        let dir = contract_path.parent().unwrap_or(Path::new("."));
        let onnx_path = dir.join(&contract.onnx);
        let actual = sha256_file(&onnx_path).with_context(|| {
            format!(
                "cannot read the ONNX model {} named by {} (install the model files together)",
                onnx_path.display(),
                contract_path.display()
            )
        })?;
        if !actual.eq_ignore_ascii_case(&contract.sha256) {
            bail!(
                "ONNX model {} has sha256 {actual} but {} expects {}: the model and its \
                 contract do not belong together; reinstall both from the same release",
                onnx_path.display(),
                contract_path.display(),
                contract.sha256
            );
        }
        Ok(ModelFiles {
            contract,
            contract_path: contract_path.to_path_buf(),
            onnx_path,
        })
    }
}

/// Hex sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn example_json(sha: &str) -> String {
        format!(
            r#"{{
  "format": "cspine-triage/model-contract/v1",
  "name": "test", "version": "0.0.1", "onnx": "m.onnx", "sha256": "{sha}",
  "input": {{ "name": "slices", "dtype": "float32", "layout": "SCHW", "channels": 3,
    "height": 128, "width": 128,
    "spacing_mm": {{ "slice": 2.0, "row": 1.25, "column": 1.25 }},
    "window": {{ "center": 400.0, "width": 1800.0 }}, "pad_hu": -1024.0,
    "min_slices": 8, "max_slices": 256 }},
  "outputs": {{
    "segmentation": {{ "name": "seg_logits", "shape": ["S", 8, 32, 32], "stride": 4,
      "classes": ["background", "C1", "C2", "C3", "C4", "C5", "C6", "C7"] }},
    "vertebra_logits": {{ "name": "vertebra_logits", "shape": [7] }},
    "patient_logit": {{ "name": "patient_logit", "shape": [1] }},
    "attention": {{ "name": "attention", "shape": [7, "S"] }} }},
  "thresholds": {{ "patient": 0.5, "vertebrae": {{ "C1": 0.5, "C2": 0.5, "C3": 0.5,
    "C4": 0.5, "C5": 0.5, "C6": 0.5, "C7": 0.5 }} }},
  "coverage": {{ "min_vertebrae": 5, "min_pixels": 4 }}
}}"#
        )
    }

    #[test]
    fn sha256_mismatch_and_missing_file_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("model.json");
        std::fs::write(&json, example_json("00")).unwrap();
        let err = format!("{:#}", ModelFiles::load(&json).unwrap_err());
        assert!(err.contains("cannot read the ONNX model"), "{err}");

        std::fs::write(dir.path().join("m.onnx"), b"not really onnx").unwrap();
        let err = format!("{:#}", ModelFiles::load(&json).unwrap_err());
        assert!(err.contains("do not belong together"), "{err}");

        let sha = sha256_file(&dir.path().join("m.onnx")).unwrap();
        std::fs::write(&json, example_json(&sha)).unwrap();
        let files = ModelFiles::load(&json).unwrap();
        assert_eq!(files.contract.seg_grid(), (32, 32));
        assert_eq!(files.onnx_path, dir.path().join("m.onnx"));
    }

    #[test]
    fn wrong_format_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("model.json");
        std::fs::write(
            &json,
            example_json("00").replace("model-contract/v1", "model-contract/v9"),
        )
        .unwrap();
        let err = format!("{:#}", ModelContract::load(&json).unwrap_err());
        assert!(err.contains("this build understands"), "{err}");
    }
}
