"""Geometry and filtering primitives of phantom family B (numpy only).

Solids are boolean occupancy tests on coordinate arrays in a local frame (u = patient left,
v = posterior, w = superior, mm): swept tubes (capsules with a radius that changes along the
segment, chained along polylines), superellipse slabs with concave endplates, ellipsoids.
Filtering is spectral (FFT per axis), trilinear resampling is written out here, so the
generator needs nothing beyond numpy.
"""

from __future__ import annotations

import numpy as np


def _capsule(u, v, w, a, ab, ra, rb, grow=0.0):
    du, dv, dw = u - a[0], v - a[1], w - a[2]
    t = np.clip((du * ab[0] + dv * ab[1] + dw * ab[2]) / max(ab @ ab, 1e-9), 0.0, 1.0)
    d2 = (du - t * ab[0]) ** 2 + (dv - t * ab[1]) ** 2 + (dw - t * ab[2]) ** 2
    r = ra + (rb - ra) * t + grow
    return d2 <= r * r


def capsule(u, v, w, a, b, ra, rb, stride=4):
    """Inside a tube from point a (radius ra) to point b (radius rb). Tested first on every
    `stride`-th voxel with a margin, then exactly inside the box of those hits."""
    a = np.asarray(a, np.float32)
    ab = np.asarray(b, np.float32) - a
    u, v, w = np.broadcast_arrays(u, v, w)
    out = np.zeros(u.shape, bool)
    if u.ndim != 3 or min(u.shape) < 2 * stride:
        return _capsule(u, v, w, a, ab, ra, rb)
    step2 = sum(float((c[tuple(np.eye(3, dtype=int)[ax])] - c[0, 0, 0]) ** 2)
                for ax in range(3) for c in (u, v, w))
    margin = stride * np.sqrt(step2)
    sub = (slice(None, None, stride),) * 3
    hit = _capsule(u[sub], v[sub], w[sub], a, ab, ra, rb, margin)
    if not hit.any():
        return out
    box = []
    for ax in range(3):
        idx = np.nonzero(hit.any(axis=tuple(i for i in range(3) if i != ax)))[0]
        box.append(slice(max(idx[0] * stride - stride, 0), idx[-1] * stride + stride + 1))
    box = tuple(box)
    out[box] = _capsule(u[box], v[box], w[box], a, ab, ra, rb)
    return out


def sweep(u, v, w, points, radii):
    """Inside a tube swept along a polyline, radius interpolated per vertex."""
    out = np.zeros(np.broadcast(u, v, w).shape, bool)
    for i in range(len(points) - 1):
        out |= capsule(u, v, w, points[i], points[i + 1], radii[i], radii[i + 1])
    return out


def ellipsoid(u, v, w, c, s):
    return ((u - c[0]) / s[0]) ** 2 + ((v - c[1]) / s[1]) ** 2 + ((w - c[2]) / s[2]) ** 2 <= 1.0


def superellipse_r(u, v, a, b, p):
    """Superellipse 'radius' (1 on the outline) of an axial cross-section."""
    return (np.abs(u / a) ** p + np.abs(v / b) ** p) ** (1.0 / p)


def arc(centre, semi, t0, t1, n, z=0.0):
    """Points on an ellipse arc in a horizontal plane; angle 0 = patient left, pi/2 = posterior."""
    t = np.linspace(t0, t1, n)
    return [np.array([centre[0] + semi[0] * np.cos(x), centre[1] + semi[1] * np.sin(x), z]) for x in t]


def _fast_len(n):
    best = 2 * n
    for a in (1, 3, 9, 27, 5, 15, 45, 25, 75):
        m = a
        while m < n:
            m *= 2
        best = min(best, m)
    return best


def gauss(arr, sigma_vox):
    """Separable Gaussian filter (per-axis sigma in voxels; 0 = leave that axis), edge-padded:
    direct taps for small sigmas, FFT for large ones."""
    out = np.asarray(arr, np.float32)
    for ax, s in enumerate(sigma_vox):
        if s <= 0:
            continue
        pad = int(np.ceil(3 * s))
        widths = [(0, 0)] * out.ndim
        n0 = out.shape[ax]
        if pad <= 6:
            widths[ax] = (pad, pad)
            x = np.pad(out, widths, mode="edge")
            k = np.exp(-0.5 * (np.arange(-pad, pad + 1) / s) ** 2)
            k /= k.sum()
            y = np.zeros(out.shape, np.float32)
            for i, wk in enumerate(k):
                y += np.float32(wk) * np.take(x, np.arange(i, i + n0), axis=ax)
            out = y
            continue
        n = _fast_len(n0 + 2 * pad)
        widths[ax] = (pad, n - n0 - pad)
        x = np.pad(out, widths, mode="edge")
        f = np.fft.rfftfreq(n)
        h = np.exp(-2.0 * (np.pi * f * s) ** 2).astype(np.float32)
        shape = [1] * x.ndim
        shape[ax] = h.size
        y = np.fft.irfft(np.fft.rfft(x, axis=ax) * h.reshape(shape), n=n, axis=ax)
        out = np.take(y, np.arange(pad, pad + n0), axis=ax).astype(np.float32)
    return out


def band_noise(rng, shape, lo, hi, coarse=1):
    """Zero-mean, unit-std band-pass noise: difference of two Gaussians (sigmas in voxels).
    coarse > 1 makes it on a grid that much coarser and repeats it (cheap, blockier)."""
    small = tuple(-(-n // coarse) for n in shape)
    white = rng.standard_normal(small).astype(np.float32)
    n = gauss(white, [x / coarse for x in lo]) - gauss(white, [x / coarse for x in hi])
    n /= max(float(n.std()), 1e-6)
    if coarse > 1:
        for ax in range(n.ndim):
            n = np.repeat(n, coarse, axis=ax)
        n = n[tuple(slice(0, m) for m in shape)]
    return n


def trilinear(vol, z, y, x, fill):
    """Samples vol[z, y, x] at fractional indices (arrays of one shape); `fill` outside."""
    nz, ny, nx = vol.shape
    inside = (z >= 0) & (z <= nz - 1) & (y >= 0) & (y <= ny - 1) & (x >= 0) & (x <= nx - 1)
    z0 = np.clip(np.floor(z).astype(int), 0, max(nz - 2, 0))
    y0 = np.clip(np.floor(y).astype(int), 0, max(ny - 2, 0))
    x0 = np.clip(np.floor(x).astype(int), 0, max(nx - 2, 0))
    fz, fy, fx = (np.clip(z - z0, 0, 1), np.clip(y - y0, 0, 1), np.clip(x - x0, 0, 1))
    z1, y1, x1 = np.minimum(z0 + 1, nz - 1), np.minimum(y0 + 1, ny - 1), np.minimum(x0 + 1, nx - 1)
    out = np.zeros(z.shape, np.float32)
    for zi, wz in ((z0, 1 - fz), (z1, fz)):
        for yi, wy in ((y0, 1 - fy), (y1, fy)):
            for xi, wx in ((x0, 1 - fx), (x1, fx)):
                out += vol[zi, yi, xi] * (wz * wy * wx)
    return np.where(inside, out, fill).astype(np.float32)


def shell(mask, thickness_vox):
    """Voxels of `mask` within about `thickness_vox` (per axis) of its outside: the mask
    blurred by a Gaussian of that width drops below 1 near the surface."""
    m = gauss(mask.astype(np.float32), [max(t, 0.3) for t in thickness_vox])
    return mask & (m < 0.93)
