//! Inference: preprocessing as `models/model.json` specifies, the tract engine, and
//! postprocessing into a [`crate::result::TriageResult`].
//!
//! - [`contract`]: `model.json` and the ONNX sha256 check.
//! - [`envelope`]: the acquisitions the model was trained on; outside them `indeterminate`.
//! - [`preprocess`]: CT volume -> `[S, 3, 128, 128]` model input.
//! - [`engine`]: tract (CPU, or CUDA with the `cuda` feature), prepared once.
//! - [`dequantize`]: the int8 graph rewritten to float at load (what CUDA runs).
//! - [`postprocess`]: probabilities, flags, localization, partial coverage, `indeterminate`.
//! - [`keyimage`]: the PNG of the key slice.
//!
//! [`Pipeline::analyze`] chains them for one volume; [`run_inference`] is the daemon stage
//! (its events go to the handle of [`Pipeline::with_events`]).

pub mod contract;
pub mod dequantize;
pub mod engine;
pub mod envelope;
pub mod keyimage;
pub mod postprocess;
pub mod preprocess;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::mpsc;

use crate::events::{AnalysisStatus, EarlyWithholdReason, Event, Events};
use crate::heartbeat::Heartbeat;

use crate::result::{ResultMessage, TriageResult};
use crate::series::{
    CtVolume, DropReason, FailReason, Feedback, SeriesKey, SeriesMeta, SeriesOutcome,
};
use crate::test_hooks::TestHooks;
use contract::VERTEBRAE;
pub use dequantize::GraphChoice;
pub use engine::RuntimeChoice;
use engine::{Engine, EngineOptions};
use envelope::{Acquisition, EnvelopePolicy};
use postprocess::{RunInfo, Thresholds};
use preprocess::Sampled;

/// `[inference]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InferenceConfig {
    /// The model contract; the ONNX file is found next to it.
    pub model: PathBuf,
    /// Threads for tract's kernels and for preprocessing.
    pub threads: usize,
    /// "gpu-or-cpu" (CUDA when usable and faster than the CPU on a start-up probe, else
    /// CPU), "cuda" (fail without it) or "cpu".
    pub runtime: RuntimeChoice,
    /// Writable directory where tract-cuda keeps the kernels NVRTC compiled.
    pub cuda_cache_dir: PathBuf,
    /// Overrides `thresholds.patient` of model.json.
    pub patient_threshold: Option<f32>,
    /// Overrides entries of `thresholds.vertebrae` of model.json (keys C1..C7).
    pub vertebra_thresholds: BTreeMap<String, f32>,
    /// On the CPU, run the per-slice part of the model one slice per thread at a time
    /// (faster with tract; off runs the graph whole with multithreaded kernels).
    pub slice_parallel: bool,
    /// Which graph each runtime runs: "auto" (default: the dequantized float graph on
    /// CUDA; on the CPU the int8 file as shipped or the dequantized graph, whichever runs
    /// a start-up probe faster), "int8" or "dequantized" (the int8 weights dequantized to
    /// float at load; see `inference::dequantize`).
    pub graph: GraphChoice,
}

impl Default for InferenceConfig {
    fn default() -> Self {
        InferenceConfig {
            model: PathBuf::from("/usr/share/cspine-triage/model/model.json"),
            threads: 2,
            runtime: RuntimeChoice::GpuOrCpu,
            cuda_cache_dir: PathBuf::from("/var/cache/cspine-triage"),
            patient_threshold: None,
            vertebra_thresholds: BTreeMap::new(),
            slice_parallel: true,
            graph: GraphChoice::Auto,
        }
    }
}

impl InferenceConfig {
    pub fn validate(&self) -> Result<()> {
        ensure!(
            (1..=256).contains(&self.threads),
            "inference.threads must be 1 to 256, got {}",
            self.threads
        );
        let valid = |t: f32| (0.0..=1.0).contains(&t);
        if let Some(t) = self.patient_threshold {
            ensure!(
                valid(t),
                "inference.patient_threshold must be in [0, 1], got {t}"
            );
        }
        for (k, &t) in &self.vertebra_thresholds {
            ensure!(
                VERTEBRAE.contains(&k.as_str()),
                "inference.vertebra_thresholds: unknown vertebra {k:?} (use C1..C7)"
            );
            ensure!(
                valid(t),
                "inference.vertebra_thresholds.{k} must be in [0, 1], got {t}"
            );
        }
        Ok(())
    }

