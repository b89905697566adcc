//! Which instances and series go on to volume building, and which series of a study is
//! analysed.
//!
//! Instance rule: only single-frame CT Image Storage objects of ORIGINAL, non-localizer,
//! axial images qualify (see [`instance_rejection`]). Everything else is skipped with a
//! reason: localizers/scouts, DERIVED images (reformats, MIPs), non-axial planes, other
//! modalities, structured reports, Enhanced / Legacy Converted Enhanced CT (multi-frame,
//! not processed yet), secondary captures.
//!
//! Study rule: of the candidate series of one study, the best by [`rank_key`] is analysed:
//! a bone kernel first (see [`is_bone_kernel`]), then the thinnest slices, then the most
//! slices, then the lowest SeriesNumber (a deterministic tie-break).
//!
//! [`selection`] applies both rules to one study; the daemon's assembler and offline
//! loading (`infer`) both call it, so that they choose the same series.

use std::cmp::Ordering;

use super::header::InstanceHeader;
use super::key::SeriesKey;

/// CT Image Storage: the classic single-frame CT object, the only one processed.
pub const CT_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.2";
pub const ENHANCED_CT_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.2.1";
pub const LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.2.2";
const SR_PREFIX: &str = "1.2.840.10008.5.1.4.1.1.88.";
const SECONDARY_CAPTURE_PREFIX: &str = "1.2.840.10008.5.1.4.1.1.7";

/// Something not processed, and why. Skips are logged and kept for tests and reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Skip {
    pub key: SeriesKey,
    /// Number of instances the skip covers.
    pub instances: usize,
    pub reason: SkipReason,
}

/// Why a series, or some instances of it, is not analysed; [`std::fmt::Display`] is the
/// text logged and shown by `infer`.
#[derive(Debug, Clone, PartialEq)]
pub enum SkipReason {
    /// Instances that cannot be a slice of an axial CT volume (the instance rule).
    NotASlice(Rejection),
    /// A candidate series, but another series of its study ranks better; it is a
    /// fallback if that one cannot be built.
    NotTheBest {
        best: CandidateSummary,
        this: CandidateSummary,
    },
    /// A series completed after its study was decided, and the series already chosen
    /// ranks better.
    LateNotBetter {
        chosen: CandidateSummary,
        this: CandidateSummary,
    },
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SkipReason::NotASlice(why) => why.fmt(f),
            SkipReason::NotTheBest { best, this } => write!(
                f,
                "not the best series of its study: series {} ({}) is preferred over this one ({}); \
                 this one is a fallback if it cannot be built",
                best.series_instance_uid,
                best.describe(),
                this.describe()
            ),
            SkipReason::LateNotBetter { chosen, this } => write!(
                f,
                "study already analysed with series {} ({}), preferred over this late one ({})",
                chosen.series_instance_uid,
                chosen.describe(),
                this.describe()
            ),
        }
    }
}

/// Why an instance cannot be a slice of an axial CT volume ([`instance_rejection`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Rejection {
    StructuredReport {
        sop_class_uid: String,
    },
    NotCt {
        modality: String,
    },
    /// Enhanced or Legacy Converted Enhanced CT: multi-frame, not processed yet.
    EnhancedCt {
        sop_class_uid: String,
    },
    SecondaryCapture,
    NotCtImageStorage {
        sop_class_uid: String,
    },
    MultiFrame,
    Localizer,
    /// ImageType's first value is not ORIGINAL (a reformat, post-processing).
    NotOriginal {
        image_type: String,
    },
    NoOrientation,
    NotAxial {
        plane: &'static str,
        normal: [f64; 3],
    },
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejection::StructuredReport { sop_class_uid } => write!(
                f,
                "structured report (SOP class {sop_class_uid}), not an image"
            ),
            Rejection::NotCt { modality } => write!(f, "modality {modality} is not CT"),
            Rejection::EnhancedCt { sop_class_uid } => write!(
                f,
                "Enhanced CT (multi-frame, SOP class {sop_class_uid}) is stored but not processed yet"
            ),
            Rejection::SecondaryCapture => {
                f.write_str("secondary capture (screenshot), not an acquired CT image")
            }
            Rejection::NotCtImageStorage { sop_class_uid } => {
                write!(f, "SOP class {sop_class_uid} is not CT Image Storage")
            }
            Rejection::MultiFrame => f.write_str("multi-frame CT image, not processed yet"),
            Rejection::Localizer => f.write_str("localizer (scout) image"),
            Rejection::NotOriginal { image_type } => write!(
                f,
                "{image_type} image (reformat or post-processing), only ORIGINAL images are analysed"
            ),
            Rejection::NoOrientation => f.write_str("no valid ImageOrientationPatient"),
            Rejection::NotAxial { plane, normal } => write!(
                f,
                "not axial: {plane} plane (slice normal {:.2}, {:.2}, {:.2})",
                normal[0], normal[1], normal[2]
            ),
        }
    }
}

