//! Volume building on a folder of DICOM files: wall time and peak resident memory.
//!
//! usage: series_volume DIR   (run by benches/series_rss.sh, which also runs the peer)
//!
//! Prints one `key=value` line: slices, rows, columns, int16 volume size, the process's
//! peak RSS (VmHWM) before and after building, and the build time.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use cspine_triage::series::{load_series_from_paths, SeriesOutcome};

fn vm_hwm_kib() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM in /proc/self/status")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("malformed VmHWM")?
        .parse()?)
}

fn main() -> Result<()> {
    let dir = std::env::args()
        .nth(1)
        .context("usage: series_volume DIR")?;
    let before = vm_hwm_kib()?;
    let start = Instant::now();
    let outcomes = load_series_from_paths(&[dir])?;
    let secs = start.elapsed().as_secs_f64();
    let after = vm_hwm_kib()?;
    let [n, rows, cols] = match outcomes.as_slice() {
        [SeriesOutcome::Volume(v)] => v.dims,
        [SeriesOutcome::Failed { reason, .. }] => bail!("series failed: {reason}"),
        other => bail!("expected one series, got {}", other.len()),
    };
    let volume_mib = (n * rows * cols * 2) as f64 / (1 << 20) as f64;
    println!(
        "slices={n} rows={rows} columns={cols} int16_mib={volume_mib:.1} \
         peak_rss_before_mib={:.1} peak_rss_mib={:.1} ratio_to_int16={:.2} build_s={secs:.2}",
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        after as f64 / 1024.0 / volume_mib
    );
    Ok(())
}
