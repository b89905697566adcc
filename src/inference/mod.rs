//! Inference: preprocessing as `models/model.json` specifies, the tract engine, and
//! postprocessing into a [`crate::alert::TriageResult`].

use std::path::PathBuf;

use anyhow::Result;
use serde::{Deserialize, Serialize};

/// `[inference]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InferenceConfig {
    /// The model contract; the ONNX file is found next to it.
    pub model: PathBuf,
    /// Threads for tract's kernels.
    pub threads: usize,
}

impl Default for InferenceConfig {
    fn default() -> Self {
        InferenceConfig {
            model: PathBuf::from("/usr/share/cspine-triage/model/model.json"),
            threads: 2,
        }
    }
}

impl InferenceConfig {
    pub fn validate(&self) -> Result<()> {
        Ok(())
    }
}

pub mod cli {
    //! `cspine-triage infer`.
    use std::path::PathBuf;

    use anyhow::Result;

    #[derive(Debug, clap::Args)]
    pub struct InferArgs {
        /// DICOM folders or files.
        #[arg(required = true)]
        pub paths: Vec<PathBuf>,
        /// Print results as JSON (one per series).
        #[arg(long)]
        pub json: bool,
    }

    pub fn run(_args: &InferArgs) -> Result<()> {
        anyhow::bail!("infer is not implemented yet")
    }
}
