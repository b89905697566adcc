//! The committed model, run by tract exactly as the daemon runs it.
//!
//! 1. `tract_matches_onnxruntime`: the committed ONNX on the committed fixture input
//!    (`models/fixtures/`, made by `models/training/make_fixtures.py`) must reproduce the
//!    committed onnxruntime outputs within `models/fixtures/tolerances.json`.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use tract_onnx::prelude::*;

fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models")
}

/// Minimal `.npy` reader: little-endian float32, C order (what make_fixtures.py writes).
fn read_npy_f32(path: &Path) -> Result<(Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    ensure!(bytes.starts_with(b"\x93NUMPY"), "{} is not a .npy file", path.display());
    let (header_len, header_start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => (u32::from_le_bytes(bytes[8..12].try_into()?) as usize, 12),
        v => bail!("unsupported .npy version {v} in {}", path.display()),
    };
    let header = std::str::from_utf8(&bytes[header_start..header_start + header_len])?;
    ensure!(header.contains("'descr': '<f4'"), "{}: expected float32, header {header}", path.display());
    ensure!(header.contains("'fortran_order': False"), "{}: expected C order", path.display());
    let shape_src = header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .context("no shape in .npy header")?;
    let shape: Vec<usize> = shape_src
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>())
        .collect::<Result<_, _>>()?;
    let data: Vec<f32> = bytes[header_start + header_len..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    ensure!(data.len() == shape.iter().product::<usize>(), "{}: size does not match shape", path.display());
    Ok((shape, data))
}

fn load_model(onnx: &Path) -> Result<Arc<TypedRunnableModel>> {
    tract_onnx::onnx()
        .model_for_path(onnx)
        .with_context(|| format!("loading {}", onnx.display()))?
        .into_optimized()?
        .into_runnable()
}

fn run(model: &Arc<TypedRunnableModel>, shape: &[usize], data: Vec<f32>) -> Result<TVec<TValue>> {
    let input = Tensor::from_shape(shape, &data)?;
    model.run(tvec!(input.into()))
}

#[test]
fn tract_matches_onnxruntime() -> Result<()> {
    let dir = models_dir();
    let contract: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("model.json"))?)?;
    let onnx = dir.join(contract["onnx"].as_str().context("model.json: onnx")?);
    let fixtures = dir.join("fixtures");
    let tol: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("tolerances.json"))?)?;

    let model = load_model(&onnx)?;
    let (shape, data) = read_npy_f32(&fixtures.join("input.npy"))?;
    let outputs = run(&model, &shape, data)?;

    let names = ["seg_logits", "vertebra_logits", "patient_logit", "attention"];
    ensure!(outputs.len() == names.len(), "model has {} outputs, expected {}", outputs.len(), names.len());
    for (name, got) in names.iter().zip(outputs.iter()) {
        let (want_shape, want) = read_npy_f32(&fixtures.join(format!("{name}.npy")))?;
        ensure!(got.shape() == want_shape.as_slice(), "{name}: shape {:?} vs ORT {:?}", got.shape(), want_shape);
        let got: Vec<f32> = got.to_plain_array_view::<f32>()?.iter().copied().collect();
        let max_abs = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let diff2: f64 = got.iter().zip(&want).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
        let norm2: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
        let rel_l2 = (diff2 / norm2.max(1e-30)).sqrt();
        let t = &tol["tolerances"][name];
        let (tol_abs, tol_rel) = (t["max_abs"].as_f64().unwrap(), t["rel_l2"].as_f64().unwrap());
        eprintln!("{name}: max_abs {max_abs:.3e} (tol {tol_abs:.0e}), rel_l2 {rel_l2:.3e} (tol {tol_rel:.0e})");
        ensure!((max_abs as f64) <= tol_abs, "{name}: max abs diff {max_abs} > {tol_abs}");
        ensure!(rel_l2 <= tol_rel, "{name}: relative L2 {rel_l2} > {tol_rel}");
    }
    Ok(())
}
