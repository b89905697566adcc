"""The triage network: a 2.5D slice encoder, a stride-4 UNet decoder, per-vertebra pooling
through the predicted segmentation, a bidirectional GRU across slices and attention pooling.

Designed for tract on a couple of CPU cores: tract only multithreads matmul and im2col at high
resolution dominates, so the first conv is strided, the decoder stops at stride 4 (32x32) and
channel counts stay small. Channel widths are constructor arguments so that structured pruning
(`prune.py`) can rebuild a genuinely smaller network with the same code.

Everything after the convolutions (GRU, attention, softmax) stays float in the int8 export:
tract folds DequantizeLinear->Softmax->QuantizeLinear into a lookup table (wrong attention).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

N_VERT = 7
N_CLASSES = 8  # background + C1..C7

# Default widths. Keys are the prunable conv blocks; `prune.py` shrinks them.
DEFAULT_WIDTHS = {
    "enc1": 16,  # 128 -> 64
    "enc2": 32,  # 64 -> 32
    "enc3": 64,  # 32 -> 16
    "enc4": 96,  # 16 -> 8
    "dec3": 64,  # 16x16
    "dec2": 48,  # 32x32: also the per-slice feature map that is pooled per vertebra
}


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int = 1, k: int = 3):
        super().__init__(
            nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class Block(nn.Module):
    """Two 3x3 conv-BN-ReLU; the first may stride. `mid` is the hidden width (prunable)."""

    def __init__(self, cin: int, cout: int, stride: int, mid: int | None = None):
        super().__init__()
        mid = cout if mid is None else mid
        self.a = ConvBNReLU(cin, mid, stride)
        self.b = ConvBNReLU(mid, cout, 1)

    def forward(self, x):
        return self.b(self.a(x))


class TriageNet(nn.Module):
    def __init__(self, widths: dict | None = None, mids: dict | None = None, gru_hidden: int = 32):
        super().__init__()
        w = dict(DEFAULT_WIDTHS)
        if widths:
            w.update(widths)
        m = dict(w)
        if mids:
            m.update(mids)
        self.widths, self.mids, self.gru_hidden = w, m, gru_hidden
        self.enc1 = ConvBNReLU(3, w["enc1"], stride=2)  # one conv only at 64x64: im2col cost
        self.enc2 = Block(w["enc1"], w["enc2"], 2, m["enc2"])
        self.enc3 = Block(w["enc2"], w["enc3"], 2, m["enc3"])
        self.enc4 = Block(w["enc3"], w["enc4"], 2, m["enc4"])
        self.dec3 = Block(w["enc4"] + w["enc3"], w["dec3"], 1, m["dec3"])
        self.dec2 = Block(w["dec3"] + w["enc2"], w["dec2"], 1, m["dec2"])
        self.seg_head = nn.Conv2d(w["dec2"], N_CLASSES, 1)
        c = w["dec2"] + 1  # pooled features + log vertebra mass on the slice
        self.gru = nn.GRU(c, gru_hidden, batch_first=False, bidirectional=True)
        h2 = 2 * gru_hidden
        self.att = nn.Linear(h2, 1)
        self.vert_head = nn.Linear(h2, 1)
        self.vert_bias = nn.Parameter(torch.zeros(N_VERT))
        self.pat_scale = nn.Parameter(torch.ones(1))
        self.pat_bias = nn.Parameter(torch.zeros(1))
        self.pat_head = nn.Linear(h2, 1)

    def features(self, x: torch.Tensor):
        """Per-slice part. x: [S, 3, 128, 128] windowed slices (channels = slices k-1, k, k+1).
        Returns seg_logits [S,8,32,32] and the per-vertebra sequence [S,7,C+1]."""
        e1 = self.enc1(x)  # [S, c1, 64, 64]
        e2 = self.enc2(e1)  # [S, c2, 32, 32]
        e3 = self.enc3(e2)  # [S, c3, 16, 16]
        e4 = self.enc4(e3)  # [S, c4, 8, 8]
        d3 = self.dec3(torch.cat([F.interpolate(e4, scale_factor=2.0, mode="nearest"), e3], 1))
        d2 = self.dec2(torch.cat([F.interpolate(d3, scale_factor=2.0, mode="nearest"), e2], 1))
        seg_logits = self.seg_head(d2)  # [S, 8, 32, 32]

        # Pool the 32x32 features per vertebra with the soft segmentation.
        s = x.shape[0]
        prob = torch.softmax(seg_logits, dim=1)[:, 1:].reshape(s, N_VERT, -1)  # [S,7,1024]
        feat = d2.reshape(s, d2.shape[1], -1)  # [S,C,1024]
        mass = prob.sum(-1, keepdim=True)  # [S,7,1] expected cells of the vertebra
        pooled = torch.bmm(prob, feat.transpose(1, 2)) / (mass + 1.0)  # [S,7,C]
        seq = torch.cat([pooled, torch.log(mass + 1e-3) * 0.1], dim=2)  # [S,7,C+1]
        return seg_logits, seq

    def head(self, seq: torch.Tensor):
        """Across slices. seq: [S,7,C+1] (last feature = 0.1 * log vertebra mass)."""
        # Sequence over slices, the 7 vertebrae as the batch.
        h, _ = self.gru(seq)  # [S,7,2H]
        # Attention over slices, biased by where the vertebra is (log of its mass).
        score = self.att(h).squeeze(2) + seq[:, :, -1] * 10.0  # [S,7]
        attention = torch.softmax(score.transpose(0, 1), dim=1)  # [7,S]
        ctx = torch.bmm(attention.unsqueeze(1), h.transpose(0, 1)).squeeze(1)  # [7,2H]
        vertebra_logits = self.vert_head(ctx).squeeze(1) + self.vert_bias  # [7]
        patient_logit = (
            self.pat_scale * torch.logsumexp(vertebra_logits, dim=0, keepdim=True)
            + self.pat_head(ctx.mean(0))
            + self.pat_bias
        )  # [1]
        return vertebra_logits, patient_logit, attention

    def forward(self, x: torch.Tensor):
        seg_logits, seq = self.features(x)
        vertebra_logits, patient_logit, attention = self.head(seq)
        return seg_logits, vertebra_logits, patient_logit, attention

    def config(self) -> dict:
        return {"widths": self.widths, "mids": self.mids, "gru_hidden": self.gru_hidden}


def save_checkpoint(model: "TriageNet", path, **extra) -> None:
    torch.save({"config": model.config(), "state_dict": model.state_dict(), **extra}, path)


def load_checkpoint(path) -> "TriageNet":
    ck = torch.load(path, map_location="cpu", weights_only=False)
    m = TriageNet(**ck["config"])
    m.load_state_dict(ck["state_dict"])
    return m


OUTPUT_NAMES = ["seg_logits", "vertebra_logits", "patient_logit", "attention"]


def export_onnx(model: nn.Module, path: str, s: int = 24) -> None:
    """One graph, symbolic slice count S, TorchScript exporter (the dynamo exporter fixed S)."""
    model = model.eval()
    x = torch.rand(s, 3, 128, 128)
    torch.onnx.export(
        model,
        (x,),
        path,
        dynamo=False,
        opset_version=17,
        input_names=["slices"],
        output_names=OUTPUT_NAMES,
        dynamic_axes={"slices": {0: "S"}, "seg_logits": {0: "S"}, "attention": {1: "S"}},
        do_constant_folding=True,
    )


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
