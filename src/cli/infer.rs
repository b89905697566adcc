//! `cspine-triage infer PATH...`: the daemon's pipeline offline, on DICOM files or folders.
//! One result per series, JSON lines with `--json`, a human summary otherwise.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use crate::inference::{GraphChoice, InferenceConfig, Pipeline, RuntimeChoice};
use crate::result::{Status, TriageResult};
use crate::series::{FailReason, SeriesOutcome};

#[derive(Debug, clap::Args)]
pub struct InferArgs {
    /// DICOM folders (searched recursively) or files.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Print results as JSON, one line per series.
    #[arg(long)]
    pub json: bool,
    /// Write the key image of each result to DIR/<result id>.png.
    #[arg(long, value_name = "DIR")]
    pub keyimage: Option<PathBuf>,
    /// The model contract (model.json; the ONNX file lies next to it).
    #[arg(
        long,
        env = "CSPINE_TRIAGE_MODEL",
        default_value = "/usr/share/cspine-triage/model/model.json"
    )]
    pub model: PathBuf,
    /// Threads for the model and preprocessing.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// gpu-or-cpu (CUDA when usable and faster on a start-up probe), cuda or cpu.
    #[arg(long, value_enum, default_value_t = RuntimeChoice::GpuOrCpu)]
    pub runtime: RuntimeChoice,
    /// Writable directory for the kernels tract-cuda compiles.
    #[arg(long, default_value = "/var/cache/cspine-triage")]
    pub cuda_cache_dir: PathBuf,
    /// Run the model as one graph with multithreaded kernels instead of slices in parallel.
    #[arg(long)]
    pub no_slice_parallel: bool,
    /// Which graph each runtime runs: auto (dequantized on CUDA; on the CPU the faster of the two on a start-up probe), int8
    /// (the file as shipped) or dequantized (int8 weights dequantized to float at load).
    #[arg(long, value_enum, default_value_t = GraphChoice::Auto)]
    pub graph: GraphChoice,
    /// Time every node of the model and print the totals per op to stderr (CPU only).
    #[arg(long)]
    pub profile: bool,
    /// Analyse series outside the model's acquisition envelope (pixel spacing, slice
    /// spacing and thickness, kernel, coverage) instead of answering `indeterminate`, and
    /// say so on stderr: for evaluating the model on data the daemon would refuse. The
    /// daemon always enforces the envelope.
    #[arg(long)]
    pub ignore_envelope: bool,
}

