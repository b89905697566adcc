//! Offline loading: DICOM files or folders -> one [`SeriesOutcome`] per study, with the
//! same selection rules as the daemon's assembler (used by `cspine-triage infer`).
//!
//! Headers are read and series chosen for every study first ([`load_series_report`]);
//! pixels are decoded one study at a time ([`StudyCandidates::build`]), so that memory
//! holds one volume however many studies are given.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::header::InstanceHeader;
use super::selection::{choose_candidate, filter_series, CandidateSummary, Skip};
use super::volume::{build_volume_within, meta_from_header, VolumeLimits};
use super::{SeriesMeta, SeriesOutcome, VolumeWindow};

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

    for (study_uid, series) in studies {
        let mut candidates = Vec::new();
        for (series_uid, headers) in series {
            let (accepted, skips) = filter_series(headers);
            report.skipped.extend(skips);
            if !accepted.is_empty() {
                candidates.push((series_uid, accepted));
            }
        }
        if candidates.is_empty() {
            continue;
        }
        let summaries: Vec<CandidateSummary> = candidates
            .iter()
            .map(|(uid, hs)| {
                let refs: Vec<&InstanceHeader> = hs.iter().collect();
                CandidateSummary::from_headers(uid, &refs, extra_bone_kernels)
            })
            .collect();
        let (order, skips) = choose_candidate(&summaries, &study_uid);
        report.skipped.extend(skips);
        let mut slots: Vec<Option<Vec<InstanceHeader>>> =
            candidates.into_iter().map(|(_, hs)| Some(hs)).collect();
        let ranked = order
            .into_iter()
            .map(|i| {
                let headers = slots[i].take().expect("each candidate once");
                (meta_from_header(&headers[0]), headers)
            })
            .collect();
        report.studies.push(StudyCandidates {
            study_instance_uid: study_uid,
            ranked,
        });
    }
    for skip in &report.skipped {
        log::info!(
            "not analysed: series {} of study {} ({} instance(s)): {}",
            skip.series_instance_uid,
            skip.study_instance_uid,
            skip.instances,
            skip.reason
        );
    }
    Ok(report)
}

/// Builds the first candidate series that can be built (best first). When none can, the
/// outcome is the failure of the best one, with the fallbacks' reasons appended.
pub fn build_best(
    ranked: Vec<(SeriesMeta, Vec<InstanceHeader>)>,
    window: Option<&VolumeWindow>,
    limits: &VolumeLimits,
) -> SeriesOutcome {
    let mut failures: Vec<(SeriesMeta, String)> = Vec::new();
    for (mut meta, headers) in ranked {
        // Also for a failure: its result names the instances it was built from.
        meta.set_instances(&headers);
        match build_volume_within(headers, meta.clone(), window, limits) {
            Ok(mut volume) => {
                volume.meta.failed_better = failures
                    .iter()
                    .map(|(m, reason)| super::FailedSeries {
                        series_instance_uid: m.series_instance_uid.clone(),
                        sop_instance_uids: m.sop_instance_uids.clone(),
                        reason: reason.clone(),
                    })
                    .collect();
                if let Some((best, reason)) = failures.first() {
                    log::warn!(
                        "series {} of study {} could not be built ({reason}): analysing fallback series {}",
                        best.series_instance_uid,
                        best.study_instance_uid,
                        meta.series_instance_uid
                    );
                }
                return SeriesOutcome::Volume(Box::new(volume));
            }
            Err(e) => failures.push((meta, format!("{e:#}"))),
        }
    }
    let mut failures = failures.into_iter();
    let Some((meta, mut reason)) = failures.next() else {
        return SeriesOutcome::Failed {
            meta: SeriesMeta::default(),
            reason: "no series to build".into(),
        };
    };
    for (fallback, why) in failures {
        reason.push_str(&format!(
            "; fallback series {} failed too: {why}",
            fallback.series_instance_uid
        ));
    }
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
