//! The committed model, run by tract exactly as the daemon runs it.
//!
//! 1. `tract_matches_onnxruntime`: the committed ONNX on the committed fixture input
//!    (`models/fixtures/`, made by `models/training/make_fixtures.py`) must reproduce the
//!    committed onnxruntime outputs within `models/fixtures/tolerances.json`.
//! 2. `heldout_patient_auc_matches_model_card`: a small held-out set made by
//!    `cspine-triage synth` (seed never used in training), preprocessed as
//!    docs/model-contract.md says and run through tract; its patient AUC must be within
//!    2.5 standard errors (Hanley-McNeil, from the set's class counts) of the card's
//!    (`models/metrics.json`).
//! 3. `preprocessing_matches_python_reference`: the fixture input was made by
//!    `models/training/preprocess.py` from study 0 of `synth --seed 3000 --matrix 256`; the
//!    same study regenerated and preprocessed here must give the same numbers.
//! 4. `tract_latency` (ignored: timing, not a check): prints tract latency per study.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use tract_onnx::prelude::*;

fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models")
}

/// Minimal `.npy` reader: little-endian float32, C order (what make_fixtures.py writes).
fn read_npy_f32(path: &Path) -> Result<(Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    ensure!(
        bytes.starts_with(b"\x93NUMPY"),
        "{} is not a .npy file",
        path.display()
    );
    let (header_len, header_start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => (u32::from_le_bytes(bytes[8..12].try_into()?) as usize, 12),
        v => bail!("unsupported .npy version {v} in {}", path.display()),
    };
    let header = std::str::from_utf8(&bytes[header_start..header_start + header_len])?;
    ensure!(
        header.contains("'descr': '<f4'"),
        "{}: expected float32, header {header}",
        path.display()
    );
    ensure!(
        header.contains("'fortran_order': False"),
        "{}: expected C order",
        path.display()
    );
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
    ensure!(
        data.len() == shape.iter().product::<usize>(),
        "{}: size does not match shape",
        path.display()
    );
    Ok((shape, data))
}

