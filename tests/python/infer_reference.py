"""Python reference for the inference parity test: pydicom + numpy preprocessing
(`models/training/preprocess.py`) + onnxruntime on the committed ONNX.

    python3 infer_reference.py SERIES_DIR OUT_DIR

Writes OUT_DIR/input.npy ([S,3,128,128] float32), one .npy per model output and
OUT_DIR/reference.json (S, model slice z, onnxruntime version).
"""

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "models" / "training"))

import preprocess  # noqa: E402


def main():
    series_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    import onnxruntime as ort

    vol = preprocess.load_dicom_series(series_dir)
    grid = preprocess.target_grid(vol)
    x = preprocess.preprocess(vol)
    np.save(out / "input.npy", x)
    contract = json.loads((ROOT / "models" / "model.json").read_text())
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(
        str(ROOT / "models" / contract["onnx"]), opts, providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in sess.get_outputs()]
    outs = sess.run(None, {sess.get_inputs()[0].name: x})
    for name, v in zip(names, outs):
        np.save(out / f"{name}.npy", np.asarray(v, dtype=np.float32))
    (out / "reference.json").write_text(
        json.dumps(
            {"slices": int(grid.s), "z_mm": grid.z().tolist(), "onnxruntime": ort.__version__}
        )
    )


if __name__ == "__main__":
    main()
