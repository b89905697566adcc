//! The acquisition envelope: the series geometry (pixel spacing, slice spacing, slice
//! thickness, reconstruction kernel family, z coverage) the model was trained and tested on,
//! as `model.json` states it (`envelope`, see `docs/model-contract.md`). A series outside it
//! is answered `indeterminate` with the violations as the reason, before the model runs
//! (except the least number of vertebrae in view, `min_covered_vertebrae`, which needs the
//! model's segmentation and is checked after it, in [`super::postprocess`]): a
//! model that has only seen one kind of acquisition has nothing to say about another, and a
//! `negative` there must not be trusted. `cspine-triage infer --ignore-envelope` analyses
//! such a series anyway, for evaluation only; the daemon always enforces the envelope.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::series::CtVolume;

/// Prefix of the published `reason` of a series outside the envelope.
pub const REASON_OUTSIDE_ENVELOPE: &str =
    "series outside the acquisition envelope the model was trained on";

/// A closed range in mm.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MmRange {
    pub min: f64,
    pub max: f64,
}

impl MmRange {
    fn contains(&self, v: f64) -> bool {
        v >= self.min && v <= self.max
    }

    fn is_valid(&self) -> bool {
        self.min.is_finite() && self.max.is_finite() && self.min > 0.0 && self.max >= self.min
    }
}

/// Families of reconstruction kernel (ConvolutionKernel is free text; see
/// [`KernelFamily::classify`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelFamily {
    /// Sharp bone kernels (GE BONE/BONEPLUS/EDGE, Siemens B/H/I/J/U 60 and sharper, "Bone").
    Bone,
    /// Smooth soft-tissue kernels (GE STANDARD/SOFT, Siemens B/H/I/J/U below 60, "Brain",
    /// "Smooth").
    Soft,
}

impl KernelFamily {
    /// The family a ConvolutionKernel value names, or None when the rule does not recognise
    /// it (vendor codes such as Canon FC30 or Philips YC): unknown kernels are not refused.
    pub fn classify(kernel: &str) -> Option<KernelFamily> {
        if kernel.trim().is_empty() {
            return None;
        }
        if crate::series::selection::is_bone_kernel(kernel, &[]) {
            return Some(KernelFamily::Bone);
        }
        let upper = kernel.to_ascii_uppercase();
        if ["STANDARD", "STND", "SOFT", "SMOOTH", "BRAIN"]
            .iter()
            .any(|s| upper.contains(s))
        {
            return Some(KernelFamily::Soft);
        }
        // Siemens style `<letters><two digits>` below 60 (B30f, Br40d, Hr36): soft.
        let siemens_soft = crate::series::selection::siemens_sharpness(kernel).any(|n| n < 60);
        siemens_soft.then_some(KernelFamily::Soft)
    }
}

impl fmt::Display for KernelFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KernelFamily::Bone => "bone",
            KernelFamily::Soft => "soft-tissue",
        })
    }
}

/// `envelope` of `model.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// Distance between pixel centres, rows and columns alike.
    pub pixel_spacing_mm: MmRange,
    /// Distance between slice centres along the slice normal.
    pub slice_spacing_mm: MmRange,
    /// SliceThickness. Checked when the series states it.
    pub slice_thickness_mm: MmRange,
    /// Kernel families the model was trained on. A series whose ConvolutionKernel is
    /// recognised as another family is outside; an absent or unrecognised kernel is not
    /// (the tag is free text). Absent or empty: no kernel check.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kernel_families: Vec<KernelFamily>,
    /// Shortest z coverage (first to last slice centre) accepted. Absent: no check (from
    /// 0.8.0, where partial coverage is analysed and `min_covered_vertebrae` bounds it
    /// instead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_coverage_mm: Option<f64>,
    /// Least number of contiguous vertebra levels the series must cover (partial coverage,
    /// [`super::postprocess::InView`]) for the vertebrae in view to be analysed. Absent: no
    /// check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_covered_vertebrae: Option<usize>,
}

