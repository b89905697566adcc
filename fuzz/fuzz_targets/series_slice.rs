//! One spooled instance, as the series stage handles it. The file is laid out as the
//! spool writes it (preamble, our file meta group naming the negotiated transfer syntax,
//! then the peer's data set), and only what the spool admits goes on: its declared-length
//! check (`dicom::lengths::check_file`, run by `Spool::commit` before C-STORE Success;
//! without it every other input is dicom-parser's known allocate-the-declared-length case,
//! docs/RELIABILITY.md). Then `InstanceHeader::read` (what the assembler runs on every
//! instance that arrives) and `series::build_volume`, which plans the one-slice series and
//! decodes its pixel data through dicom-pixeldata (native, deflate, RLE, JPEG through
//! jpeg-decoder, JPEG-LS through CharLS, JPEG 2000 through openjp2) into the HU volume.
//! Only the series selection in between (modality, SOP class, image type) is left out, so
//! that the decoders see every input whatever its header says.
//!
//! Input: first byte picks the transfer syntax the presentation context was accepted
//! with (`ACCEPTED_TRANSFER_SYNTAXES`, modulo its length); the rest is the data set.
//!
//! With `CSPINE_FUZZ_SHOW=1` every input prints how far it got (`-runs=0` over a corpus,
//! piped through `sort | uniq -c`, tallies that).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use cspine_triage::dicom::lengths;
use cspine_triage::dicom::syntax::{ACCEPTED_TRANSFER_SYNTAXES, CT_IMAGE_STORAGE};
use cspine_triage::series::{build_volume, InstanceHeader, SeriesMeta};
use dicom_object::meta::FileMetaTableBuilder;
use libfuzzer_sys::fuzz_target;

struct Env {
    path: PathBuf,
    /// Preamble, "DICM" and file meta group, per accepted transfer syntax.
    heads: Vec<Vec<u8>>,
    show: bool,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        // libfuzzer-sys's panic hook aborts on any panic, even one the daemon catches
        // (volume building turns a decoder's panic into a failed slice); the default hook
        // lets those unwind. A panic nobody catches still aborts: libfuzzer-sys aborts
        // when one unwinds out of the target.
        drop(std::panic::take_hook());
        Env {
            // One file per process, rewritten for every input (TMPDIR=/dev/shm keeps it in memory).
            path: std::env::temp_dir()
                .join(format!("cspine-fuzz-slice-{}.dcm", std::process::id())),
            heads: ACCEPTED_TRANSFER_SYNTAXES
                .iter()
                .map(|(ts, _)| {
                    let meta = FileMetaTableBuilder::new()
                        .transfer_syntax(*ts)
                        .media_storage_sop_class_uid(CT_IMAGE_STORAGE)
                        .media_storage_sop_instance_uid("1.2.826.0.1.3680043.8.498.1")
                        .implementation_class_uid("1.2.826.0.1.3680043.8.498.2")
                        .build()
                        .expect("file meta group");
                    let mut head = vec![0u8; 128];
                    head.extend_from_slice(b"DICM");
                    meta.write(&mut head).expect("file meta group in memory");
                    head
                })
                .collect(),
            show: std::env::var_os("CSPINE_FUZZ_SHOW").is_some(),
        }
    })
}

fuzz_target!(|input: &[u8]| {
    let Some((&selector, data_set)) = input.split_first() else {
        return;
    };
    let env = env();
    let which = selector as usize % ACCEPTED_TRANSFER_SYNTAXES.len();
    let head = &env.heads[which];
    std::fs::write(&env.path, [head.as_slice(), data_set].concat())
        .expect("cannot write the fuzz input file");
    // Errors are the expected outcome for most inputs (a refused instance, a failed
    // series, an instance the assembler skips); only a panic, an abort, an allocation past
    // -malloc_limit_mb, a leak past -rss_limit_mb or a timeout is a finding.
    let ts = ACCEPTED_TRANSFER_SYNTAXES[which].0;
    let outcome = if lengths::check_file(&env.path, head.len() as u64, ts).is_err() {
        "refused by the spool's length check"
    } else {
        match InstanceHeader::read(&env.path) {
            Err(_) => "header unreadable",
            Ok(header) => match build_volume(vec![header], SeriesMeta::default()) {
                Ok(_) => "volume built",
                Err(e) => {
                    let why = format!("{e:#}");
                    if why.contains("has no valid") || why.contains("invalid ImageOrientation") {
                        "plan refused (geometry)"
                    } else if why.contains("cannot decode slice") {
                        "decode refused"
                    } else {
                        "plan refused (other)"
                    }
                }
            },
        }
    };
    if env.show {
        eprintln!("cspine-fuzz outcome: {outcome}");
    }
});
