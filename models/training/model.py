"""The triage network: a 2.5D slice encoder, a stride-4 UNet decoder, a slice-level BiGRU that
tells which vertebra each slice shows, per-vertebra pooling through the predicted segmentation,
a bidirectional GRU across slices and attention pooling.

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


def max_over_classes(x: torch.Tensor, n: int = N_CLASSES) -> torch.Tensor:
    """`x.amax(dim=1, keepdim=True)` of `x` [S, n, ...] as element-wise maxima of halves (the
    same values; `n` a Python int so that the export slices with constants). tract 0.23.9
    reduces over a non-last axis slowly: the ReduceMax over the 8 classes of [74,8,32,32]
    took 11.5 ms, a twentieth of the model, where three element-wise Max take well under a
    millisecond."""
    while n > 1:
        half = n // 2
        top = torch.maximum(x[:, :half], x[:, half:2 * half])
        x = torch.cat([top, x[:, 2 * half:n]], 1) if n % 2 else top
        n = half + n % 2
    return x


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int = 1, k: int = 3):
        super().__init__(
            nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class Block(nn.Module):
    """Two k x k conv-BN-ReLU (3x3 unless `k`); the first may stride. `mid` is the hidden
    width (prunable)."""

    def __init__(self, cin: int, cout: int, stride: int, mid: int | None = None, k: int = 3):
        super().__init__()
        mid = cout if mid is None else mid
        self.a = ConvBNReLU(cin, mid, stride, k)
        self.b = ConvBNReLU(mid, cout, 1, k)

    def forward(self, x):
        return self.b(self.a(x))


class TriageNet(nn.Module):
    """Per slice: encoder -> stride-4 decoder -> pixel class logits and a fracture-evidence map.
    Across slices: a small BiGRU over the global encoder descriptor gives each slice a *level*
    (which of C1..C7 it belongs to). An axial slice of C4 looks like one of C5: the level can
    only be told by counting from the skull base or the thorax, so it comes from the sequence,
    and the segmentation is pixel evidence + the slice's level prior (log-softmax)."""

    def __init__(self, widths: dict | None = None, mids: dict | None = None, gru_hidden: int = 32,
                 level_hidden: int = 24, frac_hires: int = 0, dec2_kernel: int = 3,
                 frac_branch_layout: str = "hires"):
        super().__init__()
        w = dict(DEFAULT_WIDTHS)
        if widths:
            w.update(widths)
        m = dict(w)
        if mids:
            m.update(mids)
        self.widths, self.mids, self.gru_hidden, self.level_hidden = w, m, gru_hidden, level_hidden
        self.frac_hires = frac_hires
        # The two cheaper options of benches/model_variants.py (tract 0.134 -> 0.090 s on
        # 60 slices): `dec2_kernel` 1 makes the 32x32 decoder block 1x1, `frac_branch_layout`
        # "strided" reads enc1 with one strided 3x3 instead of a 3x3 at 64x64 first.
        self.dec2_kernel, self.frac_branch_layout = dec2_kernel, frac_branch_layout
        self.enc1 = ConvBNReLU(3, w["enc1"], stride=2)  # one conv only at 64x64: im2col cost
        self.enc2 = Block(w["enc1"], w["enc2"], 2, m["enc2"])
        self.enc3 = Block(w["enc2"], w["enc3"], 2, m["enc3"])
        self.enc4 = Block(w["enc3"], w["enc4"], 2, m["enc4"])
        self.dec3 = Block(w["enc4"] + w["enc3"], w["dec3"], 1, m["dec3"])
        self.dec2 = Block(w["dec3"] + w["enc2"], w["dec2"], 1, m["dec2"], k=dec2_kernel)
        self.seg_head = nn.Conv2d(w["dec2"], N_CLASSES, 1)
        # Fracture evidence per 32x32 cell. A crack is 1-3 pixels wide at 1.25 mm: with
        # `frac_hires` > 0 a small branch reads the stride-2 (64x64) features and strides
        # down itself, so the head sees the crack before the encoder has blurred it away.
        if frac_hires and frac_branch_layout == "strided":
            self.frac_branch = nn.Sequential(ConvBNReLU(w["enc1"], frac_hires, stride=2))
        elif frac_hires:
            self.frac_branch = nn.Sequential(ConvBNReLU(w["enc1"], frac_hires),
                                             ConvBNReLU(frac_hires, frac_hires, stride=2))
        self.frac_head = nn.Conv2d(w["dec2"] + frac_hires, 1, 1)
        self.level_gru = nn.GRU(w["enc4"], level_hidden, batch_first=False, bidirectional=True)
        self.level_out = nn.Linear(2 * level_hidden, N_VERT)
        c = w["dec2"] + 2  # pooled features + max fracture evidence + log vertebra mass
        self.gru = nn.GRU(c, gru_hidden, batch_first=False, bidirectional=True)
        h2 = 2 * gru_hidden
        self.att = nn.Linear(h2, 1)
        self.vert_head = nn.Linear(h2, 1)
        self.vert_bias = nn.Parameter(torch.zeros(N_VERT))
        self.pat_scale = nn.Parameter(torch.ones(1))
        self.pat_bias = nn.Parameter(torch.zeros(1))
        self.pat_head = nn.Linear(h2, 1)

    def encode(self, x: torch.Tensor):
        """Per-slice part. x: [S, 3, 128, 128] windowed slices (channels = slices k-1, k, k+1).
        Returns pixel logits [S,8,32,32], fracture logits [S,1,32,32], decoder features
        [S,C,32,32] and the slice descriptor [S,C4]."""
        e1 = self.enc1(x)  # [S, c1, 64, 64]
        e2 = self.enc2(e1)  # [S, c2, 32, 32]
        e3 = self.enc3(e2)  # [S, c3, 16, 16]
        e4 = self.enc4(e3)  # [S, c4, 8, 8]
        d3 = self.dec3(torch.cat([F.interpolate(e4, scale_factor=2.0, mode="nearest"), e3], 1))
        d2 = self.dec2(torch.cat([F.interpolate(d3, scale_factor=2.0, mode="nearest"), e2], 1))
        frac_in = torch.cat([d2, self.frac_branch(e1)], 1) if self.frac_hires else d2
        return self.seg_head(d2), self.frac_head(frac_in), d2, e4.mean(dim=(2, 3))

    def level(self, desc: torch.Tensor) -> torch.Tensor:
        """Slice descriptors [S,C4] -> level logits [S,7] (which vertebra each slice shows)."""
        h, _ = self.level_gru(desc.unsqueeze(1), self._h0(1, self.level_hidden, desc))  # [S,1,2L]
        return self.level_out(h.squeeze(1))

    @staticmethod
    def _h0(batch: int, hidden: int, like: torch.Tensor) -> torch.Tensor:
        """A constant zero initial state (on `like`'s device). Left implicit, the exporter
        derives it from the input's shape, which ties it to the per-slice part of the graph
        and stops tract's engine from cutting the graph into per-slice and across-slices
        parts."""
        return torch.zeros(2, batch, hidden, device=like.device)

    @staticmethod
    def segment(pix: torch.Tensor, level_logits: torch.Tensor) -> torch.Tensor:
        """Pixel evidence + the slice's level prior -> seg logits [S,8,32,32]."""
        prior = torch.log_softmax(level_logits, dim=1).unsqueeze(2).unsqueeze(3)  # [S,7,1,1]
        return torch.cat([pix[:, :1], pix[:, 1:] + prior], 1)

    @staticmethod
    def pool(seg_logits: torch.Tensor, frac_logits: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        """Per-vertebra sequence [S,7,C+2]: the decoder features averaged over the soft
        segmentation, the strongest fracture evidence inside the vertebra (a crack covers a
        few cells: an average would drown it) and 0.1 * log vertebra mass (last)."""
        s = seg_logits.shape[0]
        # The softmax over the 8 classes spelled out: tract 0.23.9's Softmax op took a third
        # of the model's time on these 8-element rows (over any axis); reductions and
        # element-wise ops are fast there.
        e = torch.exp(seg_logits - max_over_classes(seg_logits))
        prob = (e / e.sum(dim=1, keepdim=True))[:, 1:].reshape(s, N_VERT, -1)  # [S,7,1024]
        feat = d2.reshape(s, d2.shape[1], -1)  # [S,C,1024]
        mass = prob.sum(-1, keepdim=True)  # [S,7,1] expected cells of the vertebra
        pooled = torch.bmm(prob, feat.transpose(1, 2)) / (mass + 1.0)  # [S,7,C]
        frac = torch.sigmoid(frac_logits).reshape(s, 1, -1)  # [S,1,1024]
        frac_max = (prob * frac).amax(dim=2, keepdim=True)  # [S,7,1]
        return torch.cat([pooled, frac_max, torch.log(mass + 1e-3) * 0.1], dim=2)

    def features(self, x: torch.Tensor):
        """seg logits [S,8,32,32], fracture logits [S,1,32,32], level logits [S,7] and the
        per-vertebra sequence [S,7,C+2] of a whole study (or a window of it)."""
        return self.from_encoding(*self.encode(x))

    def from_encoding(self, pix, frac, d2, desc):
        """`features` from `encode`'s outputs (training caches those of a frozen encoder)."""
        lev = self.level(desc)
        seg_logits = self.segment(pix, lev)
        return seg_logits, frac, lev, self.pool(seg_logits, frac, d2)

    def head(self, seq: torch.Tensor):
        """Across slices. seq: [S,7,C+2] (last feature = 0.1 * log vertebra mass)."""
        # Sequence over slices, the 7 vertebrae as the batch.
        h, _ = self.gru(seq, self._h0(N_VERT, self.gru_hidden, seq))  # [S,7,2H]
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
        seg_logits, _, _, seq = self.features(x)
        vertebra_logits, patient_logit, attention = self.head(seq)
        return seg_logits, vertebra_logits, patient_logit, attention

    def config(self) -> dict:
        return {"widths": self.widths, "mids": self.mids, "gru_hidden": self.gru_hidden,
                "level_hidden": self.level_hidden, "frac_hires": self.frac_hires,
                "dec2_kernel": self.dec2_kernel, "frac_branch_layout": self.frac_branch_layout}


def save_checkpoint(model: "TriageNet", path, **extra) -> None:
    state = {k: v.cpu() for k, v in model.state_dict().items()}  # loadable without a GPU
    torch.save({"config": model.config(), "state_dict": state, **extra}, path)


def load_checkpoint(path) -> "TriageNet":
    ck = torch.load(path, map_location="cpu", weights_only=False)
    m = TriageNet(**ck["config"])
    m.load_state_dict(ck["state_dict"])
    return m


def with_layout(model: "TriageNet", dec2_kernel: int, frac_branch_layout: str) -> "TriageNet":
    """The same network with the dec2 kernel size and fracture-branch layout changed, as a
    warm start: every other weight is kept, a 1x1 conv starts from the centre tap of the 3x3
    it replaces, and a "strided" branch from the first conv of the "hires" one (same shape)."""
    cfg = model.config()
    cfg.update(dec2_kernel=dec2_kernel, frac_branch_layout=frac_branch_layout)
    new = TriageNet(**cfg)
    old = model.state_dict()
    if frac_branch_layout != model.frac_branch_layout:
        old = {k: v for k, v in old.items() if not k.startswith("frac_branch.1.")}
    state = new.state_dict()
    for k, v in old.items():
        if k not in state:
            continue
        if state[k].shape == v.shape:
            state[k] = v
        elif v.dim() == 4 and state[k].shape[2:] == (1, 1):  # 3x3 -> 1x1: the centre tap
            state[k] = v[:, :, v.shape[2] // 2: v.shape[2] // 2 + 1, v.shape[3] // 2: v.shape[3] // 2 + 1]
        else:
            raise ValueError(f"{k}: {tuple(v.shape)} cannot start {tuple(state[k].shape)}")
    new.load_state_dict(state)
    return new


def add_frac_branch(model: "TriageNet", width: int) -> "TriageNet":
    """The same network with a new high-resolution fracture branch (fresh weights); every
    other weight is kept, and the fracture head keeps its decoder columns."""
    cfg = model.config()
    cfg["frac_hires"] = width
    new = TriageNet(**cfg)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("frac_")}
    missing, _ = new.load_state_dict(sd, strict=False)
    assert all(k.startswith("frac_") for k in missing), missing
    with torch.no_grad():
        c = model.frac_head.weight.shape[1]
        new.frac_head.weight.zero_()
        new.frac_head.weight[:, :c] = model.frac_head.weight
        new.frac_head.bias.copy_(model.frac_head.bias)
    return new


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
