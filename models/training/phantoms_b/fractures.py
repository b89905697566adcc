"""Phantom family B fractures: bone is cut by a rough, curved surface and whole fragments move
as rigid bodies (or, for a burst, the body is squashed and its pieces spread); the gap is what
the moving fragment leaves behind, filled with haematoma, and where fragments overlap the bone
is impacted (denser). Kinds:

- `split_body`: oblique or vertical rough cut through a body (C2-C7), fragment displaced
  1.5-4 mm with a shear and a small rotation;
- `burst`: body height reduced 20-35 %, widened, cut into 3-5 pieces that spread 0.7-1.5 mm,
  posterior-superior piece retropulsed 1.5-3 mm into the canal (C3-C7);
- `teardrop`: anterior-inferior corner fragment displaced forward and down (C3-C7);
- `arch_split`: one side of the posterior arch cut across the pedicle, pillar or lamina and
  displaced 1.5-3 mm (C2-C7);
- `spinous_avulsion`: tip of the spinous process pulled down 3-6 mm (C6, C7);
- `dens_tilt`: dens cut at its base and tilted 8-20 degrees (C2);
- `ring_spread`: C1 ring broken in front and behind, both halves pushed outwards 1.5-3 mm.

Every fracture reports its vertebra, a point on the cut, the cut's normal and the gap along it
(0 where there is no single plane) in patient mm (ground truth).
"""

from __future__ import annotations

import numpy as np

from .shapes import band_noise, trilinear

KINDS = {
    "C1": ["ring_spread"],
    "C2": ["dens_tilt", "split_body", "arch_split"],
    "C3": ["split_body", "burst", "teardrop", "arch_split"],
    "C4": ["split_body", "burst", "teardrop", "arch_split"],
    "C5": ["split_body", "burst", "teardrop", "arch_split"],
    "C6": ["split_body", "burst", "teardrop", "arch_split", "spinous_avulsion"],
    "C7": ["split_body", "burst", "teardrop", "arch_split", "spinous_avulsion"],
}


def rot(axis, deg):
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    t = np.deg2rad(deg)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


class Bone:
    """A vertebra's bounding box: its local coordinates, mask and HU, and the index mapping."""

    def __init__(self, vert, local, mask, hu, origin, spacing, rng):
        self.v, (self.u, self.vv, self.w) = vert, local
        self.mask, self.hu = mask, hu
        self.origin, self.spacing = np.asarray(origin, float), np.asarray(spacing, float)  # z, y, x
        self.vacated = np.zeros(mask.shape, bool)
        self.rng = rng
        self._rough = None

    @property
    def rough(self):
        if self._rough is None:
            sp = self.spacing
            self._rough = band_noise(self.rng, self.mask.shape, [2.0 / s for s in sp], [6.0 / s for s in sp], 2)
        return self._rough

    def side(self, p0, n, amp, bend=0.0):
        """> 0 on the + side of a rough, slightly curved surface through p0 with normal n."""
        du, dv, dw = self.u - p0[0], self.vv - p0[1], self.w - p0[2]
        d = du * n[0] + dv * n[1] + dw * n[2]
        return d + bend * (du * du + dv * dv + dw * dw - d * d) / 40.0 + amp * self.rough

    def move(self, frag, centre, R, t):
        """Moves the voxels of `frag` by q = centre + R (p - centre) + t (local mm)."""
        if not frag.any():
            return
        # Destination voxel q -> source p = centre + R^T (q - t - centre), in local mm.
        q = np.stack([self.u, self.vv, self.w], -1) - centre - t
        p = q @ R + centre  # rows: (R^T q)^T = q R
        pat = self.v.centre + p @ self.v.R.T  # x, y, z
        iz = (pat[..., 2] - self.origin[0]) / self.spacing[0]
        iy = (pat[..., 1] - self.origin[1]) / self.spacing[1]
        ix = (pat[..., 0] - self.origin[2]) / self.spacing[2]
        fmask = trilinear(frag.astype(np.float32), iz, iy, ix, 0.0) > 0.5
        fhu = trilinear(np.where(frag, self.hu, 0.0).astype(np.float32), iz, iy, ix, 0.0)
        stay = self.mask & ~frag
        overlap = fmask & stay
        hu = np.where(fmask, fhu, self.hu)
        hu = np.where(overlap, np.maximum(fhu, self.hu) + 150.0, hu)
        self.vacated |= frag & ~fmask
        self.mask = stay | fmask
        self.hu = np.where(self.mask, hu, 0.0).astype(np.float32)

    def record(self, kind, surface, n_local, gap):
        """Ground truth: the centre of the cut surface (patient mm), its normal and the gap."""
        pts = np.stack([self.u[surface], self.vv[surface], self.w[surface]], -1)
        c = pts.mean(0) if len(pts) else np.zeros(3)
        return {"vertebra": self.v.name, "kind": kind, "location_mm": self.v.to_patient(c).tolist(),
                "normal": (self.v.R @ n_local).tolist(), "gap_mm": float(gap)}


