//! The tract engine: the ONNX model loaded, checked against its contract and prepared
//! once at start-up (with the slice count `S` symbolic), then run for every series.
//!
//! Runtimes: `cpu` (tract's optimized CPU plan; slices run in parallel, see [`SlicePlan`]), `cuda`
//! (tract-cuda; only with the `cuda` Cargo feature) and `gpu-or-cpu` (CUDA when a driver,
//! the CUDA libraries and NVRTC work and CUDA runs a start-up probe faster than the CPU,
//! else CPU, with a log line saying why).
//!
//! Graph: each runtime runs the int8 file as shipped or its dequantized float rewrite
//! ([`super::dequantize`], `inference.graph`); `auto` runs the dequantized graph on CUDA
//! (tract-cuda keeps int8 convolutions on the CPU) and the int8 graph on the CPU, so the
//! `gpu-or-cpu` probe compares dequantized-on-CUDA with int8-on-the-CPU.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir;

use super::contract::{InputSpec, ModelFiles, VERTEBRAE};
use super::dequantize::{dequantize, Graph, GraphChoice};
use super::preprocess::ModelInput;

/// `(node name, op name, time)` per node of a plan, in plan order.
pub type NodeTimes = Vec<(String, String, Duration)>;

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
    /// threads (see [`SlicePlan`]) instead of as one graph.
    pub slice_parallel: bool,
    /// Which graph each runtime runs (int8 as shipped, or dequantized at load).
    pub graph: GraphChoice,
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
    /// The same model cut in two for the CPU (see [`SlicePlan`]); None on CUDA or when
    /// the graph has no recurrent op to cut at.
    slice_plan: Option<SlicePlan>,
    /// "cpu" or "cuda".
    runtime: &'static str,
    /// The graph `runnable` runs.
    graph: Graph,
    outputs: OutputIndex,
    threads: usize,
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
    /// Loads `model.json` (verifying the ONNX sha256), loads and declutters the ONNX
    /// graph with `S` symbolic, and prepares it for the chosen runtime.
    pub fn load(contract_path: &Path, options: &EngineOptions) -> Result<Engine> {
        let started = Instant::now();
        avoid_amx_int8();
        let files = ModelFiles::load(contract_path)?;
        let threads = options.threads.max(1);
        let (runtime, graph, runnable, outputs) = prepare(&files, options)?;
        let mut engine = Engine {
            files,
            runnable,
            slice_plan: None,
            runtime,
            graph,
            outputs,
            threads,
        };
        if runtime == "cpu" && options.slice_parallel {
            engine.slice_plan = engine.try_slice_plan();
        }
        if runtime == "cuda" && options.runtime == RuntimeChoice::GpuOrCpu {
            engine = engine.or_cpu_if_faster(options)?;
        }
        if engine.runtime == "cpu" && options.graph == GraphChoice::Auto {
            engine = engine.or_dequantized_if_faster(options)?;
        }
        log::info!(
            "model {} {} ({}) ready on runtime {} graph {} with {threads} CPU threads{} in {:.2} s",
            engine.files.contract.name,
            engine.files.contract.version,
            engine.files.onnx_path.display(),
            engine.runtime,
            engine.graph.name(),
            if engine.slice_plan.is_some() {
                ", slices in parallel"
            } else {
                ""
            },
            started.elapsed().as_secs_f64()
        );
        Ok(engine)
    }

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

    fn read_outputs(&self, slices: usize, outputs: &[TValue]) -> Result<ModelOutputs> {
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

/// tract 0.23.9's AMX int8 matrix kernel (x86_64 Sapphire Rapids and later) crashes with
/// SIGSEGV when it runs on any thread but the process's main one, and the daemon runs the
/// model on worker threads. So AMX int8 is taken out of tract's kernel choice (AVX-512 VNNI
/// and AVX2 kernels remain) unless `TRACT_CPU_ISA` is already set. Must run before tract
/// probes the CPU, i.e. before the first model is loaded (public for code that loads
/// models with tract directly, such as tests/model.rs).
pub fn avoid_amx_int8() {
    #[cfg(target_arch = "x86_64")]
    if std::env::var_os("TRACT_CPU_ISA").is_none() {
        std::env::set_var("TRACT_CPU_ISA", "-amx-int8");
    }
}

/// Runs one plan any number of times, summing each node's time over the runs.
struct PlanTimer {
    state: TypedSimpleState,
    times: BTreeMap<usize, Duration>,
}

impl PlanTimer {
    fn new(plan: &Arc<TypedRunnableModel>) -> TractResult<PlanTimer> {
        Ok(PlanTimer {
            state: plan.spawn()?,
            times: BTreeMap::new(),
        })
    }

    fn run(&mut self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let times = &mut self.times;
        self.state
            .run_plan_with_eval(inputs, |ctx, op_state, node, inputs| {
                let t = Instant::now();
                let r = tract_onnx::tract_core::plan::eval(ctx, op_state, node, inputs);
                *times.entry(node.id).or_default() += t.elapsed();
                r
            })
    }

    /// `(prefix + node name, op name, time)` per node, in plan order.
    fn node_times(&self, prefix: &str) -> NodeTimes {
        let model = self.state.plan().model();
        self.times
            .iter()
            .map(|(&id, &t)| {
                let node = model.node(id);
                (
                    format!("{prefix}{}", node.name),
                    node.op().name().to_string(),
                    t,
                )
            })
            .collect()
    }
}

fn input_tensor(input: ModelInput) -> Result<Tensor> {
    let shape = [input.slices, 3, input.height, input.width];
    Ok(tract_ndarray::Array4::from_shape_vec(shape, input.tensor)
        .context("model input has the wrong length")?
        .into_tensor())
}

/// The ONNX protobuf of `graph`: the file as shipped, or its dequantized rewrite.
fn load_proto(files: &ModelFiles, graph: Graph) -> Result<tract_onnx::pb::ModelProto> {
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

/// What [`prepare`] returns: runtime name, graph, plan, output indices.
type Prepared = (&'static str, Graph, Arc<dyn Runnable>, OutputIndex);

/// The CPU plan of `options.graph`'s CPU graph.
fn prepare_cpu_graph(files: &ModelFiles, options: &EngineOptions) -> Result<Prepared> {
    let graph = options.graph.for_runtime(false);
    let model = load_decluttered(files, graph)?;
    let outputs = output_index(&model, files)?;
    Ok(("cpu", graph, prepare_cpu(model)?, outputs))
}

#[cfg(not(feature = "gpu"))]
fn prepare(files: &ModelFiles, options: &EngineOptions) -> Result<Prepared> {
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
fn prepare(files: &ModelFiles, options: &EngineOptions) -> Result<Prepared> {
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
struct SlicePlan {
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

impl Engine {
    /// `gpu-or-cpu` keeps CUDA only if it runs the model faster than the CPU. tract-cuda
    /// does not offload every op: 0.23.9 runs int8 convolutions on the CPU and copies their
    /// tensors to and from the GPU, so the committed int8 model ran 4-6x slower on an H200
    /// than on its 16 CPU threads (BENCHMARKS.md); with `graph = "auto"` CUDA therefore
    /// runs the dequantized graph and the CPU the int8 one. Which wins depends on the model
    /// and the box, so it is measured: a probe input of typical size, one warm-up run and
    /// the best of three timed runs on each runtime.
    fn or_cpu_if_faster(self, options: &EngineOptions) -> Result<Engine> {
        let cpu = self.cpu_engine(options)?;
        let spec = &self.files.contract.input;
        let slices = PROBE_SLICES.clamp(spec.min_slices.max(3), spec.max_slices.max(3));
        let input = probe_input(spec, slices);
        let cuda_time = self.probe_time(&input)?;
        let cpu_time = cpu.probe_time(&input)?;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        if cuda_time <= cpu_time {
            log::info!(
                "runtime gpu-or-cpu: cuda ({} graph) ran the {slices}-slice probe in {:.0} ms, \
                 cpu ({} graph) in {:.0} ms: using cuda",
                self.graph.name(),
                ms(cuda_time),
                cpu.graph.name(),
                ms(cpu_time)
            );
            Ok(self)
        } else {
            log::warn!(
                "runtime gpu-or-cpu: cuda ({} graph) ran the {slices}-slice probe in {:.0} ms, \
                 cpu ({} graph) in {:.0} ms: using cpu (runtime \"cuda\" forces the GPU)",
                self.graph.name(),
                ms(cuda_time),
                cpu.graph.name(),
                ms(cpu_time)
            );
            Ok(cpu)
        }
    }

    /// A CPU engine for the same model files with `options` (its slice plan included), for
    /// the start-up probes to compare against this one.
    fn cpu_engine(&self, options: &EngineOptions) -> Result<Engine> {
        let (runtime, graph, runnable, outputs) = prepare_cpu_graph(&self.files, options)?;
        let mut cpu = Engine {
            files: self.files.clone(),
            runnable,
            slice_plan: None,
            runtime,
            graph,
            outputs,
            threads: self.threads,
        };
        if options.slice_parallel {
            cpu.slice_plan = cpu.try_slice_plan();
        }
        Ok(cpu)
    }

    /// `graph = "auto"` on the CPU keeps the int8 graph only if it runs the probe faster
    /// than the dequantized one. Both give the same statuses (probabilities within 3.3e-7
    /// on 20 phantoms, BENCHMARKS.md); which is faster depends on the CPU: tract's int8
    /// kernels need AVX-512 VNNI (or arm64 dot products) to be fast, and on an AVX2-only
    /// x86 the int8 graph ran 15x slower than the dequantized one.
    fn or_dequantized_if_faster(self, options: &EngineOptions) -> Result<Engine> {
        let forced = EngineOptions {
            graph: GraphChoice::Dequantized,
            ..options.clone()
        };
        let other = self.cpu_engine(&forced)?;
        // Smaller and shorter than the CUDA probe: where int8 is slow it costs seconds at
        // every start, and a 15x gap needs no best-of-three to be seen.
        let spec = &self.files.contract.input;
        let slices = GRAPH_PROBE_SLICES.clamp(spec.min_slices.max(3), spec.max_slices.max(3));
        let input = probe_input(spec, slices);
        let time_once = |engine: &Engine| -> Result<Duration> {
            engine.run(input.clone())?;
            let started = Instant::now();
            engine.run(input.clone())?;
            Ok(started.elapsed())
        };
        let mine = time_once(&self)?;
        let theirs = time_once(&other)?;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let (keep, why) = if mine <= theirs {
            (self, "int8")
        } else {
            (other, "dequantized")
        };
        log::info!(
            "graph auto on the cpu: int8 ran the {slices}-slice probe in {:.0} ms, dequantized \
             in {:.0} ms: using {why}",
            ms(mine),
            ms(theirs)
        );
        Ok(keep)
    }

    /// The best of three timed runs on a probe input, after one warm-up run.
    fn probe_time(&self, input: &ModelInput) -> Result<Duration> {
        self.run(input.clone())?;
        let mut best = Duration::MAX;
        for _ in 0..3 {
            let input = input.clone();
            let started = Instant::now();
            self.run(input)?;
            best = best.min(started.elapsed());
        }
        Ok(best)
    }

    fn try_slice_plan(&self) -> Option<SlicePlan> {
        match SlicePlan::build(&self.files, self.graph) {
            Ok(None) => None,
            Ok(Some(plan)) => match self.check_slice_plan(&plan) {
                Ok(()) => Some(plan),
                Err(e) => {
                    log::warn!("not running slices in parallel: {e:#}");
                    None
                }
            },
            Err(e) => {
                log::warn!("not running slices in parallel: cannot cut the model: {e:#}");
                None
            }
        }
    }

    /// The cut plan must reproduce the whole graph (same kernels up to summation order).
    fn check_slice_plan(&self, plan: &SlicePlan) -> Result<()> {
        let spec = &self.files.contract.input;
        let s = spec.min_slices.max(3);
        let input = probe_input(spec, s);
        let whole = self.run_whole(input.clone())?;
        let cut = self.read_outputs(s, &plan.run(input, self.threads)?)?;
        let close = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .all(|(x, y)| (x - y).abs() <= 1e-3 * (1.0 + x.abs().max(y.abs())))
        };
        ensure!(
            close(&whole.seg_logits, &cut.seg_logits)
                && close(&whole.vertebra_logits, &cut.vertebra_logits)
                && close(&[whole.patient_logit], &[cut.patient_logit])
                && close(&whole.attention, &cut.attention),
            "the per-slice cut of the model does not reproduce the whole graph"
        );
        Ok(())
    }
}

/// Model slices of the `gpu-or-cpu` probe: about a cervical spine at the contract's 2 mm.
const PROBE_SLICES: usize = 96;
/// Model slices of the CPU graph probe (`graph = "auto"`): one warm-up and one timed run.
const GRAPH_PROBE_SLICES: usize = 24;

/// A deterministic input of `slices` model slices with values in [0, 1) (xorshift), for the
/// checks and timings made at load.
fn probe_input(spec: &InputSpec, slices: usize) -> ModelInput {
    let hw = spec.height * spec.width;
    let mut state = 0x2545F491u32;
    let tensor: Vec<f32> = (0..slices * 3 * hw)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state >> 8) as f32 / (1u32 << 24) as f32
        })
        .collect();
    ModelInput {
        tensor,
        slices,
        height: spec.height,
        width: spec.width,
        grid: super::preprocess::ModelGrid {
            centre: [0.0; 3],
            z_mm: vec![0.0; slices],
        },
    }
}

impl SlicePlan {
    /// Ok(None) when the graph has no recurrent op to cut at.
    fn build(files: &ModelFiles, graph: Graph) -> Result<Option<SlicePlan>> {
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
    fn run(&self, input: ModelInput, threads: usize) -> TractResult<TVec<TValue>> {
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
    fn run_profiled(&self, input: ModelInput) -> TractResult<(TVec<TValue>, NodeTimes)> {
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

/// Where the ONNX graph is cut between its per-slice and across-slices parts (names of
/// ONNX tensors; ONNX nodes are stored in topological order).
struct GraphSplit {
    /// Every tensor computed downstream of a recurrent op (its outputs included).
    across: std::collections::HashSet<String>,
    /// Tensors computed from the model input by per-slice nodes and read by across-slices
    /// nodes, in the order the graph first reads them.
    cuts: Vec<String>,
}

impl GraphSplit {
    /// None when the graph has no recurrent op. Nodes writing a tensor of `forced` belong
    /// to the across-slices part too.
    fn of(
        graph: &tract_onnx::pb::GraphProto,
        forced: &std::collections::HashSet<String>,
    ) -> Option<GraphSplit> {
        use std::collections::HashSet;
        let initializers: HashSet<&str> = graph.initializer.iter().map(|t| &*t.name).collect();
        // Tensors that depend on the model input (constants and weights do not).
        let mut from_input: HashSet<&str> = graph
            .input
            .iter()
            .map(|i| &*i.name)
            .filter(|n| !initializers.contains(n))
            .collect();
        let mut across: HashSet<String> = HashSet::new();
        let mut cuts: Vec<String> = vec![];
        for node in &graph.node {
            let recurrent = matches!(node.op_type.as_str(), "GRU" | "LSTM" | "RNN");
            let is_across = recurrent
                || node.input.iter().any(|i| across.contains(i.as_str()))
                || node.output.iter().any(|o| forced.contains(o));
            if is_across {
                for i in &node.input {
                    if from_input.contains(i.as_str())
                        && !across.contains(i.as_str())
                        && !cuts.contains(i)
                    {
                        cuts.push(i.clone());
                    }
                }
                across.extend(node.output.iter().cloned());
            }
            if node.input.iter().any(|i| from_input.contains(i.as_str())) {
                from_input.extend(node.output.iter().map(|o| &**o));
            }
        }
        (!cuts.is_empty()).then_some(GraphSplit { across, cuts })
    }
}
