//! The tract engine: the ONNX model loaded, checked against its contract and prepared
//! once at start-up (with the slice count `S` symbolic), then run for every series.
//!
//! Runtimes: `cpu` (tract's optimized CPU plan on a private thread pool), `cuda`
//! (tract-cuda; only with the `cuda` Cargo feature) and `gpu-or-cpu` (CUDA when a driver,
//! the CUDA libraries and NVRTC work, else CPU, with a log line saying why).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use tract_linalg::multithread::{multithread_tract_scope, Executor};
use tract_onnx::prelude::*;

use super::contract::{ModelFiles, VERTEBRAE};
use super::preprocess::ModelInput;

/// Which runtime to prepare the model for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeChoice {
    Cpu,
    Cuda,
    GpuOrCpu,
}

impl std::str::FromStr for RuntimeChoice {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(RuntimeChoice::Cpu),
            "cuda" => Ok(RuntimeChoice::Cuda),
            "gpu-or-cpu" => Ok(RuntimeChoice::GpuOrCpu),
            _ => bail!("unknown runtime {s:?}: use \"cpu\", \"cuda\" or \"gpu-or-cpu\""),
        }
    }
}

/// Engine settings (from `[inference]` or the `infer` flags).
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub runtime: RuntimeChoice,
    /// Threads of tract's CPU pool (and of preprocessing).
    pub threads: usize,
    /// Where tract-cuda keeps the kernels NVRTC compiled (must be writable).
    pub cuda_cache_dir: PathBuf,
}

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
struct OutputIndex {
    seg: usize,
    vertebra: usize,
    patient: usize,
    attention: usize,
}

/// A loaded, prepared model; cheap to share (`Arc`) between studies and threads.
pub struct Engine {
    pub files: ModelFiles,
    runnable: Arc<dyn Runnable>,
    /// "cpu" or "cuda".
    runtime: &'static str,
    executor: Executor,
    outputs: OutputIndex,
    threads: usize,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model", &self.files.onnx_path)
            .field("runtime", &self.runtime)
            .field("threads", &self.threads)
            .finish()
    }
}

impl Engine {
    /// Loads `model.json` (verifying the ONNX sha256), loads and declutters the ONNX
    /// graph with `S` symbolic, and prepares it for the chosen runtime.
    pub fn load(contract_path: &Path, options: &EngineOptions) -> Result<Engine> {
        let started = Instant::now();
        let files = ModelFiles::load(contract_path)?;
        let decluttered = load_decluttered(&files)
            .with_context(|| format!("cannot load the ONNX model {}", files.onnx_path.display()))?;
        let outputs = output_index(&decluttered, &files)?;
        let threads = options.threads.max(1);
        let executor = if threads > 1 {
            Executor::multithread_with_name(threads, "cspine-tract")
        } else {
            Executor::SingleThread
        };
        let (runtime, runnable) = prepare(decluttered, options)?;
        log::info!(
            "model {} {} ({}) ready on runtime {runtime} with {threads} CPU threads in {:.2} s",
            files.contract.name,
            files.contract.version,
            files.onnx_path.display(),
            started.elapsed().as_secs_f64()
        );
        Ok(Engine {
            files,
            runnable,
            runtime,
            executor,
            outputs,
            threads,
        })
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
        let slices = input.slices;
        let tensor = input_tensor(input)?;
        let outputs = multithread_tract_scope(self.executor.clone(), || {
            self.runnable.run(tvec![tensor.into_tvalue()])
        })
        .map_err(|e| anyhow!("model run failed on {slices} slices: {e:#}"))?;
        self.read_outputs(slices, &outputs)
    }

