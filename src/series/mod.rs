//! Series assembly (which instances form a complete series worth analysing) and
//! volume building (decoded, sorted, validated HU voxels).
//!
//! - [`assembler`]: groups arriving instances, decides completion, picks the series.
//! - [`header`]: the attributes of one instance, read without pixel data.
//! - [`key`]: a series' identity, its Study and Series Instance UIDs ([`SeriesKey`]).
//! - [`selection`]: which instances and series are analysed, and why not.
//! - [`plan`]: a series' slices validated and sorted from their headers, within limits.
//! - [`volume`]: validated, sorted HU volume of one series, decoded one file at a time.
//! - [`failure`]: why a series analysis failed ([`FailReason`]).
//! - [`source`]: the patient, study and instances result objects copy and reference.
//! - [`load`]: offline entry point, files or folders -> outcomes (`infer`).

pub mod assembler;
pub mod failure;
pub mod header;
pub mod key;
pub mod load;
pub mod plan;
pub mod selection;
pub mod source;
pub mod volume;

pub use assembler::{
    run_assembler, Assembler, DropReason, Feedback, Release, SeriesJob, SpoolLinks,
};
pub use failure::{FailReason, FallbackFailure};
pub use header::InstanceHeader;
pub use key::SeriesKey;
pub use load::{load_series_from_paths, load_series_report, LoadReport, StudyCandidates};
pub use selection::{Rejection, Skip, SkipReason};
pub use source::SourceStudy;
pub use volume::{build_volume, build_volume_within, BuildError, VolumeError, VolumeLimits};

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// `[series]` section: when a series counts as complete and which one is analysed.
///
/// A series is complete at the first of: `quiet_period_secs` without a new instance, its
/// expected instance count reached, or `max_wait_secs` after its first instance. A study
/// is decided (its best candidate series chosen, see [`selection`]) once all its series are
/// complete and it has had no new instance for `study_quiet_period_secs`, or at the latest
/// `max_wait_secs` after its first instance. See [`assembler`] for late instances.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AssemblyConfig {
    /// A series is complete after this many seconds without a new instance.
    pub quiet_period_secs: f64,
    /// ... or at the latest this many seconds after its first instance.
    pub max_wait_secs: f64,
    /// A study's candidate series are compared once the study has been quiet this long
    /// (0: as soon as all its series are complete). Defaults to `quiet_period_secs`.
    /// Raise it if your scanner pauses between series longer than that; lower it with
    /// expected counts for speed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub study_quiet_period_secs: Option<f64>,
    /// Use (0020,1002) Images in Acquisition as the expected instance count when present.
    pub use_images_in_acquisition: bool,
    /// Expected instance counts by sender; the first matching rule wins over
    /// Images in Acquisition (`[[series.expected_count]]`).
    pub expected_count: Vec<ExpectedCountRule>,
    /// Extra case-insensitive substrings of ConvolutionKernel that mark a bone kernel,
    /// on top of the built-in rule (BONE, EDGE, Siemens B/H/I/J/U60 and sharper).
    pub bone_kernels: Vec<String>,
    /// How long a decided study is remembered (counted from its last instance, and at
    /// least until its results are committed to the outbox), so that late instances
    /// re-open its series instead of starting a new, partial one. Its instances stay in the
    /// spool as long (marked analysed, so that a restart does not analyse them again; a
    /// restart counts the time from the mark). Below twice `dicom.min_free_space_mb` of
    /// free spool space, analysed studies go earlier, oldest first
    /// ([`assembler::SpoolLinks::spool_short_of_space`]).
    pub completed_retention_secs: f64,
    /// Anatomy-coverage trigger: while a series is still arriving, analyse early the
    /// contiguous slab received so far (no gap along the slice normal) once it is
    /// `min_coverage_mm` long, at most every `coverage_check_secs`, if the series is the
    /// study's best candidate so far. The early result is published only if it is
    /// `positive` or `negative` and the model's segmentation found C1 and C7 with a margin
    /// (at least one mean vertebra height of slab beyond C1's top and C7's bottom, unless
    /// the slab ends there with the first or last instance of the series); otherwise it is
    /// dropped. When the series completes (quiet period), it is analysed again if
    /// instances arrived after the published slab: a revised result under a new id.
    pub anatomy_coverage_trigger: bool,
    /// Slab length (mm along the slice normal) at which the trigger tries an early
    /// analysis. C1 top to C7 bottom is about 110-130 mm in adults; with a vertebra of
    /// margin on each side, 150 mm.
    pub min_coverage_mm: f64,
    /// At most one early check per series per this many seconds; a check runs the model
    /// only when the slab grew since the last one.
    pub coverage_check_secs: f64,
    /// A series whose volume build began this many times without ending (the process was
    /// killed while building it: out of memory, a hard crash) is not built again: it is
    /// published as `failed` with that reason. The count is durable in the spool and goes
    /// with the series' files. Without it, a series that kills the process would be
    /// rebuilt, and kill it again, after every restart.
    pub max_build_attempts: u32,
    /// A series with more distinct slices than this fails ([`VolumeError::TooManySlices`])
    /// before anything is decoded. 4000 holds a whole-body trauma scan at 0.5 mm
    /// increments (about 1.8 m); the cervical spine needs a few hundred.
    pub max_slices: usize,
    /// A series whose volume (int16 voxels of the part of each slice the model reads,
    /// all slices) would be larger than this many MiB fails
    /// ([`VolumeError::TooLarge`]) before it is allocated: the headers say how large, and
    /// a few kB of headers can claim GBs (4096 x 4096 slices). Three volumes can be held at
    /// once (one being built, one queued, one in inference): 3 x 768 MiB plus the model
    /// (about 200 MiB) stays below the unit's MemoryHigh=3G and MemoryMax=4G. A 0.5 mm
    /// pixel slice keeps about 0.2 MiB, a whole 512 x 512 slice 0.5 MiB.
    pub max_volume_mib: u64,
    /// Missing slices are interpolated (and reported, [`SeriesMeta::interpolated_gaps`])
    /// when the step across them is at most this many mm; a larger gap fails the series.
    /// The model samples the volume every 2 mm along the slice normal, interpolating by
    /// each slice's real position: a gap no longer than its own step changes nothing it
    /// could see. Set it to the `input.spacing_mm.slice` of another model's contract.
    pub max_interpolated_gap_mm: f64,
}

