//! Small 3-vector and rotation helpers (patient coordinates are DICOM LPS, mm).

pub type V3 = [f64; 3];

pub fn add(a: V3, b: V3) -> V3 {
    [a[0] + b[0], a[1] + b[1], a[2] + b[2]]
}

pub fn sub(a: V3, b: V3) -> V3 {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
}

pub fn scale(a: V3, s: f64) -> V3 {
    [a[0] * s, a[1] * s, a[2] * s]
}

pub fn dot(a: V3, b: V3) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

pub fn cross(a: V3, b: V3) -> V3 {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

pub fn norm(a: V3) -> f64 {
    dot(a, a).sqrt()
}

pub fn normalize(a: V3) -> V3 {
    scale(a, 1.0 / norm(a))
}

/// An orthonormal frame: `axes[0]` = local u (patient left), `axes[1]` = local v
/// (posterior), `axes[2]` = local w (superior), all in patient coordinates.
#[derive(Debug, Clone, Copy)]
pub struct Frame {
    pub origin: V3,
    pub axes: [V3; 3],
}

impl Frame {
    pub fn to_local(&self, p: V3) -> V3 {
        let d = sub(p, self.origin);
        [
            dot(d, self.axes[0]),
            dot(d, self.axes[1]),
            dot(d, self.axes[2]),
        ]
    }

    pub fn to_patient(&self, l: V3) -> V3 {
        let mut p = self.origin;
        for (i, axis) in self.axes.iter().enumerate() {
            p = add(p, scale(*axis, l[i]));
        }
        p
    }

    /// A direction (no translation) from local to patient coordinates.
    pub fn dir_to_patient(&self, l: V3) -> V3 {
        let mut p = [0.0; 3];
        for (i, axis) in self.axes.iter().enumerate() {
            p = add(p, scale(*axis, l[i]));
        }
        p
    }
}

/// Rotation of `v` about unit `axis` by `angle` radians (Rodrigues).
pub fn rotate(v: V3, axis: V3, angle: f64) -> V3 {
    let (s, c) = angle.sin_cos();
    let k = axis;
    add(
        add(scale(v, c), scale(cross(k, v), s)),
        scale(k, dot(k, v) * (1.0 - c)),
    )
}

/// Axis-aligned box (local or patient coordinates).
#[derive(Debug, Clone, Copy)]
pub struct Aabb {
    pub min: V3,
    pub max: V3,
}

impl Aabb {
    pub fn empty() -> Aabb {
        Aabb {
            min: [f64::INFINITY; 3],
            max: [f64::NEG_INFINITY; 3],
        }
    }

    pub fn include(&mut self, p: V3) {
        for (i, v) in p.iter().enumerate() {
            self.min[i] = self.min[i].min(*v);
            self.max[i] = self.max[i].max(*v);
        }
    }

    pub fn grow(&self, by: f64) -> Aabb {
        Aabb {
            min: [self.min[0] - by, self.min[1] - by, self.min[2] - by],
            max: [self.max[0] + by, self.max[1] + by, self.max[2] + by],
        }
    }

    pub fn union(&self, o: &Aabb) -> Aabb {
        let mut b = *self;
        b.include(o.min);
        b.include(o.max);
        b
    }

    pub fn contains(&self, p: V3) -> bool {
        (0..3).all(|i| p[i] >= self.min[i] && p[i] <= self.max[i])
    }

    pub fn corners(&self) -> [V3; 8] {
        let (a, b) = (self.min, self.max);
        [
            [a[0], a[1], a[2]],
            [b[0], a[1], a[2]],
            [a[0], b[1], a[2]],
            [b[0], b[1], a[2]],
            [a[0], a[1], b[2]],
            [b[0], a[1], b[2]],
            [a[0], b[1], b[2]],
            [b[0], b[1], b[2]],
        ]
    }
}
