//! The tract engine: the ONNX model loaded, checked against its contract and prepared
//! once at start-up (with the slice count `S` symbolic), then run for every series.
//!
//! Runtimes: `cpu` (tract's optimized CPU plan; slices run in parallel, see
//! [`SlicePlan`](slices::SlicePlan)), `cuda` (tract-cuda; only with the `cuda` Cargo
//! feature) and `gpu-or-cpu` (CUDA when a driver, the CUDA libraries and NVRTC work and
//! CUDA runs a start-up probe faster than the CPU, else CPU, with a log line saying why).
//!
//! Graph: each runtime runs the int8 file as shipped or its dequantized float rewrite
//! ([`super::dequantize`], `inference.graph`); `auto` runs the dequantized graph on CUDA
//! (tract-cuda keeps int8 convolutions on the CPU) and the int8 graph on the CPU, so the
//! `gpu-or-cpu` probe compares dequantized-on-CUDA with int8-on-the-CPU.
//!
//! - [`options`]: what to prepare the model for ([`RuntimeChoice`], [`EngineOptions`]).
//! - [`load`]: [`Engine::load`] and the choices made at start-up: the `gpu-or-cpu` and
//!   `graph = "auto"` probes, and the check of the slice plan against the whole graph.
//! - [`prepare`]: the ONNX graph read (and dequantized), typed and prepared for the CPU or
//!   CUDA.
//! - [`outputs`]: the raw outputs of one series ([`ModelOutputs`]) and where the contract's
//!   outputs are among the model's.
//! - [`run`](mod@run): the [`Engine`] and its runs on one series (whole, sliced or
//!   profiled).
//! - [`slices`]: the CPU plan that runs slices in parallel
//!   ([`SlicePlan`](slices::SlicePlan)).
//! - [`split`]: where the ONNX graph is cut between its per-slice and across-slices parts.
//! - [`timer`]: per-node timing of a plan ([`NodeTimes`]).

mod load;
mod options;
mod outputs;
mod prepare;
mod run;
mod slices;
mod split;
mod timer;

pub use load::avoid_amx_int8;
pub use options::{EngineOptions, RuntimeChoice};
pub use outputs::ModelOutputs;
pub use run::Engine;
pub use timer::NodeTimes;
