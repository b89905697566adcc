//! The phantom's anatomy: C1-C7 (plus T1-T2 and the skull base) as implicit
//! solids in per-vertebra frames placed along a lordotic centreline.
//!
//! Sizes are adult means in mm (body width / depth / height, canal, processes),
//! each scaled per study and jittered per vertebra.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::geom::{add, cross, dot, normalize, rotate, scale, sub, Aabb, Frame, V3};
use super::lesion::Fracture;
use super::shape::{body_top, Group, Hole, Part, Shape};

/// What a bone voxel is made of; the renderer maps it to HU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tissue {
    Cortical,
    Cancellous,
    /// Impacted trabeculae under a compressed endplate (denser than cancellous).
    Sclerotic,
    /// Fracture gap inside the bone envelope (haematoma / soft-tissue HU).
    Gap,
}

/// Body dimensions (semi-axes and half height), used for discs and fractures.
#[derive(Debug, Clone, Copy)]
pub struct BodyDims {
    pub a: f64,
    pub b: f64,
    pub h: f64,
}

/// One bone: a vertebra or the skull base.
#[derive(Debug, Clone)]
pub struct Bone {
    /// "C1".."C7", "T1", "T2" or "skull".
    pub name: String,
    /// Mask label: 1..7 = C1..C7, 8.. = T1.. (RSNA convention), 0 = not labelled.
    pub label: u8,
    pub frame: Frame,
    pub parts: Vec<Part>,
    pub cortex: f64,
    pub body: Option<BodyDims>,
    /// Canal semi-axes (lateral, AP) and its centre v (for fracture placement).
    pub canal: [f64; 3],
    pub fractures: Vec<Fracture>,
    /// Union of the parts' local bounds (grown by any fragment displacement).
    pub local_bounds: Aabb,
}

impl Bone {
    fn new(name: &str, label: u8, frame: Frame, cortex: f64) -> Bone {
        Bone {
            name: name.to_string(),
            label,
            frame,
            parts: Vec::new(),
            cortex,
            body: None,
            canal: [0.0; 3],
            fractures: Vec::new(),
            local_bounds: Aabb::empty(),
        }
    }

    pub fn finish(&mut self) {
        let mut bb = Aabb::empty();
        for p in &self.parts {
            bb = bb.union(&p.bounds);
        }
        let shift = self
            .fractures
            .iter()
            .map(|f| super::geom::norm(f.displacement))
            .fold(0.0, f64::max);
        self.local_bounds = bb.grow(shift + 0.5);
    }

    /// Patient-space bounds of the intact bone (ignoring fragment displacement),
    /// so that fractures never change the acquisition geometry.
    pub fn intact_patient_bounds(&self) -> Aabb {
        let mut local = Aabb::empty();
        for p in &self.parts {
            local = local.union(&p.bounds);
        }
        let mut bb = Aabb::empty();
        for c in local.corners() {
            bb.include(self.frame.to_patient(c));
        }
        bb
    }

    /// Patient-space bounding box.
    pub fn patient_bounds(&self) -> Aabb {
        let mut bb = Aabb::empty();
        for c in self.local_bounds.corners() {
            bb.include(self.frame.to_patient(c));
        }
        bb
    }