/// An early analysis (the anatomy-coverage trigger, [`AssemblyConfig`]) of a contiguous
/// slab of a series still arriving: published only if the model finds C1 to C7 with a
/// margin ([`crate::inference::postprocess::early_coverage`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EarlyCheck {
    /// The slab's inferior end (lowest patient z) is an end of the whole series (its
    /// first or last instance by Instance Number): no margin is needed beyond it.
    pub inferior_end_final: bool,
    /// The same for the superior end (highest patient z).
    pub superior_end_final: bool,
}

/// Expected number of instances per series for a sender: every given field must match.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectedCountRule {
    /// Calling AE title of the association (exact match).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calling_ae: Option<String>,
    /// (0008,1010) Station Name (exact match).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub station_name: Option<String>,
    /// Instances per series.
    pub images: u32,
}

impl Default for AssemblyConfig {
    fn default() -> Self {
        AssemblyConfig {
            quiet_period_secs: 3.0,
            max_wait_secs: 600.0,
            study_quiet_period_secs: None,
            use_images_in_acquisition: true,
            expected_count: Vec::new(),
            bone_kernels: Vec::new(),
            completed_retention_secs: 3600.0,
            anatomy_coverage_trigger: false,
            min_coverage_mm: 150.0,
            coverage_check_secs: 2.0,
            max_build_attempts: 3,
            max_slices: 4000,
            max_volume_mib: 768,
            max_interpolated_gap_mm: 2.0,
        }
    }
}

impl AssemblyConfig {
    /// Effective study quiet period: the configured one, else the series quiet period.
    pub fn study_quiet_period(&self) -> f64 {
        self.study_quiet_period_secs
            .unwrap_or(self.quiet_period_secs)
    }

