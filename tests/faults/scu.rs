//! The scanner: DCMTK `storescu` runs, their log read as they go ([`Scu`]), and what
//! each file was answered ([`ScuReport`]).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use crate::common::{dcmtk, Proc};
use crate::studies::Source;

/// One DCMTK `storescu` run (the scanner), its log read as it goes.
pub struct Scu {
    proc: Proc,
}

/// What storescu reported, file by file.
pub struct ScuReport {
    pub status: ExitStatus,
    /// Files answered Success, in order (an instance already in the spool is answered
    /// Success too).
    pub acked: Vec<PathBuf>,
    /// Files answered with another status, and the status as storescu prints it.
    pub refused: Vec<(PathBuf, String)>,
    pub log: String,
}

impl Scu {
    pub fn start(port: u16, files: &[&Path]) -> Scu {
        let mut cmd = Command::new(dcmtk("storescu"));
        cmd.args(["-v", "-aec", "CSPINE", "-aet", "CTSCANNER", "127.0.0.1"])
            .arg(port.to_string())
            .args(files);
        Scu {
            proc: Proc::spawn(cmd),
        }
    }

    /// Success responses so far.
    pub fn successes(&self) -> usize {
        self.proc
            .log()
            .matches("Received Store Response (Success)")
            .count()
    }

    pub fn exited(&mut self) -> bool {
        self.proc.child.try_wait().unwrap().is_some()
    }

    pub fn finish(mut self) -> ScuReport {
        let status = self
            .proc
            .wait_exit(Duration::from_secs(120))
            .unwrap_or_else(|| panic!("storescu hung:\n{}", self.proc.log()));
        let log = self.proc.log();
        let (mut acked, mut refused) = (Vec::new(), Vec::new());
        let mut current: Option<PathBuf> = None;
        for line in log.lines() {
            if let Some(file) = line.strip_prefix("I: Sending file: ") {
                current = Some(PathBuf::from(file));
            } else if let Some(rsp) = line.strip_prefix("I: Received Store Response (") {
                let file = current.take().expect("a response follows a file");
                match rsp.trim_end_matches(')') {
                    "Success" => acked.push(file),
                    other => refused.push((file, other.to_string())),
                }
            }
        }
        ScuReport {
            status,
            acked,
            refused,
            log,
        }
    }
}

/// Sends `files` and returns storescu's report.
pub fn store(port: u16, files: &[&Path]) -> ScuReport {
    Scu::start(port, files).finish()
}

pub fn paths<'a>(sources: impl IntoIterator<Item = &'a Source>) -> Vec<&'a Path> {
    sources.into_iter().map(|s| s.path.as_path()).collect()
}
