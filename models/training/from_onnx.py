"""The committed ONNX model -> a PyTorch checkpoint that `train.py --init` can continue.

Only the ONNX file is committed: this gives back the network as it ships, so that a user can
fine-tune it on their own data (RSNA layout, `data.py`) and the next run of the recipe can
start from it. Every weight is read from the graph by the module name the exporter kept in
the node names (`/enc2/a/a.0/Conv` is `enc2.a.0`):
- float `Conv`: BatchNorm was folded into it at export, so the conv takes the folded weight
  and the BatchNorm after it becomes the identity plus the folded bias (mean 0, variance 1,
  scale sqrt(1 + eps), shift = bias): the same function in eval mode. Train the result with
  `train.py --freeze-bn` (BatchNorm in training mode would renormalise by batch statistics);
- `QLinearConv`: the int8 weight times its scale, the int32 bias times input scale x weight
  scale (what the int8 model multiplies by, not the float weights before quantization:
  fine-tuning recovers the difference);
- `GRU`: ONNX gate order z, r, h back to PyTorch's r, z, n, per direction;
- `Gemm` / `MatMul` + `Add`: the linear heads, and `vert_bias`, `pat_scale`, `pat_bias`.

  python3 from_onnx.py ../cspine_triage_int8.onnx runs/shipped/model.pt

The check at the end exports the checkpoint again and compares it with the source graph on
the committed fixture input (24 slices of a phantom, `models/fixtures/input.npy`) with
onnxruntime: an fp32 source is reproduced exactly, an int8 one differs by its activation
quantization only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

from model import TriageNet, export_onnx, save_checkpoint

# The shipped architecture (models/training/runs/next/config.json, "model").
SHIPPED_CONFIG = {
    "widths": {"enc1": 8, "enc2": 16, "enc3": 32, "enc4": 48, "dec3": 32, "dec2": 24},
    "mids": {"enc1": 8, "enc2": 16, "enc3": 32, "enc4": 48, "dec3": 32, "dec2": 24},
    "gru_hidden": 32,
    "level_hidden": 24,
    "frac_hires": 16,
}


class Graph:
    def __init__(self, path: Path):
        g = onnx.load(str(path)).graph
        self.values = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        for n in g.node:
            if n.op_type == "Constant":
                self.values[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        self.nodes = {n.name: n for n in g.node}

    def node(self, name: str):
        if name not in self.nodes:
            raise SystemExit(f"node {name!r} not in the graph: not the shipped architecture?")
        return self.nodes[name]

    def value(self, name: str) -> np.ndarray:
        return self.values[name].astype(np.float32) if name in self.values else None

    def conv(self, scope: str) -> tuple[np.ndarray, np.ndarray]:
        """Weight and bias of the convolution exported from module scope `scope`."""
        if f"{scope}/Conv" in self.nodes:
            n = self.nodes[f"{scope}/Conv"]
            return self.value(n.input[1]), self.value(n.input[2])
        n = self.node(f"{scope}/Conv_quant")
        x_scale, w_q, w_scale, w_zp, b_q = (self.values[n.input[i]] for i in (1, 3, 4, 5, 8))
        w = (w_q.astype(np.float32) - w_zp.astype(np.float32)) * w_scale.astype(np.float32)
        b = b_q.astype(np.float32) * (x_scale * w_scale).astype(np.float32)
        return w.astype(np.float32), b.astype(np.float32)

    def gru(self, scope: str) -> dict:
        n = self.node(f"{scope}/GRU")
        w, r, b = (self.value(n.input[i]) for i in (1, 2, 3))
        h = r.shape[2]
        zrh_to_rzn = lambda a: np.concatenate([a[h:2 * h], a[:h], a[2 * h:]], 0)
        out = {}
        for d, suffix in enumerate(("", "_reverse")):
            out[f"weight_ih_l0{suffix}"] = zrh_to_rzn(w[d])
            out[f"weight_hh_l0{suffix}"] = zrh_to_rzn(r[d])
            out[f"bias_ih_l0{suffix}"] = zrh_to_rzn(b[d, :3 * h])
            out[f"bias_hh_l0{suffix}"] = zrh_to_rzn(b[d, 3 * h:])
        return out


def recover(path: Path) -> TriageNet:
    g = Graph(path)
    model = TriageNet(**SHIPPED_CONFIG)
    sd = {k: v.clone() for k, v in model.state_dict().items()}

    def put(name: str, value: np.ndarray):
        if sd[name].shape != value.shape:
            raise SystemExit(f"{name}: graph has {value.shape}, the model {tuple(sd[name].shape)}")
        sd[name] = torch.from_numpy(np.ascontiguousarray(value))

    # conv + BatchNorm pairs: module prefix of the Sequential, ONNX scope of its conv
    pairs = [("enc1", "/enc1/enc1.0")]
    for block in ("enc2", "enc3", "enc4", "dec3", "dec2"):
        for half in ("a", "b"):
            pairs.append((f"{block}.{half}", f"/{block}/{half}/{half}.0"))
    for i in range(2):
        pairs.append((f"frac_branch.{i}", f"/frac_branch/frac_branch.{i}/frac_branch.{i}.0"))
    for prefix, scope in pairs:
        w, b = g.conv(scope)
        put(f"{prefix}.0.weight", w)
        bn = model.get_submodule(f"{prefix}.1")
        put(f"{prefix}.1.weight", np.full(b.shape, np.sqrt(1.0 + bn.eps), np.float32))
        put(f"{prefix}.1.bias", b)
        put(f"{prefix}.1.running_mean", np.zeros_like(b))
        put(f"{prefix}.1.running_var", np.ones_like(b))
    for head in ("seg_head", "frac_head"):
        w, b = g.conv(f"/{head}")
        put(f"{head}.weight", w)
        put(f"{head}.bias", b)
    for gru in ("level_gru", "gru"):
        for k, v in g.gru(f"/{gru}").items():
            put(f"{gru}.{k}", v)
    for name in ("level_out.weight", "level_out.bias", "vert_head.weight", "vert_head.bias",
                 "att.bias", "pat_head.bias", "vert_bias", "pat_scale", "pat_bias"):
        put(name, g.value(name))
    for lin in ("att", "pat_head"):
        put(f"{lin}.weight", g.value(g.node(f"/{lin}/MatMul").input[1]).T)
    model.load_state_dict(sd)
    return model.eval()


FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "input.npy"


def compare(a: Path, b: Path, x: np.ndarray) -> dict:
    """Largest |difference| per output of two ONNX files on input `x` (onnxruntime)."""
    sa = ort.InferenceSession(str(a), providers=["CPUExecutionProvider"])
    sb = ort.InferenceSession(str(b), providers=["CPUExecutionProvider"])
    ra, rb = sa.run(None, {"slices": x}), sb.run(None, {"slices": x})
    return {o.name: float(np.abs(p - q).max()) for o, p, q in zip(sa.get_outputs(), ra, rb)}


# An int8 source differs from its recovered fp32 network by its activation quantization:
# 0.26 in a vertebra logit and 0.05 in the patient logit for 0.6.1 on the fixture. A wrong
# mapping (a gate order, a transposed head) gives differences of several units.
MAX_LOGIT_DIFF = 1.0


def self_check(tmp: Path) -> float:
    """Random weights and BatchNorm statistics -> fp32 export -> recover -> export: the two
    graphs must agree (the mapping is exact; only float rounding of the folding differs)."""
    torch.manual_seed(0)
    model = TriageNet(**SHIPPED_CONFIG)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
        model.vert_bias.uniform_(-1, 1)
        model.pat_scale.fill_(0.7)
        model.pat_bias.fill_(-0.2)
    src, again = tmp / "self_check_src.onnx", tmp / "self_check_recovered.onnx"
    export_onnx(model, str(src))
    export_onnx(recover(src), str(again))
    return max(compare(src, again, np.load(FIXTURE)).values())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("onnx", type=Path, help="the committed model (int8) or an fp32 export of it")
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--self-check", action="store_true",
                    help="first check the mapping on a random network exported to fp32 (CI)")
    args = ap.parse_args()
    args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
    if args.self_check:
        worst = self_check(args.checkpoint.parent)
        print(f"self-check (random fp32 network exported, recovered, exported again): max |diff| {worst:.2e}")
        if worst > 1e-4:
            raise SystemExit("from_onnx.py does not recover an fp32 export exactly: the mapping is wrong")
    model = recover(args.onnx)
    save_checkpoint(model, args.checkpoint, recovered_from=str(args.onnx))
    fp32 = args.checkpoint.with_suffix(".onnx")
    export_onnx(model, str(fp32))
    worst = compare(args.onnx, fp32, np.load(FIXTURE))
    print(f"wrote {args.checkpoint} and its fp32 export {fp32}")
    print(f"largest |source - recovered| on {FIXTURE.name} (onnxruntime): " + json.dumps(worst))
    if max(worst["vertebra_logits"], worst["patient_logit"]) > MAX_LOGIT_DIFF:
        raise SystemExit(f"the recovered network differs by more than {MAX_LOGIT_DIFF} in a logit: "
                         "not the shipped architecture, or a mapping error")


if __name__ == "__main__":
    main()
