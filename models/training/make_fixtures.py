"""Writes the fixtures the Rust test `tests/model.rs` compares tract against:
`models/fixtures/input.npy` (float32 [S,3,128,128], a generated study through preprocess.py),
onnxruntime outputs of the committed ONNX (`<output>.npy`) and `tolerances.json`.

Usage: python3 make_fixtures.py --study DIR [--slices 24]
(DIR is one study folder of DICOM files; the S middle model slices around the spine are kept.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

MODELS = Path(__file__).resolve().parent.parent
FIX = MODELS / "fixtures"

# Stated tolerances for tract vs onnxruntime (CPU, same graph). Both are float32 with different
# summation orders; the int8 convs use identical integer arithmetic, so differences come
# from float requantisation rounding only: a value on a rounding boundary can land one
# quantum apart, and a flip in an earlier int8 layer can move a later one by a quantum or
# two more. A max-abs bound on logits plus a relative L2 bound; for the segmentation logits
# (the int8 seg head's output, dequantised) the max-abs bound is three output quanta of that
# head (`seg_quantum`, read from the graph; measured: up to two), the relative L2 bound
# stays tight (measured: 2e-4).
TOLERANCES = {
    "seg_logits": {"max_abs": 0.05, "rel_l2": 1e-3},
    "vertebra_logits": {"max_abs": 0.02, "rel_l2": 1e-3},
    "patient_logit": {"max_abs": 0.02, "rel_l2": 1e-3},
    "attention": {"max_abs": 2e-3, "rel_l2": 1e-3},
}


def seg_quantum(onnx_path) -> float | None:
    """Output scale of the QLinearConv of the segmentation head (None for a float model)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(onnx_path))
    init = {t.name: t for t in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "QLinearConv" and "seg_head" in n.name and n.input[6] in init:
            return float(numpy_helper.to_array(init[n.input[6]]))
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--study", type=Path, help="folder of one DICOM series")
    ap.add_argument("--input", type=Path, help="or: an existing float32 .npy model input")
    ap.add_argument("--slices", type=int, default=24)
    ap.add_argument("--onnx", type=Path, default=MODELS / "cspine_triage_int8.onnx")
    args = ap.parse_args()
    if args.study:
        from preprocess import load_dicom_series, preprocess

        vol = load_dicom_series(args.study)
        x = preprocess(vol)
        s = x.shape[0]
        start = max(0, (s - args.slices) // 2)
        x = np.ascontiguousarray(x[start : start + args.slices])
    elif args.input:
        x = np.load(args.input).astype(np.float32)
    else:
        raise SystemExit("give --study DIR or --input FILE.npy")
    tolerances = {k: dict(v) for k, v in TOLERANCES.items()}
    quantum = seg_quantum(args.onnx)
    if quantum:
        tolerances["seg_logits"]["max_abs"] = max(tolerances["seg_logits"]["max_abs"], round(3.01 * quantum, 4))
    FIX.mkdir(exist_ok=True)
    np.save(FIX / "input.npy", x)
    sess = ort.InferenceSession(str(args.onnx), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {"slices": x})
    for meta, y in zip(sess.get_outputs(), outs):
        np.save(FIX / f"{meta.name}.npy", y.astype(np.float32))
    from contract import sha256_file

    (FIX / "tolerances.json").write_text(
        json.dumps(
            {
                "onnx_sha256": sha256_file(args.onnx),
                "reference": f"onnxruntime {ort.__version__} CPUExecutionProvider",
                "seg_quantum": quantum,
                "tolerances": tolerances,
            },
            indent=2,
        )
        + "\n"
    )
    print("fixtures:", {m.name: y.shape for m, y in zip(sess.get_outputs(), outs)})


if __name__ == "__main__":
    main()