impl Envelope {
    pub fn validate(&self) -> anyhow::Result<()> {
        for (what, r) in [
            ("pixel_spacing_mm", &self.pixel_spacing_mm),
            ("slice_spacing_mm", &self.slice_spacing_mm),
            ("slice_thickness_mm", &self.slice_thickness_mm),
        ] {
            anyhow::ensure!(
                r.is_valid(),
                "envelope.{what} must have 0 < min <= max, got {} to {}",
                r.min,
                r.max
            );
        }
        if let Some(mm) = self.min_coverage_mm {
            anyhow::ensure!(
                mm.is_finite() && mm >= 0.0,
                "envelope.min_coverage_mm must be >= 0"
            );
        }
        if let Some(n) = self.min_covered_vertebrae {
            anyhow::ensure!(
                (1..=7).contains(&n),
                "envelope.min_covered_vertebrae must be 1 to 7, got {n}"
            );
        }
        Ok(())
    }

    /// Everything about `acq` outside the envelope; empty when it is inside.
    pub fn check(&self, acq: &Acquisition) -> Vec<Violation> {
        let mut out = Vec::new();
        for mm in acq.pixel_spacing_mm {
            if !self.pixel_spacing_mm.contains(mm) {
                out.push(Violation::PixelSpacing {
                    mm,
                    allowed: self.pixel_spacing_mm,
                });
                break;
            }
        }
        if !self.slice_spacing_mm.contains(acq.slice_spacing_mm) {
            out.push(Violation::SliceSpacing {
                mm: acq.slice_spacing_mm,
                allowed: self.slice_spacing_mm,
            });
        }
        if let Some(mm) = acq.slice_thickness_mm {
            if !self.slice_thickness_mm.contains(mm) {
                out.push(Violation::SliceThickness {
                    mm,
                    allowed: self.slice_thickness_mm,
                });
            }
        }
        if let Some(kernel) = &acq.convolution_kernel {
            if let Some(family) = KernelFamily::classify(kernel) {
                if !self.kernel_families.is_empty() && !self.kernel_families.contains(&family) {
                    out.push(Violation::Kernel {
                        kernel: kernel.clone(),
                        family,
                    });
                }
            }
        }
        if let Some(min) = self.min_coverage_mm.filter(|&min| acq.coverage_mm < min) {
            out.push(Violation::Coverage {
                mm: acq.coverage_mm,
                min,
            });
        }
        out
    }

    /// The check of `min_covered_vertebrae` against the levels a series covers (`covered`:
    /// their names, contiguous, in order), once the model's segmentation has told them.
    pub fn check_covered(&self, covered: &[String]) -> Option<Violation> {
        let min = self.min_covered_vertebrae?;
        (covered.len() < min).then(|| Violation::CoveredVertebrae {
            covered: covered.to_vec(),
            min,
        })
    }
}

/// What the envelope is checked against, for one series.
#[derive(Debug, Clone, PartialEq)]
pub struct Acquisition {
    /// [between rows, between columns].
    pub pixel_spacing_mm: [f64; 2],
    pub slice_spacing_mm: f64,
    /// None when unknown: not checked.
    pub slice_thickness_mm: Option<f64>,
    /// None when unknown: not checked.
    pub convolution_kernel: Option<String>,
    /// First to last slice centre along the normal.
    pub coverage_mm: f64,
}

impl Acquisition {
    /// The geometry of a built volume, with the SliceThickness and ConvolutionKernel of
    /// its series' first instance ([`crate::series::SeriesMeta`]).
    pub fn of_volume(volume: &CtVolume) -> Acquisition {
        let g = &volume.geometry;
        let coverage_mm = match (volume.slices.first(), volume.slices.last()) {
            (Some(a), Some(b)) => (b.z_mm - a.z_mm).abs(),
            _ => 0.0,
        };
        Acquisition {
            pixel_spacing_mm: [g.spacing[1], g.spacing[2]],
            slice_spacing_mm: g.spacing[0],
            slice_thickness_mm: volume.meta.slice_thickness_mm,
            convolution_kernel: Some(volume.meta.convolution_kernel.clone())
                .filter(|k| !k.trim().is_empty()),
            coverage_mm,
        }
    }
}

