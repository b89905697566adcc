//! Upper-layer PDUs as the SCP decodes them: dicom-ul's `read_pdu` with the SCP's
//! maximum PDU length and strict mode (what `ServerAssociationOptions::establish_async`
//! and `AsyncServerAssociation::receive` call on the bytes buffered from the socket),
//! then the PDU description the SCP logs.
#![no_main]

use std::sync::OnceLock;

use cspine_triage::dicom::ScpConfig;
use libfuzzer_sys::fuzz_target;

fn max_pdu_length() -> u32 {
    static MAX: OnceLock<u32> = OnceLock::new();
    *MAX.get_or_init(|| ScpConfig::default().max_pdu_length)
}

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(pdu)) = dicom_ul::read_pdu(data, max_pdu_length(), true) {
        let _ = format!("{}", pdu.short_description());
        let _ = format!("{pdu:?}");
    }
});
