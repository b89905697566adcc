#!/usr/bin/env python3
"""What would a cheaper network buy in tract? Speed what-ifs, not models.

Builds the shipped architecture (`models/training/runs/size_report.json`, random weights
unless --checkpoint) and variants of it with some convolutions replaced, exports and
int8-quantizes each exactly as the recipe does (`export_onnx`, `quantize.py`, calibrated on
8 phantoms generated here), writes a contract for each and times it with
`benches/infer_vs_ort.py` (tract against onnxruntime, same file, same input, same threads).

  python3 benches/model_variants.py --bin target/release/cspine-triage

Variants (TriageNet's `dec2_kernel` and `frac_branch_layout`; with --checkpoint, converted
by `model.with_layout`):
  base          the shipped architecture
  dec2-1x1      the decoder's last block (32x32) with 1x1 instead of 3x3 convolutions
  frac-strided  the fracture branch as one strided 3x3 from enc1, without its 3x3 at 64x64
  both          dec2-1x1 and frac-strided
Needs the training requirements (torch, onnx, onnxruntime).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TRAINING = ROOT / "models" / "training"
sys.path.insert(0, str(TRAINING))

from model import ConvBNReLU, TriageNet, export_onnx, load_checkpoint, with_layout  # noqa: E402


def distinct_bn(block: ConvBNReLU) -> ConvBNReLU:
    """Random BatchNorm statistics: with the defaults every folded bias is zero and the
    exporter shares them as one constant, which quantize.py cannot read as a conv bias."""
    bn = block[1]
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.1, 0.1)
    bn.running_mean.uniform_(-0.1, 0.1)
    bn.running_var.uniform_(0.5, 1.5)
    return block


LAYOUTS = {  # variant -> (dec2_kernel, frac_branch_layout), TriageNet's options
    "base": (3, "hires"),
    "dec2-1x1": (1, "hires"),
    "frac-strided": (3, "strided"),
    "both": (1, "strided"),
}


def network(variant: str, checkpoint: Path | None) -> TriageNet:
    dec2_kernel, layout = LAYOUTS[variant]
    if checkpoint:
        return with_layout(load_checkpoint(checkpoint), dec2_kernel, layout).eval()
    config = json.loads((TRAINING / "runs" / "size_report.json").read_text())["after"]["config"]
    config.update(dec2_kernel=dec2_kernel, frac_branch_layout=layout)
    m = TriageNet(**config)
    for mod in m.modules():
        if isinstance(mod, ConvBNReLU):
            distinct_bn(mod)
    return m.eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", type=Path, default=ROOT / "target" / "release" / "cspine-triage")
    ap.add_argument("--checkpoint", type=Path, help="trained weights instead of random ones")
    ap.add_argument("--variants", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--slices", type=int, default=60)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--keep", type=Path,
                    help="write the variants here (VARIANT/model.json, for `infer --profile --model`) "
                         "instead of a temporary directory")
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.keep or Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        calib = tmp / "calib"
        subprocess.run([str(args.bin), "synth", str(calib), "--count", "8", "--seed", "77", "--matrix", "256"],
                       check=True, stderr=subprocess.DEVNULL)
        contract = json.loads((ROOT / "models" / "model.json").read_text())
        rows = []
        for variant in args.variants:
            out = tmp / variant
            out.mkdir(exist_ok=True)
            export_onnx(network(variant, args.checkpoint), str(out / "fp32.onnx"))
            subprocess.run([sys.executable, "quantize.py", str(out / "fp32.onnx"), str(out / "int8.onnx"),
                            "--data", str(calib), "--cache", str(tmp / "cache"), "--calib", "8"],
                           cwd=TRAINING, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            contract.update(onnx="int8.onnx", sha256=hashlib.sha256((out / "int8.onnx").read_bytes()).hexdigest())
            (out / "model.json").write_text(json.dumps(contract, indent=2))
            bench = subprocess.run(
                [sys.executable, str(ROOT / "benches" / "infer_vs_ort.py"), "--bin", str(args.bin),
                 "--model", str(out / "model.json"), "--runs", str(args.runs), "--slices", str(args.slices),
                 "--rows", str(args.rows)], check=True, capture_output=True, text=True).stdout
            tract, ort, ratio = re.search(r"model latency s\s+(\S+)\s+(\S+)\s+(\S+)", bench).groups()
            rows.append((variant, tract, ort, ratio))
            print(f"{variant:14s} tract {tract} s  onnxruntime {ort} s  {ratio}x", flush=True)
    print(f"\nmodel latency, {args.slices} slices of {args.rows} rows, {args.runs} runs, "
          f"{'weights ' + str(args.checkpoint) if args.checkpoint else 'random weights'}")
    print("| variant | tract | onnxruntime | ratio |\n|---|---:|---:|---:|")
    for variant, tract, ort, ratio in rows:
        print(f"| {variant} | {tract} s | {ort} s | {ratio}x |")


if __name__ == "__main__":
    main()
