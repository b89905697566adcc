"""One phantom family B study end to end: sample, build the fine volume, fracture, acquire,
write. Deterministic in (run seed, study index)."""

from __future__ import annotations

import numpy as np

from . import VERSION, body, fractures, scanner, spine, writer

CERVICAL = spine.NAMES[:7]


def generate(root, seed: int, index: int, fracture: str, matrix: int = 256) -> dict:
    """Writes the study's DICOM, segmentation and ground truth (not its train.csv row)."""
    rng = np.random.default_rng([seed, index, 0xB])
    fov = rng.uniform(150, 210)
    d = fov / matrix
    cx, cy = rng.uniform(-10, 10), rng.uniform(-140, -100)
    xs = cx - fov / 2 + d * (np.arange(matrix) + 0.5)
    ys = cy - fov / 2 + d * (np.arange(matrix) + 0.5)
    acq = scanner.sample(rng)
    spine_x, spine_y = cx + rng.uniform(-6, 6), cy + rng.uniform(5, 25)
    c1_z = rng.uniform(-80, 40)
    verts = spine.column(rng, spine_x, spine_y, c1_z)
    z_top = c1_z + rng.uniform(12, 35)
    z_bot = verts[7].centre[2] - rng.uniform(0, 25)  # T1 in view, T2 sometimes cut
    dz = min(0.5, acq.thickness / 2)
    zs = np.arange(z_bot, z_top + dz, dz)
    g = body.Grid(xs, ys, zs)
    shoulder_z = verts[5].centre[2] + rng.uniform(-8, 8)
    body.soft_tissue(g, rng, verts, shoulder_z)
    body.discs(g, rng, verts)
    metal = body.head_and_chest(g, rng, verts, g.spacing)
    # Which vertebrae break.
    chosen = []
    if fracture == "yes" or (fracture == "random" and rng.random() < 0.5):
        n = 1 if rng.random() < 0.7 else 2
        chosen = list(rng.choice(CERVICAL, n, replace=False, p=[0.1, 0.2, 0.1, 0.1, 0.15, 0.2, 0.15]))
    elif fracture in CERVICAL:
        chosen = [fracture]
    tex = spine.texture_params(rng)
    gt_frac, gt_vert = [], []
    for v in verts:
        sl, (x, y, z), (u, vv, w) = g.local_box(v, v.extent)
        if 0 in x.shape:
            continue
        mask = spine.vertebra_mask(v, u, vv, w)
        hu = spine.texture(rng, mask, g.spacing, tex)
        origin = (zs[sl[0].start], ys[sl[1].start], xs[sl[2].start])
        bone = fractures.Bone(v, (u, vv, w), mask, hu, origin, g.spacing, rng)
        if v.name in chosen:
            kind = str(rng.choice(fractures.KINDS[v.name]))
            gt_frac.append(fractures.apply(bone, kind))
        g.paint(sl, bone.vacated & ~bone.mask, rng.uniform(45, 75))
        g.paint(sl, bone.mask, bone.hu, v.label)
        inview = np.nonzero(bone.mask.any(axis=(1, 2)))[0]
        gt_vert.append({
            "name": v.name, "label": v.label, "fractured": v.name in chosen,
            "centre_mm": v.centre.tolist(),
            "z_min_mm": float(zs[sl[0]][inview].min()) if len(inview) else None,
            "z_max_mm": float(zs[sl[0]][inview].max()) if len(inview) else None,
        })
    img, lab, zc = scanner.acquire(rng, g, acq, shoulder_z, metal)
    labels = [int(n in chosen) for n in CERVICAL]
    gt = {"format": "cspine-triage/phantoms-b-ground-truth/v1",
          "note": "synthetic phantom (family B), not a patient; no number derived from it is clinical",
          "generator_version": VERSION, "run_seed": seed, "study_index": index,
          "patient_overall": int(any(labels)), "labels": labels,
          "mask_labels": "0 background, 1-7 C1-C7, 8 T1, 9 T2 (RSNA 2022 convention)",
          "acquisition": {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in vars(acq).items()},
          "pixel_mm": float(d), "slices": int(len(zc)), "metal": len(metal),
          "vertebrae": gt_vert, "fractures": gt_frac}
    study = writer.write_study(root, f"phantoms-b/{seed}/{index}", rng, img, lab, zc, xs, ys, acq, gt)
    return {"study": study, "labels": labels, "slices": len(zc), "kinds": [f["kind"] for f in gt_frac]}
