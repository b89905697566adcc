//! The [`Engine`]: a loaded, prepared model, and its runs on one series' input (whole, with
//! the slice plan, or profiled), read back into [`ModelOutputs`].

use std::sync::Arc;

use anyhow::{anyhow, ensure, Context, Result};
use tract_onnx::prelude::*;

use super::outputs::{ModelOutputs, OutputIndex};
use super::slices::SlicePlan;
use super::timer::{NodeTimes, PlanTimer};
use crate::inference::contract::{ModelFiles, VERTEBRAE};
use crate::inference::dequantize::Graph;
use crate::inference::preprocess::ModelInput;

/// A loaded, prepared model; cheap to share (`Arc`) between studies and threads.
pub struct Engine {
    pub files: ModelFiles,
    pub(super) runnable: Arc<dyn Runnable>,
    /// The same model cut in two for the CPU (see [`SlicePlan`]); None on CUDA or when
    /// the graph has no recurrent op to cut at.
    pub(super) slice_plan: Option<SlicePlan>,
    /// "cpu" or "cuda".
    pub(super) runtime: &'static str,
    /// The graph `runnable` runs.
    pub(super) graph: Graph,
    pub(super) outputs: OutputIndex,
    pub(super) threads: usize,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model", &self.files.onnx_path)
            .field("runtime", &self.runtime)
            .field("graph", &self.graph)
            .field("threads", &self.threads)
            .field("slice_parallel", &self.slice_plan.is_some())
            .finish()
    }
}

impl Engine {
    /// The graph the engine runs: "int8" or "dequantized".
    pub fn graph(&self) -> &'static str {
        self.graph.name()
    }

    /// "cpu" or "cuda": what results report.
    pub fn runtime(&self) -> &'static str {
        self.runtime
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs the model on one series' input (consumed: the tensor moves into tract).
    pub fn run(&self, input: ModelInput) -> Result<ModelOutputs> {
        if let Some(plan) = &self.slice_plan {
            let slices = input.slices;
            let outputs = plan
                .run(input, self.threads)
                .map_err(|e| anyhow!("model run failed on {slices} slices: {e:#}"))?;
            return self.read_outputs(slices, &outputs);
        }
        self.run_whole(input)
    }

    /// Runs the model as one graph (the CUDA runtime always does).
    pub fn run_whole(&self, input: ModelInput) -> Result<ModelOutputs> {
        let slices = input.slices;
        let tensor = input_tensor(input)?;
        let outputs = self
            .runnable
            .run(tvec![tensor.into_tvalue()])
            .map_err(|e| anyhow!("model run failed on {slices} slices: {e:#}"))?;
        self.read_outputs(slices, &outputs)
    }

    /// Runs the model once, timing every node of the plan (CPU runtime only). Returns the
    /// outputs and `(node name, op name, time)` per node, in plan order. With the slice
    /// plan, its per-slice part runs slice after slice on this thread (node times summed
    /// over slices), then its across-slices part: the plans the engine really runs.
    pub fn run_profiled(&self, input: ModelInput) -> Result<(ModelOutputs, NodeTimes)> {
        let slices = input.slices;
        let failed = |e: anyhow::Error| anyhow!("model run failed on {slices} slices: {e:#}");
        if let Some(plan) = &self.slice_plan {
            let (outputs, profile) = plan.run_profiled(input).map_err(failed)?;
            return Ok((self.read_outputs(slices, &outputs)?, profile));
        }
        let plan = self
            .runnable
            .typed_plan()
            .context("profiling needs the CPU runtime")?;
        let mut timer = PlanTimer::new(plan)?;
        let outputs = timer
            .run(tvec![input_tensor(input)?.into_tvalue()])
            .map_err(failed)?;
        Ok((self.read_outputs(slices, &outputs)?, timer.node_times("")))
    }

    pub(super) fn read_outputs(&self, slices: usize, outputs: &[TValue]) -> Result<ModelOutputs> {
        let c = &self.files.contract;
        let (seg_h, seg_w) = c.seg_grid();
        let seg_classes = c.outputs.segmentation.classes.len();
        let get = |ix: usize, what: &str, len: usize| -> Result<Vec<f32>> {
            let t = outputs
                .get(ix)
                .with_context(|| format!("model returned no {what} output"))?;
            let t = t.cast_to::<f32>()?;
            let view = t.try_as_plain_ram()?;
            let v = view.as_slice::<f32>()?;
            ensure!(
                v.len() == len,
                "model output {what} has {} values, the contract implies {len} (shape {:?})",
                v.len(),
                t.shape()
            );
            Ok(v.to_vec())
        };
        let seg_logits = get(
            self.outputs.seg,
            "segmentation",
            slices * seg_classes * seg_h * seg_w,
        )?;
        let vertebra = get(self.outputs.vertebra, "vertebra_logits", VERTEBRAE.len())?;
        let patient = get(self.outputs.patient, "patient_logit", 1)?;
        let attention = get(
            self.outputs.attention,
            "attention",
            VERTEBRAE.len() * slices,
        )?;
        Ok(ModelOutputs {
            slices,
            seg_logits,
            seg_classes,
            seg_h,
            seg_w,
            vertebra_logits: vertebra.try_into().expect("length checked"),
            patient_logit: patient[0],
            attention,
        })
    }
}

fn input_tensor(input: ModelInput) -> Result<Tensor> {
    let shape = [input.slices, 3, input.height, input.width];
    Ok(tract_ndarray::Array4::from_shape_vec(shape, input.tensor)
        .context("model input has the wrong length")?
        .into_tensor())
}
