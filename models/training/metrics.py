"""Metrics: ROC AUC (rank based, ties averaged), the RSNA 2022 weighted log loss, and
sensitivity/specificity at a threshold. Plain numpy so that no extra package is needed."""

from __future__ import annotations

import json

import numpy as np


def finite(x):
    """NaN (an AUC with one class only) is not JSON: write null."""
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [finite(v) for v in x]
    if isinstance(x, float) and x != x:
        return None
    return x


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U); NaN when only one class is present."""
    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    npos, nneg = int(y.sum()), int((~y).sum())
    if npos == 0 or nneg == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    ranks = np.empty(len(p))
    sp = p[order]
    i = 0
    while i < len(sp):  # average ranks over ties
        j = i
        while j + 1 < len(sp) and sp[j + 1] == sp[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - npos * (npos + 1) / 2) / (npos * nneg))


def _wll(y, p, wpos, wneg):
    p = np.clip(p, 1e-15, 1 - 1e-15)
    w = np.where(y > 0.5, wpos, wneg)
    ll = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    return float((w * ll).sum() / w.sum())


def rsna_weighted_log_loss(y: np.ndarray, p: np.ndarray) -> float:
    """y, p: [N, 8] columns patient_overall, C1..C7 (probabilities).
    As the competition's metric: a weighted log loss over all vertebra rows (negative 1,
    positive 2) and one over patient rows (negative 7, positive 14), then their mean."""
    y, p = np.asarray(y, np.float64), np.asarray(p, np.float64)
    vert = _wll(y[:, 1:].ravel(), p[:, 1:].ravel(), 2.0, 1.0)
    pat = _wll(y[:, 0], p[:, 0], 14.0, 7.0)
    return (vert + pat) / 2


def sens_spec(y: np.ndarray, p: np.ndarray, thr: float) -> tuple[float, float]:
    y = np.asarray(y).astype(bool)
    flag = np.asarray(p) >= thr
    sens = float((flag & y).sum() / max(1, y.sum()))
    spec = float((~flag & ~y).sum() / max(1, (~y).sum()))
    return sens, spec


def choose_threshold(y: np.ndarray, p: np.ndarray, min_sens: float = 0.95) -> float:
    """Triage favours sensitivity: the highest threshold whose sensitivity is >= min_sens
    (so specificity is as high as that allows). Chosen on the VALIDATION set only."""
    y = np.asarray(y).astype(bool)
    p = np.asarray(p, np.float64)
    if y.sum() == 0:
        return 0.5
    cands = np.unique(p[y])[::-1]
    for t in cands:
        if sens_spec(y, p, t)[0] >= min_sens:
            # midway to the next lower score of any study: less brittle than the exact score
            lower = p[p < t]
            return float((t + lower.max()) / 2) if lower.size else float(t)
    return float(cands[-1])


def choose_thresholds(y: np.ndarray, p: np.ndarray, min_sens: float = 0.95, per_vertebra: bool = False):
    """Patient threshold and the seven vertebra thresholds (rows of y and p: patient, C1..C7),
    each by `choose_threshold`. Pooled by default: a validation set of tens of studies holds a
    handful of fractures per vertebra, and a threshold chosen on 1-5 positives is noise."""
    tp = choose_threshold(y[:, 0], p[:, 0], min_sens)
    if per_vertebra:
        tv = [choose_threshold(y[:, 1 + i], p[:, 1 + i], min_sens) for i in range(7)]
    else:
        tv = [choose_threshold(y[:, 1:].ravel(), p[:, 1:].ravel(), min_sens)] * 7
    return tp, tv


def summary(y: np.ndarray, p: np.ndarray, thr_patient: float, thr_vert: list[float]) -> dict:
    """All the model-card numbers for probabilities p [N, 8] against labels y [N, 8]."""
    vaucs = [auc(y[:, 1 + v], p[:, 1 + v]) for v in range(7)]
    ss_p = sens_spec(y[:, 0], p[:, 0], thr_patient)
    vflags = np.stack([p[:, 1 + v] >= thr_vert[v] for v in range(7)], 1)  # [N, 7]
    vflag = vflags.ravel()
    vy = y[:, 1:].ravel() > 0.5
    # What the daemon publishes: `positive` when the patient OR any vertebra is flagged.
    status = (p[:, 0] >= thr_patient) | vflags.any(1)
    py = y[:, 0] > 0.5
    return {
        "n": int(len(y)),
        "n_positive": int(py.sum()),
        "patient_auc": auc(y[:, 0], p[:, 0]),
        "vertebra_auc": vaucs,
        "mean_vertebra_auc": float(np.nanmean(vaucs)),
        "pooled_vertebra_auc": auc(y[:, 1:].ravel(), p[:, 1:].ravel()),
        "rsna_wll": rsna_weighted_log_loss(y, p),
        "patient_sens": ss_p[0],
        "patient_spec": ss_p[1],
        "vertebra_sens": float((vflag & vy).sum() / max(1, vy.sum())),
        "vertebra_spec": float((~vflag & ~vy).sum() / max(1, (~vy).sum())),
        "status_sens": float((status & py).sum() / max(1, py.sum())),
        "status_spec": float((~status & ~py).sum() / max(1, (~py).sum())),
    }


def brief(m: dict) -> str:
    """One line of a `summary`: the AUCs, the log loss and what the daemon would publish."""
    return (f"patient AUC {m['patient_auc']:.4f}, mean vertebra AUC {m['mean_vertebra_auc']:.4f}, "
            f"RSNA wll {m['rsna_wll']:.4f}, published status sens/spec "
            f"{m['status_sens']:.3f}/{m['status_spec']:.3f}")


def write_json(path, results: dict) -> None:
    """A results file (NaN written as null), its directory created if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(finite(results), indent=2) + "\n")
