//! Synthetic cervical-spine CT phantoms with exact ground truth, written as real
//! DICOM CT series. One implementation serves training, tests and the demo.

use std::path::PathBuf;

use anyhow::Result;

/// `cspine-triage synth` arguments.
#[derive(Debug, clap::Args)]
pub struct SynthArgs {
    /// Output directory; each study goes into its own subdirectory.
    pub out_dir: PathBuf,
    /// Number of studies.
    #[arg(long, default_value_t = 1)]
    pub count: usize,
    /// Random seed; the same seed gives the same studies.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// C1..C7, none, or random.
    #[arg(long, default_value = "random")]
    pub fracture: String,
}

pub fn run(_args: &SynthArgs) -> Result<()> {
    anyhow::bail!("synth is not implemented yet")
}
