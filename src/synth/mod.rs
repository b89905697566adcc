//! Synthetic cervical-spine CT phantoms with exact ground truth, written as real
//! DICOM CT series. One implementation serves training, tests and the demo.
//!
//! Output follows the RSNA 2022 Kaggle layout so one loader reads synthetic and
//! real data:
//!
//! ```text
//! OUT/train.csv                                  StudyInstanceUID,patient_overall,C1..C7
//! OUT/train_images/<StudyInstanceUID>/<InstanceNumber>.dcm
//! OUT/segmentations/<StudyInstanceUID>.nii       uint8 labels, 1..7 = C1..C7, 8, 9 = T1, T2
//! OUT/ground_truth/<StudyInstanceUID>.json       every parameter that matters
//! ```
//!
//! Conventions:
//! - Patient coordinates are DICOM LPS (mm). Axial slices, head-first or feet-first
//!   supine (ImageOrientationPatient `1\0\0\0\1\0` or `-1\0\0\0\1\0`); InstanceNumber runs
//!   head-to-feet or feet-to-head at random. HU = stored * RescaleSlope + RescaleIntercept.
//! - Mask `m = nib.load(p).get_fdata()[:, ::-1, ::-1].transpose(2, 1, 0)` gives
//!   `m[InstanceNumber - 1, row, column]` (the RSNA 2022 loader), see [`nifti`].
//!   Fracture gaps inside a vertebra keep its label; ribs, clavicles and skull are 0.
//! - Deterministic: a study depends only on (seed, study index) and the overrides;
//!   an override (`--matrix`, `--noise`, ...) changes only itself, and the fracture
//!   draws use their own stream, so `--fracture none` and `--fracture C5` with the same
//!   seed give the same study apart from the fracture (used by the visibility test).
//! - Fractures (see [`fracture`]): lucent body crack (gap 2-4 mm), the same displaced
//!   by 1-4 mm, anterior wedge compression (20-50 % height loss), lamina crack, C1 ring
//!   crack, dens fracture at its base. Near-axial gaps are at least 3 mm and 1.5 source
//!   slice spacings, so they survive the model's 2 mm resampling.
//! - Transfer syntaxes: explicit and implicit VR little endian, deflated explicit VR
//!   little endian (dicom-rs 0.10 has a deflate writer; it has no RLE encoder).
//!
//! Modules: [`study`] draws every random choice of a study from its seed,
//! [`anatomy`] / [`shape`] / [`fracture`] describe the bones as implicit solids,
//! [`render`] rasterises slices, [`dicom_out`] and [`nifti`] write files.

pub mod anatomy;
pub mod dicom_out;
pub mod fracture;
pub mod geom;
pub mod lesion;
pub mod nifti;
pub mod render;
pub mod shape;
pub mod study;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use self::render::{new_label_stats, LabelStats};
use self::study::{plan_study, Study};

