"""Phantom family B: everything around the column. Neck outline as a superellipse whose size
follows the head above and the shoulders below, with a subcutaneous fat layer and muscle of
slowly varying HU; airway (pharynx, larynx with a calcified cartilage rim, trachea); discs;
lung apices; clavicles and first ribs; skull base (occipital shell with the foramen magnum,
condyles, clivus, petrous ridges, pneumatised mastoids) and mandible with teeth (some with
metal fillings) in the frame of C1, so they follow the head. All of it unlabelled (label 0).
"""

from __future__ import annotations

import numpy as np

from .shapes import capsule, ellipsoid, gauss, superellipse_r, sweep
from .spine import texture, texture_params


class Grid:
    """The fine volume: vol[k, j, i] at x = xs[i], y = ys[j], z = zs[k] (patient LPS mm)."""

    def __init__(self, xs, ys, zs):
        self.xs, self.ys, self.zs = xs, ys, zs
        self.spacing = (zs[1] - zs[0], ys[1] - ys[0], xs[1] - xs[0])  # z, y, x
        self.vol = np.full((len(zs), len(ys), len(xs)), -1000.0, np.float32)
        self.lab = np.zeros(self.vol.shape, np.uint8)

    def box(self, lo, hi):
        """Index slices and coordinate arrays (broadcastable) of the patient box [lo, hi]."""
        sl = []
        for ax, arr in ((2, self.zs), (1, self.ys), (0, self.xs)):
            i0 = int(np.searchsorted(arr, lo[ax]))
            i1 = int(np.searchsorted(arr, hi[ax], side="right"))
            sl.append(slice(max(i0, 0), min(i1, len(arr))))
        z = self.zs[sl[0]][:, None, None]
        y = self.ys[sl[1]][None, :, None]
        x = self.xs[sl[2]][None, None, :]
        return tuple(sl), (x, y, z)

    def local_box(self, vert, extent):
        u0, u1, v0, v1, w0, w1 = extent
        corners = np.array([[a, b, c] for a in (u0, u1) for b in (v0, v1) for c in (w0, w1)])
        pts = vert.centre + corners @ vert.R.T
        sl, (x, y, z) = self.box(pts.min(0), pts.max(0))
        x, y, z = (np.broadcast_arrays(*(a.astype(np.float32) for a in (x, y, z))))
        return sl, (x, y, z), tuple(np.asarray(a, np.float32) for a in vert.to_local(x, y, z))

    def paint(self, sl, mask, hu, label=0):
        mask = np.broadcast_to(mask, self.vol[sl].shape)
        if mask.any():
            self.vol[sl][mask] = np.broadcast_to(np.asarray(hu, np.float32), mask.shape)[mask]
            if label is not None:
                self.lab[sl][mask] = label