    pub fn engine_options(&self) -> Result<EngineOptions> {
        Ok(EngineOptions {
            runtime: self.runtime,
            threads: self.threads,
            cuda_cache_dir: self.cuda_cache_dir.clone(),
            slice_parallel: self.slice_parallel,
            graph: self.graph,
        })
    }
}

/// Everything one series produced.
#[derive(Debug, Clone)]
pub struct Analysis {
    pub result: TriageResult,
    pub key_image_png: Option<Vec<u8>>,
    /// Where the time went (not published; the CLI and benchmarks print it).
    pub preprocess_time: Duration,
    pub model_time: Duration,
    /// `(node, op, time)` per node of the plan, when asked for.
    pub profile: Option<Vec<(String, String, Duration)>>,
    /// For an early analysis (`meta.early`, the anatomy-coverage trigger): why it must not
    /// be published; `None` when it may (or for an ordinary analysis).
    pub early_rejection: Option<EarlyWithholdReason>,
    /// How the series lies outside the model's acquisition envelope (empty: inside, or no
    /// envelope in the contract). The result is then `indeterminate`, unless the pipeline
    /// ignores the envelope ([`Pipeline::ignoring_envelope`]) and analysed it anyway.
    pub outside_envelope: Vec<envelope::Violation>,
}

impl Analysis {
    /// An `indeterminate` analysis for which the model did not run (`reason`), as of now.
    fn not_run(
        volume: &CtVolume,
        mut run: RunInfo,
        reason: &str,
        started: Instant,
        outside_envelope: Vec<envelope::Violation>,
    ) -> Analysis {
        run.inference_end = Some(OffsetDateTime::now_utc());
        Analysis {
            early_rejection: volume
                .meta
                .early
                .map(|_| EarlyWithholdReason::NotConclusive {
                    status: AnalysisStatus::Indeterminate,
                    reason: Some(reason.to_string()),
                }),
            result: postprocess::indeterminate_result(&volume.meta, &run, reason),
            key_image_png: None,
            preprocess_time: started.elapsed(),
            model_time: Duration::ZERO,
            profile: None,
            outside_envelope,
        }
    }
}

/// The volume [`Pipeline::analyze_volume`] reads: borrowed, or its own to free early.
enum VolumeAccess<'a> {
    Shared(&'a CtVolume),
    Owned(&'a mut CtVolume),
}

impl VolumeAccess<'_> {
    fn volume(&self) -> &CtVolume {
        match self {
            VolumeAccess::Shared(v) => v,
            VolumeAccess::Owned(v) => v,
        }
    }
}

/// What [`Pipeline::process_early`] decided.
#[derive(Debug)]
pub enum Processed {
    /// Publish it.
    Publish(ResultMessage),
    /// An early analysis (anatomy-coverage trigger) that did not pass the coverage check:
    /// not published; the series is analysed again when it completes.
    Withhold {
        message: ResultMessage,
        reason: EarlyWithholdReason,
    },
}

/// The engine plus the thresholds in effect: loaded once, used for every series.
#[derive(Debug)]
pub struct Pipeline {
    pub engine: Engine,
    pub thresholds: Thresholds,
    /// Private: only [`Pipeline::ignoring_envelope`] (the `infer` CLI) relaxes it.
    envelope_policy: EnvelopePolicy,
    /// Test hook (`CSPINE_TEST_EARLY_ACCEPT`, [`Pipeline::with_test_hooks`]): every early
    /// analysis is published, coverage check or not.
    early_accept: bool,
    /// Where inference starts and model runs are recorded ([`Pipeline::with_events`]).
    events: Events,
}

