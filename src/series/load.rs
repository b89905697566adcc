//! Offline loading: DICOM files or folders -> one [`SeriesOutcome`] per study, with the
//! same selection as the daemon's assembler ([`super::selection::selection`], used by
//! `cspine-triage infer`).
//!
//! Headers are read and series chosen for every study first ([`load_series_report`]);
//! pixels are decoded one study at a time ([`StudyCandidates::build`]), so that memory
//! holds one volume however many studies are given.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::header::InstanceHeader;
use super::selection::{selection, Skip, StudySelection};
use super::volume::{build_volume_within, meta_from_header, BuildError, VolumeLimits};
use super::{FailReason, FallbackFailure, SeriesMeta, SeriesOutcome, VolumeWindow};

/// Everything offline loading decided before decoding any pixel.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// One per study that had a candidate series, ordered by Study UID.
    pub studies: Vec<StudyCandidates>,
    /// Every instance group or series that was not analysed, with its reason.
    pub skipped: Vec<Skip>,
    /// Files that could not be read as DICOM (path, error).
    pub unreadable: Vec<(PathBuf, String)>,
}

/// The candidate series of one study, best first, not decoded yet.
#[derive(Debug)]
pub struct StudyCandidates {
    pub study_instance_uid: String,
    ranked: Vec<(SeriesMeta, Vec<InstanceHeader>)>,
}

impl StudyCandidates {
    /// Builds the volume of the first candidate that can be built ([`build_best`]) within
    /// the default [`VolumeLimits`]; `window` chooses what it keeps of each slice (whole
    /// slices without it).
    pub fn build(self, window: Option<&VolumeWindow>) -> SeriesOutcome {
        self.build_within(window, &VolumeLimits::default())
    }

    /// As [`StudyCandidates::build`], within `limits`.
    pub fn build_within(
        self,
        window: Option<&VolumeWindow>,
        limits: &VolumeLimits,
    ) -> SeriesOutcome {
        build_best(self.ranked, window, limits)
    }
}

/// Builds the whole volume of the chosen series of each study found in `paths` (files,
/// or folders searched recursively), all at once. Skips are logged; see
/// [`load_series_report`] to get them, or to build one study at a time.
pub fn load_series_from_paths<P: AsRef<Path>>(paths: &[P]) -> Result<Vec<SeriesOutcome>> {
    Ok(load_series_report(paths, &[])?
        .studies
        .into_iter()
        .map(|s| s.build(None))
        .collect())
}

