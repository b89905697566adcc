"""Structured pruning that really removes channels: each conv's output channels are ranked by
|BatchNorm gamma| (a channel with small gamma is nearly constant after BN), the top fraction is
kept, and a NEW, narrower TriageNet is built with the same code and the kept weights copied in
(every consumer's input channels sliced to match: the next conv, the UNet skip concats, the
segmentation and fracture heads, the slice-level GRU and the sequence GRU input). Nothing is masked: the dense kernels really shrink.
Fine-tune afterwards with `train.py --init`.

  python3 prune.py runs/fp32/model.pt runs/pruned/pruned.pt --keep 0.5
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn as nn

from model import TriageNet, count_params, load_checkpoint, save_checkpoint

# Each prunable ConvBNReLU, by module path.
GROUPS = ["enc1", "enc2.a", "enc2.b", "enc3.a", "enc3.b", "enc4.a", "enc4.b",
          "dec3.a", "dec3.b", "dec2.a", "dec2.b"]


def _cbr(model, path):
    m = model
    for p in path.split("."):
        m = getattr(m, p)
    return m  # nn.Sequential(conv, bn, relu)


def keep_indices(model: TriageNet, keep: float, min_ch: int = 8) -> dict:
    idx = {}
    for g in GROUPS:
        gamma = _cbr(model, g)[1].weight.detach().abs().numpy()
        n = max(min_ch, int(round(len(gamma) * keep)))
        n = min(n, len(gamma))
        idx[g] = np.sort(np.argsort(-gamma, kind="stable")[:n])
    return idx


def input_indices(model: TriageNet, idx: dict) -> dict:
    """Input channels each conv keeps, concats laid out as in TriageNet.features."""
    w = model.widths
    cat = lambda a, b, off: np.concatenate([a, b + off])  # noqa: E731
    return {
        "enc1": np.arange(3),
        "enc2.a": idx["enc1"], "enc2.b": idx["enc2.a"],
        "enc3.a": idx["enc2.b"], "enc3.b": idx["enc3.a"],
        "enc4.a": idx["enc3.b"], "enc4.b": idx["enc4.a"],
        "dec3.a": cat(idx["enc4.b"], idx["enc3.b"], w["enc4"]), "dec3.b": idx["dec3.a"],
        "dec2.a": cat(idx["dec3.b"], idx["enc2.b"], w["dec3"]), "dec2.b": idx["dec2.a"],
    }


@torch.no_grad()
def prune(model: TriageNet, keep: float) -> TriageNet:
    idx = keep_indices(model, keep)
    inp = input_indices(model, idx)
    widths = {"enc1": len(idx["enc1"])}
    mids = {}
    for blk in ("enc2", "enc3", "enc4", "dec3", "dec2"):
        mids[blk] = len(idx[f"{blk}.a"])
        widths[blk] = len(idx[f"{blk}.b"])
    new = TriageNet(widths=widths, mids=mids, gru_hidden=model.gru_hidden, level_hidden=model.level_hidden,
                    frac_hires=model.frac_hires, dec2_kernel=model.dec2_kernel,
                    frac_branch_layout=model.frac_branch_layout)
    for g in GROUPS:
        src, dst = _cbr(model, g), _cbr(new, g)
        o, i = torch.from_numpy(idx[g]), torch.from_numpy(inp[g])
        dst[0].weight.copy_(src[0].weight[o][:, i])
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(dst[1], name).copy_(getattr(src[1], name)[o])
    o = torch.from_numpy(idx["dec2.b"])
    new.seg_head.weight.copy_(model.seg_head.weight[:, o])
    new.seg_head.bias.copy_(model.seg_head.bias)
    # fracture head input = [dec2 (pruned), high-resolution branch (kept)]
    frac_cols = torch.cat([o, model.widths["dec2"] + torch.arange(model.frac_hires)])
    new.frac_head.weight.copy_(model.frac_head.weight[:, frac_cols])
    new.frac_head.bias.copy_(model.frac_head.bias)
    if model.frac_hires:  # its first conv reads enc1 (pruned)
        src, dst = model.frac_branch, new.frac_branch
        dst[0][0].weight.copy_(src[0][0].weight[:, torch.from_numpy(idx["enc1"])])
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(dst[0][1], name).copy_(getattr(src[0][1], name))
        if len(dst) > 1:  # "hires" layout: its strided second conv reads the branch itself
            dst[1].load_state_dict(src[1].state_dict())
    # slice-level GRU input = mean of enc4 (pruned); sequence GRU input = [pooled dec2
    # features (pruned), max fracture evidence, log mass (both kept)]
    c = model.widths["dec2"]
    for gru, cols in (("level_gru", torch.from_numpy(idx["enc4.b"])),
                      ("gru", torch.cat([o, torch.tensor([c, c + 1])]))):
        for k, v in getattr(model, gru).state_dict().items():
            if k.startswith("weight_ih"):
                v = v[:, cols]
            getattr(getattr(new, gru), k).copy_(v)
    for name in ("level_out", "att", "vert_head", "pat_head"):
        getattr(new, name).load_state_dict(getattr(model, name).state_dict())
    for name in ("vert_bias", "pat_scale", "pat_bias"):
        getattr(new, name).copy_(getattr(model, name))
    return new


def macs(model: TriageNet, s: int = 64) -> dict:
    """Multiply-accumulates for one study of s model slices (convs counted by hooks)."""
    conv = [0]

    def hook(m, x, y):
        if isinstance(m, nn.Conv2d):
            conv[0] += y.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(s, 3, 128, 128))
    for h in hs:
        h.remove()
    c = model.widths["dec2"]
    hdim, inp = model.gru_hidden, c + 2
    pool = s * 7 * 1024 * (c + 1)
    lh = model.level_hidden
    gru = s * 7 * 2 * 3 * (inp * hdim + hdim * hdim) + s * 2 * 3 * (model.widths["enc4"] * lh + lh * lh)
    return {"conv": conv[0], "pool": pool, "gru": gru, "total": conv[0] + pool + gru, "slices": s}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("out")
    ap.add_argument("--keep", type=float, default=0.5, help="fraction of channels kept per conv")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = load_checkpoint(args.checkpoint).eval()
    new = prune(model, args.keep).eval()
    x = torch.rand(12, 3, 128, 128)
    with torch.no_grad():
        a, b = model(x), new(x)
    report = {
        "keep": args.keep,
        "before": {"params": count_params(model), "macs_S64": macs(model), "config": model.config()},
        "after": {"params": count_params(new), "macs_S64": macs(new), "config": new.config()},
        "untuned_max_abs_change": {"seg_logits": float((a[0] - b[0]).abs().max()),
                                   "vertebra_logits": float((a[1] - b[1]).abs().max())},
    }
    save_checkpoint(new, args.out, prune_report=report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