fn load_model(onnx: &Path) -> Result<Arc<TypedRunnableModel>> {
    // As `Engine::load` does: tract 0.23.9's AMX int8 kernel crashes (SIGSEGV) off the
    // process's main thread, and test functions run on worker threads.
    static AVOID_AMX_INT8: std::sync::Once = std::sync::Once::new();
    AVOID_AMX_INT8.call_once(cspine_triage::inference::engine::avoid_amx_int8);
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
    let contract: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("model.json"))?)?;
    let onnx = dir.join(contract["onnx"].as_str().context("model.json: onnx")?);
    let fixtures = dir.join("fixtures");
    let tol: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("tolerances.json"))?)?;

    let model = load_model(&onnx)?;
    let (shape, data) = read_npy_f32(&fixtures.join("input.npy"))?;
    let outputs = run(&model, &shape, data)?;

    let names = [
        "seg_logits",
        "vertebra_logits",
        "patient_logit",
        "attention",
    ];
    ensure!(
        outputs.len() == names.len(),
        "model has {} outputs, expected {}",
        outputs.len(),
        names.len()
    );
    for (name, got) in names.iter().zip(outputs.iter()) {
        let (want_shape, want) = read_npy_f32(&fixtures.join(format!("{name}.npy")))?;
        ensure!(
            got.shape() == want_shape.as_slice(),
            "{name}: shape {:?} vs ORT {:?}",
            got.shape(),
            want_shape
        );
        let got: Vec<f32> = got.to_plain_array_view::<f32>()?.iter().copied().collect();
        let max_abs = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let diff2: f64 = got
            .iter()
            .zip(&want)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum();
        let norm2: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
        let rel_l2 = (diff2 / norm2.max(1e-30)).sqrt();
        let t = &tol["tolerances"][name];
        let (tol_abs, tol_rel) = (
            t["max_abs"].as_f64().unwrap(),
            t["rel_l2"].as_f64().unwrap(),
        );
        eprintln!("{name}: max_abs {max_abs:.3e} (tol {tol_abs:.0e}), rel_l2 {rel_l2:.3e} (tol {tol_rel:.0e})");
        ensure!(
            (max_abs as f64) <= tol_abs,
            "{name}: max abs diff {max_abs} > {tol_abs}"
        );
        ensure!(
            rel_l2 <= tol_rel,
            "{name}: relative L2 {rel_l2} > {tol_rel}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Test-local preprocessing, exactly docs/model-contract.md and models/training/preprocess.py.
// (Replace with the daemon's `inference::preprocess` once it exists.)

struct Volume {
    hu: Vec<f32>, // [k][row][col], slices ascending along the normal
    dims: [usize; 3],
    positions: Vec<[f64; 3]>,
    row_cos: [f64; 3],
    col_cos: [f64; 3],
    spacing: [f64; 2], // PixelSpacing: row spacing, column spacing
}

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

fn load_series(dir: &Path) -> Result<Volume> {
    use dicom_dictionary_std::tags;
    use dicom_pixeldata::PixelDecoder;
    let mut slices = Vec::new();
    let mut geometry = None;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let obj = dicom_object::open_file(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let ipp = obj
            .element(tags::IMAGE_POSITION_PATIENT)?
            .to_multi_float64()?;
        if geometry.is_none() {
            let iop = obj
                .element(tags::IMAGE_ORIENTATION_PATIENT)?
                .to_multi_float64()?;
            let ps = obj.element(tags::PIXEL_SPACING)?.to_multi_float64()?;
            let rows: usize = obj.element(tags::ROWS)?.to_int()?;
            let cols: usize = obj.element(tags::COLUMNS)?.to_int()?;
            geometry = Some((
                [iop[0], iop[1], iop[2]],
                [iop[3], iop[4], iop[5]],
                [ps[0], ps[1]],
                rows,
                cols,
            ));
        }
        let hu: Vec<f32> = obj.decode_pixel_data()?.to_vec()?; // modality LUT applied: HU
        slices.push(([ipp[0], ipp[1], ipp[2]], hu));
    }
    let (row_cos, col_cos, spacing, rows, cols) = geometry.context("no DICOM files")?;
    let n = cross(row_cos, col_cos);
    slices.sort_by(|a, b| dot(a.0, n).total_cmp(&dot(b.0, n)));
    let mut hu = Vec::with_capacity(slices.len() * rows * cols);
    for (_, s) in &slices {
        ensure!(
            s.len() == rows * cols,
            "slice size differs within the series"
        );
        hu.extend_from_slice(s);
    }
    Ok(Volume {
        dims: [slices.len(), rows, cols],
        positions: slices.iter().map(|s| s.0).collect(),
        hu,
        row_cos,
        col_cos,
        spacing,
    })
}

/// The model input `[S, 3, 128, 128]` as the contract defines it.
fn preprocess(v: &Volume, contract: &serde_json::Value) -> Result<(usize, Vec<f32>)> {
    let inp = &contract["input"];
    let f = |p: &str| {
        inp.pointer(p)
            .and_then(|x| x.as_f64())
            .with_context(|| format!("model.json input{p}"))
    };
    let (dz, dr, dc) = (
        f("/spacing_mm/slice")?,
        f("/spacing_mm/row")?,
        f("/spacing_mm/column")?,
    );
    let (center, width, pad) = (f("/window/center")?, f("/window/width")?, f("/pad_hu")?);
    let max_slices = f("/max_slices")? as usize;
    let (h, w) = (f("/height")? as usize, f("/width")? as usize);
    let [_, rn, cn] = v.dims;
    let n = cross(v.row_cos, v.col_cos);
    // Slice centres; (cx, cy) from the first slice.
    let centre = |p: [f64; 3]| -> [f64; 3] {
        let (a, b) = (
            (cn - 1) as f64 / 2.0 * v.spacing[1],
            (rn - 1) as f64 / 2.0 * v.spacing[0],
        );
        [0, 1, 2].map(|i| p[i] + v.row_cos[i] * a + v.col_cos[i] * b)
    };
    let zs: Vec<f64> = v.positions.iter().map(|p| centre(*p)[2]).collect();
    let (mut zmin, zmax) = zs
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), z| (a.min(*z), b.max(*z)));
    let mut s = ((zmax - zmin) / dz).floor() as usize + 1;
    if s > max_slices {
        s = max_slices;
        zmin = zmax - (s - 1) as f64 * dz;
    }
    let c0 = centre(v.positions[0]);
    let ds: Vec<f64> = v.positions.iter().map(|p| dot(*p, n)).collect();
    let lo = center - width / 2.0;
    let mut win = vec![0f32; s * h * w];
    for k in 0..s {
        let z = zmin + k as f64 * dz;
        for i in 0..h {
            for j in 0..w {
                let p = [
                    c0[0] + (j as f64 - (w as f64 - 1.0) / 2.0) * dc,
                    c0[1] + (i as f64 - (h as f64 - 1.0) / 2.0) * dr,
                    z,
                ];
                let u = [
                    p[0] - v.positions[0][0],
                    p[1] - v.positions[0][1],
                    p[2] - v.positions[0][2],
                ];
                let (sj, si, d) = (
                    dot(u, v.row_cos) / v.spacing[1],
                    dot(u, v.col_cos) / v.spacing[0],
                    dot(p, n),
                );
                let hu = sample(v, &ds, d, si, sj).unwrap_or(pad);
                win[(k * h + i) * w + j] = ((hu - lo) / width).clamp(0.0, 1.0) as f32;
            }
        }
    }
    let plane = h * w;
    let mut x = vec![0f32; s * 3 * plane];
    for k in 0..s {
        for (c, src) in [k.saturating_sub(1), k, (k + 1).min(s - 1)]
            .into_iter()
            .enumerate()
        {
            x[(k * 3 + c) * plane..(k * 3 + c + 1) * plane]
                .copy_from_slice(&win[src * plane..(src + 1) * plane]);
        }
    }
    Ok((s, x))
}

