//! Fracture models. Each fracture is a lucent gap (a slab around a plane, in a
//! vertebra's local frame, limited to one part group and a spherical region),
//! optionally with one fragment displaced, or an anterior wedge compression.
//!
//! Gap widths are chosen so the fracture survives the model's resampling
//! (1.25 mm in-plane, 2 mm slices, see docs/model-contract.md): cracks whose
//! plane is close to axial get a gap of at least 1.5 source slice spacings and 3 mm.

use super::anatomy::Bone;
use super::geom::{dot, normalize, scale, V3};
use super::lesion::{Fracture, FractureKind};
use super::shape::{Group, Shape};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// Fracture types that make anatomical sense for a vertebra.
pub fn kinds_for(name: &str) -> &'static [FractureKind] {
    use FractureKind::*;
    match name {
        "C1" => &[C1RingCrack],
        "C2" => &[DensFracture, BodyCrack, DisplacedBodyCrack, LaminaCrack],
        _ => &[BodyCrack, DisplacedBodyCrack, Compression, LaminaCrack],
    }
}

fn random_unit_in_plane(rng: &mut ChaCha8Rng, max_z: f64) -> V3 {
    let t = rng.gen_range(0.0..std::f64::consts::PI);
    let z = rng.gen_range(-max_z..=max_z);
    normalize([t.cos(), t.sin(), z])
}

/// Minimum gap (mm) for a crack with unit normal `n` to stay visible on both the
/// source grid and the model grid.
fn min_visible_gap(n: V3, slice_spacing: f64) -> f64 {
    if n[2].abs() > 0.7 {
        (1.5 * slice_spacing).max(3.0)
    } else {
        2.0
    }
}

/// Adds a fracture of `kind` to `bone` (which must allow it).
pub fn add_fracture(rng: &mut ChaCha8Rng, bone: &mut Bone, kind: FractureKind, slice_spacing: f64) {
    use FractureKind::*;
    let s = 1.0;
    let f = match kind {
        BodyCrack | DisplacedBodyCrack => {
            let b = bone.body.expect("body crack needs a body");
            let point = [
                rng.gen_range(-0.4..0.4) * b.a,
                rng.gen_range(-0.4..0.4) * b.b,
                rng.gen_range(-0.3..0.3) * b.h,
            ];
            let normal = random_unit_in_plane(rng, 0.5);
            let gap = rng
                .gen_range(2.0..4.0f64)
                .max(min_visible_gap(normal, slice_spacing));
            let mut displacement = [0.0; 3];
            if kind == DisplacedBodyCrack {
                let mut d = normalize([
                    rng.gen_range(-1.0..1.0),
                    rng.gen_range(-1.0..1.0),
                    rng.gen_range(-0.5..0.5),
                ]);
                if dot(d, normal) < 0.0 {
                    d = scale(d, -1.0);
                }
                displacement = scale(d, rng.gen_range(1.0..4.0));
            }
            Fracture {
                kind,
                group: Group::Body,
                point,
                normal,
                gap,
                region: 60.0,
                displacement,
                wedge: 0.0,
            }
        }
        Compression => {
            let b = bone.body.expect("compression needs a body");
            let wedge = rng.gen_range(0.2..0.5);
            for p in bone.parts.iter_mut() {
                if let Shape::Body { wedge: w, .. } = &mut p.shape {
                    *w = wedge;
                }
            }
            Fracture {
                kind,
                group: Group::Body,
                point: [0.0, -b.b, b.h - 2.0 * b.h * wedge],
                normal: [0.0, 0.0, 1.0],
                gap: 0.0,
                region: 0.0,
                displacement: [0.0; 3],
                wedge,
            }
        }
        LaminaCrack => {
            let [ca, cb, cv] = bone.canal;
            let side = if rng.gen_bool(0.5) { 1.0 } else { -1.0 };
            let pillar = [side * (ca + 3.5), cv + 0.1 * cb + 1.5, 0.0];
            let mid = [0.0, cv + cb + 2.5, -1.0];
            let t = rng.gen_range(0.3..0.7);
            let point = [
                pillar[0] + t * (mid[0] - pillar[0]),
                pillar[1] + t * (mid[1] - pillar[1]),
                pillar[2] + t * (mid[2] - pillar[2]),
            ];
            let axis = normalize([mid[0] - pillar[0], mid[1] - pillar[1], 0.0]);
            let normal = normalize([axis[0], axis[1], rng.gen_range(-0.3..0.3)]);
            let displaced = rng.gen_bool(0.4);
            Fracture {
                kind,
                group: Group::Arch,
                point,
                normal,
                gap: rng
                    .gen_range(2.5..4.0f64)
                    .max(min_visible_gap(normal, slice_spacing)),
                region: 7.0 * s,
                displacement: if displaced {
                    scale(normal, rng.gen_range(1.0..2.5))
                } else {
                    [0.0; 3]
                },
                wedge: 0.0,
            }
        }
        C1RingCrack => {
            let [ra, rb, cv] = bone.canal;
            let posterior = rng.gen_bool(0.5);
            let centre = if posterior {
                std::f64::consts::FRAC_PI_2
            } else {
                -std::f64::consts::FRAC_PI_2
            };
            let t = centre + rng.gen_range(-0.7..0.7);
            let w = if posterior { -t.sin().max(0.0) } else { 0.0 };
            let point = [ra * t.cos(), cv + rb * t.sin(), w];
            let normal = normalize([-ra * t.sin(), rb * t.cos(), 0.0]);
            Fracture {
                kind,
                group: Group::Ring,
                point,
                normal,
                gap: rng.gen_range(2.0..4.0),
                region: 9.0,
                displacement: scale(
                    normalize([normal[0], normal[1] + 0.5, 0.0]),
                    rng.gen_range(0.0..2.0),
                ),
                wedge: 0.0,
            }
        }
        DensFracture => {
            let b = bone.body.expect("C2 has a body");
            let normal = normalize([rng.gen_range(-0.2..0.2), rng.gen_range(-0.25..0.25), 1.0]);
            let gap = rng
                .gen_range(3.0..4.5f64)
                .max(min_visible_gap(normal, slice_spacing));
            let shift = rng.gen_range(0.0..3.0);
            Fracture {
                kind,
                group: Group::Dens,
                point: [0.0, -0.05 * b.b, b.h + rng.gen_range(1.5..3.5)],
                normal,
                gap,
                region: 12.0,
                displacement: [0.0, if rng.gen_bool(0.5) { shift } else { -shift }, 0.0],
                wedge: 0.0,
            }
        }
    };
    bone.fractures.push(f);
    bone.finish();
}
