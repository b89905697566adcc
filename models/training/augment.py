"""Domain randomisation of model inputs at training time (`train.py --augment`).

The phantoms of one generator share one way of making a CT image: one noise level and
texture, one reconstruction kernel, thin slices, no metal, no shoulders. A model trained on
them learns those too (MODEL_CARD.md, "Generalisation, measured": chance on a second
generator). These transforms vary, on the windowed model input, what a scanner and a patient
vary and no anatomy label depends on:

- reconstruction kernel: soft (Gaussian blur) to sharp (unsharp mask with overshoot);
- in-plane resolution: the window down-sampled and up-sampled again (coarse pixels, as the
  ~4 mm radiotherapy CTs of shared/realct, so that synthetic positives look that way too);
- slice thickness and partial volume: a blur along the slice axis;
- noise: white and correlated (CT noise has a texture), 5-55 HU;
- calibration and bone density: gain and offset, and a lower bone contrast (osteopenia);
- dental or spinal metal: a bright spot with alternating bright and dark streaks over a few
  slices;
- shoulders: horizontal photon-starvation streaks growing towards the window's lower end.

Geometry (pose, patient size) is varied where the labels are resampled with the image
(`train.posed_window`), not here. Every transform keeps values in [0, 1] and the tensor's
shape; the labels are untouched.
"""

from __future__ import annotations

import contextlib
import math
import random

import torch
import torch.nn.functional as F

# One unit of the model input is the window width, 1800 HU (model.json); 0 HU sits at 0.278.
HU = 1.0 / 1800.0
SOFT_TISSUE = 500.0 * HU


@contextlib.contextmanager
def _one_thread():
    """These are many small tensor operations: on a busy 2-core machine each one's
    two-thread parallel region waits for a descheduled thread, and a window took 4.4 s
    instead of 78 ms on one thread. The training's own thread count is restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _gauss_kernel(sigma: float) -> torch.Tensor:
    r = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _blur_axis(v: torch.Tensor, k: torch.Tensor, dim: int, circular: bool = False) -> torch.Tensor:
    """v convolved with the odd 1-D kernel k along `dim`, edges replicated (or wrapped):
    a weighted sum of shifted copies, which on a CPU beats a one-channel conv2d by far."""
    n = v.shape[dim]
    r = min(k.numel() // 2, n - 1)
    k = k[k.numel() // 2 - r: k.numel() // 2 + r + 1]
    k = k / k.sum()
    if r == 0:
        return v
    if circular:
        lo, hi = v.narrow(dim, n - r, r), v.narrow(dim, 0, r)
    else:
        lo = v.narrow(dim, 0, 1).expand(*[r if d == dim else -1 for d in range(v.dim())])
        hi = v.narrow(dim, n - 1, 1).expand(*[r if d == dim else -1 for d in range(v.dim())])
    padded = torch.cat([lo, v, hi], dim)
    out = padded.narrow(dim, 0, n) * float(k[0])
    for i in range(1, k.numel()):
        out = out + padded.narrow(dim, i, n) * float(k[i])
    return out


def blur_plane(v: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of v [S, H, W] in-plane."""
    if sigma <= 0:
        return v
    k = _gauss_kernel(sigma)
    return _blur_axis(_blur_axis(v, k, 2), k, 1)


