"""Phantom family B acquisition: what the scanner does to the fine anatomy volume.

- Slices: each reconstructed slice averages the fine volume under a triangular slice
  sensitivity profile of FWHM = slice thickness (0.625-3 mm; partial volume), spaced at the
  thickness or overlapping.
- Kernel: soft (Gaussian MTF, 0.55-0.8 mm) or sharp (narrow MTF plus edge enhancement, which
  overshoots at cortices), applied in-plane.
- Noise: white noise shaped by a ramp-times-window noise power spectrum (the kernel's
  cut-off), so it is correlated the way filtered back-projection noise is; its level grows
  with thinner slices and, with streaks along the shoulders' long axis, below the shoulders.
- Metal: radial bright/dark streaks from dental fillings.
- Reconstruction circle: optionally everything outside it is the padding value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .shapes import gauss


@dataclass
class Acquisition:
    thickness: float
    spacing: float
    kernel: str  # "soft" or "sharp"
    kernel_name: str
    blur_mm: float
    enhance: float
    noise_hu: float
    streak_hu: float
    metal_hu: float
    circle: bool


KERNELS = {"soft": ["B30f", "STANDARD", "FC13", "Br40"], "sharp": ["B70f", "BONE", "FC30", "Br64", "BONEPLUS"]}


def sample(rng) -> Acquisition:
    t = float(rng.choice([0.625, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0]))
    sp = t * float(rng.choice([1.0, 1.0, 0.8, 0.5]))
    sp = max(sp, 0.5)
    k = "sharp" if rng.random() < 0.65 else "soft"
    return Acquisition(
        thickness=t, spacing=round(sp, 4), kernel=k, kernel_name=str(rng.choice(KERNELS[k])),
        blur_mm=rng.uniform(0.3, 0.45) if k == "sharp" else rng.uniform(0.55, 0.8),
        enhance=rng.uniform(0.4, 0.9) if k == "sharp" else 0.0,
        noise_hu=rng.uniform(20, 60) if k == "sharp" else rng.uniform(6, 18),
        streak_hu=rng.uniform(10, 45), metal_hu=rng.uniform(150, 600), circle=bool(rng.random() < 0.6))


def slice_centres(zs, acq: Acquisition):
    lo, hi = zs[0] + acq.thickness / 2, zs[-1] - acq.thickness / 2
    n = int(np.floor((hi - lo) / acq.spacing)) + 1
    return hi - acq.spacing * np.arange(n)  # superior first, as a head-first scan runs


def nps_noise(rng, shape, dy, kernel):
    """Noise with a ramp x window power spectrum, unit std per slice."""
    n, ny, nx = shape
    fy = np.fft.fftfreq(ny)[:, None]
    fx = np.fft.rfftfreq(nx)[None, :]
    f = np.hypot(fy, fx) / max(dy, 1e-3)  # cycles per mm
    fc = 0.45 if kernel == "sharp" else 0.22
    h = np.sqrt(f) * np.exp(-((f / fc) ** 2))
    white = rng.standard_normal(shape).astype(np.float32)
    out = np.fft.irfft2(np.fft.rfft2(white) * h, s=(ny, nx)).astype(np.float32)
    return out / np.maximum(out.std(axis=(1, 2), keepdims=True), 1e-6)


def acquire(rng, grid, acq: Acquisition, shoulder_z, metal):
    zs = grid.zs
    zc = slice_centres(zs, acq)
    wts = np.maximum(0.0, 1.0 - np.abs(zc[:, None] - zs[None, :]) / acq.thickness)
    wts /= wts.sum(1, keepdims=True)
    img = np.tensordot(wts.astype(np.float32), grid.vol, axes=(1, 0))
    lab = grid.lab[np.abs(zc[:, None] - zs[None, :]).argmin(1)]
    dz, dy, dx = grid.spacing
    # Metal: clip the bright source (partial-volumed already) before blurring, streaks after.
    img = gauss(img, [0, acq.blur_mm / dy, acq.blur_mm / dx])
    if acq.enhance > 0:
        img = img + acq.enhance * (img - gauss(img, [0, 1.0 / dy, 1.0 / dx]))
    n = nps_noise(rng, img.shape, dy, acq.kernel)
    level = acq.noise_hu * np.sqrt(1.0 / acq.thickness)
    below = np.clip((shoulder_z - zc) / 40.0, 0, 1)[:, None, None]
    img += n * level * (1.0 + 1.5 * below)
    # Shoulder streaks: lines along x (the long path through both shoulders).
    rows = rng.standard_normal((len(zc), img.shape[1], 1)).astype(np.float32)
    rows = gauss(rows, [0, 0.8, 0])
    rows /= max(float(rows.std()), 1e-6)
    img += acq.streak_hu * below * rows * (img > -500)
    if metal:
        yy, xx = np.meshgrid(grid.ys, grid.xs, indexing="ij")
        for m in metal:
            near = np.nonzero(np.abs(zc - m[2]) < 4.0)[0]
            if not len(near):
                continue
            ang = rng.uniform(0, np.pi, int(rng.integers(10, 24)))
            sgn = rng.choice([-1.0, 1.0], len(ang))
            rx, ry = xx - m[0], yy - m[1]
            r = np.hypot(rx, ry)
            pat = np.zeros(xx.shape, np.float32)
            for a, sg in zip(ang, sgn):
                dist = np.abs(-np.sin(a) * rx + np.cos(a) * ry)
                pat += sg * np.exp(-(dist ** 2) / 2.0) * np.exp(-r / 60.0)
            for k in near:
                img[k] += acq.metal_hu * pat * (1 - abs(zc[k] - m[2]) / 4.0)
    if acq.circle:
        yy, xx = np.meshgrid(grid.ys, grid.xs, indexing="ij")
        cx, cy = 0.5 * (grid.xs[0] + grid.xs[-1]), 0.5 * (grid.ys[0] + grid.ys[-1])
        out = np.hypot(xx - cx, yy - cy) > 0.5 * (grid.xs[-1] - grid.xs[0])
        img[:, out] = -3024.0
    return img, lab, zc