impl Pipeline {
    pub fn load(config: &InferenceConfig) -> Result<Pipeline> {
        config.validate()?;
        let engine = Engine::load(&config.model, &config.engine_options()?)?;
        let thresholds = Thresholds::resolve(
            &engine.files.contract,
            config.patient_threshold,
            &config.vertebra_thresholds,
        );
        Ok(Pipeline {
            engine,
            thresholds,
            envelope_policy: EnvelopePolicy::Enforce,
            early_accept: false,
            events: Events::default(),
        })
    }

    /// This pipeline recording on `events` when inference starts on a volume and when the
    /// model has run ([`Event::InferenceStarted`], [`Event::InferenceDone`]).
    pub fn with_events(self, events: Events) -> Pipeline {
        Pipeline { events, ..self }
    }

    /// This pipeline under the test hooks `serve` read ([`TestHooks::early_accept`]:
    /// early analyses published whatever the coverage check says, so that tests can
    /// exercise the anatomy-coverage trigger's plumbing whatever the model finds in a
    /// partial slab).
    pub fn with_test_hooks(self, hooks: &TestHooks) -> Pipeline {
        Pipeline {
            early_accept: hooks.early_accept,
            ..self
        }
    }

    /// This pipeline analysing series outside the model's acquisition envelope instead of
    /// answering `indeterminate`: for `cspine-triage infer --ignore-envelope` (evaluation
    /// on data the product would refuse). The daemon never calls it.
    pub fn ignoring_envelope(self) -> Pipeline {
        Pipeline {
            envelope_policy: EnvelopePolicy::Ignore,
            ..self
        }
    }

    /// What volumes built for this model need keep of each slice
    /// ([`preprocess::volume_window`]).
    pub fn volume_window(&self) -> crate::series::VolumeWindow {
        preprocess::volume_window(&self.engine.files.contract.input)
    }

    /// Name, version and sha256 of the loaded model, as results and the status topic report it.
    pub fn model_info(&self) -> crate::result::ModelInfo {
        self.run_info().model
    }

    fn run_info(&self) -> RunInfo {
        RunInfo::new(&self.engine.files.contract, self.engine.runtime())
    }

    /// Analyses one volume. Errors are for the caller to turn into a `failed` result.
    pub fn analyze(&self, volume: &CtVolume) -> Result<Analysis> {
        self.analyze_with(volume, false)
    }

    /// As [`Pipeline::analyze`]; with `profile`, every node of the model is timed (CPU only).
    pub fn analyze_with(&self, volume: &CtVolume, profile: bool) -> Result<Analysis> {
        self.analyze_volume(VolumeAccess::Shared(volume), profile)
    }

    /// As [`Pipeline::analyze`], freeing the volume's voxels as soon as the model planes are
    /// sampled: the daemon's peak memory is then the volume or the model, not both.
    pub fn analyze_releasing(&self, volume: &mut CtVolume) -> Result<Analysis> {
        self.analyze_volume(VolumeAccess::Owned(volume), false)
    }

