"""Training on the RSNA layout (our phantoms or the real Kaggle data).

Two stages, because 2 CPU cores cannot push whole studies end to end often enough:
  A. end to end on windows of W model slices (randomly mirrored left-right, and with
     --pose-deg resampled as if the patient lay rotated): segmentation
     cross-entropy and slice-level cross-entropy on every slice with a mask, fracture-evidence
     BCE where fractures are localised (phantom ground truth or RSNA boxes), plus RSNA-weighted
     BCE for each vertebra that lies entirely inside the window (its label is then known;
     vertebrae cut by the window edge are ignored). Studies without a segmentation are used
     whole (all 7 vertebra labels + patient label). With --crack-slices K, K single slices
     that show a crack, from any fractured study, are encoded beside the window for the
     fracture-evidence loss: a window holds a few crack slices or none, and telling a crack
     from a bone edge is what training from random weights waits for.
  B. the slice encoder frozen and run once per study; the slice-level GRU (it needs the whole
     neck to count vertebrae) and the GRU/attention/heads trained on WHOLE studies with level
     cross-entropy + vertebra + patient BCE (RSNA weights: vertebra neg 1 / pos 2, patient
     neg 7 / pos 14).
Curves go to OUT/train_log.csv; the checkpoint to OUT/model.pt.

  python3 train.py --data TRAIN_ROOT --val-data VAL_ROOT --cache CACHE --out runs/fp32
  python3 train.py --init runs/pruned/pruned.pt ... --steps-a 300 --steps-b 400   (fine-tune)
  python3 train.py --smoke --data TINY_ROOT --cache /tmp/c --out /tmp/smoke          (CI)
  python3 train.py --device cuda --minutes-a 4 ...   (a GPU; the step count it chose is logged)
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import preprocess as pp

from augment import randomise_slices, randomise_window
from data import FRACTURE_TARGETS, Study, load_dataset
from metrics import summary
from model import N_VERT, TriageNet, add_frac_branch, load_checkpoint, save_checkpoint, with_layout
from robustness import axis_rotation

VERT_W = (1.0, 2.0)  # RSNA weights (negative, positive) for vertebra rows
PAT_W = (7.0, 14.0)  # and for the patient row
SEG_WEIGHT = torch.tensor([0.3] + [1.0] * N_VERT)
FRAC_POS_WEIGHT = torch.tensor(20.0)  # fracture cells are ~0.1 % of the cells of a window
HEAD_MODULES = ("level_gru", "level_out", "gru", "att", "vert_head", "vert_bias", "pat_scale", "pat_bias",
                "pat_head")


def wbce(logits: torch.Tensor, y: torch.Tensor, w: tuple) -> torch.Tensor:
    weight = torch.where(y > 0.5, w[1], w[0])
    return (F.binary_cross_entropy_with_logits(logits, y, reduction="none") * weight).sum() / weight.sum()


def vertebra_spans(seg: np.ndarray) -> list[tuple[int, int] | None]:
    """First and last model slice where each vertebra has at least one labelled cell."""
    present = np.stack([(seg == v + 1).any(axis=(1, 2)) for v in range(N_VERT)], 1)  # [S,7]
    spans = []
    for v in range(N_VERT):
        idx = np.flatnonzero(present[:, v])
        spans.append((int(idx[0]), int(idx[-1])) if idx.size else None)
    return spans


def slice_levels(seg: np.ndarray) -> np.ndarray:
    """Per model slice: index 0..6 of the vertebra with the most cells, -1 without any."""
    counts = np.stack([(seg == v + 1).sum(axis=(1, 2)) for v in range(N_VERT)], 1)  # [S,7]
    return np.where(counts.max(1) > 0, counts.argmax(1), -1)


def level_loss(level_logits: torch.Tensor, seg: np.ndarray) -> torch.Tensor | None:
    target = torch.from_numpy(slice_levels(seg)).to(level_logits.device)
    if (target >= 0).sum() == 0:
        return None
    return F.cross_entropy(level_logits, target, ignore_index=-1)


def random_pose(rng: random.Random, max_deg: tuple, scale_range: float = 0.0) -> np.ndarray | None:
    """A rotation (3x3, acting on LPS mm) by up to `max_deg` = (about z, about y, about x)
    degrees, uniform in each, then, with `scale_range` R > 0, a patient size: the window
    shows 1 +- R times the extent in-plane and, drawn apart, along z. None when all are 0."""
    if not any(max_deg) and not scale_range:
        return None
    r = np.eye(3)
    for axis, m in zip("zyx", max_deg):
        r = r @ axis_rotation(axis, rng.uniform(-m, m))
    if scale_range:
        s_plane = rng.uniform(1 - scale_range, 1 + scale_range)
        r = r @ np.diag([s_plane, s_plane, rng.uniform(1 - scale_range, 1 + scale_range)])
    return r


def posed_window(st: Study, lo: int, hi: int, rot: np.ndarray):
    """Model slices lo..hi of `st` as if the patient lay rotated by `rot` about the window's
    centre: the cached windowed volume resampled (trilinear; outside it 0, i.e. pad_hu) with
    its labels (nearest). Returns x [W, 3, 128, 128] float32 and seg, frac [W, 32, 32] (or None).
    The 2.5D neighbours are resampled too (slices lo-1 and hi), so they stay the neighbours."""
    s = st.v.shape[0]
    dz, dr, dc = pp.DZ, pp.DR, pp.DC
    # How far (in slices) a rotated point of the window can reach beyond it along z.
    reach = int(np.ceil((abs(rot[2, 0]) * pp.W / 2 * dc + abs(rot[2, 1]) * pp.H / 2 * dr) / dz
                        + max(0.0, abs(rot[2, 2]) - 1) * (hi - lo + 2) / 2)) + 2
    a, b = max(0, lo - 1 - reach), min(s, hi + 1 + reach)
    kc = (lo + hi - 1) / 2

    def sample(vol: np.ndarray, ks: np.ndarray, rows: np.ndarray, mode: str) -> torch.Tensor:
        # Output point (model slice k, pixel row i, column j) -> mm about the centre -> rotated
        # -> source indices -> grid_sample's [-1, 1]: one affine map, built per axis and
        # broadcast (a full float64 grid of points costs more than the sampling).
        n_k, n_i, n_j = vol.shape
        to_mm = np.diag([dc, dr, dz])  # (j, i, k) offsets -> (x, y, z) mm
        centre = np.array([(pp.W - 1) / 2, (pp.H - 1) / 2, kc])
        lin = np.linalg.inv(to_mm) @ rot @ to_mm  # (j, i, k) offsets -> source (j, i, k) offsets
        off = centre - np.array([0.0, 0.0, a])  # source offsets -> indices in vol
        scale = np.ones(3)
        if mode == "nearest":  # label grids: cell centres sit at pixel 4c + 1.5
            scale[:2] = 1 / pp.SEG_STRIDE
            off[:2] -= (pp.SEG_STRIDE - 1) / 2
        norm = 2 / np.maximum(np.array([n_j, n_i, n_k]) - 1, 1)
        axes = [torch.from_numpy(t - c).float() for t, c in ((rows, centre[0]), (rows, centre[1]), (ks, kc))]
        grid = torch.zeros(len(ks), len(rows), len(rows), 3)
        for c in range(3):
            m = lin[c] * scale[c] * norm[c]
            grid[..., c] = (m[2] * axes[2][:, None, None] + m[1] * axes[1][None, :, None]
                            + m[0] * axes[0][None, None, :] + ((off[c] * scale[c]) * norm[c] - 1))
        src_t = torch.from_numpy(vol.astype(np.float32))[None, None]
        return F.grid_sample(src_t, grid[None], mode=mode, padding_mode="zeros", align_corners=True)[0, 0]

    pix = np.arange(pp.H, dtype=np.float64)
    cells = np.arange(pp.H // pp.SEG_STRIDE) * pp.SEG_STRIDE + (pp.SEG_STRIDE - 1) / 2
    v = sample(st.v[a:b], np.arange(lo - 1, hi + 1, dtype=np.float64), pix, "bilinear") / 255.0
    x = torch.stack([v[:-2], v[1:-1], v[2:]], 1).contiguous()
    ks = np.arange(lo, hi, dtype=np.float64)
    seg = None if st.seg is None else sample(st.seg[a:b], ks, cells, "nearest").numpy().astype(np.uint8)
    frac = None if st.frac is None else sample(st.frac[a:b], ks, cells, "nearest").numpy().astype(np.uint8)
    return x, seg, frac


class Logger:
    def __init__(self, path: Path):
        self.f = open(path, "a", newline="")
        self.w = csv.writer(self.f)
        if path.stat().st_size == 0:
            self.w.writerow(["stage", "step", "elapsed_s", "split", "metric", "value"])

    def log(self, stage, step, t0, split, metric, value):
        self.w.writerow([stage, step, f"{time.time() - t0:.1f}", split, metric, f"{value:.6f}"])
        self.f.flush()


def evidence_loss(seq: torch.Tensor, idx: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Multiple-instance loss on the strongest fracture evidence of each vertebra: seq[:, :, -2]
    is, per slice, the highest fracture probability inside the vertebra, so its maximum over
    the window must be high in a fractured vertebra and low in an intact one. The vertebra
    labels thus train the fracture-evidence map directly (RSNA weights), where through the
    GRU they reach it only once the heads have learnt to read that feature."""
    return wbce(torch.logit(seq[:, idx, -2].amax(0), eps=1e-4), y, VERT_W)


