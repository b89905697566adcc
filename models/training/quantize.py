"""fp32 ONNX -> int8 ONNX that tract runs in integer: onnxruntime `quantize_static` with
QuantFormat.QOperator and op_types_to_quantize=['Conv'] (QLinearConv only). GRU, attention,
softmax and the pooling stay float: tract emulates Q/DQ graphs in float and folds
DequantizeLinear->Softmax->QuantizeLinear into a lookup table (wrong attention), and it does
not implement ORT's com.microsoft QLinear* contrib ops.

Calibration uses whole training studies (never validation or test studies).

The first conv (3 input channels) and the two 1x1 output heads stay float (`--float-convs`),
the usual choice for accuracy, and here also for speed: in tract 0.23.9 (`infer --profile`,
74 slices) the int8 first conv took 57 ms where the float one takes 11 ms (its K=27 int8
matrix product and the quantization of the input), and the int8 seg head 15 ms (under 6 in
float). With the three in float, tract's model time fell from 0.19 to 0.15 s
(benches/infer_vs_ort.py, 2 threads) and the largest int8-vs-fp32 vertebra-logit error on
the calibration check from 2.15 to 0.55.

`--fuse-relu` also lists `Relu` in op_types_to_quantize: onnxruntime then gives each
Conv->Relu pair's QLinearConv the ReLU output's calibrated range (zero point 0, so uint8
saturation is the ReLU) and drops the Relu and the DequantizeLinear/QuantizeLinear around
it. The graph stays QLinearConv only (checked below); every Relu of this network follows a
Conv whose only consumer it is (also checked: onnxruntime would drop a Relu after a Conv
with other consumers without clamping anything).

  python3 quantize.py runs/fp32/model_fp32.onnx ../cspine_triage_int8.onnx \
      --data DATA_ROOT --cache CACHE --calib 16
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

from data import load_dataset


# Convs kept in float (ONNX node names of export.py's graph): the first conv and the 1x1
# heads (0.4.1: slower in tract as int8, and most of the conversion error), and since 0.6.1
# the four convs of the 16x16 and 8x8 encoder blocks: on 630 validation studies they carried
# most of what int8 lost (patient AUC 0.9955 -> 0.9963, mean vertebra AUC 0.9883 -> 0.9905,
# fp32 0.9973 / 0.9939), and tract runs them faster in float (MODEL_CARD.md, "int8").
FLOAT_CONVS = (
    "/enc1/enc1.0/Conv",
    "/enc3/a/a.0/Conv",
    "/enc3/b/b.0/Conv",
    "/enc4/a/a.0/Conv",
    "/enc4/b/b.0/Conv",
    "/seg_head/Conv",
    "/frac_head/Conv",
)


class StudyReader(CalibrationDataReader):
    def __init__(self, studies):
        self.it = iter([{"slices": st.slices()} for st in studies])

    def get_next(self):
        return next(self.it, None)


def restore_shapes(path, fp32_path) -> None:
    """The quantizer stores shapes from its own symbolic shape inference, with invented dim
    names (e.g. 'Softmaxattention_dim_0' where the graph has 7, also on the `attention`
    output) that contradict tract's analysis. Intermediate shapes are optional in ONNX: drop
    them, and give the outputs back the fp32 graph's declared shapes."""
    m = onnx.load(str(path))
    ref = {o.name: o for o in onnx.load(str(fp32_path)).graph.output}
    del m.graph.value_info[:]
    for o in m.graph.output:
        o.type.CopyFrom(ref[o.name].type)
    onnx.save(m, str(path))


def check_relu_fusable(fp32: str) -> None:
    """onnxruntime (QLinearActivation) removes a Relu whose input is quantized, but moves the
    Relu's range onto the Conv output only when that output has no other consumer: a Conv
    output read by the Relu and by something else would lose its ReLU."""
    g = onnx.load(fp32).graph
    producer = {o: n for n in g.node for o in n.output}
    consumers = collections.Counter(i for n in g.node for i in n.input)
    for n in g.node:
        if n.op_type == "Relu":
            src = producer.get(n.input[0])
            if src is not None and src.op_type == "Conv" and consumers[n.input[0]] != 1:
                raise SystemExit(f"--fuse-relu: {src.name}'s output feeds {n.name} and other nodes")


def check_tract_safe(path) -> None:
    """No node outside the default ONNX domain (tract has no com.microsoft ops), and no
    QuantizeLinear/DequantizeLinear next to a Softmax (tract would fold the three into a
    lookup table)."""
    g = onnx.load(str(path)).graph
    producer = {o: n for n in g.node for o in n.output}
    consumers = collections.defaultdict(list)
    for n in g.node:
        for i in n.input:
            consumers[i].append(n)
    foreign = sorted({f"{n.domain}.{n.op_type}" for n in g.node if n.domain not in ("", "ai.onnx")})
    if foreign:
        raise SystemExit(f"int8 graph has ops outside the ONNX domain: {foreign}")
    for n in g.node:
        if n.op_type == "Softmax":
            near = [producer[i].op_type for i in n.input if i in producer]
            near += [c.op_type for c in consumers[n.output[0]]]
            if {"QuantizeLinear", "DequantizeLinear"} & set(near):
                raise SystemExit(f"int8 graph quantizes around {n.name}: {near}")


def op_histogram(path) -> dict:
    return dict(collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node))


def compare(fp32: str, int8: str, studies) -> dict:
    """onnxruntime int8 vs onnxruntime fp32 on whole studies."""
    a = ort.InferenceSession(fp32, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(int8, providers=["CPUExecutionProvider"])
    worst = collections.defaultdict(float)
    for st in studies:
        x = st.slices()
        for meta, ya, yb in zip(a.get_outputs(), a.run(None, {"slices": x}), b.run(None, {"slices": x})):
            worst[meta.name] = max(worst[meta.name], float(np.abs(ya - yb).max()))
    return dict(worst)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("fp32")
    ap.add_argument("int8")
    ap.add_argument("--data", type=Path, required=True, help="RSNA-layout root of TRAINING studies")
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--calib", type=int, default=16, help="number of calibration studies")
    ap.add_argument("--per-channel", action="store_true")
    ap.add_argument("--float-convs", default=",".join(FLOAT_CONVS),
                    help="comma-separated Conv node names kept in float ('' quantizes every Conv)")
    ap.add_argument("--fuse-relu", action="store_true",
                    help="fold each Conv's ReLU into its QLinearConv (Relu in op_types_to_quantize)")
    args = ap.parse_args()
    if args.fuse_relu:
        check_relu_fusable(args.fp32)
    studies = load_dataset(args.data, args.cache / args.data.name)[: args.calib]
    quantize_static(
        args.fp32,
        args.int8,
        StudyReader(studies),
        quant_format=QuantFormat.QOperator,
        op_types_to_quantize=["Conv", "Relu"] if args.fuse_relu else ["Conv"],
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=args.per_channel,
        nodes_to_exclude=[n for n in args.float_convs.split(",") if n],
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
    )
    restore_shapes(args.int8, args.fp32)
    hist = op_histogram(args.int8)
    print("int8 graph ops:", hist)
    bad = [op for op in hist if op.startswith("QLinear") and op != "QLinearConv"] + [
        op for op in hist if op in ("QGemm", "QAttention", "DynamicQuantizeLinear")
    ]
    if bad:
        raise SystemExit(f"int8 graph has ops tract does not run: {bad}")
    check_tract_safe(args.int8)
    print("max |int8 - fp32| (onnxruntime, calibration studies):", compare(args.fp32, args.int8, studies[:4]))


if __name__ == "__main__":
    main()
