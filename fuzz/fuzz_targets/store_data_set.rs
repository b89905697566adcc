//! A received C-STORE data set, as the spool handles it before answering: the bytes are
//! written behind our file meta group into a temp file of a real spool
//! (`Spool::begin` + `Incoming::push`, as the SCP does), then
//! `Incoming::check_received` runs exactly what `Spool::commit` runs before anything is
//! made durable: flush, the declared-length check (`dicom::lengths::check_file`), the
//! dicom-object parse-back, the UID checks. Only the fsync and link are left out.
//!
//! Input: first byte picks the transfer syntax the presentation context was accepted
//! with (`ACCEPTED_TRANSFER_SYNTAXES`, modulo its length); the rest is the data set.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use cspine_triage::dicom::spool::{InstanceHeader, Spool};
use cspine_triage::dicom::syntax::{ACCEPTED_TRANSFER_SYNTAXES, CT_IMAGE_STORAGE};
use libfuzzer_sys::fuzz_target;

struct Env {
    spool: Spool,
    rt: tokio::runtime::Runtime,
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
    let mut incoming = env.spool.begin(header).expect("cannot create a temp file");
    env.rt.block_on(incoming.push(data_set));
    // Refusals (C000, A900) are the expected outcome for most inputs; only a panic,
    // an abort, a leak past -rss_limit_mb or a timeout is a finding.
    let _ = incoming.check_received();
    incoming.discard();
});