def soft_tissue(g: Grid, rng, verts, shoulder_z):
    """Neck, head and shoulder outline, fat, muscle, airway."""
    x = g.xs[None, None, :]
    y = g.ys[None, :, None]
    z = g.zs[:, None, None]
    sx = np.interp(g.zs, [v.centre[2] for v in verts[::-1]], [v.centre[0] for v in verts[::-1]])
    sy = np.interp(g.zs, [v.centre[2] for v in verts[::-1]], [v.centre[1] for v in verts[::-1]])
    zc2 = verts[1].centre[2]
    head = np.clip((g.zs - (zc2 - 10.0)) / 30.0, 0, 1)
    below = np.clip(shoulder_z - g.zs, 0, None)
    W = rng.uniform(50, 64) + 15 * head + 1.6 * below ** 1.15
    D = rng.uniform(58, 68) + 25 * head + 0.4 * below
    yc = sy - 10 - 20 * head
    p = rng.uniform(2.2, 2.8)
    W3, D3 = W[:, None, None], D[:, None, None]
    r = superellipse_r(x - sx[:, None, None], y - yc[:, None, None], W3, D3, p)
    fat = rng.uniform(4.0, 12.0)
    inner = r <= 1.0 - fat / np.minimum(W3, D3)
    slow = gauss(rng.standard_normal((len(g.zs) // 4 + 2, len(g.ys) // 4 + 2, len(g.xs) // 4 + 2)),
                 [3, 3, 3])
    slow = slow / max(float(slow.std()), 1e-6)
    big = np.kron(slow, np.ones((4, 4, 4), np.float32))[: len(g.zs), : len(g.ys), : len(g.xs)]
    muscle = rng.uniform(38, 55) + 8.0 * big
    g.vol[:] = np.where(r <= 1.0, np.where(inner, muscle, rng.uniform(-115, -85) + 10 * big), -1000.0)
    # Airway: pharynx above C4, larynx C4-C6, trachea below C6 (lumen centre, radii by level).
    zl = [verts[i].centre[2] for i in (0, 3, 5, 8)]  # C1, C4, C6, T2 (descending)
    ay = np.interp(g.zs, zl[::-1], [-26, -28, -34, -14][::-1]) * rng.uniform(0.9, 1.1)
    rx = np.interp(g.zs, zl[::-1], [rng.uniform(10, 17), 8, 8, rng.uniform(7, 9.5)][::-1])
    ry = np.interp(g.zs, zl[::-1], [rng.uniform(4, 8), 8, 8, rng.uniform(7, 9.5)][::-1])
    top = verts[0].centre[2] + 25
    ok = (g.zs < top)[:, None, None]
    d = ((x - sx[:, None, None]) / rx[:, None, None]) ** 2 + ((y - (sy + ay)[:, None, None]) / ry[:, None, None]) ** 2
    lar = ((g.zs < zl[1]) & (g.zs > zl[3] - 10))[:, None, None]
    rim = ok & lar & (d > 1.0) & (d < (1 + 2.5 / np.minimum(rx, ry)[:, None, None]) ** 2)
    g.vol[rim] = rng.uniform(120, 380) + 40 * big[rim]
    g.vol[ok & (d <= 1.0)] = -1000.0 + 30 * np.abs(big[ok & (d <= 1.0)])


def discs(g: Grid, rng, verts):
    hu = rng.uniform(70, 95)
    for up, lo in zip(verts[1:-1], verts[2:]):
        gap = np.linalg.norm(up.centre - lo.centre) - 0.5 * (up.h + lo.h)
        ext = (-lo.a - 3, lo.a + 3, -lo.b - 3, lo.b + 3, 0.5 * lo.h - 2, 0.5 * lo.h + gap + 2)
        sl, _, (u, v, w) = g.local_box(lo, ext)
        a, b = 0.5 * (up.a + lo.a), 0.5 * (up.b + lo.b)
        m = (superellipse_r(u, v, a, b, 2.5) <= 1.0) & (w > 0.5 * lo.h - 2) & (w < 0.5 * lo.h + gap + 2)
        g.paint(sl, m, hu)


def head_and_chest(g: Grid, rng, verts, spacing):
    """Skull base and mandible (C1 frame), lung apices, clavicles, first ribs. Returns metal points."""
    c1, t1 = verts[0], verts[7]
    s = c1.a / 17.5
    tex = texture_params(rng)
    metal = []
    # Skull base in C1's frame (w up from the ring centre).
    sl, _, (u, v, w) = g.local_box(c1, (-75, 75, -60, 90, 5, 60))
    if u.size:
        cen, semi, th = np.array([0, 8, 52 * s]), np.array([64, 76, 58]) * s, rng.uniform(5, 8)
        outer = ellipsoid(u, v, w, cen, semi)
        inner = ellipsoid(u, v, w, cen, semi - th)
        brain = inner & (w < 45 * s)
        fm = ((u / 16.5) ** 2 + ((v - 9) / 19.0) ** 2 < 1.0) & (w < 24 * s)
        bone = outer & ~inner & (w < 40 * s) & ~fm
        for sg in (-1, 1):
            bone |= ellipsoid(u, v, w, (sg * 13 * s, 3, 11 * s), (6, 10, 5))
            bone |= capsule(u, v, w, (sg * 20 * s, -4, 30 * s), (sg * 50 * s, 16, 27 * s), 8, 7)
        bone |= capsule(u, v, w, (0, -15 * s, 13 * s), (0, -42 * s, 46 * s), 7, 8)
        mast = np.zeros(u.shape, bool)
        for sg in (-1, 1):
            mast |= ellipsoid(u, v, w, (sg * 50 * s, 12, 19 * s), (9, 11, 15))
        inside = g.vol[sl] > -500  # the head outline: no bone outside the skin
        bone &= inside
        mast &= inside
        g.paint(sl, brain & ~bone & inside, rng.uniform(28, 40))
        hu = texture(rng, bone, spacing, tex, 2)
        g.paint(sl, bone & ~mast, hu)
        mhu = np.where(rng.random(u.shape) < 0.5, -500.0, 600.0).astype(np.float32)
        mhu = gauss(mhu, [0.6 / sp for sp in spacing])
        g.paint(sl, mast, mhu)
    # Mandible: a U-shaped tube with rami and teeth.
    zm = -rng.uniform(25, 45) * s
    sl, _, (u, v, w) = g.local_box(c1, (-65, 65, -105, 0, zm - 15, zm + 60))
    if u.size:
        t = np.linspace(-1, 1, 13)
        arch = [np.array([48 * s * x, -82 * s + 57 * s * x * x, zm + 6 * x * x]) for x in t]
        ridge = [p + np.array([0, 0, 9.0]) for p in arch]
        m = sweep(u, v, w, arch, [7.0] * 13) | sweep(u, v, w, ridge, [5.5] * 13)
        for sg in (-1, 1):
            m |= capsule(u, v, w, (sg * 48 * s, -25 * s, zm + 7), (sg * 50 * s, -17 * s, zm + 48), 6.0, 4.5)
        hu = texture(rng, m, spacing, tex, 2)
        g.paint(sl, m, hu)
        teeth = np.zeros(u.shape, bool)
        for x in np.linspace(-0.8, 0.8, 10):
            base = np.array([48 * s * x, -82 * s + 57 * s * x * x, zm + 13])
            tooth = capsule(u, v, w, base, base + np.array([0, 0, 8.0]), 3.0, 2.8)
            teeth |= tooth
            if rng.random() < 0.08:
                g.paint(sl, tooth & (w > zm + 18), 9000.0)
                metal.append(c1.to_patient(base + np.array([0, 0, 6.0])))
        g.paint(sl, teeth & (g.vol[sl] < 5000), 2200.0)
    # Chest: lung apices, clavicles, first ribs (patient axes).
    sx, sy, zt = t1.centre
    for sg in (-1, 1):
        c = np.array([sx + sg * rng.uniform(38, 50), sy - 8, zt - 42])
        sl, (x, y, z) = g.box(c - [36, 46, 46], c + [36, 46, 46])
        if 0 in g.vol[sl].shape:
            continue
        m = ellipsoid(x, y, z, c, (35, 45, 45)) & (g.vol[sl] > -200)
        g.paint(sl, m, -840.0)
    for sg in (-1, 1):
        a = np.array([sx + sg * 14, sy - 62, zt - 10])
        b = np.array([sx + sg * 95, sy - 18, zt + 6])
        rib = [np.array([sx + sg * 34, sy + 14, zt]), np.array([sx + sg * 56, sy - 6, zt - 10]),
               np.array([sx + sg * 46, sy - 46, zt - 24]), np.array([sx + sg * 20, sy - 60, zt - 30])]
        lo = np.minimum(np.minimum(a, b), np.min(rib, 0)) - 8
        hi = np.maximum(np.maximum(a, b), np.max(rib, 0)) + 8
        sl, (x, y, z) = g.box(lo, hi)
        if 0 in g.vol[sl].shape:
            continue
        x, y, z = np.broadcast_arrays(*(a.astype(np.float32) for a in (x, y, z)))
        m = capsule(x, y, z, a, b, 6.0, 6.0) | sweep(x, y, z, rib, [4.0] * 4)
        g.paint(sl, m, texture(rng, m, spacing, tex, 2))
    return metal