    /// Runs the model once, timing every node of the plan (CPU runtime only). Returns the
    /// outputs and `(node name, op name, time)` per node, in plan order.
    pub fn run_profiled(
        &self,
        input: ModelInput,
    ) -> Result<(ModelOutputs, Vec<(String, String, Duration)>)> {
        let plan = self
            .runnable
            .typed_plan()
            .context("profiling needs the CPU runtime")?
            .clone();
        let slices = input.slices;
        let tensor = input_tensor(input)?;
        let mut times: BTreeMap<usize, Duration> = BTreeMap::new();
        let outputs = multithread_tract_scope(self.executor.clone(), || {
            let mut state = plan.spawn()?;
            state.run_plan_with_eval(tvec![tensor.into_tvalue()], |ctx, op_state, node, inputs| {
                let t = Instant::now();
                let r = tract_onnx::tract_core::plan::eval(ctx, op_state, node, inputs);
                *times.entry(node.id).or_default() += t.elapsed();
                r
            })
        })
        .map_err(|e| anyhow!("model run failed on {slices} slices: {e:#}"))?;
        let model = plan.model();
        let profile = times
            .into_iter()
            .map(|(id, t)| {
                let node = model.node(id);
                (node.name.clone(), node.op().name().to_string(), t)
            })
            .collect();
        Ok((self.read_outputs(slices, &outputs)?, profile))
    }

    fn read_outputs(&self, slices: usize, outputs: &[TValue]) -> Result<ModelOutputs> {
        let c = &self.files.contract;
        let (seg_h, seg_w) = c.seg_grid();
        let seg_classes = c.outputs.segmentation.classes.len();
        let get = |ix: usize, what: &str, len: usize| -> Result<Vec<f32>> {
            let t = outputs
                .get(ix)
                .with_context(|| format!("model returned no {what} output"))?;
            let t = t.cast_to::<f32>()?;
            let v = t.as_slice::<f32>()?;
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
        let attention = get(self.outputs.attention, "attention", VERTEBRAE.len() * slices)?;
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

/// The ONNX graph, typed and decluttered, with its input fixed to `[S, 3, H, W]` f32.
fn load_decluttered(files: &ModelFiles) -> Result<TypedModel> {
    let spec = &files.contract.input;
    let mut model = tract_onnx::onnx().model_for_path(&files.onnx_path)?;
    let s = model.symbols.sym("S");
    model.set_input_fact(
        0,
        f32::fact(dims!(s, spec.channels, spec.height, spec.width)).into(),
    )?;
    Ok(model.into_typed()?.into_decluttered()?)
}

/// Finds the contract's four outputs by name.
fn output_index(model: &TypedModel, files: &ModelFiles) -> Result<OutputIndex> {
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

fn prepare_cpu(model: TypedModel) -> Result<Arc<dyn Runnable>> {
    let plan = model.into_optimized()?.into_runnable()?;
    Ok(Arc::new(plan))
}

#[cfg(not(feature = "cuda"))]
fn prepare(model: TypedModel, options: &EngineOptions) -> Result<(&'static str, Arc<dyn Runnable>)> {
    match options.runtime {
        RuntimeChoice::Cpu => {}
        RuntimeChoice::GpuOrCpu => log::info!(
            "runtime gpu-or-cpu: this build has no CUDA support (built without the `cuda` \
             feature), using cpu"
        ),
        RuntimeChoice::Cuda => bail!(
            "runtime \"cuda\" needs a build with the `cuda` feature; use runtime \"cpu\" or \
             rebuild with `cargo build --features cuda`"
        ),
    }
    Ok(("cpu", prepare_cpu(model)?))
}

#[cfg(feature = "cuda")]
fn prepare(model: TypedModel, options: &EngineOptions) -> Result<(&'static str, Arc<dyn Runnable>)> {
    // Linking tract-cuda registers its runtime.
    use tract_cuda as _;
    if options.runtime == RuntimeChoice::Cpu {
        return Ok(("cpu", prepare_cpu(model)?));
    }
    let strict = options.runtime == RuntimeChoice::Cuda;
    match prepare_cuda(model.clone(), &options.cuda_cache_dir) {
        Ok(runnable) => Ok(("cuda", runnable)),
        Err(e) if strict => Err(e.context("runtime \"cuda\" is not usable on this machine")),
        Err(e) => {
            log::warn!("runtime gpu-or-cpu: CUDA is not usable ({e:#}); falling back to cpu");
            Ok(("cpu", prepare_cpu(model)?))
        }
    }
}

#[cfg(feature = "cuda")]
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
    let runnable = rt
        .prepare(model)
        .map_err(|e| anyhow!("tract-cuda could not prepare the model: {e:#}"))?;
    Ok(Arc::from(runnable))
}
