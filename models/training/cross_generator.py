"""Cross-generator protocol: a model is tested on phantoms from a generator it was not trained on.

Family A is `cspine-triage synth` (src/synth/, what the shipped model was trained on); family B is
`phantoms_b/` (Python: other anatomy construction, bone texture, acquisition and fracture
mechanism; its module docs say how). The protocol is "train on one family, test on the other":

- Evaluate a model on held-out sets of both families (this script, default): both sets have
  `--count` studies, half of them fractured (family A: the first half `--fracture none`, the
  second half one fracture each at a vertebra drawn from `--seed-a`; family B: `--fracture half`),
  fixed seeds, written to a temporary folder and deleted afterwards (`--keep` keeps them).
  Every study goes through the product path, `cspine-triage infer --json --ignore-envelope
  --runtime cpu`, and is scored from its result JSON:
  patient AUC (patient.probability against patient_overall, 95 % bootstrap interval over
  studies), mean vertebra AUC (C1-C7, vertebrae with both classes), sensitivity and
  specificity at the shipped thresholds (the result's `flagged`), and localisation: of the
  cervical vertebrae whose ground-truth centre lies inside the scanned z range, how many the
  result reports (`found`), how many have the ground-truth centre inside the reported
  `z_range_mm` (`centre_in_range`), and how many are nearest, by reported-range centre, to the
  right ground-truth centre (`right_level`) or to one within one level (`within_one_level`).
  A study without a result (failed, skipped) counts as probability 0 and nothing found.
- Train on family B (one command, ~45 min of training on 2 free cores plus generation; not run
  where the CPU is shared): `bash models/training/train_on_b.sh WORKDIR` generates the family-B
  training and validation phantoms, trains the shipped architecture from random weights with
  from_scratch.sh's recipe, exports and quantizes it, writes WORKDIR/model/model.json and runs
  this script on it (`--model WORKDIR/model/model.json`): the train-on-B, test-on-A numbers.

Seeds: family A held-out 9000, family B held-out 9100 (train_on_b.sh trains on B seeds
9200-9239 and validates on 9300; none of these are used elsewhere).

Usage (from the repository root; the binary from `cargo build`):
    python3 models/training/cross_generator.py [--count 40] [--families a b] \
        [--bin target/debug/cspine-triage] [--model models/model.json] [--out DIR]
    python3 models/training/cross_generator.py --smoke      # 1 study per family, for CI
`--out DIR` writes DIR/summary.json and DIR/studies_<family>.csv (per study, no images);
`--rescore --out DIR` recomputes the summaries from those CSVs (no generation, no inference).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pydicom

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CERVICAL = ["C1", "C2", "C3", "C4", "C5", "C6", "C7"]
SEED_A, SEED_B = 9000, 9100


def run(cmd, **kw):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if p.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


def make_a(binary: Path, out: Path, count: int, seed: int, matrix: int | None) -> None:
    """`cspine-triage synth`: first half intact, second half one fracture each."""
    half = count // 2
    extra = ["--matrix", str(matrix)] if matrix else []
    run([binary, "synth", out, "--count", half, "--seed", seed, "--fracture", "none", "--threads", 1, *extra])
    rng = np.random.default_rng(seed)
    for i in range(half, count):
        run([binary, "synth", out, "--count", 1, "--seed", seed, "--first-index", i, "--append",
             "--fracture", rng.choice(CERVICAL), "--threads", 1, *extra])


def make_b(out: Path, count: int, seed: int, matrix: int | None) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    run([sys.executable, "-m", "phantoms_b", out, "--count", count, "--seed", seed, "--fracture", "half",
         "--matrix", matrix or 256], cwd=HERE, env=env)


def infer(binary: Path, model: Path, dirs: list[Path], threads: int) -> dict:
    """Result JSON per StudyInstanceUID."""
    p = subprocess.run([str(binary), "infer", "--json", "--ignore-envelope", "--runtime", "cpu", "--threads",
                        str(threads), "--model", str(model), *map(str, dirs)], capture_output=True, text=True)
    out = {}
    for line in p.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            out[r["study_instance_uid"]] = r
    if not out:
        sys.exit(f"infer produced no result (rc {p.returncode}): {p.stderr[-2000:]}")
    return out


def auc(y, s) -> float | None:
    y, s = np.asarray(y, bool), np.asarray(s, float)
    pos, neg = s[y], s[~y]
    if not len(pos) or not len(neg):
        return None
    gt = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(gt / (len(pos) * len(neg)))


def auc_ci(y, s, n=1000, seed=0):
    rng = np.random.default_rng(seed)
    y, s = np.asarray(y), np.asarray(s)
    vals = []
    for _ in range(n):
        i = rng.integers(0, len(y), len(y))
        a = auc(y[i], s[i])
        if a is not None:
            vals.append(a)
    return [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))] if vals else None


def score(root: Path, results: dict) -> tuple[dict, list[dict]]:
    rows = []
    with open(root / "train.csv") as f:
        labels = {r["StudyInstanceUID"]: r for r in csv.DictReader(f)}
    for uid, lab in labels.items():
        gt = json.loads((root / "ground_truth" / f"{uid}.json").read_text())
        zs = [float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2])
              for p in (root / "train_images" / uid).glob("*.dcm")]
        zlo, zhi = min(zs), max(zs)
        centre = {v["name"]: v["centre_mm"][2] for v in gt["vertebrae"] if v["name"] in CERVICAL}
        inview = [n for n in CERVICAL if n in centre and zlo <= centre[n] <= zhi]
        r = results.get(uid)
        row = {"study": uid, "patient_label": int(lab["patient_overall"]),
               "status": r["status"] if r else "no_result",
               "patient_p": ((r or {}).get("patient") or {}).get("probability") or 0.0,
               "patient_flagged": int(bool(((r or {}).get("patient") or {}).get("flagged"))),
               "in_view": len(inview), "found": 0, "centre_in_range": 0, "right_level": 0, "within_one_level": 0}
        verts = (r or {}).get("vertebrae") or {}
        for n in CERVICAL:
            row[f"{n}_label"] = int(lab[n])
            vr = verts.get(n) or {}
            row[f"{n}_p"] = vr.get("probability") or 0.0
            row[f"{n}_flagged"] = int(bool(vr.get("flagged")))
            if n not in inview or not vr.get("z_range_mm"):
                continue
            lo, hi = sorted(vr["z_range_mm"])
            row["found"] += 1
            row["centre_in_range"] += int(lo <= centre[n] <= hi)
            near = min(centre, key=lambda m: abs(centre[m] - 0.5 * (lo + hi)))
            row["right_level"] += int(near == n)
            row["within_one_level"] += int(abs(CERVICAL.index(near) - CERVICAL.index(n)) <= 1)
        row["kinds"] = " ".join(f"{f['vertebra']}:{f['kind']}" for f in gt.get("fractures", []))
        rows.append(row)
    return summarize(rows), rows


def by_kind(rows: list[dict]) -> dict:
    """Per fracture kind: how many, and how many of their vertebrae the shipped thresholds
    flag (vertebra flag) and how many of their studies are flagged (patient flag)."""
    out = {}
    for r in rows:
        for item in r["kinds"].split():
            v, kind = item.split(":")
            k = out.setdefault(kind, {"fractures": 0, "vertebra_flagged": 0, "study_flagged": 0})
            k["fractures"] += 1
            k["vertebra_flagged"] += int(r[f"{v}_flagged"])
            k["study_flagged"] += int(r["patient_flagged"])
    return dict(sorted(out.items()))


def read_rows(path: Path) -> list[dict]:
    """studies_<family>.csv back into rows (numbers as numbers)."""
    rows = []
    for r in csv.DictReader(open(path)):
        rows.append({k: (v if k in ("study", "status", "kinds") else float(v) if k.endswith("_p") else int(v))
                     for k, v in r.items()})
    return rows


def summarize(rows: list[dict]) -> dict:
    y = [r["patient_label"] for r in rows]
    p = [r["patient_p"] for r in rows]
    fl = [r["patient_flagged"] for r in rows]
    vaucs = {n: auc([r[f"{n}_label"] for r in rows], [r[f"{n}_p"] for r in rows]) for n in CERVICAL}
    valid = [a for a in vaucs.values() if a is not None]
    vy = np.array([[r[f"{n}_label"] for n in CERVICAL] for r in rows]).ravel()
    vf = np.array([[r[f"{n}_flagged"] for n in CERVICAL] for r in rows]).ravel()
    pos, neg = sum(y), len(y) - sum(y)
    iv = sum(r["in_view"] for r in rows)
    summary = {
        "studies": len(rows), "fractured": pos,
        "statuses": {s: sum(r["status"] == s for r in rows) for s in sorted({r["status"] for r in rows})},
        "patient_auc": auc(y, p), "patient_auc_ci95": auc_ci(y, p),
        "vertebra_auc": vaucs, "mean_vertebra_auc": float(np.mean(valid)) if valid else None,
        "patient_sensitivity": (sum(f for f, t in zip(fl, y) if t) / pos) if pos else None,
        "patient_specificity": (sum(1 - f for f, t in zip(fl, y) if not t) / neg) if neg else None,
        "vertebra_sensitivity": float(vf[vy == 1].mean()) if (vy == 1).any() else None,
        "vertebra_specificity": float(1 - vf[vy == 0].mean()) if (vy == 0).any() else None,
        "localisation": {"vertebrae_in_view": iv,
                         **{k: (sum(r[k] for r in rows) / iv if iv else None)
                            for k in ("found", "centre_in_range", "right_level", "within_one_level")},
                         "studies_all_in_view_within_one_level":
                             sum(r["within_one_level"] == r["in_view"] for r in rows) / len(rows)},
        "by_kind": by_kind(rows),
    }
    return summary


def fmt(v):
    return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", type=Path, default=ROOT / "target" / "debug" / "cspine-triage")
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "model.json")
    ap.add_argument("--count", type=int, default=40, help="studies per family (half fractured)")
    ap.add_argument("--families", nargs="+", default=["a", "b"], choices=["a", "b"])
    ap.add_argument("--seed-a", type=int, default=SEED_A)
    ap.add_argument("--seed-b", type=int, default=SEED_B)
    ap.add_argument("--matrix", type=int, help="image matrix of both families (default: A random 256-512, B 256)")
    ap.add_argument("--threads", type=int, default=1, help="infer --threads")
    ap.add_argument("--batch", type=int, default=10, help="studies per infer call")
    ap.add_argument("--work", type=Path, help="folder for the phantoms (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the generated phantoms")
    ap.add_argument("--out", type=Path, help="write summary.json and studies_<family>.csv here")
    ap.add_argument("--rescore", action="store_true",
                    help="no generation or inference: summaries again from OUT/studies_<family>.csv")
    ap.add_argument("--smoke", action="store_true",
                    help="CI: 2 studies per family (1 intact, 1 fractured), matrix 128; checks the path, not the model")
    a = ap.parse_args()
    if a.smoke:
        a.count, a.matrix = 2, 128
    summaries = {}
    if a.rescore:
        prev = json.loads((a.out / "summary.json").read_text()) if (a.out / "summary.json").exists() else {}
        for fam in a.families:
            summaries[fam] = summarize(read_rows(a.out / f"studies_{fam}.csv"))
            summaries[fam]["seed"] = prev.get("families", {}).get(fam, {}).get("seed")
        a.count, a.matrix = prev.get("count", a.count), prev.get("matrix", a.matrix)
    elif not a.bin.exists():
        sys.exit(f"{a.bin} not found: cargo build first (or --bin)")
    work = a.work or Path(tempfile.mkdtemp(prefix="cspine-cross-"))
    try:
        for fam in ([] if a.rescore else a.families):
            d = work / f"family_{fam}"
            if not (d / "train.csv").exists():
                if fam == "a":
                    make_a(a.bin, d, a.count, a.seed_a, a.matrix)
                else:
                    make_b(d, a.count, a.seed_b, a.matrix)
            studies = sorted((d / "train_images").iterdir())
            # Results are kept beside the phantoms (WORK/family_<f>/infer_<model sha>.jsonl), so a
            # rerun with --work scores them again without inference.
            sha = json.loads(a.model.read_text()).get("sha256", "")[:12]
            cache = d / f"infer_{sha}.jsonl"
            results = {}
            if cache.exists():
                results = {r["study_instance_uid"]: r for r in map(json.loads, cache.read_text().splitlines())}
            for i in range(0, len(studies), a.batch):
                chunk = [p for p in studies[i:i + a.batch] if p.name not in results]
                if chunk:
                    results.update(infer(a.bin, a.model, chunk, a.threads))
                    cache.write_text("".join(json.dumps(r) + "\n" for r in results.values()))
            summary, rows = score(d, results)
            summary["seed"] = a.seed_a if fam == "a" else a.seed_b
            summaries[fam] = summary
            if a.out:
                a.out.mkdir(parents=True, exist_ok=True)
                with open(a.out / f"studies_{fam}.csv", "w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=list(rows[0]))
                    w.writeheader()
                    w.writerows(rows)
    finally:
        if not a.keep and a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    model = json.loads(a.model.read_text())
    report = {"model": {k: model.get(k) for k in ("name", "version")}, "count": a.count,
              "matrix": a.matrix, "families": summaries}
    if a.out:
        (a.out / "summary.json").write_text(json.dumps(report, indent=1) + "\n")
    for fam, s in summaries.items():
        loc = s["localisation"]
        print(f"family {fam.upper()} (seed {s['seed']}): {s['studies']} studies, {s['fractured']} fractured, "
              f"statuses {s['statuses']}")
        print(f"  patient AUC {fmt(s['patient_auc'])} (95 % {s['patient_auc_ci95']}), mean vertebra AUC "
              f"{fmt(s['mean_vertebra_auc'])}; at the shipped thresholds: patient sensitivity "
              f"{fmt(s['patient_sensitivity'])}, specificity {fmt(s['patient_specificity'])}; vertebra "
              f"sensitivity {fmt(s['vertebra_sensitivity'])}, specificity {fmt(s['vertebra_specificity'])}")
        print(f"  localisation of {loc['vertebrae_in_view']} in-view vertebrae: found {fmt(loc['found'])}, "
              f"centre in range {fmt(loc['centre_in_range'])}, right level {fmt(loc['right_level'])}, "
              f"within one level {fmt(loc['within_one_level'])}; studies with all within one level "
              f"{fmt(loc['studies_all_in_view_within_one_level'])}")
        print("  by fracture kind (fractures: vertebra flagged, study flagged): " + ", ".join(
            f"{k} {v['fractures']}: {v['vertebra_flagged']}, {v['study_flagged']}" for k, v in s["by_kind"].items()))
    if a.smoke:
        for fam, s in summaries.items():
            if s["studies"] != a.count or "no_result" in s["statuses"]:
                sys.exit(f"smoke: family {fam}: {s['studies']} studies scored, statuses {s['statuses']}")
        print("cross-generator smoke: OK")


if __name__ == "__main__":
    main()
