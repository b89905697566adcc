//! The ONNX graph read (the file as shipped, or its dequantized rewrite), typed and
//! decluttered with `S` symbolic, and prepared for the CPU or for CUDA.

#[cfg(feature = "gpu")]
use std::path::Path;
use std::sync::Arc;

#[cfg(feature = "gpu")]
use anyhow::anyhow;
use anyhow::{Context, Result};
use tract_onnx::prelude::*;

use super::options::{EngineOptions, RuntimeChoice};
use super::outputs::{output_index, OutputIndex};
use crate::inference::contract::ModelFiles;
use crate::inference::dequantize::{dequantize, Graph};

/// The ONNX protobuf of `graph`: the file as shipped, or its dequantized rewrite.
pub(super) fn load_proto(files: &ModelFiles, graph: Graph) -> Result<tract_onnx::pb::ModelProto> {
    let mut proto = tract_onnx::onnx().proto_model_for_path(&files.onnx_path)?;
    if graph == Graph::Dequantized {
        let done = dequantize(&mut proto).with_context(|| {
            format!(
                "cannot dequantize the ONNX model {}",
                files.onnx_path.display()
            )
        })?;
        log::debug!(
            "dequantized graph: {} QLinearConv -> Conv, {} Q/DQ pairs removed",
            done.convs,
            done.pairs
        );
    }
    Ok(proto)
}

/// The ONNX graph `graph`, typed and decluttered, with its input fixed to `[S, 3, H, W]` f32.
fn load_decluttered(files: &ModelFiles, graph: Graph) -> Result<TypedModel> {
    let spec = &files.contract.input;
    let mut model = tract_onnx::onnx()
        .model_for_proto_model(&load_proto(files, graph)?)
        .with_context(|| format!("cannot load the ONNX model {}", files.onnx_path.display()))?;
    let s = model.symbols.sym("S");
    model.set_input_fact(
        0,
        f32::fact([
            s.to_dim(),
            spec.channels.to_dim(),
            spec.height.to_dim(),
            spec.width.to_dim(),
        ])
        .into(),
    )?;
    model.into_typed()?.into_decluttered()
}

fn prepare_cpu(model: TypedModel) -> Result<Arc<dyn Runnable>> {
    let plan = model.into_optimized()?.into_runnable()?;
    Ok(Arc::new(plan))
}

/// What [`prepare`] returns: runtime name, graph, plan, output indices.
pub(super) type Prepared = (&'static str, Graph, Arc<dyn Runnable>, OutputIndex);

/// The CPU plan of `options.graph`'s CPU graph.
pub(super) fn prepare_cpu_graph(files: &ModelFiles, options: &EngineOptions) -> Result<Prepared> {
    let graph = options.graph.for_runtime(false);
    let model = load_decluttered(files, graph)?;
    let outputs = output_index(&model, files)?;
    Ok(("cpu", graph, prepare_cpu(model)?, outputs))
}

#[cfg(not(feature = "gpu"))]
pub(super) fn prepare(files: &ModelFiles, options: &EngineOptions) -> Result<Prepared> {
    match options.runtime {
        RuntimeChoice::Cpu => {}
        RuntimeChoice::GpuOrCpu => log::info!(
            "runtime gpu-or-cpu: this build has no CUDA support (built without the `cuda` \
             feature), using cpu"
        ),
        RuntimeChoice::Cuda => anyhow::bail!(
            "runtime \"cuda\" needs a build with the `cuda` feature; use runtime \"cpu\" or \
             rebuild with `cargo build --features cuda`"
        ),
    }
    prepare_cpu_graph(files, options)
}

#[cfg(feature = "gpu")]
pub(super) fn prepare(files: &ModelFiles, options: &EngineOptions) -> Result<Prepared> {
    // Linking tract-cuda registers its runtime.
    use tract_cuda as _;
    if options.runtime == RuntimeChoice::Cpu {
        return prepare_cpu_graph(files, options);
    }
    let strict = options.runtime == RuntimeChoice::Cuda;
    let graph = options.graph.for_runtime(true);
    let model = load_decluttered(files, graph)?;
    let outputs = output_index(&model, files)?;
    match prepare_cuda(model, &options.cuda_cache_dir) {
        Ok(runnable) => Ok(("cuda", graph, runnable, outputs)),
        Err(e) if strict => Err(e.context("runtime \"cuda\" is not usable on this machine")),
        Err(e) => {
            log::warn!("runtime gpu-or-cpu: CUDA is not usable ({e:#}); using cpu");
            prepare_cpu_graph(files, options)
        }
    }
}

#[cfg(feature = "gpu")]
fn prepare_cuda(model: TypedModel, cache_dir: &Path) -> Result<Arc<dyn Runnable>> {
    let rt = tract_onnx::tract_core::runtime::runtimes()
        .find(|rt| rt.name() == "cuda")
        .ok_or_else(|| {
            // `runtimes()` lists only the runtimes whose check passed: ask for the reason.
            anyhow!("no CUDA driver or libraries found (libcuda, cudart, nvrtc, cublas, cudnn)")
        })?;
    // tract-cuda caches NVRTC output under $XDG_CACHE_HOME/tract; it reads the variable
    // once, at its first compilation, which is below.
    std::fs::create_dir_all(cache_dir).with_context(|| {
        format!(
            "cannot create the CUDA kernel cache {} (set inference.cuda_cache_dir to a \
             writable directory)",
            cache_dir.display()
        )
    })?;
    let probe = cache_dir.join(".write-test");
    std::fs::write(&probe, b"").with_context(|| {
        format!(
            "the CUDA kernel cache {} is not writable (set inference.cuda_cache_dir)",
            cache_dir.display()
        )
    })?;
    let _ = std::fs::remove_file(probe);
    std::env::set_var("XDG_CACHE_HOME", cache_dir);
    // The CUDA runtime gets the decluttered model: it applies its own transform and
    // optimisation; a CPU-optimized plan would hide the ops it knows how to offload.
    // tract-cuda 0.23.9 panics (rather than failing) when the CUDA libraries load but no
    // device answers: seen with the toolkit's stub libcuda first on the library path, and
    // what a container started without its GPU gives. `gpu-or-cpu` must still fall back.
    let prepared = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rt.prepare(model)))
        .map_err(|panic| {
            let message = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .and_then(|m| m.lines().next())
                .unwrap_or("no message");
            anyhow!(
                "tract-cuda panicked while preparing the model ({message}): is a GPU visible \
                 to this process, and is the real libcuda.so.1 (not the toolkit's stub) first \
                 on the library path?"
            )
        })?;
    let runnable =
        prepared.map_err(|e| anyhow!("tract-cuda could not prepare the model: {e:#}"))?;
    Ok(Arc::from(runnable))
}