    fn analyze_volume(&self, mut access: VolumeAccess<'_>, profile: bool) -> Result<Analysis> {
        let contract = &self.engine.files.contract;
        let mut run = self.run_info();
        run.inference_start = Some(OffsetDateTime::now_utc());
        let t0 = Instant::now();
        let sampled =
            preprocess::sample_planes(access.volume(), &contract.input, self.engine.threads())?;
        if let VolumeAccess::Owned(v) = &mut access {
            // Only geometry and slice records are read from here on.
            v.voxels = Vec::new();
        }
        let volume = access.volume();
        let planes = match sampled {
            Sampled::TooShort { slices, min_slices } => {
                let reason = format!(
                    "{}: {slices} model slice(s) of {} mm, at least {min_slices} needed",
                    postprocess::REASON_TOO_SHORT,
                    contract.input.spacing_mm.slice
                );
                return Ok(Analysis::not_run(volume, run, &reason, t0, Vec::new()));
            }
            Sampled::Planes(planes) => planes,
        };
        let outside_envelope = match &contract.envelope {
            Some(envelope) => envelope.check(&Acquisition::of_volume(volume)),
            None => Vec::new(),
        };
        if !outside_envelope.is_empty() && self.envelope_policy == EnvelopePolicy::Enforce {
            let reason = envelope::reason(&outside_envelope);
            return Ok(Analysis::not_run(
                volume,
                run,
                &reason,
                t0,
                outside_envelope,
            ));
        }
        let input = planes.to_input();
        // The copies into the three channels are preprocessing too.
        let preprocess_time = t0.elapsed();
        let grid = input.grid.clone();
        let t1 = Instant::now();
        let (outputs, profile) = if profile {
            let (outputs, profile) = self.engine.run_profiled(input)?;
            (outputs, Some(profile))
        } else {
            (self.engine.run(input)?, None)
        };
        let model_time = t1.elapsed();
        run.inference_end = Some(OffsetDateTime::now_utc());
        log::info!(
            "series {}: {} model slices, preprocess {:.3} s, model {:.3} s on {}",
            volume.meta.series_instance_uid,
            outputs.slices,
            preprocess_time.as_secs_f64(),
            model_time.as_secs_f64(),
            self.engine.runtime()
        );
        self.events.emit(Event::InferenceDone {
            study_instance_uid: volume.meta.study_instance_uid.clone(),
            series_instance_uid: volume.meta.series_instance_uid.clone(),
            model_slices: outputs.slices,
            preprocess_secs: preprocess_time.as_secs_f64(),
            model_secs: model_time.as_secs_f64(),
        });
        let verdict = postprocess::interpret(
            volume,
            &grid,
            &outputs,
            contract,
            &self.thresholds,
            &run,
            self.envelope_policy,
        );
        let mut outside_envelope = outside_envelope;
        outside_envelope.extend(verdict.coverage_violation.clone());
        let early_rejection = volume.meta.early.and_then(|check| {
            use crate::result::Status;
            match verdict.result.status {
                Status::Positive | Status::Negative => {
                    postprocess::early_coverage(&outputs, &grid, &contract.coverage, &check).err()
                }
                status => Some(EarlyWithholdReason::NotConclusive {
                    status: status.into(),
                    reason: verdict.result.reason.clone(),
                }),
            }
        });
        let key_image_png = match verdict.key_model_slice {
            Some(k) => {
                let seg = postprocess::seg_argmax(&outputs, k);
                Some(keyimage::render(
                    planes.plane(k),
                    (contract.input.height, contract.input.width),
                    &seg,
                    (outputs.seg_h, outputs.seg_w),
                    verdict.key_vertebra,
                )?)
            }
            None => None,
        };
        Ok(Analysis {
            result: verdict.result,
            key_image_png,
            preprocess_time,
            model_time,
            profile,
            early_rejection,
            outside_envelope,
        })
    }

    /// A series outcome to a result message; never fails (errors become `failed`).
    pub fn process(&self, outcome: SeriesOutcome) -> ResultMessage {
        match self.process_early(outcome) {
            Processed::Publish(message) | Processed::Withhold { message, .. } => message,
        }
    }

    /// [`Pipeline::process`], plus the decision on an early analysis of the
    /// anatomy-coverage trigger (`meta.early`): published only if it is `positive` or
    /// `negative` and covers C1 to C7 with a margin
    /// ([`postprocess::early_coverage`]); a failure is never published early.
    pub fn process_early(&self, outcome: SeriesOutcome) -> Processed {
        let early = match &outcome {
            SeriesOutcome::Volume(v) => v.meta.early.is_some(),
            SeriesOutcome::Failed { meta, .. } => meta.early.is_some(),
        };
        let (message, rejection) = match outcome {
            SeriesOutcome::Volume(mut volume) => match self.analyze_releasing(&mut volume) {
                Ok(a) => (
                    ResultMessage {
                        result: a.result,
                        patient_id: volume.meta.patient_id.clone(),
                        key_image_png: a.key_image_png,
                        sop_instance_uids: volume.meta.sop_instance_uids.clone(),
                        failed_better: volume.meta.failed_better.clone(),
                        source: volume.meta.source.clone(),
                    },
                    a.early_rejection,
                ),
                Err(cause) => {
                    log::error!(
                        "inference failed for series {}: {cause:#}",
                        volume.meta.series_instance_uid
                    );
                    let reason = FailReason::Inference { cause };
                    (
                        self.failed(&volume.meta, &reason),
                        Some(not_concluded(&reason)),
                    )
                }
            },
            SeriesOutcome::Failed { meta, reason } => {
                (self.failed(&meta, &reason), Some(not_concluded(&reason)))
            }
        };
        match rejection {
            Some(reason) if early && !self.early_accept => Processed::Withhold { message, reason },
            _ => Processed::Publish(message),
        }
    }

