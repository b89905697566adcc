//! One phantom study: every random choice (anatomy, fractures, acquisition
//! geometry, tissue HU, noise, encoding), drawn once from the study's seed.

use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::anatomy::{build_spine, Spine};
use super::fracture::{add_fracture, kinds_for};
use super::geom::{add, Aabb, V3};
use super::lesion::FractureKind;
use super::{FractureRequest, Overrides, TransferSyntax};

/// Mean HU of each tissue in this study.
#[derive(Debug, Clone, Serialize)]
pub struct TissueHu {
    pub cortical: f64,
    pub cancellous: f64,
    pub sclerotic: f64,
    pub disc: f64,
    pub muscle: f64,
    pub fat: f64,
    pub air: f64,
    pub fracture_gap: f64,
}

/// Patient position of the acquisition (DICOM PatientPosition).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum PatientPosition {
    /// Head first supine: rows run towards patient left (+x).
    HFS,
    /// Feet first supine: rows run towards patient right (-x).
    FFS,
}

/// Acquisition geometry; instance `k + 1` is slice `k`.
#[derive(Debug, Clone, Serialize)]
pub struct AcquisitionGeometry {
    pub rows: usize,
    pub columns: usize,
    pub fov_mm: f64,
    pub pixel_spacing_mm: f64,
    pub slice_thickness_mm: f64,
    pub spacing_between_slices_mm: f64,
    pub slices: usize,
    pub patient_position: PatientPosition,
    /// ImageOrientationPatient: row direction, then column direction.
    pub image_orientation_patient: [f64; 6],
    /// ImagePositionPatient of InstanceNumber 1.
    pub first_position: V3,
    /// Change of ImagePositionPatient from one InstanceNumber to the next.
    pub instance_step: V3,
    /// True when InstanceNumber grows towards the head.
    pub instances_ascend_superior: bool,
    /// Patient x, y of the centre of the field of view.
    pub fov_centre: [f64; 2],
}

impl AcquisitionGeometry {
    pub fn row_direction(&self) -> V3 {
        let o = self.image_orientation_patient;
        [o[0], o[1], o[2]]
    }

    pub fn column_direction(&self) -> V3 {
        let o = self.image_orientation_patient;
        [o[3], o[4], o[5]]
    }

    /// ImagePositionPatient of slice `k` (InstanceNumber k + 1).
    pub fn position(&self, k: usize) -> V3 {
        let s = self.instance_step;
        add(
            self.first_position,
            [s[0] * k as f64, s[1] * k as f64, s[2] * k as f64],
        )
    }
}

/// Neck soft tissue: an ellipse with a subcutaneous fat rim, plus the airway.
#[derive(Debug, Clone, Serialize)]
pub struct SoftTissue {
    pub centre: [f64; 2],
    pub semi_axes: [f64; 2],
    pub fat_mm: f64,
    pub airway_radius_mm: f64,
    /// Airway centre lies this far anterior to the vertebral body centre.
    pub airway_offset_mm: f64,
    /// Above this z the head widens the soft tissue; below `shoulder_z` the shoulders do.
    pub head_z: f64,
    pub shoulder_z: f64,
    /// Patient table under the patient: a curved carbon-fibre shell whose top
    /// surface is at `table_y + (x - centre.x)^2 / (2 * table_radius_mm)`.
    pub table_y: f64,
    pub table_radius_mm: f64,
    pub table_thickness_mm: f64,
    pub table_hu: f64,
}

/// How pixel values are stored (HU = stored * slope + intercept).
#[derive(Debug, Clone, Serialize)]
pub struct Encoding {
    pub transfer_syntax: TransferSyntax,
    pub transfer_syntax_uid: &'static str,
    pub bits_stored: u16,
    pub pixel_representation: u16,
    pub rescale_intercept: f64,
    pub rescale_slope: f64,
}

impl Encoding {
    /// Lowest HU the encoding can hold, capped at -3024 (the usual CT padding value).
    pub fn padding_hu(&self) -> f64 {
        let (lo, _) = self.stored_range();
        (lo as f64 * self.rescale_slope + self.rescale_intercept).max(-3024.0)
    }