/// Why this instance cannot be a slice of an axial CT volume; `None` if it can.
pub fn instance_rejection(h: &InstanceHeader) -> Option<Rejection> {
    if h.sop_class_uid.starts_with(SR_PREFIX) {
        return Some(Rejection::StructuredReport {
            sop_class_uid: h.sop_class_uid.clone(),
        });
    }
    if !h.modality.is_empty() && h.modality != "CT" {
        return Some(Rejection::NotCt {
            modality: h.modality.clone(),
        });
    }
    if h.sop_class_uid == ENHANCED_CT_IMAGE_STORAGE
        || h.sop_class_uid == LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE
    {
        return Some(Rejection::EnhancedCt {
            sop_class_uid: h.sop_class_uid.clone(),
        });
    }
    if h.sop_class_uid.starts_with(SECONDARY_CAPTURE_PREFIX) {
        return Some(Rejection::SecondaryCapture);
    }
    if h.sop_class_uid != CT_IMAGE_STORAGE {
        return Some(Rejection::NotCtImageStorage {
            sop_class_uid: h.sop_class_uid.clone(),
        });
    }
    if h.number_of_frames.is_some_and(|n| n > 1) {
        return Some(Rejection::MultiFrame);
    }
    if h.image_type.iter().any(|v| v == "LOCALIZER") {
        return Some(Rejection::Localizer);
    }
    // ImageType is type 1 for CT; a sender that leaves it out gets the benefit of the doubt.
    if let Some(first) = h.image_type.first() {
        if first != "ORIGINAL" {
            return Some(Rejection::NotOriginal {
                image_type: first.clone(),
            });
        }
    }
    let Some(normal) = h.normal() else {
        return Some(Rejection::NoOrientation);
    };
    if let Some(plane) = non_axial_plane(normal) {
        return Some(Rejection::NotAxial { plane, normal });
    }
    None
}

/// The plane name when the slice normal is closer to the x (sagittal) or y (coronal) axis
/// than to z (axial); gantry-tilted axials stay axial.
fn non_axial_plane(normal: [f64; 3]) -> Option<&'static str> {
    let [x, y, z] = normal.map(f64::abs);
    if z >= x && z >= y {
        None
    } else if x >= y {
        Some("sagittal")
    } else {
        Some("coronal")
    }
}

/// Bone (sharp) reconstruction kernel rule, case-insensitive, on ConvolutionKernel:
/// - contains `BONE` (GE BONE/BONEPLUS, Philips/Canon "Bone") or `EDGE` (GE, sharper than BONE);
/// - Siemens style `<letters><two digits>` (e.g. B60f, B70s, Br64, Hr60, H70h, I70f, Ur77)
///   with a sharpness number of 60 or more (B60+ / H60+ are the bone kernels);
/// - or contains one of the extra substrings from the configuration.
pub fn is_bone_kernel(kernel: &str, extra: &[String]) -> bool {
    let upper = kernel.to_ascii_uppercase();
    if upper.contains("BONE") || upper.contains("EDGE") {
        return true;
    }
    if extra
        .iter()
        .any(|p| !p.is_empty() && upper.contains(&p.to_ascii_uppercase()))
    {
        return true;
    }
    siemens_sharpness(kernel).any(|n| n >= 60)
}

/// The sharpness numbers of the Siemens-style values of a ConvolutionKernel (`B30f`,
/// `Br64d`, `Hr36`: one or two letters starting with B, H, I, J or U, then two digits), one
/// per `\`-separated value that has that form.
pub fn siemens_sharpness(kernel: &str) -> impl Iterator<Item = u32> + '_ {
    kernel.split('\\').filter_map(|value| {
        let value = value.trim().to_ascii_uppercase();
        let letters = value
            .chars()
            .take_while(|c| c.is_ascii_alphabetic())
            .count();
        let digits: String = value[letters..]
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        let siemens = (1..=2).contains(&letters)
            && matches!(value.as_bytes()[0], b'B' | b'H' | b'I' | b'J' | b'U')
            && digits.len() == 2;
        siemens.then(|| digits.parse().ok()).flatten()
    })
}