    /// What is at patient point `p`, if this bone is there.
    pub fn eval(&self, p: V3) -> Option<Tissue> {
        let l = self.frame.to_local(p);
        if !self.local_bounds.contains(l) {
            return None;
        }
        let mut best = f64::INFINITY;
        let mut best_part: Option<(&Part, V3)> = None;
        let mut in_gap_bone = false;
        for part in &self.parts {
            let mut q = l;
            let mut in_gap = false;
            for f in &self.fractures {
                if f.group != part.group || f.gap <= 0.0 {
                    continue;
                }
                let rel = sub(l, f.point);
                if dot(rel, rel) > f.region * f.region {
                    continue;
                }
                let s = dot(rel, f.normal);
                if s.abs() < 0.5 * f.gap {
                    in_gap = true;
                } else if s > 0.0 {
                    q = sub(q, f.displacement);
                }
            }
            if !part.bounds.contains(q) {
                continue;
            }
            let d = part.sdf(q);
            if in_gap {
                if d <= 0.0 {
                    in_gap_bone = true;
                }
                continue;
            }
            if d < best {
                best = d;
                best_part = Some((part, q));
            }
        }
        if best <= 0.0 {
            if let Some((part, q)) = best_part {
                if let Shape::Body { c, b, h, wedge, .. } = part.shape {
                    if wedge > 0.0 && q[2] - c[2] > body_top(h, b, wedge, q[1] - c[1]) - 3.0 {
                        return Some(Tissue::Sclerotic);
                    }
                }
            }
            return Some(if best > -self.cortex {
                Tissue::Cortical
            } else {
                Tissue::Cancellous
            });
        }
        if in_gap_bone {
            return Some(Tissue::Gap);
        }
        None
    }
}

/// An intervertebral disc between two bodies.
#[derive(Debug, Clone)]
pub struct Disc {
    pub frame: Frame,
    pub shape: Shape,
    pub local_bounds: Aabb,
}

impl Disc {
    pub fn contains(&self, p: V3) -> bool {
        let l = self.frame.to_local(p);
        self.local_bounds.contains(l) && self.shape.sdf(l) <= 0.0
    }

    pub fn patient_bounds(&self) -> Aabb {
        let mut bb = Aabb::empty();
        for c in self.local_bounds.corners() {
            bb.include(self.frame.to_patient(c));
        }
        bb
    }
}

/// The whole skeleton of one phantom.
#[derive(Debug, Clone)]
pub struct Spine {
    /// C1..C7, T1, T2 in that order, then the skull.
    pub bones: Vec<Bone>,
    pub discs: Vec<Disc>,
    /// Points on the body centreline (patient mm), inferior to superior, for the airway.
    pub centreline: Vec<V3>,
    /// Total lordosis C2-C7 in degrees (ground truth).
    pub lordosis_deg: f64,
    pub size_scale: f64,
    /// Degenerative changes (confounders, not fractures): narrowed discs ("C5-C6")
    /// and vertebrae with anterior osteophytes.
    pub narrowed_discs: Vec<String>,
    pub osteophytes: Vec<String>,
}

impl Spine {
    pub fn vertebra(&self, name: &str) -> Option<&Bone> {
        self.bones.iter().find(|b| b.name == name)
    }

    /// Body-centreline point at patient height `z` (clamped to the ends).
    pub fn centre_at(&self, z: f64) -> V3 {
        let c = &self.centreline;
        if z <= c[0][2] {
            return c[0];
        }
        for w in c.windows(2) {
            if z <= w[1][2] {
                let t = (z - w[0][2]) / (w[1][2] - w[0][2]).max(1e-9);
                return add(w[0], scale(sub(w[1], w[0]), t));
            }
        }
        *c.last().unwrap()
    }
}

pub const VERTEBRAE: [&str; 9] = ["C1", "C2", "C3", "C4", "C5", "C6", "C7", "T1", "T2"];

/// Mean adult body (width, depth, height) in mm for C2..T2; C2 height excludes the dens.
const BODY_MM: [[f64; 3]; 8] = [
    [17.0, 15.5, 16.0], // C2
    [16.0, 15.0, 14.0], // C3
    [17.0, 15.5, 13.5], // C4
    [18.5, 16.0, 13.5], // C5
    [20.5, 16.5, 13.8], // C6
    [23.0, 17.0, 14.5], // C7
    [27.0, 19.0, 17.0], // T1
    [28.0, 21.0, 19.0], // T2
];

fn jitter(rng: &mut ChaCha8Rng, x: f64, rel: f64) -> f64 {
    x * (1.0 + rng.gen_range(-rel..=rel))
}

