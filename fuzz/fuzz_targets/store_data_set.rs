//! A received C-STORE data set, as the spool handles it before answering: the bytes are
//! collected behind our file meta group by a real spool (`Spool::begin` +
//! `Incoming::push`, as the SCP does: in memory up to 4 MiB, in a temp file beyond), then
//! `Incoming::check_received` runs exactly what `Spool::commit` runs before anything is
//! made durable: the declared-length check (`dicom::lengths::check_slice`, or
//! `check_file` for a spilled data set), the dicom-object parse-back, the UID
//! checks. Only the write, fsync and link are left out.
//!
//! Input: first byte picks the transfer syntax the presentation context was accepted
//! with (`ACCEPTED_TRANSFER_SYNTAXES`, modulo its length); the rest is the data set.
//!
//! With `CSPINE_FUZZ_SHOW=1` every input prints the status the SCP would answer
//! (`-runs=0` over a corpus, piped through `sort | uniq -c`, tallies how far inputs get).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use cspine_triage::dicom::spool::{InstanceHeader, Spool, StoreError};
use cspine_triage::dicom::syntax::{ACCEPTED_TRANSFER_SYNTAXES, CT_IMAGE_STORAGE};
use libfuzzer_sys::fuzz_target;

struct Env {
    spool: Spool,
    rt: tokio::runtime::Runtime,
    show: bool,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        // One spool per process under $TMPDIR (TMPDIR=/dev/shm keeps it in memory).
        // Every input is discarded after its check, so only empty directories remain.
        let root: PathBuf =
            std::env::temp_dir().join(format!("cspine-fuzz-spool-{}", std::process::id()));
        Env {
            spool: Spool::open(&root, "FUZZ", 0).expect("cannot open the fuzz spool"),
            rt: tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("tokio runtime"),
            show: std::env::var_os("CSPINE_FUZZ_SHOW").is_some(),
        }
    })
}

fuzz_target!(|input: &[u8]| {
    let Some((&selector, data_set)) = input.split_first() else {
        return;
    };
    let (ts, _) = ACCEPTED_TRANSFER_SYNTAXES[selector as usize % ACCEPTED_TRANSFER_SYNTAXES.len()];
    let env = env();
    let header = InstanceHeader {
        sop_class_uid: CT_IMAGE_STORAGE.to_string(),
        sop_instance_uid: "1.2.826.0.1.3680043.8.498.1".to_string(),
        transfer_syntax_uid: ts.to_string(),
        calling_ae: "FUZZ".to_string(),
        received_at: time::OffsetDateTime::UNIX_EPOCH,
    };
    let mut incoming = env.spool.begin(header).expect("cannot encode the file meta group");
    env.rt.block_on(incoming.push(data_set));
    // Refusals (C000, A900) are the expected outcome for most inputs; only a panic,
    // an abort, a leak past -rss_limit_mb or a timeout is a finding.
    let outcome = incoming.check_received();
    incoming.discard();
    if env.show {
        eprintln!(
            "cspine-fuzz outcome: {}",
            match &outcome {
                // Parsed back, and the UIDs happen to match the command's.
                Ok(()) => "accepted (parsed back, UIDs match)",
                // Parsed back completely; only the UID comparison refused it.
                Err(StoreError::Mismatch(_)) => "A900 (parsed back, UIDs differ)",
                Err(StoreError::CannotUnderstand(why)) if why.contains("but only") => {
                    "C000 (a declared length runs past the data)"
                }
                Err(StoreError::CannotUnderstand(_)) => "C000 (other parse error)",
                Err(StoreError::OutOfResources(_)) => "A700 (write failed)",
            }
        );
    }
});