    pub fn stored_range(&self) -> (i32, i32) {
        match self.pixel_representation {
            0 => (0, (1 << self.bits_stored) - 1),
            _ => (
                -(1 << (self.bits_stored - 1)),
                (1 << (self.bits_stored - 1)) - 1,
            ),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Identity {
    pub patient_id: String,
    pub patient_name: String,
    pub patient_sex: String,
    pub patient_birth_date: String,
    pub accession_number: String,
    pub study_date: String,
    pub study_time: String,
    pub station_name: String,
    pub convolution_kernel: String,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub frame_of_reference_uid: String,
    #[serde(skip)]
    pub sop_instance_uids: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Study {
    pub index: usize,
    pub seed: u64,
    pub id: Identity,
    pub geometry: AcquisitionGeometry,
    pub encoding: Encoding,
    pub hu: TissueHu,
    pub noise_sigma_hu: f64,
    pub blur_sigma_mm: f64,
    /// Pixels outside the reconstruction circle (diameter = FOV) hold `padding_hu`.
    pub reconstruction_circle: bool,
    pub soft: SoftTissue,
    pub spine: Spine,
    /// (vertebra name, kind) of each fracture, in the order they were added.
    pub fractures: Vec<(String, FractureKind)>,
}

/// A `2.25.` UID from 128 random bits (ISO/IEC 9834-8), deterministic for the RNG.
pub fn random_uid(rng: &mut ChaCha8Rng) -> String {
    let v: u128 = rng.gen::<u128>() | 1;
    format!("2.25.{v}")
}

/// Per-study seed: a SplitMix64 mix of the run seed and the study index.
pub fn study_seed(seed: u64, index: usize) -> u64 {
    let mut z = seed
        .wrapping_add((index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(0x632B_E59B_D9B4_E019);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// How far below the lowest point of the `--crop-below` vertebra a cropped series ends:
/// more than a model slice (2 mm), so the vertebra lies whole in it.
pub const CROP_MARGIN_MM: f64 = 5.0;

pub fn plan_study(
    index: usize,
    run_seed: u64,
    fracture: &FractureRequest,
    ov: &Overrides,
) -> Study {
    use rand::SeedableRng;
    let seed = study_seed(run_seed, index);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);

    // Acquisition parameters first: fracture gaps depend on the slice spacing.
    // Every value is drawn even when overridden, so an override changes only itself.
    let rows = *[256, 320, 384, 448, 512].choose(&mut rng).unwrap();
    let rows = ov.matrix.unwrap_or(rows);
    let fov_mm = ov.fov.unwrap_or(rng.gen_range(140.0..250.0));
    let pixel_spacing_mm = fov_mm / rows as f64;
    let thickness: f64 = rng.gen_range(0.6..3.0);
    let overlap = rng.gen_bool(0.3);
    let overlap_factor = rng.gen_range(0.5..0.9);
    let (slice_thickness_mm, spacing) = match ov.slice_thickness {
        Some(t) => (t, t),
        // Overlapping reconstruction, common for thin bone kernels.
        None if overlap => (thickness, (thickness * overlap_factor).max(0.5)),
        None => (thickness, thickness),
    };

    let cortex = rng.gen_range(1.0..1.8);
    let mut spine = build_spine(&mut rng, cortex);

    // Fractures come from their own stream, so the same seed with `--fracture none`
    // and `--fracture C5` gives the same study apart from the fracture.
    let mut frng = ChaCha8Rng::seed_from_u64(seed ^ 0x5EED_F4AC_7E5E_ED00);
    let names = ["C1", "C2", "C3", "C4", "C5", "C6", "C7"];
    let possible = |name: &&str| {
        ov.fracture_type
            .is_none_or(|k| kinds_for(name).contains(&k))
    };
    let targets: Vec<&str> = match fracture {
        FractureRequest::None => vec![],
        FractureRequest::Vertebra(v) => vec![names[*v - 1]],
        FractureRequest::Random => {
            if frng.gen_bool(0.5) {
                let n = if frng.gen_bool(0.25) { 2 } else { 1 };
                let mut pool: Vec<&str> = names.iter().copied().filter(possible).collect();
                pool.shuffle(&mut frng);
                pool.truncate(n);
                pool
            } else {
                vec![]
            }
        }
    };
    let mut fractures = Vec::new();
    for name in targets {
        let kind = match ov.fracture_type {
            Some(k) => k,
            None => *kinds_for(name).choose(&mut frng).unwrap(),
        };
        let bone = spine.bones.iter_mut().find(|b| b.name == name).unwrap();
        add_fracture(&mut frng, bone, kind, spacing);
        fractures.push((name.to_string(), kind));
    }
    for b in spine.bones.iter_mut() {
        b.finish();
    }

    // Soft tissue relative to the spine (C4 body centre is at the origin now):
    // the body sits at ~40 % of the neck's depth, so the neck centre is posterior to it.
    let neck_cy = rng.gen_range(5.0..15.0);
    let neck_a = rng.gen_range(55.0..75.0);
    let spine_bb = spine_bounds(&spine);
    let neck_b = rng
        .gen_range(52.0..66.0f64)
        .max(spine_bb.max[1] - neck_cy + 12.0)
        .max(neck_cy - spine_bb.min[1] + 30.0);
    let soft = SoftTissue {
        centre: [0.0, neck_cy],
        semi_axes: [neck_a, neck_b],
        fat_mm: rng.gen_range(3.0..12.0),
        airway_radius_mm: rng.gen_range(6.0..10.0),
        airway_offset_mm: rng.gen_range(14.0..20.0),
        head_z: spine.bones[0].frame.origin[2] + 10.0,
        shoulder_z: spine.bones[6].frame.origin[2] + 5.0,
        // Filled in below, once the table's random draws cannot shift the others.
        table_y: 0.0,
        table_radius_mm: 0.0,
        table_thickness_mm: 0.0,
        table_hu: 0.0,
    };

    // Field of view: the neck is centred within +-20 mm, the spine stays inside.
    let half = 0.5 * fov_mm - 4.0;
    let mut offset = [0.0, 0.0];
    for attempt in 0..64 {
        let o = if attempt < 63 {
            [rng.gen_range(-20.0..20.0), rng.gen_range(-20.0..20.0)]
        } else {
            // Centre the spine itself if no random offset fits.
            [
                -0.5 * (spine_bb.min[0] + spine_bb.max[0]) + soft.centre[0],
                -0.5 * (spine_bb.min[1] + spine_bb.max[1]) + soft.centre[1],
            ]
        };
        // Spine relative to the FOV centre = spine - neck centre + o.
        let fits = (0..2).all(|i| {
            spine_bb.min[i] - soft.centre[i] + o[i] >= -half
                && spine_bb.max[i] - soft.centre[i] + o[i] <= half
        });
        offset = o;
        if fits {
            break;
        }
    }
    // Absolute patient coordinates: table height and couch position vary.
    let fov_centre = [rng.gen_range(-30.0..30.0), rng.gen_range(-60.0..80.0)];
    let c4_z = rng.gen_range(-400.0..100.0);
    let shift = [
        fov_centre[0] + offset[0] - soft.centre[0],
        fov_centre[1] + offset[1] - soft.centre[1],
        c4_z,
    ];
    spine.translate(shift);
    let soft = SoftTissue {
        centre: [soft.centre[0] + shift[0], soft.centre[1] + shift[1]],
        head_z: soft.head_z + c4_z,
        shoulder_z: soft.shoulder_z + c4_z,
        ..soft
    };

    // z coverage: from above C1 (skull base often in view) to below C7 (T1-T2).
    let c1_top = spine.vertebra("C1").unwrap().intact_patient_bounds().max[2];
    let c7_bottom = spine.vertebra("C7").unwrap().intact_patient_bounds().min[2];
    let z_top = c1_top + rng.gen_range(5.0..30.0);
    let z_bottom = c7_bottom - rng.gen_range(5.0..40.0);
    // `--crop-below Cn`: the series ends below Cn instead (the draw above is kept, so the
    // crop changes nothing else).
    let z_bottom = match ov.crop_below {
        Some(v) => {
            let bottom = spine.vertebra(&format!("C{v}")).unwrap();
            bottom.intact_patient_bounds().min[2] - CROP_MARGIN_MM
        }
        None => z_bottom,
    };
    let slices = ((z_top - z_bottom) / spacing).floor() as usize + 1;

    let patient_position = if rng.gen_bool(0.5) {
        PatientPosition::HFS
    } else {
        PatientPosition::FFS
    };
    let rowdir_x = match patient_position {
        PatientPosition::HFS => 1.0,
        PatientPosition::FFS => -1.0,
    };
    let extent = (rows - 1) as f64 * pixel_spacing_mm * 0.5;
    let ascend = rng.gen_bool(0.5);
    let (z_first, dz) = if ascend {
        (z_bottom, spacing)
    } else {
        (z_bottom + (slices - 1) as f64 * spacing, -spacing)
    };
    let geometry = AcquisitionGeometry {
        rows,
        columns: rows,
        fov_mm,
        pixel_spacing_mm,
        slice_thickness_mm,
        spacing_between_slices_mm: spacing,
        slices,
        patient_position,
        image_orientation_patient: [rowdir_x, 0.0, 0.0, 0.0, 1.0, 0.0],
        first_position: [
            fov_centre[0] - rowdir_x * extent,
            fov_centre[1] - extent,
            z_first,
        ],
        instance_step: [0.0, 0.0, dz],
        instances_ascend_superior: ascend,
        fov_centre,
    };

    // Deflate is slow to write (noisy pixels compress poorly): keep it rarer.
    let transfer_syntax = *[
        TransferSyntax::ExplicitVrLittleEndian,
        TransferSyntax::ExplicitVrLittleEndian,
        TransferSyntax::ImplicitVrLittleEndian,
        TransferSyntax::ImplicitVrLittleEndian,
        TransferSyntax::DeflatedExplicitVrLittleEndian,
    ]
    .choose(&mut rng)
    .unwrap();
    let transfer_syntax = ov.transfer_syntax.unwrap_or(transfer_syntax);
    let encoding = match rng.gen_range(0..3) {
        0 => Encoding {
            transfer_syntax,
            transfer_syntax_uid: transfer_syntax.uid(),
            bits_stored: 16,
            pixel_representation: 1,
            rescale_intercept: 0.0,
            rescale_slope: 1.0,
        },
        1 => Encoding {
            transfer_syntax,
            transfer_syntax_uid: transfer_syntax.uid(),
            bits_stored: 16,
            pixel_representation: 1,
            rescale_intercept: -1024.0,
            rescale_slope: 1.0,
        },
        _ => Encoding {
            transfer_syntax,
            transfer_syntax_uid: transfer_syntax.uid(),
            bits_stored: 12,
            pixel_representation: 0,
            rescale_intercept: -1024.0,
            rescale_slope: 1.0,
        },
    };

    let cancellous = rng.gen_range(220.0..400.0);
    let hu = TissueHu {
        cortical: rng.gen_range(1200.0..1800.0),
        cancellous,
        sclerotic: cancellous + rng.gen_range(250.0..450.0),
        disc: rng.gen_range(70.0..95.0),
        muscle: rng.gen_range(35.0..60.0),
        fat: rng.gen_range(-120.0..-80.0),
        air: -1000.0,
        fracture_gap: rng.gen_range(30.0..70.0),
    };
    let noise_sigma_hu = ov.noise.unwrap_or(rng.gen_range(5.0..40.0));
    let blur_sigma_mm = ov.blur.unwrap_or(rng.gen_range(0.3..1.0));

    let reconstruction_circle = rng.gen_bool(0.5);
    // The head rests on the table; the neck hovers a little above it.
    let soft = SoftTissue {
        table_y: soft.centre[1] + 1.2 * soft.semi_axes[1] + rng.gen_range(2.0..10.0),
        table_radius_mm: rng.gen_range(300.0..600.0),
        table_thickness_mm: rng.gen_range(4.0..9.0),
        table_hu: rng.gen_range(150.0..350.0),
        ..soft
    };
    let year = rng.gen_range(2019..2026);
    let id = Identity {
        patient_id: format!("SYNTH{:08}", seed % 100_000_000),
        patient_name: format!("PHANTOM^SYNTHETIC^{index:05}"),
        patient_sex: ["M", "F", "O"].choose(&mut rng).unwrap().to_string(),
        patient_birth_date: format!(
            "{}{:02}{:02}",
            rng.gen_range(1930..2005),
            rng.gen_range(1..13),
            rng.gen_range(1..29)
        ),
        accession_number: format!("SYN{:010}", rng.gen_range(0..10_000_000_000u64)),
        study_date: format!(
            "{year}{:02}{:02}",
            rng.gen_range(1..13),
            rng.gen_range(1..29)
        ),
        study_time: format!(
            "{:02}{:02}{:02}",
            rng.gen_range(0..24),
            rng.gen_range(0..60),
            rng.gen_range(0..60)
        ),
        station_name: format!("SYNTHCT{:02}", rng.gen_range(1..20)),
        convolution_kernel: ["BONE", "BONEPLUS", "B70f", "Br64", "FC30", "YC"]
            .choose(&mut rng)
            .unwrap()
            .to_string(),
        study_instance_uid: random_uid(&mut rng),
        series_instance_uid: random_uid(&mut rng),
        frame_of_reference_uid: random_uid(&mut rng),
        sop_instance_uids: (0..slices).map(|_| random_uid(&mut rng)).collect(),
    };

    Study {
        index,
        seed,
        id,
        geometry,
        encoding,
        hu,
        noise_sigma_hu,
        blur_sigma_mm,
        reconstruction_circle,
        soft,
        spine,
        fractures,
    }
}

/// Bounds of C1-C7 (the part that must stay in the field of view).
fn spine_bounds(spine: &Spine) -> Aabb {
    let mut bb = Aabb::empty();
    for b in spine.bones.iter().filter(|b| (1..=7).contains(&b.label)) {
        bb = bb.union(&b.intact_patient_bounds());
    }
    bb
}
