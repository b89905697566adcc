//! A DIMSE command set (all its P-DATA fragments concatenated) through the SCP's command
//! parser (`dimse::Command::parse`: length check, then dicom-object), and, when it
//! parses, the response the SCP would encode from the peer's values.
#![no_main]

use cspine_triage::dicom::dimse::{self, status, Command};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The SCP refuses to collect more than this (scp.rs); longer inputs never reach parse.
    if dimse::check_command_set_len(data.len()).is_err() {
        return;
    }
    if let Ok(rq) = Command::parse(data) {
        let rsp = dimse::response(&rq, status::CANNOT_UNDERSTAND, Some("fuzz \\ comment"));
        Command::parse(&rsp).expect("our own response must parse");
    }
});