/// What the study rule compares, for one candidate series.
#[derive(Debug, Clone, PartialEq)]
pub struct CandidateSummary {
    pub series_instance_uid: String,
    pub bone_kernel: bool,
    /// SliceThickness, or the spacing measured from positions when absent.
    pub thickness_mm: Option<f64>,
    pub instances: usize,
    pub series_number: Option<i64>,
}

impl CandidateSummary {
    pub fn from_headers(
        series_instance_uid: &str,
        headers: &[&InstanceHeader],
        extra_bone: &[String],
    ) -> Self {
        let first = headers.first();
        let thickness_mm = first
            .and_then(|h| h.slice_thickness)
            .filter(|t| *t > 0.0)
            .or_else(|| measured_spacing(headers));
        CandidateSummary {
            series_instance_uid: series_instance_uid.to_string(),
            bone_kernel: first.is_some_and(|h| is_bone_kernel(&h.convolution_kernel, extra_bone)),
            thickness_mm,
            instances: headers.len(),
            series_number: first.and_then(|h| h.series_number),
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "{} kernel, {} mm, {} slices",
            if self.bone_kernel { "bone" } else { "non-bone" },
            self.thickness_mm
                .map_or("unknown".into(), |t| format!("{t:.2}")),
            self.instances
        )
    }
}

/// Smallest positive step between sorted slice positions along the normal.
fn measured_spacing(headers: &[&InstanceHeader]) -> Option<f64> {
    let normal = headers.first()?.normal()?;
    let mut z: Vec<f64> = headers
        .iter()
        .filter_map(|h| h.image_position_patient)
        .map(|p| super::header::dot(p, normal))
        .collect();
    z.sort_by(f64::total_cmp);
    z.windows(2)
        .map(|w| w[1] - w[0])
        .filter(|d| *d > 0.01)
        .min_by(f64::total_cmp)
}

/// Orders candidates best first: bone kernel, thinnest, most slices, lowest SeriesNumber,
/// then UID.
pub fn rank_key(a: &CandidateSummary, b: &CandidateSummary) -> Ordering {
    b.bone_kernel
        .cmp(&a.bone_kernel)
        .then_with(|| {
            let (ta, tb) = (
                a.thickness_mm.unwrap_or(f64::INFINITY),
                b.thickness_mm.unwrap_or(f64::INFINITY),
            );
            ta.total_cmp(&tb)
        })
        .then_with(|| b.instances.cmp(&a.instances))
        .then_with(|| {
            a.series_number
                .unwrap_or(i64::MAX)
                .cmp(&b.series_number.unwrap_or(i64::MAX))
        })
        .then_with(|| a.series_instance_uid.cmp(&b.series_instance_uid))
}

/// Splits the instances of one series into those that qualify as slices and skips
/// (one per distinct reason, with its instance count).
pub fn filter_series(headers: Vec<InstanceHeader>) -> (Vec<InstanceHeader>, Vec<Skip>) {
    let mut accepted = Vec::with_capacity(headers.len());
    // By the reason's text: one skip per distinct text, in its order.
    let mut reasons: std::collections::BTreeMap<String, Skip> = Default::default();
    for h in headers {
        match instance_rejection(&h) {
            None => accepted.push(h),
            Some(reason) => {
                let entry = reasons.entry(reason.to_string()).or_insert_with(|| Skip {
                    key: SeriesKey::new(&h.study_instance_uid, &h.series_instance_uid),
                    instances: 0,
                    reason: SkipReason::NotASlice(reason),
                });
                entry.instances += 1;
            }
        }
    }
    let skips = reasons.into_values().collect();
    (accepted, skips)
}

