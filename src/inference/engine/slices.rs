//! The CPU plan that runs slices in parallel ([`SlicePlan`]): built from the graph cut
//! ([`super::split`]), run on every thread at once, or slice after slice when profiled.

use std::sync::Arc;

use anyhow::{anyhow, ensure, Context, Result};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir;

use super::prepare::load_proto;
use super::split::GraphSplit;
use super::timer::{NodeTimes, PlanTimer};
use crate::inference::contract::ModelFiles;
use crate::inference::dequantize::Graph;
use crate::inference::preprocess::ModelInput;

/// The CPU plan that runs slices in parallel.
///
/// The network is per-slice convolutions followed by recurrent ops across slices. tract
/// threads little besides matrix products, and with a symbolic slice count it cannot pick
/// its fixed-shape convolution kernels. So the graph is cut in two: the *across-slices*
/// part is every node downstream of a recurrent op (GRU/LSTM/RNN), the op included; the
/// *per-slice* part is everything else, prepared for one slice with concrete shapes and run
/// slice by slice on every thread at once. The cut tensors (per-slice tensors that the
/// across part reads, e.g. the GRU input and the decoder features that the segmentation
/// pools) are stacked over slices and fed to the across part, which runs once. At load the
/// cut plan is checked against the whole graph on a random input and dropped (with a
/// warning) if they disagree.
pub(super) struct SlicePlan {
    /// `[1, 3, H, W]` -> the whole graph's outputs that come from the per-slice part, then
    /// the cut tensors, each `[1, ...]`.
    per_slice: Arc<TypedRunnableModel>,
    /// Cut tensors `[S, ...]`, in the order of `per_slice`'s outputs -> the remaining outputs.
    across: Arc<TypedRunnableModel>,
    /// For each output of the whole graph: where it comes from.
    sources: Vec<OutputSource>,
    /// Number of outputs of `per_slice` that are whole-graph outputs (the cut tensors follow).
    direct: usize,
}

#[derive(Debug, Clone, Copy)]
enum OutputSource {
    /// Output `i` of the per-slice part, stacked over slices.
    PerSlice(usize),
    /// Output `i` of the across-slices part.
    Across(usize),
}

impl SlicePlan {
    /// Ok(None) when the graph has no recurrent op to cut at.
    pub(super) fn build(files: &ModelFiles, graph: Graph) -> Result<Option<SlicePlan>> {
        let onnx = tract_onnx::onnx();
        let proto = load_proto(files, graph)?;
        let graph = proto.graph.as_ref().context("ONNX file has no graph")?;
        let spec = &files.contract.input;
        // The one-slice typed graph says which candidate cut tensors really are per slice.
        let mut full = onnx.model_for_proto_model(&proto)?;
        full.set_input_fact(
            0,
            f32::fact([1, spec.channels, spec.height, spec.width]).into(),
        )?;
        let full = full.into_typed()?;
        let per_slice_tensor = |name: &str| {
            full.find_outlet_label(name)
                .and_then(|o| full.outlet_fact(o).ok())
                .is_some_and(|f| {
                    f.datum_type == f32::datum_type() && f.shape.first() == Some(&TDim::from(1))
                })
        };
        // A candidate that is not a float `[1, ...]` tensor (e.g. a recurrent op's initial
        // state expanded to the batch size, or a shape computation) is computed in the
        // across-slices part instead, and its own inputs become candidates.
        let mut forced = std::collections::HashSet::new();
        let split = loop {
            let Some(split) = GraphSplit::of(graph, &forced) else {
                return Ok(None);
            };
            let bad: Vec<String> = split
                .cuts
                .iter()
                .filter(|n| !per_slice_tensor(n))
                .cloned()
                .collect();
            if bad.is_empty() {
                break split;
            }
            ensure!(
                bad.iter().any(|n| !forced.contains(n)),
                "no per-slice cut exists (tensors {bad:?})"
            );
            forced.extend(bad);
        };
        let output_names: Vec<String> = graph.output.iter().map(|o| o.name.clone()).collect();
        let (across_names, direct_names): (Vec<String>, Vec<String>) = output_names
            .iter()
            .cloned()
            .partition(|n| split.across.contains(n));

        // Per-slice part: one slice, concrete shapes.
        let mut per_slice = onnx.model_for_proto_model(&proto)?;
        per_slice.set_input_fact(
            0,
            f32::fact([1, spec.channels, spec.height, spec.width]).into(),
        )?;
        let mut outs = direct_names.clone();
        outs.extend(split.cuts.iter().cloned());
        per_slice.select_outputs_by_name(&outs)?;
        let per_slice = per_slice.into_optimized()?;
        let cut_facts: Vec<TypedFact> = (0..split.cuts.len())
            .map(|i| per_slice.output_fact(direct_names.len() + i).cloned())
            .collect::<TractResult<_>>()?;
        let per_slice = per_slice.into_runnable()?;

        // Across-slices part: each cut tensor's producer becomes an input, `S` symbolic again.
        let mut across = onnx.model_for_proto_model(&proto)?;
        let s = across.symbols.sym("S");
        let mut cut_outlets = vec![];
        for (name, fact) in split.cuts.iter().zip(&cut_facts) {
            let outlet = across
                .find_outlet_label(name)
                .with_context(|| format!("no tensor {name:?} in the graph"))?;
            ensure!(
                across.node(outlet.node).outputs.len() == 1,
                "cut tensor {name:?} comes from a node with several outputs"
            );
            for input in across.node(outlet.node).inputs.clone() {
                across.node_mut(input.node).outputs[input.slot]
                    .successors
                    .retain(|succ| succ.node != outlet.node);
            }
            across.node_mut(outlet.node).inputs.clear();
            across.node_mut(outlet.node).op = Box::new(tract_hir::ops::source::Source::new());
            let mut shape: TVec<TDim> = fact.shape.iter().cloned().collect();
            ensure!(
                shape.first() == Some(&TDim::from(1)),
                "cut tensor {name:?} is not per slice: shape {shape:?}"
            );
            shape[0] = s.clone().into();
            across.set_outlet_fact(outlet, f32::fact(shape).into())?;
            cut_outlets.push(outlet);
        }
        across.set_input_outlets(&cut_outlets)?;
        across.select_outputs_by_name(&across_names)?;
        let across = across.into_optimized()?.into_runnable()?;

        let sources = output_names
            .iter()
            .map(|n| {
                if let Some(i) = direct_names.iter().position(|d| d == n) {
                    OutputSource::PerSlice(i)
                } else {
                    OutputSource::Across(across_names.iter().position(|d| d == n).unwrap())
                }
            })
            .collect();
        Ok(Some(SlicePlan {
            per_slice,
            across,
            sources,
            direct: direct_names.len(),
        }))
    }