/// Builds a random spine whose C4 body centre is at the patient origin; the
/// caller translates it into the field of view.
pub fn build_spine(rng: &mut ChaCha8Rng, cortex: f64) -> Spine {
    let s = rng.gen_range(0.88..1.12);
    // Bodies C2..T2 (index 0..8) and the discs below each of C2..T1.
    let dims: Vec<BodyDims> = BODY_MM
        .iter()
        .map(|m| BodyDims {
            a: jitter(rng, m[0] * s, 0.06) / 2.0,
            b: jitter(rng, m[1] * s, 0.06) / 2.0,
            h: jitter(rng, m[2] * s, 0.06) / 2.0,
        })
        .collect();
    let mut discs: Vec<f64> = (0..7).map(|_| rng.gen_range(4.0..6.5) * s).collect();
    let mut narrowed_discs = Vec::new();
    for (i, d) in discs.iter_mut().enumerate() {
        if rng.gen_bool(0.12) {
            *d *= rng.gen_range(0.35..0.6);
            narrowed_discs.push(format!("{}-{}", VERTEBRAE[i + 1], VERTEBRAE[i + 2]));
        }
    }

    // Arc-length positions of body centres from T2 (s = 0) upwards.
    let mut arc = vec![0.0; 8];
    for i in (0..7).rev() {
        arc[i] = arc[i + 1] + dims[i + 1].h + discs[i] + dims[i].h;
    }
    // Lordosis: the tangent leans anteriorly (phi > 0) at C7 and posteriorly at C2.
    let lordosis_deg: f64 = rng.gen_range(5.0..45.0);
    let bias_deg: f64 = rng.gen_range(-8.0..8.0);
    let kappa = lordosis_deg.to_radians() / (arc[0] - arc[5]);
    let phi_c7 = (0.5 * lordosis_deg + bias_deg).to_radians();
    let phi = |a: f64| phi_c7 - kappa * (a - arc[5]);
    let tangent = |a: f64| [0.0, -phi(a).sin(), phi(a).cos()];
    // Integrate the centreline in 0.5 mm steps.
    let total = arc[0] + 40.0;
    let step = 0.5;
    let mut pts = vec![[0.0, 0.0, 0.0]];
    let mut a = 0.0;
    while a < total {
        let p = *pts.last().unwrap();
        pts.push(add(p, scale(tangent(a + 0.5 * step), step)));
        a += step;
    }
    let at = |a: f64| pts[((a / step).round() as usize).min(pts.len() - 1)];
    let lateral_bend: f64 = rng.gen_range(-3.0f64..3.0).to_radians();

    let frame_at = |a: f64, rng: &mut ChaCha8Rng, axial_deg: f64| {
        let w = tangent(a);
        let v = [0.0, phi(a).cos(), phi(a).sin()];
        let u = cross(v, w);
        let bend = lateral_bend + rng.gen_range(-1.5f64..1.5).to_radians();
        let (u, w) = (rotate(u, v, bend), rotate(w, v, bend));
        let rho = rng.gen_range(-axial_deg..axial_deg).to_radians();
        let (u, v) = (rotate(u, w, rho), rotate(v, w, rho));
        Frame {
            origin: at(a),
            axes: [normalize(u), normalize(v), normalize(w)],
        }
    };

    let mut bones = Vec::new();
    let mut frames = Vec::new();
    for &a in &arc {
        frames.push(frame_at(a, rng, 4.0));
    }
    // C2 frame; C1 sits on C2's dens, with its own (larger) axial rotation.
    let c2 = frames[0];
    let dens_r = jitter(rng, 5.0 * s, 0.08);
    let dens_len = jitter(rng, 15.0 * s, 0.08);
    let c1_height = dims[0].h + 0.55 * dens_len;
    let c1_rot = rng.gen_range(-8.0f64..8.0).to_radians();
    let c1_frame = Frame {
        origin: c2.to_patient([0.0, 0.0, c1_height]),
        axes: [
            rotate(c2.axes[0], c2.axes[2], c1_rot),
            rotate(c2.axes[1], c2.axes[2], c1_rot),
            c2.axes[2],
        ],
    };
    bones.push(build_c1(rng, c1_frame, s, dens_r, cortex));
    bones.push(build_c2(rng, c2, dims[0], s, dens_r, dens_len, cortex));
    for i in 1..8 {
        let name = VERTEBRAE[i + 1];
        let label = (i + 2) as u8; // C3 = 3 ... C7 = 7, T1 = 8, T2 = 9
        bones.push(build_subaxial(
            rng, name, label, frames[i], dims[i], s, i, cortex,
        ));
    }
    // Anterior osteophytes on some C3-C7 bodies: bony spurs at the endplate corners.
    let mut osteophytes = Vec::new();
    for (bone, d) in bones[2..7].iter_mut().zip(&dims[1..6]) {
        if !rng.gen_bool(0.15) {
            continue;
        }
        for end in [-1.0, 1.0] {
            if rng.gen_bool(0.7) {
                bone.parts.push(Part::new(
                    Shape::Ellipsoid {
                        c: [rng.gen_range(-2.0..2.0), -d.b - 0.5, end * (d.h - 0.8)],
                        r: [
                            rng.gen_range(3.0..5.0),
                            rng.gen_range(1.5..3.0),
                            rng.gen_range(1.5..3.0),
                        ],
                    },
                    Group::Body,
                ));
            }
        }
        osteophytes.push(bone.name.clone());
    }

    // Discs C2-C3 .. T1-T2.
    let mut disc_list = Vec::new();
    for i in 0..7 {
        let (up, lo) = (&frames[i], &frames[i + 1]);
        let top_of_lower = lo.to_patient([0.0, 0.0, dims[i + 1].h]);
        let bottom_of_upper = up.to_patient([0.0, 0.0, -dims[i].h]);
        let origin = scale(add(top_of_lower, bottom_of_upper), 0.5);
        let w = normalize(add(up.axes[2], lo.axes[2]));
        let v0 = add(up.axes[1], lo.axes[1]);
        let v = normalize(sub(v0, scale(w, dot(v0, w))));
        let u = cross(v, w);
        let half = 0.5 * super::geom::norm(sub(bottom_of_upper, top_of_lower)) + 1.5;
        let shape = Shape::Body {
            c: [0.0; 3],
            a: 0.5 * (dims[i].a + dims[i + 1].a) * 0.97,
            b: 0.5 * (dims[i].b + dims[i + 1].b) * 0.97,
            h: half,
            wedge: 0.0,
        };
        let local_bounds = shape.bounds().grow(0.5);
        disc_list.push(Disc {
            frame: Frame {
                origin,
                axes: [u, v, w],
            },
            shape,
            local_bounds,
        });
    }

    // Skull base: an ellipsoidal shell above C1 with the foramen magnum.
    let c1 = bones[0].frame;
    let skull_gap = rng.gen_range(8.0..16.0);
    let rz = 75.0 * s;
    let skull_frame = Frame {
        origin: add(c1.origin, [0.0, 12.0 * s, skull_gap + rz]),
        axes: [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
    };
    let mut skull = Bone::new("skull", 0, skull_frame, 2.0);
    skull.parts.push(
        Part::new(
            Shape::Shell {
                c: [0.0; 3],
                r: [68.0 * s, 88.0 * s, rz],
                t: rng.gen_range(5.0..8.0),
            },
            Group::Arch,
        )
        .with_hole(Hole {
            u: 0.0,
            v: -6.0 * s,
            r: 16.0 * s,
        }),
    );
    bones.push(skull);
    // First and second ribs and the clavicles: bone in the lowest slices that
    // must not be labelled as spine.
    for (i, frame) in [(7usize, frames[6]), (8, frames[7])] {
        let body = dims[i - 1];
        for side in [-1.0, 1.0] {
            bones.push(build_rib(rng, frame, body, s, side, i - 6, cortex));
        }
    }
    for side in [-1.0, 1.0] {
        bones.push(build_clavicle(rng, frames[6], dims[6], s, side, cortex));
    }

    let centreline = frames
        .iter()
        .rev()
        .map(|f| f.origin)
        .chain(std::iter::once(c1.origin))
        .collect();
    let mut spine = Spine {
        bones,
        discs: disc_list,
        centreline,
        lordosis_deg,
        size_scale: s,
        narrowed_discs,
        osteophytes,
    };
    // Put the C4 body centre at the origin.
    let c4 = spine.bones[3].frame.origin;
    spine.translate(scale(c4, -1.0));
    spine
}

impl Spine {
    pub fn translate(&mut self, d: V3) {
        for b in &mut self.bones {
            b.frame.origin = add(b.frame.origin, d);
        }
        for disc in &mut self.discs {
            disc.frame.origin = add(disc.frame.origin, d);
        }
        for p in &mut self.centreline {
            *p = add(*p, d);
        }
    }
}

/// Rib `n` (1 or 2) of a thoracic vertebra: from the transverse process it
/// sweeps laterally, then anteriorly and down towards the manubrium.
fn build_rib(
    rng: &mut ChaCha8Rng,
    frame: Frame,
    body: BodyDims,
    s: f64,
    side: f64,
    n: usize,
    cortex: f64,
) -> Bone {
    let name = format!("rib{n}_{}", if side > 0.0 { "left" } else { "right" });
    let mut bone = Bone::new(&name, 0, frame, cortex);
    let k = if n == 1 { 1.0 } else { 1.3 };
    let lateral = jitter(rng, 30.0 * s * k, 0.1);
    let anterior = jitter(rng, 55.0 * s, 0.1);
    let drop = jitter(rng, 30.0 * s, 0.15);
    let r = jitter(rng, 4.0 * s, 0.1);
    let pt = |t: f64| {
        let a = std::f64::consts::PI * t;
        [
            side * (body.a + 12.0 * s + lateral * (0.9 * a).sin()),
            0.35 * body.b - anterior * 0.5 * (1.0 - a.cos()),
            -drop * t,
        ]
    };
    let steps = 10;
    for i in 0..steps {
        let (t0, t1) = (i as f64 / steps as f64, (i + 1) as f64 / steps as f64);
        bone.parts.push(Part::new(
            Shape::Capsule {
                a: pt(t0),
                b: pt(t1),
                r,
            },
            Group::Arch,
        ));
    }
    bone
}

/// Clavicle: manubrium to acromion, rising laterally and curving back.
fn build_clavicle(
    rng: &mut ChaCha8Rng,
    t1: Frame,
    body: BodyDims,
    s: f64,
    side: f64,
    cortex: f64,
) -> Bone {
    let name = format!("clavicle_{}", if side > 0.0 { "left" } else { "right" });
    let frame = Frame {
        origin: t1.origin,
        axes: [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
    };
    let mut bone = Bone::new(&name, 0, frame, cortex);
    let medial = [side * 22.0 * s, -jitter(rng, 50.0 * s, 0.1), -body.h - 15.0];
    let mid = [
        side * jitter(rng, 70.0 * s, 0.1),
        medial[1] + 10.0,
        medial[2] + 6.0,
    ];
    let lateral = [
        side * jitter(rng, 115.0 * s, 0.1),
        jitter(rng, 5.0 * s, 0.5),
        mid[2] + 3.0,
    ];
    let r = jitter(rng, 5.5 * s, 0.1);
    for (a, b) in [(medial, mid), (mid, lateral)] {
        bone.parts
            .push(Part::new(Shape::Capsule { a, b, r }, Group::Arch));
    }
    bone
}

fn mirror(p: V3, side: f64) -> V3 {
    [p[0] * side, p[1], p[2]]
}

/// C1 (atlas): a ring (anterior and posterior arches) with lateral masses and
/// transverse processes; no body. Local origin = dens axis at ring height.
fn build_c1(rng: &mut ChaCha8Rng, frame: Frame, s: f64, dens_r: f64, cortex: f64) -> Bone {
    let mut bone = Bone::new("C1", 1, frame, cortex);
    let arch_r = jitter(rng, 3.6 * s, 0.1);
    let ra = jitter(rng, 21.0 * s, 0.06);
    let rb = jitter(rng, 20.0 * s, 0.06);
    let front = -(dens_r + 1.5 + arch_r);
    let cv = front + rb;
    // The ring as a closed polyline of capsules (anterior arch at angle -90 deg).
    let n = 20;
    let ring_pt = |k: usize| {
        let t = 2.0 * std::f64::consts::PI * k as f64 / n as f64;
        // Posterior arch sits slightly lower than the anterior arch.
        let w = -t.sin().max(0.0);
        [ra * t.cos(), cv + rb * t.sin(), w]
    };
    for k in 0..n {
        bone.parts.push(Part::new(
            Shape::Capsule {
                a: ring_pt(k),
                b: ring_pt(k + 1),
                r: arch_r,
            },
            Group::Ring,
        ));
    }
    // Anterior and posterior tubercles.
    bone.parts.push(Part::new(
        Shape::Ellipsoid {
            c: [0.0, front, 0.0],
            r: [6.0 * s, arch_r + 0.5, 5.0 * s],
        },
        Group::Ring,
    ));
    bone.parts.push(Part::new(
        Shape::Ellipsoid {
            c: [0.0, cv + rb, -1.0],
            r: [5.0 * s, arch_r + 1.0, 5.0 * s],
        },
        Group::Ring,
    ));
    for side in [-1.0, 1.0] {
        // Lateral masses carry the skull; they are the bulk of C1.
        bone.parts.push(Part::new(
            Shape::Ellipsoid {
                c: mirror([0.9 * ra, cv - 0.45 * rb, 0.0], side),
                r: [
                    jitter(rng, 7.0 * s, 0.1),
                    jitter(rng, 9.5 * s, 0.1),
                    jitter(rng, 7.5 * s, 0.1),
                ],
            },
            Group::Ring,
        ));
        // Transverse process with the foramen transversarium.
        let tp_c = mirror([ra + 10.0 * s, cv - 0.35 * rb, 0.0], side);
        bone.parts.push(
            Part::new(
                Shape::Ellipsoid {
                    c: tp_c,
                    r: [11.0 * s, 6.0 * s, 4.0 * s],
                },
                Group::Transverse,
            )
            .with_hole(Hole {
                u: side * (ra + 6.0 * s),
                v: cv - 0.35 * rb,
                r: 2.8 * s,
            }),
        );
    }
    bone.canal = [ra, rb, cv];
    bone
}

/// C2 (axis): body, dens, superior facets, heavy posterior arch and spinous process.
fn build_c2(
    rng: &mut ChaCha8Rng,
    frame: Frame,
    body: BodyDims,
    s: f64,
    dens_r: f64,
    dens_len: f64,
    cortex: f64,
) -> Bone {
    let mut bone = Bone::new("C2", 2, frame, cortex);
    bone.body = Some(body);
    bone.parts.push(Part::new(
        Shape::Body {
            c: [0.0; 3],
            a: body.a,
            b: body.b,
            h: body.h,
            wedge: 0.0,
        },
        Group::Body,
    ));
    bone.parts.push(Part::new(
        Shape::Capsule {
            a: [0.0, -0.1 * body.b, body.h - 2.0],
            b: [0.0, 0.0, body.h + dens_len - dens_r],
            r: dens_r,
        },
        Group::Dens,
    ));
    // Superior articular facets beside the dens (they carry C1's lateral masses).
    for side in [-1.0, 1.0] {
        bone.parts.push(Part::new(
            Shape::Ellipsoid {
                c: mirror([body.a + 3.0 * s, 0.2 * body.b, body.h - 1.0], side),
                r: [7.0 * s, 8.0 * s, 5.0 * s],
            },
            Group::Body,
        ));
    }
    add_posterior_elements(rng, &mut bone, body, s, 1.25, 1.2, cortex);
    bone
}

/// C3-C7 and T1-T2: body with cortical shell and cancellous core, plus the arch.
#[allow(clippy::too_many_arguments)]
fn build_subaxial(
    rng: &mut ChaCha8Rng,
    name: &str,
    label: u8,
    frame: Frame,
    body: BodyDims,
    s: f64,
    index: usize,
    cortex: f64,
) -> Bone {
    let mut bone = Bone::new(name, label, frame, cortex);
    bone.body = Some(body);
    bone.parts.push(Part::new(
        Shape::Body {
            c: [0.0; 3],
            a: body.a,
            b: body.b,
            h: body.h,
            wedge: 0.0,
        },
        Group::Body,
    ));
    // Spinous processes lengthen towards C7 (vertebra prominens) and T1.
    let spinous = [1.0, 1.0, 1.05, 1.2, 1.6, 1.7, 1.6][index - 1];
    let canal = if index >= 6 { 0.8 } else { 1.0 };
    add_posterior_elements(rng, &mut bone, body, s, spinous, canal, cortex);
    bone
}

/// Pedicles, articular pillars, laminae, spinous process and transverse
/// processes (with foramina, cervical only) around the spinal canal.
fn add_posterior_elements(
    rng: &mut ChaCha8Rng,
    bone: &mut Bone,
    body: BodyDims,
    s: f64,
    spinous_scale: f64,
    canal_scale: f64,
    _cortex: f64,
) {
    let canal_a = jitter(rng, 12.5 * s * canal_scale, 0.06);
    let canal_b = jitter(rng, 7.5 * s * canal_scale, 0.06);
    let cv = body.b + canal_b; // canal centre just behind the body
    bone.canal = [canal_a, canal_b, cv];
    let cervical = bone.label <= 7;
    let lam_r = jitter(rng, 2.6 * s, 0.1);
    let ped_r = jitter(rng, 3.0 * s, 0.1);
    let lamina_mid = [0.0, cv + canal_b + lam_r, -1.0];
    for side in [-1.0, 1.0] {
        let pillar = mirror([canal_a + 3.5 * s, cv + 0.1 * canal_b, 0.0], side);
        // Pedicle: body posterolateral corner to the pillar.
        bone.parts.push(Part::new(
            Shape::Capsule {
                a: mirror([0.6 * body.a, 0.7 * body.b, 0.0], side),
                b: pillar,
                r: ped_r,
            },
            Group::Arch,
        ));
        // Articular pillar (lateral mass): tall, reaching towards the facets.
        bone.parts.push(Part::new(
            Shape::Capsule {
                a: add(pillar, [0.0, -1.0, -body.h - 1.0]),
                b: add(pillar, [0.0, 1.5, body.h + 1.0]),
                r: jitter(rng, 4.5 * s, 0.1),
            },
            Group::Arch,
        ));
        // Lamina: pillar to midline behind the canal.
        bone.parts.push(Part::new(
            Shape::Capsule {
                a: add(pillar, [-side * 1.0, 1.5, 0.0]),
                b: lamina_mid,
                r: lam_r,
            },
            Group::Arch,
        ));
        // Transverse process, from the body side outwards.
        let tp_len = if cervical { 13.0 * s } else { 20.0 * s };
        let tp_c = mirror([body.a + 0.5 * tp_len, 0.35 * body.b, 0.0], side);
        let mut tp = Part::new(
            Shape::Ellipsoid {
                c: tp_c,
                r: [
                    0.5 * tp_len + 2.0,
                    if cervical { 5.5 } else { 4.0 } * s,
                    3.5 * s,
                ],
            },
            Group::Transverse,
        );
        if cervical {
            tp = tp.with_hole(Hole {
                u: side * (body.a + 4.5 * s),
                v: 0.35 * body.b,
                r: 2.6 * s,
            });
        }
        bone.parts.push(tp);
    }
    // Spinous process: midline, pointing posteriorly and down.
    let len = jitter(rng, 15.0 * s * spinous_scale, 0.1);
    let angle: f64 = rng.gen_range(15.0f64..35.0).to_radians();
    let tip = add(lamina_mid, [0.0, len * angle.cos(), -len * angle.sin()]);
    bone.parts.push(Part::new(
        Shape::Capsule {
            a: lamina_mid,
            b: tip,
            r: jitter(rng, 3.0 * s, 0.1),
        },
        Group::Arch,
    ));
    bone.parts.push(Part::new(
        Shape::Ellipsoid {
            c: tip,
            r: [4.5 * s, 3.5 * s, 4.0 * s],
        },
        Group::Arch,
    ));
}