def balanced_evidence_loss(logits: torch.Tensor, target: torch.Tensor, bone: torch.Tensor | None,
                           hard_negatives: int = 0) -> torch.Tensor:
    """Fracture-evidence BCE as three means: fracture cells, the other cells inside the
    vertebrae (normal bone: the negatives that teach what a crack is not) and, at a tenth of
    the weight, the cells outside. With one BCE over all cells (the "weighted" loss) the
    background's easy cells outnumber the cracks a thousandfold and the map learns bone from
    air long before it learns a crack from a bone edge.
    `hard_negatives` K > 0 adds a fourth mean: the K bone cells with the highest loss. The
    heads read each vertebra's *strongest* evidence, so a few false alarms in thousands of
    intact cells decide what they see, while the plain mean barely feels them. Cells next to
    a crack (in-plane and in the neighbouring slices) are left out of it: where the crack's
    label ends is not sharp, and they would be the "hardest" negatives."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    pos = target > 0.5
    inside = ~pos if bone is None else bone & ~pos
    outside = ~pos & ~inside
    loss = torch.zeros((), device=logits.device)
    for mask, w in ((pos, 1.0), (inside, 1.0), (outside, 0.1)):
        if mask.any():
            loss = loss + w * bce[mask].mean()
    if hard_negatives:
        near_crack = F.max_pool3d(pos[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0
        candidates = bce[inside & ~near_crack]
        if candidates.numel():
            loss = loss + candidates.topk(min(hard_negatives, candidates.numel())).values.mean()
    return loss


def coarse_window(x: torch.Tensor, seg: np.ndarray | None, frac: np.ndarray | None, size: int):
    """A window shown at `size` x `size` instead of the contract's 128 (a coarser spacing):
    the image antialiased, the segmentation by nearest label, and a fracture cell kept
    wherever any cell it covers was one, so that no crack vanishes from the target."""
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    cells = size // 4  # the model's outputs are a quarter of its input
    if seg is not None:
        seg_t = torch.from_numpy(np.ascontiguousarray(seg)).unsqueeze(1).float()
        seg = F.interpolate(seg_t, size=(cells, cells), mode="nearest").squeeze(1).to(torch.uint8).numpy()
    if frac is not None:
        frac_t = torch.from_numpy(np.ascontiguousarray(frac)).unsqueeze(1).float()
        frac = F.adaptive_max_pool2d(frac_t, cells).squeeze(1).to(torch.uint8).numpy()
    return x, seg, frac


def crack_slices(cracked: list[Study], k: int, rng: random.Random, augment: float = 0.0):
    """`k` model slices that show a crack, each from a random fractured study: input
    [k, 3, 128, 128], fracture targets and bone (any vertebra label) [k, 32, 32], mirrored
    left-right half the time, and with `augment` > 0 domain-randomised (augment.py)."""
    xs, fracs, bones = [], [], []
    for _ in range(k):
        st = rng.choice(cracked)
        ks = np.flatnonzero(st.frac.any(axis=(1, 2)))
        j = int(ks[rng.randrange(ks.size)])
        x, frac, bone = torch.from_numpy(st.slices(j, j + 1)), st.frac[j:j + 1], st.seg[j:j + 1] > 0
        if rng.random() < 0.5:
            x, frac, bone = x.flip(3), frac[:, :, ::-1], bone[:, :, ::-1]
        xs.append(x)
        fracs.append(np.ascontiguousarray(frac))
        bones.append(np.ascontiguousarray(bone))
    x = torch.cat(xs)
    if augment:
        x = randomise_slices(x, rng, augment)
    return x, np.concatenate(fracs), np.concatenate(bones)


def stage_a_step(model, opt, st: Study, window: int, rng: random.Random, fracture_window_p: float,
                 frac_weight: float, pose_deg: tuple = (0.0, 0.0, 0.0), mil_weight: float = 0.0,
                 frac_loss: str = "weighted", hard_negatives: int = 0, coarse_size: int | None = None,
                 cracks: tuple | None = None, augment: float = 0.0, scale_range: float = 0.0,
                 negative: bool = False):
    """One step on a window of `st`. `cracks` (crack_slices' output) go through the encoder
    beside the window, for their fracture-evidence loss only (the window's `frac_loss`).
    `augment` > 0: the window domain-randomised (augment.py) with that strength.
    `negative`: `st` is known to hold no fracture and has no segmentation (a real neck): a
    random window, every vertebra's label and every cell's fracture target 0."""
    dev = next(model.parameters()).device
    s = st.v.shape[0]
    fracture_slices = np.flatnonzero(st.frac.any(axis=(1, 2))) if st.frac is not None else np.zeros(0)
    if negative:
        lo = rng.randint(0, max(0, s - window))
        hi = min(s, lo + window)
    elif st.seg is None:  # no mask: the whole study, study-level labels only
        lo, hi = 0, s
    elif fracture_slices.size and rng.random() < fracture_window_p:
        # Fractures are a few cells of a few slices: show them more often than uniform
        # windows would, anywhere inside the window.
        k = int(fracture_slices[rng.randrange(fracture_slices.size)])
        lo = max(0, min(k - rng.randint(2, max(2, window - 3)), s - window))
        hi = min(s, lo + window)
    else:
        spans = [sp for sp in vertebra_spans(st.seg) if sp]
        lo_c = min(sp[0] for sp in spans) if spans else 0
        hi_c = max(sp[1] for sp in spans) if spans else s - 1
        # window start chosen so that the window overlaps the spine
        a = max(0, min(lo_c - window // 2, s - window))
        b = max(a, min(hi_c - window // 2, s - window))
        lo = rng.randint(a, b)
        hi = min(s, lo + window)
    rot = random_pose(rng, pose_deg, scale_range)
    if rot is None:
        x = torch.from_numpy(st.slices(lo, hi))
        seg = None if st.seg is None else st.seg[lo:hi]
        frac = None if st.frac is None else st.frac[lo:hi]
    else:
        x, seg, frac = posed_window(st, lo, hi, rot)
    x = x.to(dev)
    if rng.random() < 0.5:  # left-right mirror: a neck is (nearly) symmetric
        x = x.flip(3)
        seg = None if seg is None else seg[:, :, ::-1].copy()
        frac = None if frac is None else frac[:, :, ::-1].copy()
    if negative:
        frac = np.zeros((x.shape[0], pp.H // pp.SEG_STRIDE, pp.W // pp.SEG_STRIDE), np.uint8)
    if augment:
        x = randomise_window(x, rng, augment)
    if coarse_size is not None and coarse_size != x.shape[-1]:
        x, seg, frac = coarse_window(x, seg, frac, coarse_size)
    n = x.shape[0]
    if cracks is not None:
        x = torch.cat([x, cracks[0].to(dev)])
    enc = model.encode(x.contiguous(memory_format=torch.channels_last))
    seg_logits, frac_logits, lev, seq = model.from_encoding(*(t[:n] for t in enc))
    vlog, plog, _ = model.head(seq)
    loss = torch.zeros((), device=dev)
    parts = {}
    labelled = None  # (vertebra indices, their labels) of the vertebrae whose label applies here
    if negative:
        y = torch.zeros(N_VERT, device=dev)
        vl = wbce(vlog, y, VERT_W)
        loss = loss + vl
        parts["neg_vert_bce"] = float(vl.detach())
        labelled = (torch.arange(N_VERT, device=dev), y)
    elif seg is not None:
        tgt = torch.from_numpy(seg.astype(np.int64)).to(dev)
        seg_loss = F.cross_entropy(seg_logits, tgt, weight=SEG_WEIGHT.to(dev))
        loss = loss + seg_loss
        parts["seg_ce"] = float(seg_loss.detach())
        ll = level_loss(lev, seg)
        if ll is not None:
            loss = loss + 0.5 * ll
            parts["level_ce"] = float(ll.detach())
        if rot is None:
            spans = vertebra_spans(st.seg)
            inside = [v for v, sp in enumerate(spans) if sp and sp[0] >= lo and sp[1] < hi]
        else:  # posed: a vertebra is whole if it is in the window but on neither end slice
            ends = set(np.unique(seg[0])) | set(np.unique(seg[-1]))
            inside = [v for v, sp in enumerate(vertebra_spans(seg)) if sp and v + 1 not in ends]
        if inside:
            idx = torch.tensor(inside, device=dev)
            y = torch.from_numpy(st.labels[1:]).to(dev)[idx]
            vl = wbce(vlog[idx], y, VERT_W)
            loss = loss + vl
            parts["vert_bce"] = float(vl.detach())
            labelled = (idx, y)
    else:
        y = torch.from_numpy(st.labels[1:]).to(dev)
        vl = wbce(vlog, y, VERT_W)
        pl = wbce(plog, torch.from_numpy(st.labels[:1]).to(dev), PAT_W)
        loss = loss + vl + pl
        parts["vert_bce"], parts["pat_bce"] = float(vl.detach()), float(pl.detach())
        labelled = (torch.arange(N_VERT, device=dev), y)
    if mil_weight and labelled is not None:
        ml = evidence_loss(seq, *labelled)
        loss = loss + mil_weight * ml
        parts["mil_bce"] = float(ml.detach())
    def evidence_bce(logits, frac, bone):
        frac_t = torch.from_numpy(frac.astype(np.float32)).to(dev)
        if frac_loss == "balanced":
            bone = None if bone is None else torch.from_numpy(bone).to(dev)
            return balanced_evidence_loss(logits.squeeze(1), frac_t, bone, hard_negatives)
        return F.binary_cross_entropy_with_logits(logits.squeeze(1), frac_t, pos_weight=FRAC_POS_WEIGHT.to(dev))

    if frac is not None:
        fl = evidence_bce(frac_logits, frac, None if seg is None else seg > 0)
        loss = loss + frac_weight * fl
        parts["frac_bce"] = float(fl.detach())
    if cracks is not None:
        cl = evidence_bce(enc[1][n:], cracks[1], cracks[2])
        loss = loss + frac_weight * cl
        parts["crack_bce"] = float(cl.detach())
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    opt.step()
    parts["loss"] = float(loss.detach())
    return parts


@torch.no_grad()
def encode_study(model: TriageNet, st: Study, chunk: int = 64) -> dict:
    """Frozen per-slice part of a whole study: pixel and fracture logits, decoder features
    (float16 to keep a few hundred studies in memory) and slice descriptors."""
    dev = next(model.parameters()).device
    parts = [model.encode(torch.from_numpy(st.slices(lo, min(st.v.shape[0], lo + chunk))).to(dev))
             for lo in range(0, st.v.shape[0], chunk)]
    pix, frac, d2, desc = (torch.cat([p[i] for p in parts]) for i in range(4))
    return {"pix": pix.half(), "frac": frac.half(), "d2": d2.half(), "desc": desc}


def encoded_features(model: TriageNet, enc: dict):
    """`TriageNet.features` (seg, fracture and level logits, per-vertebra sequence) from
    `encode_study` tensors."""
    return model.from_encoding(enc["pix"].float(), enc["frac"].float(), enc["d2"].float(), enc["desc"])


def head_outputs(model: TriageNet, enc: dict):
    """Everything after the per-slice encoder, from `encode_study` tensors."""
    _, _, lev, seq = encoded_features(model, enc)
    vlog, plog, _ = model.head(seq)
    return lev, vlog, plog


@torch.no_grad()
def predict(model: TriageNet, studies: list[Study]) -> np.ndarray:
    """Probabilities [N, 8] (patient, C1..C7) on whole studies."""
    model.eval()
    out = []
    for st in studies:
        _, vlog, plog = head_outputs(model, encode_study(model, st))
        out.append(torch.sigmoid(torch.cat([plog, vlog])).cpu().numpy())
    return np.stack(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, nargs="+", required=True, help="RSNA-layout roots for training")
    ap.add_argument("--val-data", type=Path, nargs="*", default=[], help="RSNA-layout roots for validation")
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--init", type=Path, help="start from this checkpoint (e.g. a pruned model)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--steps-a", type=int, default=900)
    ap.add_argument("--steps-b", type=int, default=1500)
    ap.add_argument("--lr-a", type=float, default=2e-3)
    ap.add_argument("--fracture-window-p", type=float, default=0.6,
                    help="stage A: chance that a window of a fractured study is placed on a fracture")
    ap.add_argument("--frac-weight", type=float, default=3.0, help="stage A: weight of the fracture-evidence loss")
    ap.add_argument("--fracture-target", choices=FRACTURE_TARGETS, default="crack",
                    help="phantom fracture targets: cells on the crack (default) or a 10 mm ball (first design)")
    ap.add_argument("--mil-weight", type=float, default=0.0,
                    help="stage A: weight of the multiple-instance loss that asks each vertebra's strongest "
                         "fracture evidence to match its label (the from-scratch recipe uses 1)")
    ap.add_argument("--frac-loss", choices=("weighted", "balanced"), default="weighted",
                    help="stage A: fracture-evidence loss: one BCE over all cells with positive weight 20 "
                         "(weighted), or means over crack cells, other bone cells and the rest (balanced, "
                         "the from-scratch recipe's)")
    ap.add_argument("--hard-negatives", type=int, default=0,
                    help="stage A, with --frac-loss balanced: also the mean loss of the K bone cells that look "
                         "most like a crack, away from cracks (0: off)")
    ap.add_argument("--coarse-steps", type=int, default=0,
                    help="stage A: the first N steps see windows at --coarse-size, the rest at the "
                         "contract's 128 (cheaper steps that learn less: MODEL_CARD.md)")
    ap.add_argument("--coarse-size", type=int, default=96, help="stage A: the in-plane size of --coarse-steps")
    ap.add_argument("--crack-slices", type=int, default=0,
                    help="stage A: each step also encodes K single slices that show a crack, drawn from "
                         "all fractured training studies, for the fracture-evidence loss only (0: off)")
    ap.add_argument("--lr-b", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="torch device (cpu, cuda): the same recipe, faster on a GPU")
    ap.add_argument("--minutes-a", type=float,
                    help="fit stage A's step count to this wall-clock budget (rate measured over its first "
                         "steps); the count chosen is printed and logged, so --steps-a repeats the run")
    ap.add_argument("--workers", type=int, default=2, help="processes that build the cache")
    ap.add_argument("--frac-hires", type=int, default=16,
                    help="width of the high-resolution fracture branch (0: none); added to an --init model without one")
    ap.add_argument("--dec2-kernel", type=int, choices=(1, 3),
                    help="kernel of the 32x32 decoder block (default: the --init model's, else 3); "
                         "changing it warm-starts a 1x1 from the 3x3's centre tap")
    ap.add_argument("--frac-branch-layout", choices=("hires", "strided"),
                    help="fracture branch: a 3x3 at 64x64 then a strided one (hires), or one "
                         "strided 3x3 (strided; cheaper in tract, benches/model_variants.py)")
    ap.add_argument("--eval-every", type=int, default=300)
    ap.add_argument("--ema", type=float, default=0.0,
                    help="stage A: also keep an exponential moving average of the weights (and BN "
                         "statistics) with this decay, e.g. 0.999; evaluated and saved next to the model")
    ap.add_argument("--eval-every-b", type=int, default=1000)
    ap.add_argument("--pose-deg", type=float, nargs=3, default=(0.0, 0.0, 0.0), metavar=("Z", "Y", "X"),
                    help="stage A: show each window as if the patient lay rotated, by up to these degrees "
                         "about z (head turned), y (tilted to a shoulder) and x (nodded); "
                         "robustness.py measures what the phantoms' straight necks leave out")
    ap.add_argument("--augment", type=float, default=0.0,
                    help="stage A: domain randomisation of every window and crack slice (augment.py: kernel, "
                         "resolution, slice thickness, noise, calibration, osteopenia, metal, shoulders); the "
                         "strength scales each transform's probability (0: off, 1: as designed)")
    ap.add_argument("--scale-range", type=float, default=0.0,
                    help="stage A: patient size, the window resampled to show 1 +- R times the extent "
                         "(in-plane and along z drawn apart), labels with it")
    ap.add_argument("--negatives", type=Path, nargs="*", default=[],
                    help="RSNA-layout roots of studies known to hold no fracture and without segmentations "
                         "(real necks: realct_negatives.py): stage A shows them as random windows with every "
                         "label 0, stage B as whole studies")
    ap.add_argument("--negative-p", type=float, default=0.15,
                    help="stage A: chance that a step's window comes from --negatives")
    ap.add_argument("--real-data", type=Path, nargs="*", default=[],
                    help="RSNA-layout roots of real necks with derived vertebra labels, each as it is and "
                         "with an inserted fracture (realct_inserted.py): stage A draws a step's window from "
                         "them with --real-p, their cracks join --crack-slices; stage B uses them whole")
    ap.add_argument("--real-p", type=float, default=0.15,
                    help="stage A: chance that a step's window comes from --real-data")
    ap.add_argument("--freeze-bn", action="store_true",
                    help="BatchNorm normalises with its running statistics and keeps them (needed to continue "
                         "a checkpoint recovered from ONNX by from_onnx.py, whose BatchNorm is folded)")
    ap.add_argument("--smoke", action="store_true", help="a few steps on 2 studies (CI)")
    ap.add_argument("--cached-only", action="store_true", help="train only on studies already in the cache")
    args = ap.parse_args()
    if args.hard_negatives and args.frac_loss != "balanced":
        ap.error("--hard-negatives is a term of --frac-loss balanced")
    if args.crack_slices and args.coarse_steps:
        ap.error("--crack-slices are encoded beside the window, at 128: not with --coarse-steps")
    if args.smoke:
        args.steps_a, args.steps_b, args.window, args.eval_every = 4, 6, 12, 1000

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    torch.backends.cudnn.benchmark = True  # fixed window shapes: let cuDNN pick its kernels
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    limit = 2 if args.smoke else None
    def cache_dir(root: Path) -> Path:  # one cache per kind of fracture target
        return args.cache / (root.name if args.fracture_target == "crack" else f"{root.name}-{args.fracture_target}")

    def load(roots: list[Path], cached_only: bool = False) -> list[Study]:
        return [st for root in roots
                for st in load_dataset(root, cache_dir(root), workers=args.workers, limit=limit,
                                       cached_only=cached_only, fracture_target=args.fracture_target)]

    train = load(args.data, args.cached_only)
    negatives = load(args.negatives)
    if any(st.labels.any() for st in negatives):
        raise SystemExit("--negatives: a study there is labelled fractured")
    real = load(args.real_data)
    val = load(args.val_data)
    print(f"{len(train)} training, {len(negatives)} negative, {len(real)} real labelled, {len(val)} validation studies "
          f"({time.time() - t0:.0f} s to load)")
    log = Logger(args.out / "train_log.csv")
    (args.out / "train_studies.txt").write_text("".join(f"{st.uid}\n" for st in train + negatives + real))

    layout = {k: v for k, v in (("dec2_kernel", args.dec2_kernel), ("frac_branch_layout", args.frac_branch_layout))
              if v is not None}
    if args.init:
        model = load_checkpoint(args.init)
        if args.frac_hires and not model.frac_hires:
            model = add_frac_branch(model, args.frac_hires)
        cfg = model.config()
        if any(cfg[k] != v for k, v in layout.items()):
            model = with_layout(model, **{"dec2_kernel": cfg["dec2_kernel"],
                                          "frac_branch_layout": cfg["frac_branch_layout"], **layout})
    else:
        model = TriageNet(frac_hires=args.frac_hires, **layout)
    # Channels-last: oneDNN's convolutions (forward and backward) skip a layout conversion,
    # 13 % less time per stage-A step on 2 cores; the same arithmetic, up to rounding.
    model.to(dev, memory_format=torch.channels_last)
    (args.out / "config.json").write_text(json.dumps({**vars(args), "model": model.config()}, default=str, indent=2))

    def evaluate(stage, step, net=model, name="model"):
        if not val:
            return
        p = predict(net, val)
        y = np.stack([st.labels for st in val])
        m = summary(y, p, 0.5, [0.5] * 7)
        split = "val" if name == "model" else f"val_{name}"
        for k in ("patient_auc", "mean_vertebra_auc", "rsna_wll"):
            log.log(stage, step, t0, split, k, m[k])
        print(f"[{stage} {step}] {split} patient AUC {m['patient_auc']:.4f} vertebra AUC "
              f"{m['mean_vertebra_auc']:.4f} RSNA wll {m['rsna_wll']:.4f}", flush=True)
        if stage == "A":  # long runs: keep every evaluated checkpoint, to choose one on validation
            save_checkpoint(net, args.out / f"{name}_a_{step}.pt", seed=args.seed)

    # Stage A: end to end on windows.
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr_a, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr_a, total_steps=max(1, args.steps_a), pct_start=0.1)
    ema = None
    if args.ema:
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(args.ema), use_buffers=True)
    cracked = [st for st in train + real if st.frac is not None and st.seg is not None and st.frac.any()]
    if args.crack_slices and not cracked:
        print(f"--crack-slices {args.crack_slices}: no training study has both a located fracture and a "
              "segmentation, so no crack slices are shown", flush=True)
    t_a = time.time()
    run = {}
    # --minutes-a: the rate is timed over RATE_STEPS steps after WARMUP_STEPS (allocator,
    # cuDNN autotuning), then the schedule is rebuilt for the step count that fits.
    WARMUP_STEPS, RATE_STEPS = 10, 40
    rate_t0 = time.time()
    step = 0
    while step < args.steps_a:
        step += 1
        if step == WARMUP_STEPS:
            rate_t0 = time.time()
        if args.minutes_a and step == WARMUP_STEPS + RATE_STEPS:
            per_step = (time.time() - rate_t0) / RATE_STEPS
            args.steps_a = max(step, int(step + (args.minutes_a * 60 - (time.time() - t_a)) / per_step))
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr_a, total_steps=args.steps_a, pct_start=0.1)
            for _ in range(step - 1):  # where the old schedule was (it steps after each step)
                sched.step()
            log.log("A", step, t0, "train", "steps_a_chosen", args.steps_a)
            print(f"--minutes-a {args.minutes_a}: {per_step * 1000:.1f} ms/step, stage A runs {args.steps_a} steps",
                  flush=True)
        model.train()
        if args.freeze_bn:
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.eval()
        cracks = (crack_slices(cracked, args.crack_slices, rng, args.augment)
                  if args.crack_slices and cracked else None)
        draw = rng.random()
        neg_p = args.negative_p if negatives else 0.0
        negative = draw < neg_p
        from_real = bool(real) and not negative and draw < neg_p + args.real_p
        source = negatives if negative else (real if from_real else train)
        parts = stage_a_step(model, opt, rng.choice(source), args.window, rng,
                             args.fracture_window_p, args.frac_weight, tuple(args.pose_deg), args.mil_weight,
                             args.frac_loss, args.hard_negatives,
                             args.coarse_size if step <= args.coarse_steps else None, cracks,
                             args.augment, args.scale_range, negative)
        sched.step()
        if ema is not None:
            ema.update_parameters(model)
        for k, v in parts.items():
            run[k] = 0.95 * run.get(k, v) + 0.05 * v
        if step % 20 == 0 or step == args.steps_a:
            for k, v in run.items():
                log.log("A", step, t0, "train", k, v)
            print(f"[A {step}] " + " ".join(f"{k} {v:.4f}" for k, v in run.items()) + f" {time.time() - t0:.0f}s", flush=True)
        if step % args.eval_every == 0:
            evaluate("A", step)
            if ema is not None:
                evaluate("A", step, ema.module, "ema")
    if args.steps_b:
        evaluate("A", args.steps_a)

    if args.steps_b == 0:  # stage A only (time-limited runs): heads trained on windows only
        save_checkpoint(model, args.out / "model.pt", seed=args.seed)
        if ema is not None:
            evaluate("A", args.steps_a, ema.module, "ema")
        print(f"saved {args.out / 'model.pt'} after stage A only ({time.time() - t0:.0f} s)")
        return
    save_checkpoint(model, args.out / "model_a.pt", seed=args.seed)  # stage B can be redone from here

    # Stage B: frozen encoder, whole studies through the slice-level GRU and the heads.
    model.eval()
    train = train + negatives + real  # whole studies: a real neck's labels (all 0) hold for all of it
    encs = [encode_study(model, st) for st in train]
    print(f"stage B: encoder outputs of {len(encs)} studies cached ({time.time() - t0:.0f} s)", flush=True)
    head_params = [p for n, p in model.named_parameters() if n.split(".")[0] in HEAD_MODULES]
    opt = torch.optim.AdamW(head_params, lr=args.lr_b, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, args.steps_b))
    run = {}
    for step in range(1, args.steps_b + 1):
        model.train()  # cuDNN's GRU backward needs training mode; the encoder does not run here
        i = rng.randrange(len(train))
        lev, vlog, plog = head_outputs(model, encs[i])
        y = torch.from_numpy(train[i].labels).to(dev)
        vl, pl = wbce(vlog, y[1:], VERT_W), wbce(plog, y[:1], PAT_W)
        loss = vl + pl
        parts = {"vert_bce": float(vl.detach()), "pat_bce": float(pl.detach())}
        if train[i].seg is not None:
            ll = level_loss(lev, train[i].seg)
            if ll is not None:
                loss = loss + 0.5 * ll
                parts["level_ce"] = float(ll.detach())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head_params, 5.0)
        opt.step()
        sched.step()
        for k, v in parts.items():
            run[k] = 0.98 * run.get(k, v) + 0.02 * v
        if step % 50 == 0 or step == args.steps_b:
            for k, v in run.items():
                log.log("B", step, t0, "train", k, v)
        if step % 500 == 0 or step == args.steps_b:
            print(f"[B {step}] " + " ".join(f"{k} {v:.4f}" for k, v in run.items()) + f" {time.time() - t0:.0f}s",
                  flush=True)
        if step % args.eval_every_b == 0 and step != args.steps_b:
            evaluate("B", step)
    evaluate("B", args.steps_b)
    save_checkpoint(model, args.out / "model.pt", seed=args.seed)
    print(f"saved {args.out / 'model.pt'} ({time.time() - t0:.0f} s)")
    if args.smoke:  # the export path too: symbolic S, onnxruntime == PyTorch
        from export import check_against_torch
        from model import export_onnx

        model.cpu()
        export_onnx(model, str(args.out / "smoke.onnx"))
        worst = check_against_torch(model, str(args.out / "smoke.onnx"))
        print(f"smoke export: max |torch - onnxruntime| = {worst:.2e}")
        if worst > 1e-3:
            raise SystemExit("smoke: onnxruntime does not reproduce PyTorch")


if __name__ == "__main__":
    main()