/// Trilinear HU at continuous index (slice from position `d` along the normal, row `si`,
/// column `sj`); `None` beyond the outermost voxel centres.
fn sample(v: &Volume, ds: &[f64], d: f64, si: f64, sj: f64) -> Option<f64> {
    let [kn, rn, cn] = v.dims;
    const EPS: f64 = 1e-6;
    if d < ds[0] - EPS
        || d > ds[kn - 1] + EPS
        || si < 0.0
        || si > (rn - 1) as f64
        || sj < 0.0
        || sj > (cn - 1) as f64
    {
        return None;
    }
    // piecewise-linear inverse of the slice positions (np.interp)
    let sk = if kn == 1 || d <= ds[0] {
        0.0
    } else if d >= ds[kn - 1] {
        (kn - 1) as f64
    } else {
        let b = ds.partition_point(|x| *x <= d).min(kn - 1);
        let a = b - 1;
        a as f64 + (d - ds[a]) / (ds[b] - ds[a])
    };
    let split = |t: f64, n: usize| -> (usize, f64) {
        if n == 1 {
            return (0, 0.0);
        }
        let t0 = (t.floor().max(0.0) as usize).min(n - 2);
        (t0, t - t0 as f64)
    };
    let ((k0, fk), (i0, fi), (j0, fj)) = (split(sk, kn), split(si, rn), split(sj, cn));
    let (k1, i1, j1) = (
        (k0 + 1).min(kn - 1),
        (i0 + 1).min(rn - 1),
        (j0 + 1).min(cn - 1),
    );
    let at = |k: usize, i: usize, j: usize| v.hu[(k * rn + i) * cn + j] as f64;
    let lerp = |a: f64, b: f64, t: f64| a * (1.0 - t) + b * t;
    let c0 = lerp(
        lerp(at(k0, i0, j0), at(k0, i0, j1), fj),
        lerp(at(k0, i1, j0), at(k0, i1, j1), fj),
        fi,
    );
    let c1 = lerp(
        lerp(at(k1, i0, j0), at(k1, i0, j1), fj),
        lerp(at(k1, i1, j0), at(k1, i1, j1), fj),
        fi,
    );
    Some(lerp(c0, c1, fk))
}

/// ROC AUC by pair counting (ties count one half).
fn auc(labels: &[bool], scores: &[f64]) -> f64 {
    let (mut num, mut den) = (0.0, 0.0);
    for (a, la) in scores.iter().zip(labels) {
        for (b, lb) in scores.iter().zip(labels) {
            if *la && !*lb {
                den += 1.0;
                num += if a > b {
                    1.0
                } else if a == b {
                    0.5
                } else {
                    0.0
                };
            }
        }
    }
    num / den
}

/// Seed of the test's held-out set: never used by the training recipe (models/training/README.md).
const HELDOUT_SEED: u64 = 4242;
const HELDOUT_COUNT: usize = 16;

/// Standard error of an AUC estimated from `npos` positives and `nneg` negatives
/// (Hanley & McNeil 1982). The tolerance is 2.5 of these around the card's AUC: a small
/// held-out set cannot pin the AUC down more tightly than its own sampling noise.
fn auc_standard_error(a: f64, npos: f64, nneg: f64) -> f64 {
    let q1 = a / (2.0 - a);
    let q2 = 2.0 * a * a / (1.0 + a);
    ((a * (1.0 - a) + (npos - 1.0) * (q1 - a * a) + (nneg - 1.0) * (q2 - a * a)) / (npos * nneg))
        .sqrt()
}