pub fn run(args: &InferArgs) -> Result<()> {
    for p in &args.paths {
        if !p.exists() {
            bail!("{} does not exist", p.display());
        }
    }
    let report = crate::series::load_series_report(&args.paths, &[])?;
    for skip in &report.skipped {
        eprintln!(
            "not analysed: series {} ({} instance(s)): {}",
            skip.key.series, skip.instances, skip.reason
        );
    }
    if report.studies.is_empty() {
        bail!(
            "no CT series to analyse in {} ({} series skipped, {} unreadable file(s))",
            args.paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            report.skipped.len(),
            report.unreadable.len()
        );
    }
    let config = InferenceConfig {
        model: args.model.clone(),
        threads: args.threads,
        runtime: args.runtime,
        cuda_cache_dir: args.cuda_cache_dir.clone(),
        slice_parallel: !args.no_slice_parallel,
        graph: args.graph,
        ..InferenceConfig::default()
    };
    let pipeline = Pipeline::load(&config)?;
    let pipeline = if args.ignore_envelope {
        pipeline.ignoring_envelope()
    } else {
        pipeline
    };
    // Volumes keep what the model reads of each slice, as in the daemon.
    let window = pipeline.volume_window();
    if let Some(dir) = &args.keyimage {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create key image directory {}", dir.display()))?;
    }

    let bar = if report.studies.len() > 1 {
        let bar = ProgressBar::new(report.studies.len() as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} series, {elapsed} elapsed, ETA {eta}",
            )
            .expect("static template"),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let mut failures = 0;
    let stdout = std::io::stdout();
    for study in report.studies {
        let (result, key_image, timing) = match study.build(Some(&window)) {
            SeriesOutcome::Volume(volume) => match pipeline.analyze_with(&volume, args.profile) {
                Ok(a) => {
                    if let Some(profile) = &a.profile {
                        bar.suspend(|| print_profile(profile));
                    }
                    if args.ignore_envelope && !a.outside_envelope.is_empty() {
                        let list: Vec<String> =
                            a.outside_envelope.iter().map(ToString::to_string).collect();
                        bar.suspend(|| {
                            eprintln!(
                                "series {}: outside the acquisition envelope, analysed anyway \
                                 (--ignore-envelope): {}",
                                volume.meta.series_instance_uid,
                                list.join("; ")
                            )
                        });
                    }
                    let timing = format!(
                        "{} slices, preprocess {:.3} s, model {:.3} s",
                        volume.dims[0],
                        a.preprocess_time.as_secs_f64(),
                        a.model_time.as_secs_f64()
                    );
                    (a.result, a.key_image_png, timing)
                }
                Err(cause) => {
                    let m = pipeline.process(SeriesOutcome::Failed {
                        meta: volume.meta.clone(),
                        reason: FailReason::Inference { cause },
                    });
                    (m.result, None, String::new())
                }
            },
            failed @ SeriesOutcome::Failed { .. } => {
                (pipeline.process(failed).result, None, String::new())
            }
        };
        if result.status == Status::Failed {
            failures += 1;
        }
        if let (Some(dir), Some(png)) = (&args.keyimage, &key_image) {
            let path = dir.join(format!("{}.png", result.id));
            std::fs::write(&path, png)
                .with_context(|| format!("cannot write key image {}", path.display()))?;
        }
        let line = if args.json {
            serde_json::to_string(&result)?
        } else {
            summary(&result, &timing)
        };
        bar.suspend(|| writeln!(stdout.lock(), "{line}"))?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    // A file named on the command line must be DICOM; other files met while walking a
    // folder (CSV, JSON, NIfTI next to the images) are only mentioned.
    let mut named_unreadable = 0;
    for (path, err) in &report.unreadable {
        if args.paths.iter().any(|p| p == path) {
            named_unreadable += 1;
            eprintln!("unreadable: {}: {err}", path.display());
        } else {
            eprintln!("skipped (not DICOM): {}", path.display());
        }
    }
    if named_unreadable > 0 {
        bail!("{named_unreadable} input file(s) could not be read as DICOM");
    }
    if failures > 0 {
        bail!("{failures} series could not be analysed (see their reason)");
    }
    Ok(())
}

/// One human-readable line per result.
fn summary(r: &TriageResult, timing: &str) -> String {
    let mut s = format!(
        "{}: {}",
        r.series_instance_uid,
        format!("{:?}", r.status).to_uppercase()
    );
    if let Some(reason) = &r.reason {
        s += &format!(" ({reason})");
    }
    if let Some(p) = &r.patient {
        s += &format!(
            "; patient p={:.3} (threshold {:.2})",
            p.probability, p.threshold
        );
    }
    let flagged: Vec<String> = r
        .vertebrae
        .iter()
        .filter(|(_, v)| v.flagged)
        .map(|(name, v)| {
            let mut s = match v.z_range_mm {
                Some([a, b]) => format!("{name} p={:.3} z {a:.1}..{b:.1} mm", v.probability),
                None => format!("{name} p={:.3}", v.probability),
            };
            if let Some(k) = &v.key_slice {
                s += &format!(" (key z {:.1} mm)", k.z_mm);
            }
            s
        })
        .collect();
    if !flagged.is_empty() {
        s += &format!("; flagged {}", flagged.join(", "));
    }
    if let Some(missing) = r.not_covered.as_ref().filter(|m| !m.is_empty()) {
        s += &format!("; not covered {}", missing.join(", "));
    }
    if let Some(k) = &r.key_slice {
        s += &format!("; key slice {} at z {:.1} mm", k.sop_instance_uid, k.z_mm);
    }
    if !timing.is_empty() {
        s += &format!(" [{timing}, runtime {}]", r.runtime);
    }
    s
}

/// The ONNX node a tract node was derived from: its name up to the first `.` or `_` after the
/// last `/`.
fn onnx_layer(node: &str) -> &str {
    let base = node.rfind('/').map_or(0, |i| i + 1);
    let end = node[base..]
        .find(['.', '_'])
        .map_or(node.len(), |i| base + i);
    &node[..end]
}

/// Totals per op type, per ONNX layer and the slowest nodes, to stderr.
fn print_profile(profile: &[(String, String, Duration)]) {
    let total: Duration = profile.iter().map(|p| p.2).sum();
    let mut by_op: BTreeMap<&str, (Duration, usize)> = BTreeMap::new();
    for (_, op, t) in profile {
        let e = by_op.entry(op.as_str()).or_default();
        e.0 += *t;
        e.1 += 1;
    }
    let mut ops: Vec<_> = by_op.into_iter().collect();
    ops.sort_by_key(|o| std::cmp::Reverse(o.1 .0));
    eprintln!(
        "profile: {:.1} ms in {} nodes",
        total.as_secs_f64() * 1e3,
        profile.len()
    );
    for (op, (t, n)) in ops.iter().take(12) {
        eprintln!(
            "  op {op:<28} {:>9.1} ms {:>5.1}% ({n} nodes)",
            t.as_secs_f64() * 1e3,
            100.0 * t.as_secs_f64() / total.as_secs_f64().max(1e-12)
        );
    }
    // tract names the nodes it derives from an ONNX node after it ("/dec2/a/a.0/Conv" gives
    // "/dec2/a/a.0/Conv_quant.im2col", ".max", ...): their sum is what that layer costs.
    let mut by_layer: BTreeMap<&str, Duration> = BTreeMap::new();
    for (name, _, t) in profile {
        *by_layer.entry(onnx_layer(name)).or_default() += *t;
    }
    let mut layers: Vec<_> = by_layer.into_iter().collect();
    layers.sort_by_key(|l| std::cmp::Reverse(l.1));
    for (layer, t) in layers.iter().take(12) {
        eprintln!("  layer {layer:<50} {:>9.1} ms", t.as_secs_f64() * 1e3);
    }
    let mut nodes: Vec<_> = profile.iter().collect();
    nodes.sort_by_key(|n| std::cmp::Reverse(n.2));
    for (name, op, t) in nodes.iter().take(12) {
        eprintln!(
            "  node {name:<40} {op:<24} {:>9.1} ms",
            t.as_secs_f64() * 1e3
        );
    }
}