/// `cspine-triage synth` arguments.
#[derive(Debug, clap::Args)]
pub struct SynthArgs {
    /// Output directory (RSNA 2022 layout: train.csv, train_images/, segmentations/,
    /// ground_truth/).
    pub out_dir: PathBuf,
    /// Number of studies.
    #[arg(long, default_value_t = 1)]
    pub count: usize,
    /// Random seed; the same seed gives the same studies, byte for byte.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// C1..C7 (one fracture of a random type there), none, or random (~50 % of
    /// studies get 1-2 fractures).
    #[arg(long, default_value = "random")]
    pub fracture: String,
    /// Restrict fractures to one type (only vertebrae that can have it are chosen).
    #[arg(long, value_enum)]
    pub fracture_type: Option<lesion::FractureKind>,
    /// Image matrix (rows = columns), 64-1024; default: random 256-512.
    #[arg(long)]
    pub matrix: Option<usize>,
    /// Field of view in mm; default: random 140-250.
    #[arg(long)]
    pub fov: Option<f64>,
    /// Slice thickness = spacing in mm; default: random 0.6-3 (sometimes overlapping).
    #[arg(long)]
    pub slice_thickness: Option<f64>,
    /// Transfer syntax; default: random among the three.
    #[arg(long, value_enum)]
    pub transfer_syntax: Option<TransferSyntax>,
    /// Gaussian noise sigma in HU; default: random 5-40.
    #[arg(long)]
    pub noise: Option<f64>,
    /// In-plane Gaussian blur sigma in mm; default: random 0.3-1.
    #[arg(long)]
    pub blur: Option<f64>,
    /// Index of the first study (to extend a set or generate one study of it).
    #[arg(long, default_value_t = 0)]
    pub first_index: usize,
    /// Add to an existing set in OUT_DIR (train.csv rows are kept, same UIDs replaced).
    #[arg(long)]
    pub append: bool,
    /// Worker threads per study; default: all cores.
    #[arg(long)]
    pub threads: Option<usize>,
    /// C1..C7: end the series [`study::CROP_MARGIN_MM`] (5 mm) below the lowest point of
    /// that vertebra instead of below C7, as a head CT that reaches the upper neck does
    /// (partial coverage). The vertebrae below are out of view or cut; `--fracture` must
    /// then name one in view, and a random fracture may fall out of view (ground truth
    /// gives their extent as null).
    #[arg(long, value_parser = parse_vertebra)]
    pub crop_below: Option<usize>,
}

/// `C1`..`C7` (any case) as 1..=7.
fn parse_vertebra(s: &str) -> Result<usize> {
    match s
        .trim()
        .to_ascii_lowercase()
        .strip_prefix('c')
        .and_then(|n| n.parse::<usize>().ok())
    {
        Some(n @ 1..=7) => Ok(n),
        _ => bail!("expected C1..C7, not {s:?}"),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum TransferSyntax {
    /// Explicit VR Little Endian (1.2.840.10008.1.2.1).
    #[value(name = "explicit")]
    ExplicitVrLittleEndian,
    /// Implicit VR Little Endian (1.2.840.10008.1.2).
    #[value(name = "implicit")]
    ImplicitVrLittleEndian,
    /// Deflated Explicit VR Little Endian (1.2.840.10008.1.2.1.99).
    #[value(name = "deflated")]
    DeflatedExplicitVrLittleEndian,
}

impl TransferSyntax {
    pub fn uid(self) -> &'static str {
        match self {
            TransferSyntax::ExplicitVrLittleEndian => "1.2.840.10008.1.2.1",
            TransferSyntax::ImplicitVrLittleEndian => "1.2.840.10008.1.2",
            TransferSyntax::DeflatedExplicitVrLittleEndian => "1.2.840.10008.1.2.1.99",
        }
    }
}

/// Which vertebra to fracture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FractureRequest {
    None,
    Random,
    /// 1..=7 for C1..C7.
    Vertebra(usize),
}

impl std::str::FromStr for FractureRequest {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let l = s.trim().to_ascii_lowercase();
        match l.as_str() {
            "none" => Ok(FractureRequest::None),
            "random" => Ok(FractureRequest::Random),
            _ => match l.strip_prefix('c').and_then(|n| n.parse::<usize>().ok()) {
                Some(n @ 1..=7) => Ok(FractureRequest::Vertebra(n)),
                _ => bail!("--fracture must be C1..C7, none or random, not {s:?}"),
            },
        }
    }
}

/// Acquisition settings fixed from the command line instead of randomised.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub matrix: Option<usize>,
    pub fov: Option<f64>,
    pub slice_thickness: Option<f64>,
    pub transfer_syntax: Option<TransferSyntax>,
    pub noise: Option<f64>,
    pub blur: Option<f64>,
    pub fracture_type: Option<lesion::FractureKind>,
    /// End the series below this vertebra (1..=7 for C1..C7): `--crop-below`.
    pub crop_below: Option<usize>,
}