#[test]
fn heldout_patient_auc_matches_model_card() -> Result<()> {
    let dir = models_dir();
    let contract: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("model.json"))?)?;
    let metrics: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("metrics.json"))
            .context("models/metrics.json (the model card's numbers)")?,
    )?;
    let card_auc = metrics["int8"]["patient_auc"]
        .as_f64()
        .context("metrics.json: int8.patient_auc")?;
    let model = load_model(&dir.join(contract["onnx"].as_str().context("model.json: onnx")?))?;

    let out = tempfile::tempdir()?;
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_cspine-triage"))
        .arg("synth")
        .arg(out.path())
        .args([
            "--count",
            &HELDOUT_COUNT.to_string(),
            "--seed",
            &HELDOUT_SEED.to_string(),
        ])
        .args(["--matrix", "256"]) // faster to generate and read; the model sees 1.25 mm anyway
        .status()
        .context("running cspine-triage synth")?;
    ensure!(status.success(), "cspine-triage synth failed: {status}");

    let csv = std::fs::read_to_string(out.path().join("train.csv"))?;
    let mut header = csv.lines().next().context("empty train.csv")?.split(',');
    let col = header
        .position(|h| h == "patient_overall")
        .context("train.csv: no patient_overall")?;
    let (mut labels, mut scores) = (Vec::new(), Vec::new());
    for line in csv.lines().skip(1) {
        let fields: Vec<&str> = line.split(',').collect();
        let vol = load_series(&out.path().join("train_images").join(fields[0]))?;
        let (s, x) = preprocess(&vol, &contract)?;
        let outputs = run(&model, &[s, 3, 128, 128], x)?;
        let logit = outputs[2]
            .to_plain_array_view::<f32>()?
            .iter()
            .next()
            .copied()
            .context("patient_logit")?;
        labels.push(fields[col].trim() == "1");
        scores.push(1.0 / (1.0 + (-(logit as f64)).exp()));
    }
    let npos = labels.iter().filter(|l| **l).count() as f64;
    let nneg = labels.len() as f64 - npos;
    ensure!(npos > 0.0 && nneg > 0.0, "held-out set needs both classes");
    let got = auc(&labels, &scores);
    let tol = (2.5 * auc_standard_error(card_auc, npos, nneg)).max(0.02);
    eprintln!("held-out patient AUC {got:.4} on {npos} positive / {nneg} negative studies (model card {card_auc:.4}, tolerance {tol:.3})");
    ensure!(
        (got - card_auc).abs() <= tol,
        "patient AUC {got:.4} is not within {tol:.3} of the model card's {card_auc:.4}"
    );
    Ok(())
}

#[test]
fn preprocessing_matches_python_reference() -> Result<()> {
    let dir = models_dir();
    let contract: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("model.json"))?)?;
    let out = tempfile::tempdir()?;
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_cspine-triage"))
        .arg("synth")
        .arg(out.path())
        .args(["--count", "1", "--seed", "3000", "--matrix", "256"])
        .status()
        .context("running cspine-triage synth")?;
    ensure!(status.success(), "cspine-triage synth failed: {status}");
    let csv = std::fs::read_to_string(out.path().join("train.csv"))?;
    let uid = csv
        .lines()
        .nth(1)
        .and_then(|l| l.split(',').next())
        .context("train.csv")?;
    let vol = load_series(&out.path().join("train_images").join(uid))?;
    let (s, x) = preprocess(&vol, &contract)?;
    let (shape, want) = read_npy_f32(&dir.join("fixtures").join("input.npy"))?;
    // make_fixtures.py keeps the `n` middle model slices: start = (S - n) / 2.
    let n = shape[0];
    ensure!(s >= n, "study has {s} model slices, fixture {n}");
    let plane = 3 * 128 * 128;
    let start = (s - n) / 2;
    let got = &x[start * plane..(start + n) * plane];
    let max_abs = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!("preprocessing vs preprocess.py: S={s}, max |diff| {max_abs:.2e} over {n} slices");
    // Both interpolate in f64 and round once to f32: differences are float rounding only.
    ensure!(
        max_abs <= 1e-5,
        "preprocessing differs from preprocess.py by {max_abs}"
    );
    Ok(())
}

/// `cargo test --test model -- --ignored --nocapture tract_latency`
/// Optional: CSPINE_ONNX=a.onnx,b.onnx CSPINE_SLICES=64.
#[test]
#[ignore = "timing, not a check: run by hand for the model card"]
fn tract_latency() -> Result<()> {
    let files: Vec<PathBuf> = match std::env::var("CSPINE_ONNX") {
        Ok(list) => list.split(',').map(PathBuf::from).collect(),
        Err(_) => vec![models_dir().join("cspine_triage_int8.onnx")],
    };
    let s: usize = std::env::var("CSPINE_SLICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    // One thread: the crate does not enable tract-linalg's `multithread-mm` feature.
    for f in &files {
        let model = load_model(f)?;
        let x: Vec<f32> = (0..s * 3 * 128 * 128)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0)
            .collect();
        run(&model, &[s, 3, 128, 128], x.clone())?; // warm-up
        let mut times = Vec::new();
        for _ in 0..5 {
            let t = std::time::Instant::now();
            run(&model, &[s, 3, 128, 128], x.clone())?;
            times.push(t.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        eprintln!(
            "{}: 1 thread, S={s}: median {:.1} ms, min {:.1} ms",
            f.display(),
            times[2] * 1e3,
            times[0] * 1e3
        );
    }
    Ok(())
}
