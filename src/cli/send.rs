//! `cspine-triage send ADDRESS PATH...`: C-STORE files to a Storage SCP, as a scanner would
//! (one association, every file; [`crate::dicom::scu`] does the work).

use std::path::PathBuf;

use anyhow::Result;

use crate::dicom::scu;

#[derive(Debug, clap::Args)]
pub struct SendArgs {
    /// SCP address, host:port.
    pub address: String,
    /// DICOM files or directories (walked recursively).
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Called AE title (the SCP's).
    #[arg(long, default_value = "CSPINE")]
    pub called_ae: String,
    /// Our (calling) AE title.
    #[arg(long, default_value = "CSPINE-SCU")]
    pub calling_ae: String,
}

/// Sends every file; fails when any was not stored (each named on stderr).
pub fn run(args: SendArgs) -> Result<()> {
    let files = scu::collect_files(&args.paths)?;
    let target = scu::StoreTarget {
        address: args.address,
        called_ae: args.called_ae,
        calling_ae: args.calling_ae,
    };
    let report = scu::send_files(&target, &files)?;
    for (path, reason) in &report.failed {
        eprintln!("not stored: {}: {reason}", path.display());
    }
    println!("{} of {} files stored", report.stored, files.len());
    anyhow::ensure!(
        report.failed.is_empty(),
        "{} files were not stored",
        report.failed.len()
    );
    Ok(())
}
