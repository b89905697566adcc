//! A minimal C-STORE SCU: sends DICOM files to a Storage SCP as they are, without
//! transcoding. The demo and the tools use it where DCMTK `storescu` is not installed.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use dicom_core::{dicom_value, DataElement, VR};
use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::{open_file, InMemDicomObject};
use dicom_transfer_syntax_registry::{entries::IMPLICIT_VR_LITTLE_ENDIAN, TransferSyntaxRegistry};
use dicom_ul::pdu::{PDataValue, PDataValueType, PresentationContextResultReason};
use dicom_ul::{ClientAssociationOptions, Pdu};

/// Where to send and as whom.
#[derive(Debug, Clone)]
pub struct StoreTarget {
    /// `host:port` of the SCP.
    pub address: String,
    pub called_ae: String,
    pub calling_ae: String,
}

/// Outcome of sending a set of files.
#[derive(Debug, Default)]
pub struct SendReport {
    pub stored: usize,
    /// (file, reason) for each file the SCP did not store.
    pub failed: Vec<(PathBuf, String)>,
}

/// Collects the DICOM files under `paths` (files, or directories walked recursively),
/// sorted by path.
pub fn collect_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        for entry in
            std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                walk(&path, out)?;
            } else {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            walk(p, &mut out)?;
        } else if p.exists() {
            out.push(p.clone());
        } else {
            bail!("{} does not exist", p.display());
        }
    }
    out.sort();
    Ok(out)
}

struct Outgoing {
    path: PathBuf,
    sop_class: String,
    sop_instance: String,
    transfer_syntax: String,
}

fn trim_uid(s: &str) -> String {
    s.trim_end_matches(['\0', ' ']).to_string()
}

/// Sends every file on one association, proposing each file's own transfer syntax.
pub fn send_files(target: &StoreTarget, files: &[PathBuf]) -> Result<SendReport> {
    let mut outgoing = Vec::with_capacity(files.len());
    let mut contexts: BTreeMap<(String, String), ()> = BTreeMap::new();
    for path in files {
        let obj = open_file(path)
            .with_context(|| format!("{} is not a readable DICOM file", path.display()))?;
        let meta = obj.meta();
        let o = Outgoing {
            path: path.clone(),
            sop_class: trim_uid(&meta.media_storage_sop_class_uid),
            sop_instance: trim_uid(&meta.media_storage_sop_instance_uid),
            transfer_syntax: trim_uid(&meta.transfer_syntax),
        };
        contexts.insert((o.sop_class.clone(), o.transfer_syntax.clone()), ());
        outgoing.push(o);
    }
    if contexts.len() > 128 {
        bail!("too many distinct SOP class / transfer syntax pairs for one association (max 128)");
    }

    let mut options = ClientAssociationOptions::new()
        .calling_ae_title(target.calling_ae.clone())
        .called_ae_title(target.called_ae.clone())
        .max_pdu_length(116_794);
    for (sop_class, ts) in contexts.keys() {
        options = options.with_presentation_context(sop_class.clone(), vec![ts.clone()]);
    }
    let mut scu = options
        .establish(target.address.as_str())
        .with_context(|| {
            format!(
                "cannot associate with {} at {}",
                target.called_ae, target.address
            )
        })?;
    // Without TCP_NODELAY small PDUs wait for delayed ACKs: ~30x slower on loopback.
    scu.inner_stream().set_nodelay(true)?;

    let mut report = SendReport::default();
    for (message_id, o) in (1u16..).zip(outgoing) {
        let pc = scu.presentation_contexts().iter().find(|pc| {
            pc.reason == PresentationContextResultReason::Acceptance
                && trim_uid(&pc.abstract_syntax) == o.sop_class
                && trim_uid(&pc.transfer_syntax) == o.transfer_syntax
        });
        let Some(pc) = pc.cloned() else {
            report.failed.push((
                o.path,
                format!(
                    "SCP refused SOP class {} in transfer syntax {}",
                    o.sop_class, o.transfer_syntax
                ),
            ));
            continue;
        };
        let ts = TransferSyntaxRegistry
            .get(&o.transfer_syntax)
            .with_context(|| format!("unknown transfer syntax {}", o.transfer_syntax))?;
        let obj = open_file(&o.path)?;
        let mut data = Vec::new();
        obj.write_dataset_with_ts(&mut data, ts)
            .with_context(|| format!("cannot encode {}", o.path.display()))?;

        let cmd = store_request(&o.sop_class, &o.sop_instance, message_id);
        let mut cmd_data = Vec::with_capacity(128);
        cmd.write_dataset_with_ts(&mut cmd_data, &IMPLICIT_VR_LITTLE_ENDIAN.erased())?;
        scu.send(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: pc.id,
                value_type: PDataValueType::Command,
                is_last: true,
                data: cmd_data,
            }],
        })?;
        {
            let mut writer = scu.send_pdata(pc.id);
            writer.write_all(&data)?;
        }
        match scu.receive()? {
            Pdu::PData { data } => {
                let rsp = InMemDicomObject::read_dataset_with_ts(
                    &data[0].data[..],
                    &IMPLICIT_VR_LITTLE_ENDIAN.erased(),
                )?;
                let status = rsp.element(tags::STATUS)?.to_int::<u16>()?;
                if status == 0 || status == 0x0001 || (0xB000..=0xBFFF).contains(&status) {
                    report.stored += 1;
                } else {
                    report
                        .failed
                        .push((o.path, format!("C-STORE status {status:04X}H")));
                }
            }
            other => bail!("unexpected PDU from the SCP: {other:?}"),
        }
    }
    scu.release()?;
    Ok(report)
}

/// The command set of a C-STORE request (also the PACS delivery's, `crate::pacs`).
pub fn store_request(sop_class: &str, sop_instance: &str, message_id: u16) -> InMemDicomObject {
    InMemDicomObject::command_from_element_iter([
        DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            dicom_value!(Str, sop_class),
        ),
        DataElement::new(tags::COMMAND_FIELD, VR::US, dicom_value!(U16, [0x0001])),
        DataElement::new(tags::MESSAGE_ID, VR::US, dicom_value!(U16, [message_id])),
        DataElement::new(tags::PRIORITY, VR::US, dicom_value!(U16, [0x0000])),
        DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            dicom_value!(U16, [0x0000]),
        ),
        DataElement::new(
            tags::AFFECTED_SOP_INSTANCE_UID,
            VR::UI,
            dicom_value!(Str, sop_instance),
        ),
    ])
}