impl SynthArgs {
    fn overrides(&self) -> Result<Overrides> {
        if let Some(m) = self.matrix {
            anyhow::ensure!((64..=1024).contains(&m), "--matrix must be 64..=1024");
        }
        if let Some(f) = self.fov {
            anyhow::ensure!((100.0..=500.0).contains(&f), "--fov must be 100..=500 mm");
        }
        if let Some(t) = self.slice_thickness {
            anyhow::ensure!(
                (0.3..=5.0).contains(&t),
                "--slice-thickness must be 0.3..=5 mm"
            );
        }
        if let Some(n) = self.noise {
            anyhow::ensure!((0.0..=200.0).contains(&n), "--noise must be 0..=200 HU");
        }
        if let Some(b) = self.blur {
            anyhow::ensure!((0.0..=3.0).contains(&b), "--blur must be 0..=3 mm");
        }
        Ok(Overrides {
            matrix: self.matrix,
            fov: self.fov,
            slice_thickness: self.slice_thickness,
            transfer_syntax: self.transfer_syntax,
            noise: self.noise,
            blur: self.blur,
            fracture_type: self.fracture_type,
            crop_below: self.crop_below,
        })
    }
}

pub fn run(args: &SynthArgs) -> Result<()> {
    let fracture: FractureRequest = args.fracture.parse()?;
    let overrides = args.overrides()?;
    if let (Some(kind), FractureRequest::Vertebra(v)) = (overrides.fracture_type, &fracture) {
        anyhow::ensure!(
            fracture::kinds_for(&format!("C{v}")).contains(&kind),
            "--fracture-type {kind:?} is not possible in C{v} (C1 only has ring cracks, \
             dens fractures are C2 only, compression needs C3-C7)"
        );
    }
    if let (Some(crop), FractureRequest::Vertebra(v)) = (overrides.crop_below, &fracture) {
        anyhow::ensure!(
            *v <= crop,
            "--fracture C{v} is out of view with --crop-below C{crop}"
        );
    }
    let out = &args.out_dir;
    let csv_path = out.join("train.csv");
    let mut rows: Vec<String> = Vec::new();
    if csv_path.exists() {
        anyhow::ensure!(
            args.append,
            "{} already holds a phantom set; use an empty directory, or --append to add \
             studies to it (with --first-index past the existing ones)",
            out.display()
        );
        let text = std::fs::read_to_string(&csv_path)
            .with_context(|| format!("cannot read {}", csv_path.display()))?;
        rows.extend(text.lines().skip(1).map(str::to_string));
    }
    for sub in ["train_images", "segmentations", "ground_truth"] {
        std::fs::create_dir_all(out.join(sub))
            .with_context(|| format!("cannot create {}", out.join(sub).display()))?;
    }
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    for index in args.first_index..args.first_index + args.count {
        let t0 = Instant::now();
        let study = plan_study(index, args.seed, &fracture, &overrides);
        let truth = generate_study(&study, args.seed, out, threads)?;
        let uid = &study.id.study_instance_uid;
        rows.retain(|r| r.split(',').next() != Some(uid.as_str()));
        rows.push(format!(
            "{uid},{},{}",
            truth.patient_overall,
            truth.labels.map(|f| f.to_string()).join(",")
        ));
        // Rewritten after every study, so an interrupted run leaves a usable set.
        write_csv(&csv_path, &rows)?;
        log::info!(
            "study {index}: {} slices {}x{} in {:.1} s, fractures {:?}",
            study.geometry.slices,
            study.geometry.rows,
            study.geometry.columns,
            t0.elapsed().as_secs_f64(),
            study.fractures
        );
    }
    write_csv(&csv_path, &rows)
}

