"""Exports the UNTRAINED architecture (fixed seed) as a stand-in so the daemon can be built
against the contract before training finishes. Usage: python3 export_standin.py"""

from pathlib import Path

import torch

from contract import write_model_json
from model import TriageNet, export_onnx

MODELS = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    torch.manual_seed(0)
    onnx_path = MODELS / "cspine_triage_int8.onnx"
    export_onnx(TriageNet(), str(onnx_path))
    write_model_json(onnx_path, MODELS / "model.json", version="0.0.0-standin")
    print("wrote", onnx_path)