/// The longest contiguous slab of a series still arriving: its slices (sorted along the
/// slice normal, one per position) without a step larger than
/// [`super::volume::GAP_FACTOR`] times the median step, and its length in mm (first to
/// last position, plus one step). Slices without a position are left out. What the
/// anatomy-coverage trigger analyses early: volume building accepts it (no gap).
pub fn contiguous_slab(accepted: &[InstanceHeader]) -> (Vec<InstanceHeader>, f64) {
    let Some(normal) = accepted.iter().find_map(|h| h.normal()) else {
        return (Vec::new(), 0.0);
    };
    let mut stack: Vec<(f64, &InstanceHeader)> = accepted
        .iter()
        .filter_map(|h| Some((super::header::dot(h.image_position_patient?, normal), h)))
        .collect();
    stack.sort_by(|a, b| a.0.total_cmp(&b.0));
    stack.dedup_by(|b, a| (b.0 - a.0).abs() < 0.01);
    if stack.len() < 2 {
        return (stack.into_iter().map(|(_, h)| h.clone()).collect(), 0.0);
    }
    let mut steps: Vec<f64> = stack.windows(2).map(|w| w[1].0 - w[0].0).collect();
    let step_at = steps.clone();
    steps.sort_by(f64::total_cmp);
    let median = steps[steps.len() / 2];
    // Runs between gaps: (first index, last index).
    let mut best = (0, 0);
    let mut start = 0;
    for (i, &step) in step_at.iter().enumerate() {
        if step > super::volume::GAP_FACTOR * median {
            start = i + 1;
        } else if stack[i + 1].0 - stack[start].0 > stack[best.1].0 - stack[best.0].0 {
            best = (start, i + 1);
        }
    }
    let length = stack[best.1].0 - stack[best.0].0 + median;
    let slab = stack[best.0..=best.1]
        .iter()
        .map(|(_, h)| (*h).clone())
        .collect();
    (slab, length)
}

/// Candidate indices best first, and a skip for every candidate but the best. The others
/// stay fallbacks, built in this order only if the better ones cannot be.
pub fn choose_candidate(
    candidates: &[CandidateSummary],
    study_instance_uid: &str,
) -> (Vec<usize>, Vec<Skip>) {
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    order.sort_by(|&a, &b| rank_key(&candidates[a], &candidates[b]));
    let best = order[0];
    let skips = order[1..]
        .iter()
        .map(|&i| Skip {
            key: SeriesKey::new(study_instance_uid, &candidates[i].series_instance_uid),
            instances: candidates[i].instances,
            reason: SkipReason::NotTheBest {
                best: candidates[best].clone(),
                this: candidates[i].clone(),
            },
        })
        .collect();
    (order, skips)
}

/// One candidate series of a study: its instances that qualify as slices, and what the
/// study rule compares.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub summary: CandidateSummary,
    pub instances: Vec<InstanceHeader>,
}

/// What [`selection`] chose for one study.
#[derive(Debug, Clone, Default)]
pub struct StudySelection {
    /// The candidate series, best first: the first is analysed, the others are fallbacks
    /// built in this order only if the better ones cannot be. Empty when no series has an
    /// instance that qualifies.
    pub ranked: Vec<Candidate>,
    /// Instances filtered out (per series and reason), then every candidate but the best.
    pub skips: Vec<Skip>,
}

