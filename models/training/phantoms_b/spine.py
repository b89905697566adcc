"""Phantom family B: the cervical column (C1-C7, T1-T2) as unions of swept tubes and
superellipse bodies, each in its own local frame along a sine-lordosis centreline.

Construction (not synth's): a body is an axial superellipse slab (exponent 2.2-3.5) with a
posterior bite for the canal, concave endplates, uncinate lips (C3-C7) and an anterior-inferior
lip; pedicles, laminae, spinous processes (bifid C2-C6) and the anterior and posterior bars of
the transverse processes are tubes along polylines; articular pillars are slanted tubes; the
foramen transversarium is cut out of the bars. C1 is a ring swept along an ellipse arc with
ellipsoid lateral masses; C2 carries the dens as a tapered tube. Bone texture: band-pass noise
thresholded into trabeculae, with a cortical shell found by blurring the bone mask (see
`texture`). Sizes are adult means in mm, scaled per study and jittered per vertebra.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .shapes import arc, band_noise, capsule, ellipsoid, shell, superellipse_r, sweep

NAMES = ["C1", "C2", "C3", "C4", "C5", "C6", "C7", "T1", "T2"]
# Body half width a, half depth b, height H (mm) and spinous process length, by level (C2..T2).
A = {"C2": 8.0, "C3": 8.0, "C4": 8.3, "C5": 8.8, "C6": 9.5, "C7": 10.5, "T1": 12.0, "T2": 13.0}
B = {"C2": 7.5, "C3": 7.4, "C4": 7.7, "C5": 8.0, "C6": 8.3, "C7": 8.6, "T1": 8.8, "T2": 9.6}
H = {"C2": 14.0, "C3": 13.0, "C4": 12.8, "C5": 12.5, "C6": 13.0, "C7": 14.0, "T1": 16.0, "T2": 17.5}
SPINOUS = {"C2": 17.0, "C3": 12.0, "C4": 13.0, "C5": 14.0, "C6": 18.0, "C7": 26.0, "T1": 30.0,
           "T2": 31.0}


@dataclass
class Vertebra:
    name: str
    label: int
    centre: np.ndarray  # patient LPS mm
    R: np.ndarray  # columns: local u, v, w in patient coordinates
    a: float = 0.0
    b: float = 0.0
    h: float = 0.0
    p: float = 2.6
    canal_w: float = 12.5
    canal_d: float = 15.0
    spinous: float = 12.0
    extent: tuple = (-45.0, 45.0, -20.0, 50.0, -22.0, 30.0)  # local u0,u1,v0,v1,w0,w1
    fractures: list = field(default_factory=list)

    def to_local(self, x, y, z):
        d = (x - self.centre[0], y - self.centre[1], z - self.centre[2])
        r = self.R
        return tuple(d[0] * r[0, i] + d[1] * r[1, i] + d[2] * r[2, i] for i in range(3))

    def to_patient(self, p):
        return self.centre + self.R @ np.asarray(p, float)


def frame(tangent, yaw):
    w = tangent / np.linalg.norm(tangent)
    u = np.array([1.0, 0.0, 0.0]) - w[0] * w
    u /= np.linalg.norm(u)
    v = np.cross(w, u)
    c, s = np.cos(yaw), np.sin(yaw)
    return np.stack([c * u + s * v, -s * u + c * v, w], axis=1)


def column(rng, spine_x, spine_y, c1_z):
    """The nine vertebrae of one study, placed from C1 down."""
    s = rng.uniform(0.88, 1.12)
    lordosis = rng.uniform(-4.0, 13.0)  # mm of anterior bulge at mid-neck (negative: kyphotic)
    lateral = rng.normal(0.0, 2.5)
    yaw_head = np.deg2rad(rng.normal(0.0, 5.0))
    canal_w, canal_d = 12.5 * s * rng.uniform(0.93, 1.07), 15.0 * s * rng.uniform(0.9, 1.1)
    dims = {}
    z = c1_z
    centres_z = [z]
    prev = None
    for n in NAMES[1:]:
        j = rng.normal(1.0, 0.04, 3)
        dims[n] = (A[n] * s * j[0], B[n] * s * j[1], H[n] * s * j[2])
        if prev is None:
            z = c1_z - 6.5 * s - rng.uniform(1.5, 2.5) - dims[n][2] / 2
        else:
            disc = (4.0 if n == "T2" else rng.uniform(4.0, 6.0)) * s
            z = z - dims[prev][2] / 2 - disc - dims[n][2] / 2
        centres_z.append(z)
        prev = n
    z_top, z_bot = centres_z[0], centres_z[-1]
    out = []
    for i, n in enumerate(NAMES):
        t = (centres_z[i] - z_bot) / (z_top - z_bot)
        y = spine_y - lordosis * np.sin(np.pi * t)
        x = spine_x + lateral * np.sin(np.pi * t)
        dy = -lordosis * np.pi * np.cos(np.pi * t) / (z_top - z_bot)
        dx = lateral * np.pi * np.cos(np.pi * t) / (z_top - z_bot)
        yaw = yaw_head * max(0.0, 1.0 - 1.4 * (1 - t)) if i > 0 else yaw_head
        v = Vertebra(n, i + 1, np.array([x, y, centres_z[i]]), frame(np.array([dx, dy, 1.0]), yaw),
                     canal_w=canal_w, canal_d=canal_d)
        if n == "C1":
            v.a, v.b, v.h = 17.5 * s, 18.0 * s, 13.0 * s
            v.extent = (-45 * s, 45 * s, -22 * s, 32 * s, -10 * s, 10 * s)
        else:
            v.a, v.b, v.h = dims[n]
            v.p = rng.uniform(2.2, 3.5)
            v.spinous = SPINOUS[n] * s * rng.uniform(0.9, 1.1)
            up = 20 * s if n == "C2" else 0.6 * v.h + 4
            tw = 38 * s if n.startswith("T") else 30 * s
            v.extent = (-tw, tw, -v.b - 4, v.b + canal_d + v.spinous + 8, -0.5 * v.h - 3 - 0.45 * v.spinous,
                        0.5 * v.h + up)
        out.append(v)
    return out


def body_mask(v: Vertebra, u, vv, w, uncinate=True):
    r = superellipse_r(u, vv, v.a, v.b, v.p)
    bite = ((u / (0.45 * v.a)) ** 2 + ((vv - 1.2 * v.b) / (0.4 * v.b)) ** 2) < 1.0
    cup = 0.9
    half = 0.5 * v.h - cup * (1.0 - np.minimum(r, 1.0) ** 2)
    top = half + (2.2 * np.clip((np.abs(u) / v.a - 0.72) / 0.28, 0, 1) if uncinate else 0.0)
    bottom = -half - 1.6 * np.clip((-vv / v.b - 0.55) / 0.45, 0, 1)
    return (r <= 1.0) & ~bite & (w <= top) & (w >= bottom)


def posterior(v: Vertebra, u, vv, w, first_body_part=True):
    """Pedicles, pillars, laminae, spinous and transverse processes of C2-T2 (local mm)."""
    cw, cd, b, h = v.canal_w, v.canal_d, v.b, v.h
    m = np.zeros(u.shape, bool)
    tr = np.zeros(u.shape, bool)
    thoracic = v.name.startswith("T")
    for sg in (-1.0, 1.0):
        for dw in (-1.5, 1.5):
            m |= capsule(u, vv, w, (sg * 0.62 * v.a, b - 1.5, dw), (sg * (cw + 3), b + 6, dw), 2.8, 2.5)
        m |= capsule(u, vv, w, (sg * (cw + 5), b + 5, 0.55 * h), (sg * (cw + 5), b + 11, -0.55 * h), 4.8, 4.6)
        for dw in (-0.22 * h, 0.0, 0.22 * h):
            m |= sweep(u, vv, w, [(sg * (cw + 3), b + 10, dw - 0.1 * h), (sg * 0.55 * cw, b + cd - 1, dw - 0.16 * h),
                                  (sg * 1.5, b + cd + 2, dw - 0.2 * h)], [2.2, 2.0, 2.3])
        if thoracic:
            tr |= capsule(u, vv, w, (sg * (cw + 5), b + 8, 0.0), (sg * (cw + 22), b + 14, 2.0), 4.0, 3.5)
        else:
            reach = cw + (13.0 if v.name == "C7" else 10.0)
            tr |= capsule(u, vv, w, (sg * 0.85 * v.a, -1.0, 0.0), (sg * reach, 2.0, -1.0), 2.4, 2.0)
            tr |= capsule(u, vv, w, (sg * (cw + 5), b + 6, -1.0), (sg * reach, 3.0, -1.0), 2.4, 2.0)
            tr |= ellipsoid(u, vv, w, (sg * (reach + 1), 3.0, -1.0), (3.0, 4.0, 3.0))
            tr &= ~capsule(u, vv, w, (sg * (v.a + 6.0), 3.0, -8.0), (sg * (v.a + 6.0), 3.0, 8.0), 2.7, 2.7)
    sp0 = np.array([0.0, b + cd + 1.0, -0.15 * h])
    tip = sp0 + np.array([0.0, v.spinous, -0.4 * v.spinous])
    m |= capsule(u, vv, w, sp0, tip, 3.2, 2.0)
    if v.name in ("C2", "C3", "C4", "C5", "C6"):
        for sg in (-1.0, 1.0):
            m |= ellipsoid(u, vv, w, tip + np.array([sg * 3.0, 0.5, 0.0]), (2.8, 3.0, 3.5))
    return m | tr


def c1_mask(v: Vertebra, u, vv, w):
    s = v.a / 17.5
    m = np.zeros(u.shape, bool)
    m |= sweep(u, vv, w, arc((0, 6 * s), (v.a, v.b), -np.pi + 0.55, -0.55, 9), [3.3] * 9)
    m |= sweep(u, vv, w, arc((0, 6 * s), (v.a, v.b), 0.55, np.pi - 0.55, 9), [3.0] * 9)
    m |= ellipsoid(u, vv, w, (0, -12.5 * s, 0), (4.0 * s, 3.0 * s, 5.5 * s))
    m |= ellipsoid(u, vv, w, (0, 24.5 * s, 0), (4.0 * s, 3.5 * s, 5.0 * s))
    for sg in (-1.0, 1.0):
        m |= ellipsoid(u, vv, w, (sg * v.a, 3 * s, 0), (6.5 * s, 9.0 * s, 6.5 * s))
        t = capsule(u, vv, w, (sg * (v.a + 3), 3 * s, 0), (sg * 36 * s, 5 * s, -1.0), 3.8 * s, 3.0 * s)
        t &= ~capsule(u, vv, w, (sg * (v.a + 7.5 * s), 3 * s, -8), (sg * (v.a + 7.5 * s), 3 * s, 8), 2.6, 2.6)
        m |= t
    return m


def c2_extra(v: Vertebra, u, vv, w):
    s = v.a / 8.0
    m = capsule(u, vv, w, (0, 0.5, 0.5 * v.h - 2), (0, 1.5, 0.5 * v.h + 14 * s), 5.2 * s, 4.1 * s)
    m |= ellipsoid(u, vv, w, (0, 1.5, 0.5 * v.h + 14 * s), (4.1 * s, 4.1 * s, 3.0 * s))
    for sg in (-1.0, 1.0):
        m |= ellipsoid(u, vv, w, (sg * (v.canal_w + 2.5), 2.0, 0.5 * v.h - 1.5), (7.0 * s, 8.0 * s, 4.5))
    return m


def vertebra_mask(v: Vertebra, u, vv, w):
    if v.name == "C1":
        return c1_mask(v, u, vv, w)
    m = body_mask(v, u, vv, w, uncinate=v.name not in ("C2", "T1", "T2")) | posterior(v, u, vv, w)
    if v.name == "C2":
        m |= c2_extra(v, u, vv, w)
    return m


@dataclass
class BoneTexture:
    marrow: float  # HU between trabeculae
    trabecular: float  # HU added where a trabecula is
    cortical: float  # HU of the shell
    cortex_mm: float
    fraction: float  # threshold shift: lower = denser trabecular network


def texture_params(rng) -> BoneTexture:
    density = rng.uniform(0.6, 1.2)  # osteopenic to dense
    return BoneTexture(marrow=rng.uniform(0.0, 70.0), trabecular=rng.uniform(300.0, 500.0) * density,
                       cortical=rng.uniform(750.0, 1300.0) * (0.75 + 0.25 * density),
                       cortex_mm=rng.uniform(0.8, 1.8), fraction=rng.uniform(-0.1, 0.5))


def texture(rng, mask, spacing, tex: BoneTexture, coarse=1):
    """HU inside a bone mask: trabeculae (band-pass noise, 0.4-1.6 mm) and a cortical shell.
    coarse=2 for bones outside the column (cheaper, blockier texture)."""
    dz, dy, dx = spacing
    lo = [0.4 / dz, 0.4 / dy, 0.4 / dx]
    hi = [1.6 / dz, 1.6 / dy, 1.6 / dx]
    n = band_noise(rng, mask.shape, lo, hi, coarse)
    trab = 1.0 / (1.0 + np.exp(-(n - tex.fraction) / 0.25))
    slow = band_noise(rng, mask.shape, [3 / dz, 3 / dy, 3 / dx], [12 / dz, 12 / dy, 12 / dx], 4)
    hu = tex.marrow + tex.trabecular * trab + 25.0 * slow
    t = tex.cortex_mm / 1.5
    cortex = shell(mask, [t / dz, t / dy, t / dx])
    hu = np.where(cortex, tex.cortical + 60.0 * n, hu)
    return np.where(mask, hu, 0.0).astype(np.float32)