def blur_slices(v: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of v [S, H, W] along the slice axis (thick slices, partial volume)."""
    if sigma <= 0 or v.shape[0] < 2:
        return v
    return _blur_axis(v, _gauss_kernel(sigma), 0)


def metal(v: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """A metal object (filling, screw) on a few consecutive slices: a saturated spot and
    streaks through it at a few angles, alternately bright and dark, fading with distance."""
    s, h, w = v.shape
    mid = v[s // 2]
    body = torch.nonzero(mid > SOFT_TISSUE)
    if body.shape[0] == 0:
        return v
    cy, cx = (int(c) for c in body[rng.randrange(body.shape[0])])
    n = rng.randint(1, min(6, s))
    k0 = rng.randint(0, s - n)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=v.dtype), torch.arange(w, dtype=v.dtype), indexing="ij")
    dy, dx = yy - cy, xx - cx
    r = torch.sqrt(dy * dy + dx * dx)
    theta = torch.atan2(dy, dx)
    streaks = torch.zeros_like(r)
    width = rng.uniform(0.6, 1.5)
    fade = rng.uniform(15.0, 60.0)
    for _ in range(rng.randint(2, 8)):
        angle = rng.uniform(0, math.pi)
        amp = rng.uniform(100, 600) * HU * rng.choice((-1.0, 1.0))
        dist = (r * torch.sin(theta - angle)).abs()
        streaks = streaks + amp * torch.exp(-0.5 * (dist / width) ** 2)
    streaks = streaks * torch.exp(-r / fade)
    radius = rng.uniform(0.8, 3.0)
    spot = (r <= radius).to(v.dtype)
    out = v.clone()
    out[k0:k0 + n] = torch.maximum(out[k0:k0 + n] + streaks, spot)
    return out


def shoulder_streaks(v: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """Photon starvation through the shoulders: noise smeared left-right (long horizontal
    streaks), strongest on the window's last slices (the caudal end, C6-C7 and below)."""
    s, h, w = v.shape
    # A moving average along x (columns, left-right), wrapped: cumulative sums, O(1) a pixel.
    length = rng.randint(12, 40)
    noise = torch.randn(s, h, w + length, dtype=v.dtype)
    c = torch.cumsum(noise, 2)
    x = (c[:, :, length:] - c[:, :, :-length]) / length
    x = x / x.std().clamp_min(1e-6)
    start = rng.uniform(0.3, 0.8)
    ramp = ((torch.arange(s, dtype=v.dtype) / max(1, s - 1) - start) / (1 - start)).clamp(0, 1)
    amp = rng.uniform(20, 80) * HU
    return v + amp * ramp[:, None, None] * x


def randomise_volume(v: torch.Tensor, rng: random.Random, strength: float = 1.0) -> torch.Tensor:
    """One random draw of the transforms above on consecutive slices v [S, H, W] in [0, 1]."""
    p = strength
    if rng.random() < 0.4 * p:  # slice thickness / partial volume
        v = blur_slices(v, rng.uniform(0.3, 1.2))
    if rng.random() < 0.25 * p:  # coarse pixels: down to 1.9-4.4 mm, then back to the grid
        h, w = v.shape[-2:]
        f = rng.uniform(1.5, 3.5)
        small = F.interpolate(v[:, None], size=(max(8, int(h / f)), max(8, int(w / f))), mode="area")
        v = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    u = rng.random()
    if u < 0.3 * p:  # soft kernel
        v = blur_plane(v, rng.uniform(0.4, 1.3))
    elif u < 0.55 * p:  # sharp kernel: edge overshoot
        v = v + rng.uniform(0.3, 1.5) * (v - blur_plane(v, rng.uniform(0.7, 1.5)))
    if rng.random() < 0.3 * p:  # osteopenia: less contrast between bone and soft tissue
        g = rng.uniform(0.55, 0.95)
        v = torch.where(v > SOFT_TISSUE, SOFT_TISSUE + (v - SOFT_TISSUE) * g, v)
    if rng.random() < 0.5 * p:  # calibration
        v = (v - SOFT_TISSUE) * rng.uniform(0.88, 1.12) + SOFT_TISSUE + rng.uniform(-30, 30) * HU
    if rng.random() < 0.15 * p:
        v = metal(v, rng)
    if rng.random() < 0.2 * p:
        v = shoulder_streaks(v, rng)
    if rng.random() < 0.7 * p:  # noise, white and with a texture
        white = rng.uniform(5, 40) * HU
        textured = rng.uniform(0, 40) * HU
        n = torch.randn_like(v) * white
        if textured > 0:
            c = blur_plane(torch.randn_like(v), rng.uniform(0.7, 1.5))
            n = n + c / c.std().clamp_min(1e-6) * textured
        v = v + n
    return v.clamp(0.0, 1.0)


def randomise_window(x: torch.Tensor, rng: random.Random, strength: float = 1.0) -> torch.Tensor:
    """`randomise_volume` on a window x [W, 3, H, W] of consecutive model slices, whose three
    channels are the slices before, at and after each one: the W + 2 slices are transformed
    once, together, and restacked, so that neighbours stay neighbours."""
    with _one_thread():
        v = torch.cat([x[:, 0], x[-1:, 1], x[-1:, 2]])
        v = randomise_volume(v, rng, strength)
        return torch.stack([v[:-2], v[1:-1], v[2:]], 1).contiguous()


def randomise_slices(x: torch.Tensor, rng: random.Random, strength: float = 1.0) -> torch.Tensor:
    """Single slices x [K, 3, H, W] from different studies (crack slices): each drawn apart."""
    with _one_thread():
        return torch.stack([randomise_volume(x[i], rng, strength) for i in range(x.shape[0])])