/// One way a series lies outside the envelope.
#[derive(Debug, Clone, PartialEq)]
pub enum Violation {
    PixelSpacing {
        mm: f64,
        allowed: MmRange,
    },
    SliceSpacing {
        mm: f64,
        allowed: MmRange,
    },
    SliceThickness {
        mm: f64,
        allowed: MmRange,
    },
    Kernel {
        kernel: String,
        family: KernelFamily,
    },
    Coverage {
        mm: f64,
        min: f64,
    },
    /// Fewer contiguous vertebra levels in view than `min_covered_vertebrae`: `covered`
    /// names those in view, in order (empty for none).
    CoveredVertebrae {
        covered: Vec<String>,
        min: usize,
    },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::PixelSpacing { mm, allowed } => write!(
                f,
                "pixel spacing {mm:.2} mm, trained on {:.2}-{:.2} mm",
                allowed.min, allowed.max
            ),
            Violation::SliceSpacing { mm, allowed } => write!(
                f,
                "slice spacing {mm:.2} mm, trained on {:.2}-{:.2} mm",
                allowed.min, allowed.max
            ),
            Violation::SliceThickness { mm, allowed } => write!(
                f,
                "slice thickness {mm:.2} mm, trained on {:.2}-{:.2} mm",
                allowed.min, allowed.max
            ),
            Violation::Kernel { kernel, family } => write!(
                f,
                "reconstruction kernel {kernel:?} is a {family} kernel, not one the model was \
                 trained on"
            ),
            Violation::Coverage { mm, min } => write!(
                f,
                "z coverage {mm:.0} mm, trained on at least {min:.0} mm (C1 to C7 in view)"
            ),
            Violation::CoveredVertebrae { covered, min } => match covered.as_slice() {
                [] => write!(
                    f,
                    "no vertebra lies whole in the series, at least {min} contiguous levels \
                     needed"
                ),
                [one] => write!(
                    f,
                    "only {one} in view (1 level(s)), at least {min} contiguous levels needed"
                ),
                [first, .., last] => write!(
                    f,
                    "only {first}-{last} in view ({} level(s)), at least {min} contiguous \
                     levels needed",
                    covered.len()
                ),
            },
        }
    }
}

/// The published reason for `violations` (not empty).
pub fn reason(violations: &[Violation]) -> String {
    let list: Vec<String> = violations.iter().map(ToString::to_string).collect();
    format!(
        "{REASON_OUTSIDE_ENVELOPE}: {}; read this study without triage",
        list.join("; ")
    )
}

