"""Checkpoint -> fp32 ONNX (TorchScript exporter, dynamo=False, opset 17, symbolic S), checked
against PyTorch with onnxruntime on two slice counts.

  python3 export.py runs/fp32/model.pt runs/fp32/model_fp32.onnx
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx
import onnxruntime as ort
import torch

from model import export_onnx, load_checkpoint


def check_against_torch(model, onnx_path: str, slice_counts=(9, 40), seed: int = 0) -> float:
    """Max abs difference between PyTorch and onnxruntime over all outputs."""
    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    worst = 0.0
    model.eval()
    for s in slice_counts:
        x = rng.random((s, 3, 128, 128), dtype=np.float32)
        with torch.no_grad():
            ref = [t.numpy() for t in model(torch.from_numpy(x))]
        got = sess.run(None, {"slices": x})
        for r, g in zip(ref, got):
            if r.shape != g.shape:
                raise SystemExit(f"shape mismatch at S={s}: torch {r.shape} vs onnxruntime {g.shape}")
            worst = max(worst, float(np.abs(r - g).max()))
    return worst


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("onnx")
    args = ap.parse_args()
    model = load_checkpoint(args.checkpoint).eval()
    export_onnx(model, args.onnx)
    onnx.checker.check_model(onnx.load(args.onnx))
    worst = check_against_torch(model, args.onnx)
    print(f"exported {args.onnx}; max |torch - onnxruntime| = {worst:.2e}")
    if worst > 1e-3:
        raise SystemExit("onnxruntime does not reproduce PyTorch: refusing this export")


if __name__ == "__main__":
    main()