/// Writes train.csv atomically (temporary file, then rename).
fn write_csv(path: &Path, rows: &[String]) -> Result<()> {
    let mut text = String::from("StudyInstanceUID,patient_overall,C1,C2,C3,C4,C5,C6,C7\n");
    for r in rows {
        let _ = writeln!(text, "{r}");
    }
    let tmp = path.with_extension("csv.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[derive(Serialize)]
struct VertebraTruth {
    name: String,
    label: u8,
    fractured: bool,
    /// Body centre (C1: ring centre on the dens axis), patient LPS mm.
    centre_mm: [f64; 3],
    /// Local axes in patient coordinates: left, posterior, superior.
    axes: [[f64; 3]; 3],
    /// Bounds of the labelled voxels, patient LPS mm (null if not in view).
    extent_min_mm: Option<[f64; 3]>,
    extent_max_mm: Option<[f64; 3]>,
    voxels: u64,
}

#[derive(Serialize)]
struct FractureTruth {
    vertebra: String,
    kind: lesion::FractureKind,
    part: shape::Group,
    /// A point on the fracture plane (compression: the anterior superior corner), LPS mm.
    location_mm: [f64; 3],
    /// Fracture plane normal, patient coordinates.
    normal: [f64; 3],
    gap_mm: f64,
    /// Displacement of one fragment, LPS mm (zero if undisplaced).
    displacement_mm: [f64; 3],
    /// Anterior height loss, fraction of body height (compression only).
    height_loss: f64,
}

#[derive(Serialize)]
struct GroundTruth<'a> {
    format: &'static str,
    note: &'static str,
    generator_version: &'static str,
    run_seed: u64,
    study_index: usize,
    study_seed: u64,
    study_instance_uid: &'a str,
    series_instance_uid: &'a str,
    patient_overall: u8,
    /// C1..C7 fracture flags as in train.csv.
    labels: [u8; 7],
    mask_labels: &'static str,
    vertebrae: Vec<VertebraTruth>,
    fractures: Vec<FractureTruth>,
    geometry: &'a study::AcquisitionGeometry,
    encoding: &'a study::Encoding,
    identity: &'a study::Identity,
    tissue_hu: &'a study::TissueHu,
    noise_sigma_hu: f64,
    blur_sigma_mm: f64,
    reconstruction_circle: bool,
    padding_hu: f64,
    soft_tissue: &'a study::SoftTissue,
    lordosis_deg: f64,
    size_scale: f64,
    narrowed_discs: &'a [String],
    osteophytes: &'a [String],
}

/// What the caller needs for train.csv.
pub struct StudySummary {
    pub patient_overall: u8,
    pub labels: [u8; 7],
}

/// Renders and writes one study (DICOM series, NIfTI mask, ground truth JSON).
pub fn generate_study(
    study: &Study,
    run_seed: u64,
    out: &Path,
    threads: usize,
) -> Result<StudySummary> {
    let g = &study.geometry;
    let uid = &study.id.study_instance_uid;
    let series_dir = out.join("train_images").join(uid);
    std::fs::create_dir_all(&series_dir)
        .with_context(|| format!("cannot create {}", series_dir.display()))?;
    let plane = g.rows * g.columns;
    let mut labels = vec![0u8; g.slices * plane];
    let per_thread = g.slices.div_ceil(threads);
    let results: Vec<Result<LabelStats>> = std::thread::scope(|scope| {
        let handles: Vec<_> = labels
            .chunks_mut(per_thread * plane)
            .enumerate()
            .map(|(t, chunk)| {
                let series_dir = &series_dir;
                scope.spawn(move || -> Result<LabelStats> {
                    let mut stats = new_label_stats();
                    for (i, slab) in chunk.chunks_mut(plane).enumerate() {
                        let k = t * per_thread + i;
                        let img = render::render_slice(study, k, &mut stats);
                        slab.copy_from_slice(&img.labels);
                        let pixels = dicom_out::to_stored(study, &img.hu);
                        let path = series_dir.join(format!("{}.dcm", k + 1));
                        dicom_out::write_slice(study, k, pixels, &path)?;
                    }
                    Ok(stats)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("render thread panicked"))
            .collect()
    });
    let mut stats = new_label_stats();
    for r in results {
        for (acc, s) in stats.iter_mut().zip(r?.iter()) {
            for i in 0..3 {
                acc.0[i] = acc.0[i].min(s.0[i]);
                acc.1[i] = acc.1[i].max(s.1[i]);
            }
            acc.2 += s.2;
        }
    }

    let nii = out.join("segmentations").join(format!("{uid}.nii"));
    nifti::write_labels(
        &nifti::LabelVolume {
            labels: &labels,
            slices: g.slices,
            rows: g.rows,
            columns: g.columns,
            pixel_spacing: g.pixel_spacing_mm,
            slice_spacing: g.spacing_between_slices_mm,
            first_position: g.first_position,
            instance_step: g.instance_step,
            row_direction: g.row_direction(),
            column_direction: g.column_direction(),
        },
        &nii,
    )?;

    let mut flags = [0u8; 7];
    let mut fractures = Vec::new();
    for bone in &study.spine.bones {
        for f in &bone.fractures {
            if (1..=7).contains(&bone.label) {
                flags[bone.label as usize - 1] = 1;
            }
            fractures.push(FractureTruth {
                vertebra: bone.name.clone(),
                kind: f.kind,
                part: f.group,
                location_mm: bone.frame.to_patient(f.point),
                normal: bone.frame.dir_to_patient(f.normal),
                gap_mm: f.gap,
                displacement_mm: bone.frame.dir_to_patient(f.displacement),
                height_loss: f.wedge,
            });
        }
    }
    let patient_overall = u8::from(flags.contains(&1));
    let vertebrae = study
        .spine
        .bones
        .iter()
        .filter(|b| b.label > 0)
        .map(|b| {
            let s = &stats[b.label as usize];
            VertebraTruth {
                name: b.name.clone(),
                label: b.label,
                fractured: !b.fractures.is_empty(),
                centre_mm: b.frame.origin,
                axes: b.frame.axes,
                extent_min_mm: (s.2 > 0).then_some(s.0),
                extent_max_mm: (s.2 > 0).then_some(s.1),
                voxels: s.2,
            }
        })
        .collect();
    let truth = GroundTruth {
        format: "cspine-triage/synth-ground-truth/v1",
        note: "synthetic phantom, not a patient; no number derived from it is clinical",
        generator_version: env!("CARGO_PKG_VERSION"),
        run_seed,
        study_index: study.index,
        study_seed: study.seed,
        study_instance_uid: uid,
        series_instance_uid: &study.id.series_instance_uid,
        patient_overall,
        labels: flags,
        mask_labels: "0 background, 1-7 C1-C7, 8 T1, 9 T2 (RSNA 2022 convention)",
        vertebrae,
        fractures,
        geometry: g,
        encoding: &study.encoding,
        identity: &study.id,
        tissue_hu: &study.hu,
        noise_sigma_hu: study.noise_sigma_hu,
        blur_sigma_mm: study.blur_sigma_mm,
        reconstruction_circle: study.reconstruction_circle,
        padding_hu: study.encoding.padding_hu(),
        soft_tissue: &study.soft,
        lordosis_deg: study.spine.lordosis_deg,
        size_scale: study.spine.size_scale,
        narrowed_discs: &study.spine.narrowed_discs,
        osteophytes: &study.spine.osteophytes,
    };
    let json_path = out.join("ground_truth").join(format!("{uid}.json"));
    let text = serde_json::to_string_pretty(&truth)?;
    std::fs::write(&json_path, text + "\n")
        .with_context(|| format!("cannot write {}", json_path.display()))?;
    Ok(StudySummary {
        patient_overall,
        labels: flags,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fracture_request_parses_user_spellings() {
        assert_eq!(
            "C5".parse::<FractureRequest>().unwrap(),
            FractureRequest::Vertebra(5)
        );
        assert_eq!(
            "c1".parse::<FractureRequest>().unwrap(),
            FractureRequest::Vertebra(1)
        );
        assert_eq!(
            "None".parse::<FractureRequest>().unwrap(),
            FractureRequest::None
        );
        assert_eq!(
            "random".parse::<FractureRequest>().unwrap(),
            FractureRequest::Random
        );
        for bad in ["C0", "C8", "T1", "", "5"] {
            assert!(bad.parse::<FractureRequest>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn study_seeds_differ_per_index_and_run_seed() {
        let mut seen = std::collections::HashSet::new();
        for seed in 0..4 {
            for index in 0..64 {
                assert!(seen.insert(study::study_seed(seed, index)));
            }
        }
    }

    #[test]
    fn decimal_strings_fit_dicom_ds() {
        for v in [
            0.0,
            -0.0,
            1.0 / 3.0,
            -123.456789012,
            98765.4321,
            -1024.0,
            1e-9,
        ] {
            let s = dicom_out::ds(v);
            assert!(s.len() <= 16, "{s}");
            let back: f64 = s.parse().unwrap();
            assert!((back - v).abs() < 1e-5 * v.abs().max(1.0), "{v} -> {s}");
        }
        assert_eq!(dicom_out::ds(-0.0), "0");
        assert_eq!(dicom_out::ds(2.5), "2.5");
    }

    #[test]
    fn study_plans_are_deterministic_and_overrides_change_only_themselves() {
        let ov = Overrides::default();
        let a = plan_study(3, 42, &FractureRequest::Random, &ov);
        let b = plan_study(3, 42, &FractureRequest::Random, &ov);
        assert_eq!(a.id.study_instance_uid, b.id.study_instance_uid);
        assert_eq!(a.geometry.first_position, b.geometry.first_position);
        let small = Overrides {
            matrix: Some(128),
            ..Overrides::default()
        };
        let c = plan_study(3, 42, &FractureRequest::Random, &small);
        assert_eq!(c.geometry.rows, 128);
        assert_eq!(a.id.study_instance_uid, c.id.study_instance_uid);
        assert_eq!(a.spine.lordosis_deg, c.spine.lordosis_deg);
        assert_eq!(a.fractures, c.fractures);
        // A crop ends the series 5 mm below the vertebra, and changes nothing else.
        let cropped = Overrides {
            crop_below: Some(3),
            ..Overrides::default()
        };
        let d = plan_study(3, 42, &FractureRequest::Random, &cropped);
        assert_eq!(a.id.study_instance_uid, d.id.study_instance_uid);
        assert_eq!(a.fractures, d.fractures);
        assert!(d.geometry.slices < a.geometry.slices);
        let g = &d.geometry;
        let z_last = g.first_position[2] + g.instance_step[2] * (g.slices - 1) as f64;
        let z_bottom = g.first_position[2].min(z_last);
        let c3_bottom = d.spine.vertebra("C3").unwrap().intact_patient_bounds().min[2];
        let step = g.spacing_between_slices_mm;
        assert!(
            (c3_bottom - study::CROP_MARGIN_MM - z_bottom).abs() < step,
            "{c3_bottom} {z_bottom}"
        );
        assert_eq!(
            "c3".parse::<FractureRequest>().unwrap(),
            FractureRequest::Vertebra(3)
        );
        assert_eq!(parse_vertebra("C3").unwrap(), 3);
        assert!(parse_vertebra("T1").is_err());
    }

    #[test]
    fn a_fracture_does_not_move_the_acquisition() {
        let ov = Overrides::default();
        for index in 0..8 {
            let none = plan_study(index, 7, &FractureRequest::None, &ov);
            for v in 1..=7 {
                let f = plan_study(index, 7, &FractureRequest::Vertebra(v), &ov);
                assert_eq!(f.fractures.len(), 1);
                assert_eq!(f.fractures[0].0, format!("C{v}"));
                assert_eq!(f.geometry.first_position, none.geometry.first_position);
                assert_eq!(f.geometry.slices, none.geometry.slices);
            }
        }
    }
}