    fn failed(&self, meta: &SeriesMeta, reason: &FailReason) -> ResultMessage {
        ResultMessage {
            result: postprocess::failed_result(meta, &self.run_info(), &reason.to_string()),
            patient_id: meta.patient_id.clone(),
            key_image_png: None,
            sop_instance_uids: meta.sop_instance_uids.clone(),
            failed_better: meta.failed_better.clone(),
            source: meta.source.clone(),
        }
    }
}

/// A failure as the reason an early analysis is withheld (a failure is never published
/// early).
fn not_concluded(reason: &FailReason) -> EarlyWithholdReason {
    EarlyWithholdReason::NotConclusive {
        status: AnalysisStatus::Failed,
        reason: Some(reason.to_string()),
    }
}

/// The daemon's inference stage: one series at a time (the model already uses every
/// configured thread), on a blocking thread so the async stages keep running.
/// Ends when `rx` closes; fails only if the alert stage is gone.
pub async fn run_inference(
    pipeline: Arc<Pipeline>,
    heartbeat: Heartbeat,
    mut rx: mpsc::Receiver<SeriesOutcome>,
    tx: mpsc::Sender<ResultMessage>,
    feedback: Option<mpsc::UnboundedSender<Feedback>>,
) -> Result<()> {
    loop {
        // Test hook (CSPINE_FAULT_STALL=inference, `crate::test_hooks`): a stage stuck
        // before its next input.
        heartbeat.fault_stall_point().await;
        let Some(outcome) = heartbeat.recv(&mut rx).await else {
            break;
        };
        if let SeriesOutcome::Volume(volume) = &outcome {
            log::info!(
                "series {}: volume of {} instance(s) built, inference starts",
                volume.meta.series_instance_uid,
                volume.meta.sop_instance_uids.len()
            );
            pipeline.events.emit(Event::InferenceStarted {
                study_instance_uid: volume.meta.study_instance_uid.clone(),
                series_instance_uid: volume.meta.series_instance_uid.clone(),
                instances: volume.meta.sop_instance_uids.len(),
            });
        }
        let worker = pipeline.clone();
        let message = match tokio::task::spawn_blocking(move || worker.process_early(outcome))
            .await
            .context("inference task panicked")?
        {
            Processed::Publish(message) => message,
            Processed::Withhold { message, reason } => {
                let r = &message.result;
                log::info!(
                    "series {}: early analysis of {} instance(s) (anatomy-coverage trigger) not \
                     published: {reason}; the series is analysed again when it completes",
                    r.series_instance_uid,
                    r.instances
                );
                pipeline.events.emit(Event::EarlyAnalysisWithheld {
                    study_instance_uid: r.study_instance_uid.clone(),
                    series_instance_uid: r.series_instance_uid.clone(),
                    instances: r.instances,
                    reason: reason.kind(),
                    detail: reason.to_string(),
                });
                if let Some(feedback) = &feedback {
                    let _ = feedback.send(Feedback::Dropped {
                        series: SeriesKey::new(&r.study_instance_uid, &r.series_instance_uid),
                        reason: DropReason::EarlyWithheld(reason),
                    });
                }
                continue;
            }
        };
        log::info!(
            "series {}: {:?}{}",
            message.result.series_instance_uid,
            message.result.status,
            message
                .result
                .reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        );
        if heartbeat.send(&tx, message).await.is_err() {
            anyhow::bail!("the alert stage stopped; cannot hand over results");
        }
    }
    Ok(())
}