    /// Runs the per-slice part on `threads` threads (one slice at a time each, single
    /// threaded kernels), stacks, then runs the across-slices part. Returns the whole
    /// graph's outputs in its order.
    pub(super) fn run(&self, input: ModelInput, threads: usize) -> TractResult<TVec<TValue>> {
        let s = input.slices;
        let slice_len = 3 * input.height * input.width;
        let threads = threads.clamp(1, s);
        let per_thread = s.div_ceil(threads);
        let (h, w) = (input.height, input.width);
        let run_chunk = |chunk: &[f32]| -> TractResult<Vec<TVec<TValue>>> {
            let mut state = self.per_slice.spawn()?;
            chunk
                .chunks(slice_len)
                .map(|one| {
                    let t = Tensor::from_shape(&[1, 3, h, w], one)?;
                    state.run(tvec![t.into_tvalue()])
                })
                .collect()
        };
        // Each chunk of slices gives its slices' outputs, in order.
        let parts: Vec<TractResult<Vec<TVec<TValue>>>> = if threads == 1 {
            vec![run_chunk(&input.tensor)]
        } else {
            std::thread::scope(|scope| {
                let handles: Vec<_> = input
                    .tensor
                    .chunks(per_thread * slice_len)
                    .map(|chunk| scope.spawn(|| run_chunk(chunk)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err(anyhow!("slice worker panicked")))
                    })
                    .collect()
            })
        };
        let mut per_slice: Vec<TVec<TValue>> = Vec::with_capacity(s);
        for part in parts {
            per_slice.extend(part?);
        }
        self.finish(per_slice, |cuts| self.across.run(cuts))
    }

    /// [`SlicePlan::run`] on this thread alone, timing every node of both parts.
    pub(super) fn run_profiled(&self, input: ModelInput) -> TractResult<(TVec<TValue>, NodeTimes)> {
        let (h, w) = (input.height, input.width);
        let mut per_slice_timer = PlanTimer::new(&self.per_slice)?;
        let per_slice = input
            .tensor
            .chunks(3 * h * w)
            .map(|one| {
                per_slice_timer.run(tvec![Tensor::from_shape(&[1, 3, h, w], one)?.into_tvalue()])
            })
            .collect::<TractResult<Vec<_>>>()?;
        let mut across_timer = PlanTimer::new(&self.across)?;
        let outputs = self.finish(per_slice, |cuts| across_timer.run(cuts))?;
        let mut profile = per_slice_timer.node_times("slice:");
        profile.extend(across_timer.node_times("across:"));
        Ok((outputs, profile))
    }

    /// Stacks the per-slice outputs over slices, runs the across-slices part on the cut
    /// tensors with `run_across` (its plan, timed or not), and returns the whole graph's
    /// outputs in its order.
    fn finish(
        &self,
        per_slice: Vec<TVec<TValue>>,
        run_across: impl FnOnce(TVec<TValue>) -> TractResult<TVec<TValue>>,
    ) -> TractResult<TVec<TValue>> {
        let n_out = per_slice.first().map_or(0, |outs| outs.len());
        let mut stacked: Vec<Tensor> = Vec::with_capacity(n_out);
        for o in 0..n_out {
            let views: Vec<&Tensor> = per_slice.iter().map(|outs| &*outs[o]).collect();
            stacked.push(Tensor::stack_tensors(0, &views)?);
        }
        let cuts = stacked.split_off(self.direct);
        let across = run_across(cuts.into_iter().map(|t| t.into_tvalue()).collect())?;
        Ok(self
            .sources
            .iter()
            .map(|src| match *src {
                OutputSource::PerSlice(i) => stacked[i].clone().into_tvalue(),
                OutputSource::Across(i) => across[i].clone(),
            })
            .collect())
    }
}
