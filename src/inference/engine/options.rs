//! What to prepare the model for: the runtime ([`RuntimeChoice`]) and the engine settings
//! ([`EngineOptions`]).

use std::path::PathBuf;

use crate::inference::dequantize::GraphChoice;

/// Which runtime to prepare the model for (`inference.runtime`, `infer --runtime`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum RuntimeChoice {
    /// tract's CPU kernels.
    Cpu,
    /// tract-cuda; fail when no usable GPU.
    Cuda,
    /// CUDA when usable and faster than the CPU on a start-up probe, else the CPU.
    GpuOrCpu,
}

/// Engine settings (from `[inference]` or the `infer` flags).
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub runtime: RuntimeChoice,
    /// Threads of tract's CPU pool (and of preprocessing).
    pub threads: usize,
    /// Where tract-cuda keeps the kernels NVRTC compiled (must be writable).
    pub cuda_cache_dir: PathBuf,
    /// On the CPU, run the per-slice part of the model one slice per task across the
    /// threads (see [`SlicePlan`](super::slices::SlicePlan)) instead of as one graph.
    pub slice_parallel: bool,
    /// Which graph each runtime runs (int8 as shipped, or dequantized at load).
    pub graph: GraphChoice,
}
