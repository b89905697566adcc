//! Series assembly (which instances form a complete series worth analysing) and
//! volume building (decoded, sorted, validated HU voxels).
//!
//! - [`header`]: the attributes of one instance, read without pixel data.
//! - [`selection`]: which instances and series are analysed, and why not.
//! - [`volume`]: validated, sorted HU volume of one series, decoded one file at a time.
//! - [`load`]: offline entry point, files or folders -> outcomes (`infer`).

pub mod header;
pub mod load;
pub mod selection;
pub mod volume;

pub use header::InstanceHeader;
pub use load::{load_series_from_paths, load_series_report, LoadReport};
pub use selection::Skip;
pub use volume::build_volume;

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// `[series]` section: when a series counts as complete.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AssemblyConfig {
    /// A series is complete after this many seconds without a new instance.
    pub quiet_period_secs: f64,
    /// ... or at the latest this many seconds after its first instance.
    pub max_wait_secs: f64,
}

impl Default for AssemblyConfig {
    fn default() -> Self {
        AssemblyConfig {
            quiet_period_secs: 3.0,
            max_wait_secs: 600.0,
        }
    }
}

impl AssemblyConfig {
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.quiet_period_secs > 0.0,
            "series.quiet_period_secs must be > 0"
        );
        ensure!(
            self.max_wait_secs >= self.quiet_period_secs,
            "series.max_wait_secs must be >= series.quiet_period_secs"
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
}

/// One slice of a volume, in volume order.
#[derive(Debug, Clone)]
pub struct SliceInfo {
    pub sop_instance_uid: String,
    /// Position along the slice normal (dot(ImagePositionPatient, normal)), mm.
    pub z_mm: f64,
}

/// A decoded CT volume in Hounsfield units.
#[derive(Debug, Clone)]
pub struct CtVolume {
    /// HU voxels, slice-major: `voxels[(k * rows + r) * cols + c]`, slices ascending along the normal.
    pub voxels: Vec<i16>,
    /// [slices, rows, columns].
    pub dims: [usize; 3],
    pub geometry: Geometry,
    pub slices: Vec<SliceInfo>,
    pub meta: SeriesMeta,
}

/// What the series stage hands to inference.
// `Failed` is rare and small next to a volume's voxels: boxing its meta buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum SeriesOutcome {
    /// A complete, consistent axial CT series.
    Volume(Box<CtVolume>),
    /// A candidate series that could not be built; published as a `failed` result.
    Failed { meta: SeriesMeta, reason: String },
}
