//! [`Engine::load`] and the choices made at start-up: AMX int8 kept out of tract's kernels,
//! the `gpu-or-cpu` probe (CUDA only if faster than the CPU), the `graph = "auto"` probe on
//! the CPU, and the slice plan checked against the whole graph before it is used.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};

use super::options::{EngineOptions, RuntimeChoice};
use super::prepare::{prepare, prepare_cpu_graph};
use super::run::Engine;
use super::slices::SlicePlan;
use crate::inference::contract::{InputSpec, ModelFiles};
use crate::inference::dequantize::GraphChoice;
use crate::inference::preprocess::ModelInput;

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
        grid: crate::inference::preprocess::ModelGrid {
            centre: [0.0; 3],
            z_mm: vec![0.0; slices],
        },
    }
}