    /// What volume building may allocate and interpolate.
    pub fn volume_limits(&self) -> VolumeLimits {
        VolumeLimits {
            max_slices: self.max_slices,
            max_volume_bytes: self.max_volume_mib.saturating_mul(1 << 20),
            max_gap_mm: self.max_interpolated_gap_mm,
        }
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.quiet_period_secs > 0.0,
            "series.quiet_period_secs must be > 0"
        );
        ensure!(
            self.max_wait_secs >= self.quiet_period_secs,
            "series.max_wait_secs must be >= series.quiet_period_secs"
        );
        ensure!(
            (0.0..=self.max_wait_secs).contains(&self.study_quiet_period()),
            "series.study_quiet_period_secs must be between 0 and series.max_wait_secs"
        );
        ensure!(
            self.completed_retention_secs >= 0.0,
            "series.completed_retention_secs must be >= 0"
        );
        for (i, rule) in self.expected_count.iter().enumerate() {
            ensure!(
                rule.calling_ae.is_some() || rule.station_name.is_some(),
                "series.expected_count[{i}] needs calling_ae and/or station_name"
            );
            ensure!(
                rule.images > 0,
                "series.expected_count[{i}].images must be > 0"
            );
        }
        ensure!(
            self.min_coverage_mm > 0.0,
            "series.min_coverage_mm must be > 0"
        );
        ensure!(
            self.coverage_check_secs >= 0.0,
            "series.coverage_check_secs must be >= 0"
        );
        ensure!(self.max_slices > 0, "series.max_slices must be > 0");
        ensure!(self.max_volume_mib > 0, "series.max_volume_mib must be > 0");
        ensure!(
            self.max_interpolated_gap_mm >= 0.0 && self.max_interpolated_gap_mm.is_finite(),
            "series.max_interpolated_gap_mm must be >= 0 (0: no gap is interpolated)"
        );
        Ok(())
    }
}

/// Patient coordinate geometry of a volume (DICOM LPS, millimetres).
#[derive(Debug, Clone, PartialEq)]
pub struct Geometry {
    /// ImagePositionPatient of the first slice (the one with the lowest position along `normal`).
    pub origin: [f64; 3],
    /// [between slices along the normal, between rows, between columns] in mm.
    pub spacing: [f64; 3],
    /// ImageOrientationPatient row direction (direction of increasing column index).
    pub row_direction: [f64; 3],
    /// ImageOrientationPatient column direction (direction of increasing row index).
    pub column_direction: [f64; 3],
    /// Slice normal = row_direction x column_direction; slices are sorted along it.
    pub normal: [f64; 3],
}

/// Identifying metadata of a series that later stages (results, alerts) need.
#[derive(Debug, Clone, Default)]
pub struct SeriesMeta {
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub accession_number: String,
    pub patient_id: String,
    pub station_name: String,
    pub series_description: String,
    pub calling_ae: String,
    pub first_received: Option<OffsetDateTime>,
    pub last_received: Option<OffsetDateTime>,
    pub completed: Option<OffsetDateTime>,
    /// The distinct SOP Instance UIDs the series is built from, sorted (byte order):
    /// what the result id names (see [`crate::result::result_id`]). Filled when
    /// the volume is built ([`build_volume`], [`load::build_best`]), also for a series
    /// that fails to build.
    pub sop_instance_uids: Vec<String>,
    /// Set for an early analysis by the anatomy-coverage trigger: the result is published
    /// only if the coverage check passes.
    pub early: Option<EarlyCheck>,
    /// When this series is a fallback ([`load::build_best`]): the better-ranked series of
    /// the study that could not be built. They are marked in the spool with this series'
    /// result, so that a restart does not try them again on their own (and publish their
    /// failure as a revision of the study).
    pub failed_better: Vec<FailedSeries>,
    /// Gaps in the slice positions (missing slices) that volume building accepted and the
    /// model's resampling interpolates across ([`AssemblyConfig::max_interpolated_gap_mm`]);
    /// None when there is none. Published in the result.
    pub interpolated_gaps: Option<InterpolatedGaps>,
    /// (0018,0050) Slice Thickness of the series' first instance, mm, when present: the
    /// model's acquisition envelope checks it.
    pub slice_thickness_mm: Option<f64>,
    /// (0018,1210) Convolution Kernel of the first instance (values joined by `\`), empty
    /// when absent: the envelope's kernel family.
    pub convolution_kernel: String,
    /// The patient and study modules and the instances of the series, for the DICOM
    /// result objects; set with `sop_instance_uids` ([`SeriesMeta::set_instances`]).
    pub source: SourceStudy,
}

impl SeriesMeta {
    /// Records the instances the series is built from: [`SeriesMeta::sop_instance_uids`]
    /// and [`SeriesMeta::source`].
    pub fn set_instances(&mut self, headers: &[InstanceHeader]) {
        self.sop_instance_uids =
            sorted_unique_uids(headers.iter().map(|h| h.sop_instance_uid.as_str()));
        self.source = SourceStudy::from_headers(headers);
    }
}