/// Reads the headers of every file in `paths` (files, or folders searched recursively) and
/// chooses the candidate series of each study, as the daemon's assembler does, without
/// decoding pixels. `extra_bone_kernels` extends the bone-kernel rule (see
/// [`super::selection::is_bone_kernel`]).
pub fn load_series_report<P: AsRef<Path>>(
    paths: &[P],
    extra_bone_kernels: &[String],
) -> Result<LoadReport> {
    let mut files = Vec::new();
    for p in paths {
        collect_files(p.as_ref(), &mut files)?;
    }
    let mut report = LoadReport::default();
    // study -> series -> instances, ordered for deterministic output.
    let mut studies: BTreeMap<String, BTreeMap<String, Vec<InstanceHeader>>> = BTreeMap::new();
    for file in &files {
        match InstanceHeader::read(file) {
            Ok(h) => studies
                .entry(h.study_instance_uid.clone())
                .or_default()
                .entry(h.series_instance_uid.clone())
                .or_default()
                .push(h),
            Err(e) => {
                log::warn!("skipping {}: {e:#}", file.display());
                report.unreadable.push((file.clone(), format!("{e:#}")));
            }
        }
    }
    if studies.is_empty() {
        bail!(
            "no readable DICOM file among {} file(s) in {}",
            files.len(),
            paths
                .iter()
                .map(|p| p.as_ref().display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }

    choose_series(&mut report, studies, extra_bone_kernels);
    Ok(report)
}

/// The selection ([`selection`]) of each study (study -> series -> instances) into
/// `report`: its candidates, and its skips, logged.
fn choose_series(
    report: &mut LoadReport,
    studies: BTreeMap<String, BTreeMap<String, Vec<InstanceHeader>>>,
    extra_bone_kernels: &[String],
) {
    for (study_uid, series) in studies {
        let StudySelection { ranked, skips } = selection(&study_uid, series, extra_bone_kernels);
        report.skipped.extend(skips);
        if ranked.is_empty() {
            continue;
        }
        let ranked = ranked
            .into_iter()
            .map(|c| (meta_from_header(&c.instances[0]), c.instances))
            .collect();
        report.studies.push(StudyCandidates {
            study_instance_uid: study_uid,
            ranked,
        });
    }
    for skip in &report.skipped {
        log::info!(
            "not analysed: {} ({} instance(s)): {}",
            skip.key,
            skip.instances,
            skip.reason
        );
    }
}

/// Builds the first candidate series that can be built (best first). When none can, the
/// outcome is the failure of the best one, with the fallbacks' errors
/// ([`FailReason::Build`]).
pub fn build_best(
    ranked: Vec<(SeriesMeta, Vec<InstanceHeader>)>,
    window: Option<&VolumeWindow>,
    limits: &VolumeLimits,
) -> SeriesOutcome {
    let mut failures: Vec<(SeriesMeta, BuildError)> = Vec::new();
    for (mut meta, headers) in ranked {
        // Also for a failure: its result names the instances it was built from.
        meta.set_instances(&headers);
        match build_volume_within(headers, meta.clone(), window, limits) {
            Ok(mut volume) => {
                volume.meta.failed_better = failures
                    .iter()
                    .map(|(m, error)| super::FailedSeries {
                        series_instance_uid: m.series_instance_uid.clone(),
                        sop_instance_uids: m.sop_instance_uids.clone(),
                        reason: error.to_string(),
                    })
                    .collect();
                if let Some((best, error)) = failures.first() {
                    log::warn!(
                        "series {} of study {} could not be built ({error}): analysing fallback series {}",
                        best.series_instance_uid,
                        best.study_instance_uid,
                        meta.series_instance_uid
                    );
                }
                return SeriesOutcome::Volume(Box::new(volume));
            }
            Err(e) => failures.push((meta, e)),
        }
    }
    let mut failures = failures.into_iter();
    let Some((meta, error)) = failures.next() else {
        return SeriesOutcome::Failed {
            meta: SeriesMeta::default(),
            reason: FailReason::NoSeries,
        };
    };
    let reason = FailReason::Build {
        error,
        fallbacks: failures
            .map(|(fallback, error)| FallbackFailure {
                series_instance_uid: fallback.series_instance_uid,
                error,
            })
            .collect(),
    };
    log::warn!(
        "series {} of study {} failed: {reason}",
        meta.series_instance_uid,
        meta.study_instance_uid
    );
    SeriesOutcome::Failed { meta, reason }
}

/// Regular files under `path` (recursively, sorted), or `path` itself.
fn collect_files(path: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot access {}", path.display()))?;
    if meta.is_file() {
        out.push(path.to_path_buf());
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("cannot list folder {}", path.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("cannot list folder {}", path.display()))?;
    entries.sort();
    for entry in entries {
        collect_files(&entry, out)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use time::OffsetDateTime;

    use super::*;
    use crate::dicom::{Arrival, StoredInstance};
    use crate::series::selection::CT_IMAGE_STORAGE;
    use crate::series::{Assembler, AssemblyConfig};

    const STUDY: &str = "1.2.9";

    /// Slice `k` of `series`: axial ORIGINAL CT, or a localizer.
    fn slice(series: &str, k: usize, kernel: &str, thickness: f64, scout: bool) -> InstanceHeader {
        let kind = if scout { "LOCALIZER" } else { "AXIAL" };
        InstanceHeader {
            path: format!("/spool/{series}.{k}.dcm").into(),
            study_instance_uid: STUDY.into(),
            series_instance_uid: series.into(),
            sop_instance_uid: format!("{series}.{k}"),
            sop_class_uid: CT_IMAGE_STORAGE.into(),
            modality: "CT".into(),
            image_type: vec!["ORIGINAL".into(), "PRIMARY".into(), kind.into()],
            convolution_kernel: kernel.into(),
            slice_thickness: Some(thickness),
            image_position_patient: Some([0.0, 0.0, k as f64 * thickness]),
            image_orientation_patient: Some([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]),
            pixel_spacing: Some([0.5, 0.5]),
            rows: Some(512),
            columns: Some(512),
            ..Default::default()
        }
    }

    /// A study as a scanner sends it: a scout, soft-tissue and bone kernels, thin and
    /// thick (series UID -> instances).
    fn study() -> BTreeMap<String, Vec<InstanceHeader>> {
        let series = [
            ("1.2.9.1", "B30f", 5.0, 2, true),
            ("1.2.9.2", "B30f", 2.0, 40, false),
            ("1.2.9.3", "B30f", 0.625, 120, false),
            ("1.2.9.4", "B70f", 2.0, 40, false),
            ("1.2.9.5", "B70f", 0.625, 120, false),
        ];
        series
            .into_iter()
            .map(|(uid, kernel, thickness, n, scout)| {
                let hs = (0..n)
                    .map(|k| slice(uid, k, kernel, thickness, scout))
                    .collect();
                (uid.to_string(), hs)
            })
            .collect()
    }

    fn sorted(mut skips: Vec<Skip>) -> Vec<Skip> {
        skips.sort_by_key(|s| (s.key.clone(), s.reason.to_string()));
        skips
    }

    #[test]
    fn the_daemon_and_infer_choose_the_same_series_of_a_study() {
        // infer: headers read from files, grouped, chosen.
        let mut report = LoadReport::default();
        choose_series(
            &mut report,
            BTreeMap::from([(STUDY.to_string(), study())]),
            &[],
        );
        let [loaded] = &report.studies[..] else {
            panic!("one study: {report:?}");
        };
        let loaded: Vec<&str> = loaded
            .ranked
            .iter()
            .map(|(meta, _)| meta.series_instance_uid.as_str())
            .collect();

        // The daemon: the same instances arriving, the study decided after its quiet period.
        let mut assembler = Assembler::new(AssemblyConfig {
            quiet_period_secs: 3.0,
            max_wait_secs: 60.0,
            study_quiet_period_secs: Some(3.0),
            ..Default::default()
        });
        let t0 = Instant::now();
        for (series_uid, headers) in study() {
            for h in headers {
                let stored = StoredInstance {
                    path: h.path.clone(),
                    study_instance_uid: STUDY.into(),
                    series_instance_uid: series_uid.clone(),
                    sop_instance_uid: h.sop_instance_uid.clone(),
                    sop_class_uid: h.sop_class_uid.clone(),
                    calling_ae: "SCANNER".into(),
                    received_at: OffsetDateTime::UNIX_EPOCH,
                    arrival: Arrival::First,
                };
                assembler.add(&stored, h, t0);
            }
        }
        let jobs = assembler.poll(t0 + Duration::from_secs(10));
        let [job] = &jobs[..] else {
            panic!("one job: {jobs:?}");
        };
        let daemon: Vec<&str> = std::iter::once(job)
            .chain(&job.fallbacks)
            .map(|j| j.meta.series_instance_uid.as_str())
            .collect();

        // Bone before soft tissue, thin before thick; the scout is no candidate.
        assert_eq!(loaded, ["1.2.9.5", "1.2.9.4", "1.2.9.3", "1.2.9.2"]);
        assert_eq!(daemon, loaded);
        assert_eq!(sorted(assembler.take_skips()), sorted(report.skipped));
    }
}
