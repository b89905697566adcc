//! The raw model outputs of one series ([`ModelOutputs`]), and where the contract's four
//! outputs are among the model's ([`output_index`]).

use anyhow::{Context, Result};
use tract_onnx::prelude::*;

use crate::inference::contract::ModelFiles;

/// The raw model outputs of one series.
#[derive(Debug, Clone)]
pub struct ModelOutputs {
    pub slices: usize,
    /// `[slices, classes, seg_h, seg_w]`.
    pub seg_logits: Vec<f32>,
    pub seg_classes: usize,
    pub seg_h: usize,
    pub seg_w: usize,
    /// C1..C7.
    pub vertebra_logits: [f32; 7],
    pub patient_logit: f32,
    /// `[7, slices]`: per vertebra, softmax weights over model slices.
    pub attention: Vec<f32>,
}

/// Indices of the contract's outputs among the model's outputs.
#[derive(Debug, Clone, Copy)]
pub(super) struct OutputIndex {
    pub(super) seg: usize,
    pub(super) vertebra: usize,
    pub(super) patient: usize,
    pub(super) attention: usize,
}

/// Finds the contract's four outputs by name.
pub(super) fn output_index(model: &TypedModel, files: &ModelFiles) -> Result<OutputIndex> {
    let names: Vec<String> = model
        .output_outlets()?
        .iter()
        .map(|o| {
            model
                .outlet_label(*o)
                .map(|s| s.to_string())
                .unwrap_or_else(|| model.node(o.node).name.clone())
        })
        .collect();
    let find = |name: &str| {
        names.iter().position(|n| n == name).with_context(|| {
            format!(
                "the ONNX model has no output {name:?} (it has {names:?}); it does not honour \
                 {}",
                files.contract_path.display()
            )
        })
    };
    let o = &files.contract.outputs;
    Ok(OutputIndex {
        seg: find(&o.segmentation.name)?,
        vertebra: find(&o.vertebra_logits.name)?,
        patient: find(&o.patient_logit.name)?,
        attention: find(&o.attention.name)?,
    })
}