/// Gaps of a series interpolated across: steps between neighbouring slices larger than
/// [`volume::GAP_FACTOR`] times the median spacing, none larger than
/// [`AssemblyConfig::max_interpolated_gap_mm`].
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct InterpolatedGaps {
    /// How many such steps.
    pub count: usize,
    /// The largest of them, mm along the slice normal.
    pub largest_mm: f64,
}

/// A candidate series that could not be built, see [`SeriesMeta::failed_better`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FailedSeries {
    pub series_instance_uid: String,
    /// Its distinct SOP Instance UIDs, sorted as [`SeriesMeta::sop_instance_uids`].
    pub sop_instance_uids: Vec<String>,
    pub reason: String,
}

/// `uids` sorted (byte order) without repeats, as [`SeriesMeta::sop_instance_uids`] holds them.
pub fn sorted_unique_uids<'a>(uids: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut v: Vec<&str> = uids.into_iter().collect();
    v.sort_unstable();
    v.dedup();
    v.into_iter().map(str::to_owned).collect()
}

/// One slice of a volume, in volume order.
#[derive(Debug, Clone)]
pub struct SliceInfo {
    pub sop_instance_uid: String,
    /// Position along the slice normal (dot(ImagePositionPatient, normal)), mm.
    pub z_mm: f64,
}

/// The rows and columns of every slice that a [`CtVolume`] keeps: the voxels where a kept
/// row crosses a kept column.
///
/// The model samples 128 points 1.25 mm apart across a slice, trilinearly: it reads two
/// neighbouring source columns (rows) per model column (row). A volume built for it (see
/// [`VolumeWindow`]) need not hold the others: a quarter of a 512 x 512 slice of 160 mm,
/// less of a wider one. For 700 slices that is most of the daemon's memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InPlaneWindow {
    rows: KeptIndices,
    cols: KeptIndices,
}

/// Which of `0..n` are kept, ascending, and where each sits among the kept ones.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KeptIndices {
    kept: Vec<usize>,
    /// `position[i]`: index of `i` in `kept`, or `NOT_KEPT`.
    position: Vec<u32>,
}

const NOT_KEPT: u32 = u32::MAX;

impl KeptIndices {
    fn new(n: usize, kept: impl IntoIterator<Item = usize>) -> KeptIndices {
        let mut is_kept = vec![false; n];
        for i in kept.into_iter().filter(|&i| i < n) {
            is_kept[i] = true;
        }
        let kept: Vec<usize> = (0..n).filter(|&i| is_kept[i]).collect();
        let mut position = vec![NOT_KEPT; n];
        for (p, &i) in kept.iter().enumerate() {
            position[i] = p as u32;
        }
        KeptIndices { kept, position }
    }

    fn contains(&self, i: usize) -> bool {
        self.position.get(i).is_some_and(|&p| p != NOT_KEPT)
    }
}

impl InPlaneWindow {
    /// The whole `rows x cols` matrix.
    pub fn full(rows: usize, cols: usize) -> InPlaneWindow {
        InPlaneWindow::new(rows, cols, 0..rows, 0..cols)
    }

    /// Rows `rows` and columns `cols` of a `full_rows x full_cols` matrix (indices outside
    /// it are ignored, repeats count once).
    pub fn new(
        full_rows: usize,
        full_cols: usize,
        rows: impl IntoIterator<Item = usize>,
        cols: impl IntoIterator<Item = usize>,
    ) -> InPlaneWindow {
        InPlaneWindow {
            rows: KeptIndices::new(full_rows, rows),
            cols: KeptIndices::new(full_cols, cols),
        }
    }

    /// The kept rows of the full matrix, ascending.
    pub fn rows(&self) -> &[usize] {
        &self.rows.kept
    }

    /// The kept columns of the full matrix, ascending.
    pub fn cols(&self) -> &[usize] {
        &self.cols.kept
    }

    /// `[rows, columns]` of the full matrix this window is part of.
    pub fn matrix(&self) -> [usize; 2] {
        [self.rows.position.len(), self.cols.position.len()]
    }

