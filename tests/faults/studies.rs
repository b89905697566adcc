//! Generated studies as the scanner holds them ([`Source`]), and what the spool holds of
//! them: instances, temp files, rejected files, analysed marks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dicom_dictionary_std::tags;
use dicom_object::OpenFileOptions;

use crate::common::synth;

/// One synthetic study: 256x256 slices `slice_mm` apart (0.6 mm: ~300 slices, 1.5 mm:
/// ~128), explicit VR little endian (no deflate work on either side).
pub fn study(out: &Path, seed: u64, fracture: &str, slice_mm: &str) -> Vec<PathBuf> {
    let args = [
        "--matrix",
        "256",
        "--transfer-syntax",
        "explicit",
        "--slice-thickness",
        slice_mm,
    ];
    synth(out, seed, fracture, &args)
}

/// One generated instance as the scanner holds it.
#[derive(Debug, Clone)]
pub struct Source {
    pub path: PathBuf,
    pub sop: String,
    pub series: String,
}

pub fn uid(obj: &dicom_object::DefaultDicomObject, tag: dicom_core::Tag) -> String {
    obj.element(tag)
        .unwrap_or_else(|e| panic!("{tag}: {e}"))
        .to_str()
        .unwrap()
        .trim_end_matches(['\0', ' '])
        .to_string()
}

/// Every instance of the given study directories, in Instance Number order per study.
pub fn sources(study_dirs: &[PathBuf]) -> Vec<Source> {
    let mut out = Vec::new();
    for dir in study_dirs {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        let number = |p: &PathBuf| -> u64 {
            p.file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse().ok())
                .unwrap_or(u64::MAX)
        };
        files.sort_by_key(number);
        for path in files {
            let obj = OpenFileOptions::new()
                .read_until(tags::PIXEL_DATA)
                .open_file(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            out.push(Source {
                sop: uid(&obj, tags::SOP_INSTANCE_UID),
                series: uid(&obj, tags::SERIES_INSTANCE_UID),
                path,
            });
        }
    }
    out
}

/// Study Instance UID of a generated instance (synth writes `train_images/<study>/<n>.dcm`).
pub fn study_of(source: &Source) -> String {
    source
        .path
        .parent()
        .and_then(|d| d.file_name())
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// Series Instance UID -> number of instances.
pub fn series_sizes(all: &[Source]) -> BTreeMap<String, usize> {
    let mut sizes = BTreeMap::new();
    for s in all {
        *sizes.entry(s.series.clone()).or_insert(0) += 1;
    }
    sizes
}

/// The instances of `series` among `all`.
pub fn of_series(all: &[Source], series: &str) -> Vec<Source> {
    all.iter().filter(|s| s.series == series).cloned().collect()
}

/// SOP Instance UID -> file, for every finished instance in the spool
/// (`<spool>/<study>/<series>/<sop>.dcm`; `.tmp/` and other dot entries are not finished).
///
/// The daemon may release (delete) a study or series directory while this lists it: a
/// directory gone by the time it is read holds nothing.
pub fn spooled(spool: &Path) -> BTreeMap<String, PathBuf> {
    let dirs = |dir: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.path())
                    .filter(|p| {
                        p.is_dir() && !p.file_name().unwrap().to_string_lossy().starts_with('.')
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut out = BTreeMap::new();
    for study in dirs(spool) {
        for series in dirs(&study) {
            let Ok(entries) = std::fs::read_dir(&series) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.extension().and_then(|e| e.to_str()) == Some("dcm") {
                    let sop = path.file_stem().unwrap().to_string_lossy().to_string();
                    out.insert(sop, path);
                }
            }
        }
    }
    out
}

/// Files left in `<spool>/.tmp` (receives in progress or interrupted).
pub fn spool_tmp_files(spool: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(spool.join(".tmp"))
        .map(|rd| rd.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default()
}

/// Files the re-index moved to `<spool>/.rejected` (unreadable).
pub fn spool_rejected(spool: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(spool.join(".rejected"))
        .map(|rd| rd.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default()
}

/// The spool copy is the instance that was sent: same SOP Instance UID, same pixel data.
pub fn assert_intact(source: &Source, in_spool: &Path) {
    let open = |p: &Path| {
        OpenFileOptions::new()
            .open_file(p)
            .unwrap_or_else(|e| panic!("cannot parse {}: {e}", p.display()))
    };
    let (a, b) = (open(&source.path), open(in_spool));
    assert_eq!(uid(&b, tags::SOP_INSTANCE_UID), source.sop);
    let pixels = |o: &dicom_object::DefaultDicomObject| {
        o.element(tags::PIXEL_DATA)
            .unwrap()
            .to_bytes()
            .unwrap()
            .into_owned()
    };
    assert!(
        pixels(&a) == pixels(&b),
        "pixel data of {} differs from what was sent ({})",
        in_spool.display(),
        source.path.display()
    );
}

/// The analysed mark of `series` in the spool (`<study>/<series>/.analysed.json`).
pub fn analysed_mark(spool: &Path, source: &Source) -> Option<serde_json::Value> {
    let path = spool
        .join(study_of(source))
        .join(&source.series)
        .join(".analysed.json");
    let text = std::fs::read(path).ok()?;
    serde_json::from_slice(&text).ok()
}