def _cut(bone, region, p0, n, amp, bend=0.0):
    s = bone.side(p0, n, amp, bend)
    frag = bone.mask & region & (s > 0)
    surface = bone.mask & region & (np.abs(s) < 1.0)
    return frag, surface


def apply(bone: Bone, kind: str) -> dict:
    r, v = bone.rng, bone.v
    a, b, h = v.a, v.b, v.h
    u, vv, w = bone.u, bone.vv, bone.w
    body = (vv < b + 1.0) & (np.abs(u) < a + 3.0) & (np.abs(w) < 0.5 * h + 3.0)
    if kind == "split_body":
        th = r.uniform(0, np.pi)
        tilt = r.uniform(0.0, 0.8)
        n = np.array([np.cos(th), np.sin(th), tilt * r.choice([-1, 1])])
        n /= np.linalg.norm(n)
        p0 = np.array([r.uniform(-0.4, 0.4) * a, r.uniform(-0.4, 0.3) * b, r.uniform(-0.2, 0.2) * h])
        frag, surface = _cut(bone, body, p0, n, r.uniform(0.5, 1.3), r.uniform(-0.3, 0.3))
        d = r.uniform(1.5, 4.0)
        shear = np.cross(n, r.normal(size=3))
        t = d * n + r.uniform(0, 2.0) * shear / max(np.linalg.norm(shear), 1e-6)
        bone.move(frag, p0, rot(r.normal(size=3), r.uniform(0, 4)), t)
        return bone.record(kind, surface, n, d)
    if kind == "burst":
        keep = bone.mask & ~body
        bm = bone.mask & body
        loss = r.uniform(0.2, 0.35)
        wide = r.uniform(1.05, 1.12)
        # Squash: destination (u, v, w) takes bone from (u / wide, v / wide, w / (1 - loss)).
        pat = v.centre + np.stack([u / wide, vv / wide, w / (1 - loss)], -1) @ v.R.T
        iz = (pat[..., 2] - bone.origin[0]) / bone.spacing[0]
        iy = (pat[..., 1] - bone.origin[1]) / bone.spacing[1]
        ix = (pat[..., 0] - bone.origin[2]) / bone.spacing[2]
        sm = (trilinear(bm.astype(np.float32), iz, iy, ix, 0.0) > 0.5) & body
        shu = trilinear(np.where(bm, bone.hu, 0.0).astype(np.float32), iz, iy, ix, 0.0) * (1 + 0.6 * loss)
        bone.vacated |= bm & ~sm
        bone.mask = keep | sm
        bone.hu = np.where(keep, bone.hu, np.where(sm, shu, 0.0)).astype(np.float32)
        seeds = np.stack([r.uniform(-0.6, 0.6, 4) * a, r.uniform(-0.6, 0.6, 4) * b, np.zeros(4)], -1)
        dist = np.stack([(u - s[0]) ** 2 + (vv - s[1]) ** 2 + 3 * bone.rough for s in seeds], 0)
        cell = dist.argmin(0)
        for i, s in enumerate(seeds):
            frag = bone.mask & body & (cell == i)
            off = np.array([s[0], s[1], 0.0])
            bone.move(frag, s, np.eye(3), r.uniform(0.7, 1.5) * off / max(np.linalg.norm(off), 1e-6))
        retro = bone.mask & body & (vv > 0.3 * b) & (w > 0)
        bone.move(retro, np.array([0, b, 0.0]), rot([1, 0, 0], r.uniform(-8, 8)),
                  np.array([0, r.uniform(1.5, 3.0), 0.0]))
        out = bone.record(kind, bone.mask & body & (np.abs(u) < 2) & (np.abs(vv) < 2), np.array([0, 0, 1.0]), 0.0)
        out["location_mm"] = v.to_patient([0.0, 0.0, 0.0]).tolist()
        return out
    if kind == "teardrop":
        n = np.array([0.0, -0.7, -0.7])
        n /= np.linalg.norm(n)
        p0 = np.array([0.0, -0.45 * b, -0.2 * h])
        frag, surface = _cut(bone, body, p0, n, r.uniform(0.4, 0.9))
        d = r.uniform(2.0, 4.0)
        bone.move(frag, p0, rot([1, 0, 0], r.uniform(5, 12)), d * np.array([0, -0.8, -0.6]))
        return bone.record(kind, surface, n, d)
    if kind == "arch_split":
        sg = r.choice([-1.0, 1.0])
        where = r.choice(["pedicle", "pillar", "lamina"])
        if where == "pedicle":
            p0, n = np.array([sg * (v.canal_w + 1), b + 3.5, 0.0]), np.array([0.3 * sg, 1.0, 0.0])
        elif where == "pillar":
            p0, n = np.array([sg * (v.canal_w + 5), b + 8, 0.0]), np.array([0.0, 0.4, 1.0])
        else:
            p0, n = np.array([sg * 0.6 * v.canal_w, b + v.canal_d - 1, -0.1 * h]), np.array([sg, -0.5, 0.0])
        n = n / np.linalg.norm(n)
        region = (vv > b) & (sg * u > 0) & (np.abs(w) < 0.5 * h + 8)
        frag, surface = _cut(bone, region, p0, n, r.uniform(0.4, 1.0))
        d = r.uniform(1.5, 3.0)
        bone.move(frag, p0, rot(r.normal(size=3), r.uniform(0, 5)), d * n)
        return bone.record(kind, surface, n, d)
    if kind == "spinous_avulsion":
        sp0 = np.array([0.0, b + v.canal_d + 1.0, -0.15 * h])
        tipdir = np.array([0.0, 1.0, -0.4]) / np.hypot(1.0, 0.4)
        p0 = sp0 + tipdir * v.spinous * r.uniform(0.5, 0.7)
        frag, surface = _cut(bone, vv > b + v.canal_d, p0, tipdir, r.uniform(0.3, 0.8))
        d = r.uniform(3.0, 6.0)
        bone.move(frag, p0, rot([1, 0, 0], r.uniform(-15, -5)), d * np.array([0, 0.3, -1.0]))
        return bone.record(kind, surface, tipdir, d)
    if kind == "dens_tilt":
        p0 = np.array([0.0, 1.0, 0.5 * h + r.uniform(0.0, 2.5)])
        n = np.array([0.0, r.uniform(-0.3, 0.3), 1.0])
        n /= np.linalg.norm(n)
        region = (np.abs(u) < 7) & (vv > -8) & (vv < 9)
        frag, surface = _cut(bone, region, p0, n, r.uniform(0.3, 0.8))
        tiltdeg = r.uniform(8, 20) * r.choice([-1, 1])
        d = r.uniform(1.0, 3.0)
        bone.move(frag, p0, rot([1, 0, 0], tiltdeg), np.array([0, np.sign(tiltdeg) * d, 0.5]))
        return bone.record(kind, surface, n, d)
    if kind == "ring_spread":
        off = r.uniform(-6, 6)
        n = np.array([1.0, r.uniform(-0.2, 0.2), 0.0])
        n /= np.linalg.norm(n)
        p0 = np.array([off, 6.0, 0.0])
        left, surface = _cut(bone, np.ones_like(bone.mask), p0, n, r.uniform(0.4, 1.0))
        right = bone.mask & ~left
        d = r.uniform(1.5, 3.0)
        bone.move(left, p0, np.eye(3), np.array([d, 0, 0]))
        bone.move(right, p0, np.eye(3), np.array([-d, 0, 0]))
        return bone.record(kind, surface, n, 2 * d)
    raise ValueError(kind)