    /// Voxels kept of each slice.
    pub fn len(&self) -> usize {
        self.rows.kept.len() * self.cols.kept.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether every voxel of `other` is kept here (both parts of the same matrix).
    pub fn contains(&self, other: &InPlaneWindow) -> bool {
        other.is_empty()
            || (self.matrix() == other.matrix()
                && other.rows().iter().all(|&r| self.rows.contains(r))
                && other.cols().iter().all(|&c| self.cols.contains(c)))
    }

    /// Index within one slice's kept voxels of full-matrix row `r`, column `c`; None if
    /// not kept.
    #[inline]
    pub fn offset(&self, r: usize, c: usize) -> Option<usize> {
        let pr = *self.rows.position.get(r)?;
        let pc = *self.cols.position.get(c)?;
        (pr != NOT_KEPT && pc != NOT_KEPT).then(|| pr as usize * self.cols.kept.len() + pc as usize)
    }
}

/// Chooses, once a series' geometry is validated and before any pixel is decoded, the
/// [`InPlaneWindow`] its volume keeps. The daemon passes the model's
/// ([`crate::inference::preprocess::volume_window`]); without one, volumes are whole.
#[derive(Clone)]
pub struct VolumeWindow(
    pub std::sync::Arc<dyn Fn(&volume::VolumePlan) -> InPlaneWindow + Send + Sync>,
);

impl std::fmt::Debug for VolumeWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VolumeWindow(..)")
    }
}

/// A decoded CT volume in Hounsfield units.
#[derive(Debug, Clone)]
pub struct CtVolume {
    /// HU voxels of the `window` of each slice, slice-major (`window.len()` per slice, kept
    /// rows in order, kept columns in order within a row), slices ascending along the
    /// normal. Read them with [`CtVolume::voxel`].
    pub voxels: Vec<i16>,
    /// [slices, rows, columns] of the whole series, whatever `window` keeps: geometry
    /// (slice centres, the model grid) is computed from the full matrix.
    pub dims: [usize; 3],
    pub window: InPlaneWindow,
    pub geometry: Geometry,
    pub slices: Vec<SliceInfo>,
    pub meta: SeriesMeta,
}

impl CtVolume {
    /// HU of slice `k`, row `r`, column `c` (full-matrix indices, inside `window`).
    ///
    /// # Panics
    /// If `window` does not keep (`r`, `c`): [`crate::inference::preprocess`] checks that
    /// a volume keeps what its grid reads before it reads.
    #[inline]
    pub fn voxel(&self, k: usize, r: usize, c: usize) -> i16 {
        let w = &self.window;
        let at = w
            .offset(r, c)
            .unwrap_or_else(|| panic!("voxel ({r}, {c}) is not in the volume's window"));
        self.voxels[k * w.len() + at]
    }
}

/// What the series stage hands to inference.
// `Failed` is rare and small next to a volume's voxels: boxing its meta buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum SeriesOutcome {
    /// A complete, consistent axial CT series.
    Volume(Box<CtVolume>),
    /// A candidate series that could not be built; published as a `failed` result.
    Failed {
        meta: SeriesMeta,
        reason: FailReason,
    },
}

impl selection::Skip {
    /// What the event stream records of a series not analysed.
    pub fn event(&self) -> crate::events::Event {
        crate::events::Event::SeriesSkipped {
            study_instance_uid: self.key.study.clone(),
            series_instance_uid: self.key.series.clone(),
            instances: self.instances,
            reason: self.reason.to_string(),
        }
    }
}

impl SeriesOutcome {
    /// What the event stream records when this outcome goes to inference.
    pub fn event(&self) -> crate::events::Event {
        use crate::events::Event;
        match self {
            SeriesOutcome::Volume(volume) => Event::SeriesComplete {
                study_instance_uid: volume.meta.study_instance_uid.clone(),
                series_instance_uid: volume.meta.series_instance_uid.clone(),
                instances: volume.meta.sop_instance_uids.len(),
            },
            SeriesOutcome::Failed { meta, reason } => Event::SeriesFailed {
                study_instance_uid: meta.study_instance_uid.clone(),
                series_instance_uid: meta.series_instance_uid.clone(),
                instances: meta.sop_instance_uids.len(),
                reason: reason.to_string(),
            },
        }
    }

    /// When a fallback series was built because the better ones of its study could not
    /// be: its `analysis_started` (fallback), recorded before [`SeriesOutcome::event`].
    pub fn fallback_event(&self) -> Option<crate::events::Event> {
        let SeriesOutcome::Volume(volume) = self else {
            return None;
        };
        let meta = &volume.meta;
        (!meta.failed_better.is_empty()).then(|| crate::events::Event::AnalysisStarted {
            study_instance_uid: meta.study_instance_uid.clone(),
            series_instance_uid: meta.series_instance_uid.clone(),
            instances: meta.sop_instance_uids.len(),
            fallback: true,
            early: meta.early.is_some(),
        })
    }
}
