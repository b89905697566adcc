//! Implicit bone primitives: signed distances in a vertebra's local frame
//! (u = patient left, v = posterior, w = superior; mm). Negative inside.
//!
//! Every part carries a local bounding box so the rasteriser only evaluates the
//! few primitives near a voxel, not every primitive for every voxel.

use serde::Serialize;

use super::geom::{dot, sub, Aabb, V3};

/// Which piece of a vertebra a part belongs to; fractures act on one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Group {
    /// Vertebral body (C2-C7, T).
    Body,
    /// Posterior arch: pedicles, laminae, spinous process, pillars.
    Arch,
    /// Transverse processes (with the foramen transversarium).
    Transverse,
    /// C1 ring (anterior and posterior arches) and lateral masses.
    Ring,
    /// C2 odontoid process.
    Dens,
}

#[derive(Debug, Clone)]
pub enum Shape {
    /// Segment `a`-`b` swept by a sphere of radius `r`.
    Capsule { a: V3, b: V3, r: f64 },
    /// Ellipsoid centred at `c` with semi-axes `r` (approximate distance).
    Ellipsoid { c: V3, r: V3 },
    /// Vertebral body: elliptic cylinder along w, semi-axes `a` (u), `b` (v),
    /// from `-h` to `h`, with the superior endplate lowered anteriorly by
    /// `wedge` (fraction of the full height lost at the anterior wall).
    Body {
        c: V3,
        a: f64,
        b: f64,
        h: f64,
        wedge: f64,
    },
    /// Ellipsoidal shell of thickness `t` (skull vault / occiput).
    Shell { c: V3, r: V3, t: f64 },
}

fn ellipsoid_sdf(q: V3, r: V3) -> f64 {
    let k = ((q[0] / r[0]).powi(2) + (q[1] / r[1]).powi(2) + (q[2] / r[2]).powi(2)).sqrt();
    (k - 1.0) * r[0].min(r[1]).min(r[2])
}

impl Shape {
    pub fn sdf(&self, p: V3) -> f64 {
        match *self {
            Shape::Capsule { a, b, r } => {
                let pa = sub(p, a);
                let ba = sub(b, a);
                let t = (dot(pa, ba) / dot(ba, ba)).clamp(0.0, 1.0);
                let d = [pa[0] - ba[0] * t, pa[1] - ba[1] * t, pa[2] - ba[2] * t];
                dot(d, d).sqrt() - r
            }
            Shape::Ellipsoid { c, r } => ellipsoid_sdf(sub(p, c), r),
            Shape::Shell { c, r, t } => {
                let q = sub(p, c);
                let inner = [r[0] - t, r[1] - t, r[2] - t];
                ellipsoid_sdf(q, r).max(-ellipsoid_sdf(q, inner))
            }
            Shape::Body { c, a, b, h, wedge } => {
                let q = sub(p, c);
                let d_xy = (((q[0] / a).powi(2) + (q[1] / b).powi(2)).sqrt() - 1.0) * a.min(b);
                let top = body_top(h, b, wedge, q[1]);
                let d_z = (q[2] - top).max(-h - q[2]);
                let outside = (d_xy.max(0.0).powi(2) + d_z.max(0.0).powi(2)).sqrt();
                outside + d_xy.max(d_z).min(0.0)
            }
        }
    }

    pub fn bounds(&self) -> Aabb {
        match *self {
            Shape::Capsule { a, b, r } => {
                let mut bb = Aabb::empty();
                bb.include(a);
                bb.include(b);
                bb.grow(r)
            }
            Shape::Ellipsoid { c, r } | Shape::Shell { c, r, .. } => Aabb {
                min: sub(c, r),
                max: [c[0] + r[0], c[1] + r[1], c[2] + r[2]],
            },
            Shape::Body { c, a, b, h, .. } => Aabb {
                min: [c[0] - a, c[1] - b, c[2] - h],
                max: [c[0] + a, c[1] + b, c[2] + h],
            },
        }
    }
}

/// Height of the superior endplate of a (possibly wedged) body at AP position `v`.
pub fn body_top(h: f64, b: f64, wedge: f64, v: f64) -> f64 {
    if wedge <= 0.0 {
        return h;
    }
    // Full loss at the anterior wall (v = -b), none at the posterior wall (v = +b).
    let anterior = ((b - v) / (2.0 * b)).clamp(0.0, 1.0);
    h - 2.0 * h * wedge * anterior
}

/// A vertical (along w) cylindrical hole, e.g. the foramen transversarium.
#[derive(Debug, Clone, Copy)]
pub struct Hole {
    pub u: f64,
    pub v: f64,
    pub r: f64,
}

#[derive(Debug, Clone)]
pub struct Part {
    pub shape: Shape,
    pub group: Group,
    pub holes: Vec<Hole>,
    /// Local bounds, grown by a margin so cortical shells and blur stay inside.
    pub bounds: Aabb,
}

impl Part {
    pub fn new(shape: Shape, group: Group) -> Part {
        let bounds = shape.bounds().grow(0.5);
        Part {
            shape,
            group,
            holes: Vec::new(),
            bounds,
        }
    }

    pub fn with_hole(mut self, hole: Hole) -> Part {
        self.holes.push(hole);
        self
    }

    pub fn sdf(&self, p: V3) -> f64 {
        let mut d = self.shape.sdf(p);
        for h in &self.holes {
            let dist = ((p[0] - h.u).powi(2) + (p[1] - h.v).powi(2)).sqrt();
            d = d.max(h.r - dist);
        }
        d
    }
}