/// The instance rule and the study rule on the series of one study (Series Instance UID,
/// instances), in the order given: the candidates best first, and the skips.
/// `extra_bone` extends the bone-kernel rule (see [`is_bone_kernel`]).
pub fn selection(
    study_instance_uid: &str,
    series: impl IntoIterator<Item = (String, Vec<InstanceHeader>)>,
    extra_bone: &[String],
) -> StudySelection {
    let mut skips = Vec::new();
    let mut candidates = Vec::new();
    for (series_uid, headers) in series {
        let (accepted, series_skips) = filter_series(headers);
        skips.extend(series_skips);
        if !accepted.is_empty() {
            let refs: Vec<&InstanceHeader> = accepted.iter().collect();
            let summary = CandidateSummary::from_headers(&series_uid, &refs, extra_bone);
            candidates.push(Candidate {
                summary,
                instances: accepted,
            });
        }
    }
    if candidates.is_empty() {
        return StudySelection {
            ranked: Vec::new(),
            skips,
        };
    }
    let summaries: Vec<CandidateSummary> = candidates.iter().map(|c| c.summary.clone()).collect();
    let (order, choice_skips) = choose_candidate(&summaries, study_instance_uid);
    skips.extend(choice_skips);
    let mut slots: Vec<Option<Candidate>> = candidates.into_iter().map(Some).collect();
    let ranked = order
        .into_iter()
        .map(|i| slots[i].take().expect("each candidate once"))
        .collect();
    StudySelection { ranked, skips }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bone_kernels() {
        for k in [
            "BONE",
            "BONEPLUS",
            "EDGE",
            "B60f",
            "B70s",
            "Br64d\\3",
            "Hr60",
            "H70h",
            "I70f\\2",
            "Ur77u",
            "FC30 bone",
        ] {
            assert!(is_bone_kernel(k, &[]), "{k} should be bone");
        }
        for k in [
            "STANDARD", "SOFT", "B30f", "Br40", "H31s", "I26f\\3", "LUNG", "", "FC08",
        ] {
            assert!(!is_bone_kernel(k, &[]), "{k} should not be bone");
        }
        assert!(is_bone_kernel("FC30", &["fc30".into()]));
    }

    fn summary(uid: &str, bone: bool, t: f64, n: usize) -> CandidateSummary {
        CandidateSummary {
            series_instance_uid: uid.into(),
            bone_kernel: bone,
            thickness_mm: Some(t),
            instances: n,
            series_number: None,
        }
    }

    #[test]
    fn ranking_prefers_bone_then_thin() {
        let mut c = [
            summary("soft-thin", false, 0.625, 400),
            summary("bone-thick", true, 2.0, 100),
            summary("bone-thin", true, 0.625, 400),
        ];
        c.sort_by(rank_key);
        let order: Vec<_> = c.iter().map(|s| s.series_instance_uid.as_str()).collect();
        assert_eq!(order, ["bone-thin", "bone-thick", "soft-thin"]);
    }

    #[test]
    fn rejections() {
        let axial = InstanceHeader {
            sop_class_uid: CT_IMAGE_STORAGE.into(),
            modality: "CT".into(),
            image_type: vec!["ORIGINAL".into(), "PRIMARY".into(), "AXIAL".into()],
            image_orientation_patient: Some([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]),
            ..Default::default()
        };
        assert_eq!(instance_rejection(&axial), None);
        let mut scout = axial.clone();
        scout.image_type[2] = "LOCALIZER".into();
        assert_eq!(instance_rejection(&scout), Some(Rejection::Localizer));
        let mut sagittal = axial.clone();
        sagittal.image_orientation_patient = Some([0.0, 1.0, 0.0, 0.0, 0.0, -1.0]);
        assert!(matches!(
            instance_rejection(&sagittal),
            Some(Rejection::NotAxial {
                plane: "sagittal",
                ..
            })
        ));
        let mut derived = axial.clone();
        derived.image_type[0] = "DERIVED".into();
        assert!(
            matches!(instance_rejection(&derived), Some(Rejection::NotOriginal { image_type }) if image_type == "DERIVED")
        );
        let mut enhanced = axial.clone();
        enhanced.sop_class_uid = ENHANCED_CT_IMAGE_STORAGE.into();
        assert!(matches!(
            instance_rejection(&enhanced),
            Some(Rejection::EnhancedCt { .. })
        ));
        let mut mr = axial;
        mr.modality = "MR".into();
        mr.sop_class_uid = "1.2.840.10008.5.1.4.1.1.4".into();
        assert!(matches!(
            instance_rejection(&mr),
            Some(Rejection::NotCt { .. })
        ));
    }

    #[test]
    fn contiguous_slab_is_the_longest_run_without_a_gap() {
        let slice = |z: f64| InstanceHeader {
            sop_instance_uid: format!("1.2.{z}"),
            image_position_patient: Some([0.0, 0.0, z]),
            image_orientation_patient: Some([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]),
            ..Default::default()
        };
        // 0..=4 and 7..=14 mm, 1 mm apart, shuffled, one position twice.
        let mut hs: Vec<InstanceHeader> = (0..5).chain(7..15).map(|z| slice(z as f64)).collect();
        hs.reverse();
        hs.push(slice(9.0));
        let (slab, mm) = contiguous_slab(&hs);
        let z: Vec<f64> = slab
            .iter()
            .map(|h| h.image_position_patient.unwrap()[2])
            .collect();
        assert_eq!(z, (7..15).map(f64::from).collect::<Vec<_>>());
        assert!((mm - 8.0).abs() < 1e-9, "{mm}");
        assert_eq!(contiguous_slab(&hs[..1]).1, 0.0);
        assert!(contiguous_slab(&[]).0.is_empty());
    }
}