/// Whether [`crate::inference::Pipeline`] refuses series outside the envelope. The daemon
/// always enforces; only `cspine-triage infer --ignore-envelope` ignores, for evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EnvelopePolicy {
    #[default]
    Enforce,
    /// Analyse anyway; the violations are reported in [`crate::inference::Analysis`].
    Ignore,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope() -> Envelope {
        Envelope {
            pixel_spacing_mm: MmRange {
                min: 0.27,
                max: 0.98,
            },
            slice_spacing_mm: MmRange { min: 0.5, max: 3.0 },
            slice_thickness_mm: MmRange { min: 0.6, max: 3.0 },
            kernel_families: vec![KernelFamily::Bone],
            min_coverage_mm: Some(100.0),
            min_covered_vertebrae: Some(2),
        }
    }

    fn inside() -> Acquisition {
        Acquisition {
            pixel_spacing_mm: [0.5, 0.5],
            slice_spacing_mm: 1.0,
            slice_thickness_mm: Some(1.0),
            convolution_kernel: Some("BONEPLUS".into()),
            coverage_mm: 180.0,
        }
    }

    #[test]
    fn a_series_inside_passes_and_each_departure_is_its_own_variant() {
        let e = envelope();
        assert!(e.check(&inside()).is_empty());
        let coarse = Acquisition {
            pixel_spacing_mm: [0.5, 5.08],
            slice_spacing_mm: 2.5,
            coverage_mm: 320.0,
            ..inside()
        };
        assert!(matches!(
            e.check(&coarse).as_slice(),
            [Violation::PixelSpacing { mm, .. }] if *mm == 5.08
        ));
        let thick = Acquisition {
            slice_spacing_mm: 5.0,
            slice_thickness_mm: Some(5.0),
            coverage_mm: 60.0,
            ..inside()
        };
        let v = e.check(&thick);
        assert!(matches!(
            v.as_slice(),
            [
                Violation::SliceSpacing { .. },
                Violation::SliceThickness { .. },
                Violation::Coverage { .. }
            ]
        ));
        assert!(reason(&v).starts_with(REASON_OUTSIDE_ENVELOPE));
    }

    #[test]
    fn kernels_are_refused_only_when_recognised_as_another_family() {
        let e = envelope();
        for (kernel, outside) in [
            ("STANDARD", true),
            ("B30f", true),
            ("Br40d", true),
            ("BONE", false),
            ("B70f", false),
            ("FC30", false),
            ("YC", false),
            ("", false),
        ] {
            let acq = Acquisition {
                convolution_kernel: Some(kernel.into()),
                ..inside()
            };
            assert_eq!(
                e.check(&acq)
                    .iter()
                    .any(|v| matches!(v, Violation::Kernel { .. })),
                outside,
                "{kernel}"
            );
        }
        let unknown = Acquisition {
            convolution_kernel: None,
            slice_thickness_mm: None,
            ..inside()
        };
        assert!(e.check(&unknown).is_empty());
    }

    /// One departure at a time: each gives its own variant and names itself in the reason.
    #[test]
    fn each_limit_alone_gives_its_own_reason() {
        let e = envelope();
        let cases = [
            (
                Acquisition {
                    pixel_spacing_mm: [1.2, 1.2],
                    ..inside()
                },
                "pixel spacing 1.20 mm, trained on 0.27-0.98 mm",
            ),
            (
                Acquisition {
                    slice_spacing_mm: 0.3,
                    ..inside()
                },
                "slice spacing 0.30 mm, trained on 0.50-3.00 mm",
            ),
            (
                Acquisition {
                    slice_thickness_mm: Some(5.0),
                    ..inside()
                },
                "slice thickness 5.00 mm, trained on 0.60-3.00 mm",
            ),
            (
                Acquisition {
                    convolution_kernel: Some("STANDARD".into()),
                    ..inside()
                },
                "reconstruction kernel \"STANDARD\" is a soft-tissue kernel",
            ),
            (
                Acquisition {
                    coverage_mm: 60.0,
                    ..inside()
                },
                "z coverage 60 mm, trained on at least 100 mm",
            ),
        ];
        for (acq, text) in cases {
            let v = e.check(&acq);
            assert_eq!(v.len(), 1, "{text}: {v:?}");
            let why = reason(&v);
            assert!(
                why.starts_with(REASON_OUTSIDE_ENVELOPE) && why.contains(text),
                "{why}"
            );
        }
        // Without `min_coverage_mm` (contracts from 0.8.0) a short series passes here; the
        // vertebrae in view decide after the model.
        let partial = Envelope {
            min_coverage_mm: None,
            ..envelope()
        };
        let short = Acquisition {
            coverage_mm: 60.0,
            ..inside()
        };
        assert!(partial.check(&short).is_empty());
    }

    #[test]
    fn too_few_covered_levels_is_a_violation_that_names_them() {
        let e = envelope();
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(e.check_covered(&names(&["C1", "C2", "C3"])), None);
        assert_eq!(e.check_covered(&names(&["C6", "C7"])), None);
        let one = e.check_covered(&names(&["C7"])).unwrap();
        assert_eq!(
            one,
            Violation::CoveredVertebrae {
                covered: names(&["C7"]),
                min: 2
            }
        );
        assert_eq!(
            one.to_string(),
            "only C7 in view (1 level(s)), at least 2 contiguous levels needed"
        );
        let none = e.check_covered(&[]).unwrap();
        assert!(
            none.to_string().starts_with("no vertebra lies whole"),
            "{none}"
        );
        let unchecked = Envelope {
            min_covered_vertebrae: None,
            ..envelope()
        };
        assert_eq!(unchecked.check_covered(&[]), None);
        let bad = Envelope {
            min_covered_vertebrae: Some(0),
            ..envelope()
        };
        assert!(bad.validate().is_err());
    }
}
