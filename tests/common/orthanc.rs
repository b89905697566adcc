//! A real PACS for the tests: Orthanc (Debian package `orthanc`) on free loopback ports
//! with its own storage, asserted through its REST API; killed on drop.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use cspine_triage::pacs::DestinationConfig;

use super::{free_port, require_tool, wait_until, Proc};

const ARRIVAL: Duration = Duration::from_secs(60);

/// A real Orthanc on free loopback ports; killed on drop.
pub struct Orthanc {
    pub dicom_port: u16,
    pub http_port: u16,
    config: PathBuf,
    proc: Option<Proc>,
    _dir: tempfile::TempDir,
}

impl Orthanc {
    /// Writes the config; `start` runs it.
    pub fn configure() -> Orthanc {
        Orthanc::configure_with(serde_json::json!({}))
    }

    /// As [`Orthanc::configure`], with `extra` settings added (e.g. DICOM TLS).
    pub fn configure_with(extra: serde_json::Value) -> Orthanc {
        let dir = tempfile::tempdir().unwrap();
        let (dicom_port, http_port) = (free_port(), free_port());
        let config = dir.path().join("orthanc.json");
        let settings = serde_json::json!({
            "Name": "cspine-test",
            "DicomAet": "ORTHANC",
            "DicomPort": dicom_port,
            "HttpPort": http_port,
            "StorageDirectory": dir.path().join("storage"),
            "IndexDirectory": dir.path().join("index"),
            "RemoteAccessAllowed": false,
            "AuthenticationEnabled": false,
            "DicomCheckCalledAet": false,
            "DicomAlwaysAllowStore": true,
            "DicomModalities": {},
            "Plugins": [],
            "HttpServerEnabled": true,
            "StorageCompression": false,
        });
        let mut settings = settings;
        for (k, v) in extra.as_object().unwrap() {
            settings[k] = v.clone();
        }
        std::fs::write(&config, serde_json::to_vec_pretty(&settings).unwrap()).unwrap();
        Orthanc {
            dicom_port,
            http_port,
            config,
            proc: None,
            _dir: dir,
        }
    }

    pub fn start(&mut self) {
        let proc = Proc::spawn({
            let mut cmd = Command::new(require_tool("Orthanc"));
            cmd.arg(&self.config);
            cmd
        });
        let http_port = self.http_port;
        wait_until("Orthanc's REST API", ARRIVAL, || {
            http_get(http_port, "/system").is_some()
        });
        assert!(super::wait_for_port(self.dicom_port, ARRIVAL));
        self.proc = Some(proc);
    }

    /// SOP Instance UID -> number of Orthanc instances with it.
    pub fn instances(&self) -> BTreeMap<String, usize> {
        let ids = http_get(self.http_port, "/instances").expect("GET /instances");
        let mut out = BTreeMap::new();
        for id in ids.as_array().unwrap() {
            let tags = http_get(
                self.http_port,
                &format!("/instances/{}/simplified-tags", id.as_str().unwrap()),
            )
            .expect("GET simplified-tags");
            *out.entry(tags["SOPInstanceUID"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
        out
    }

    /// The SOP Class UIDs of the stored instances.
    pub fn sop_classes(&self) -> std::collections::BTreeSet<String> {
        let ids = http_get(self.http_port, "/instances").expect("GET /instances");
        ids.as_array()
            .unwrap()
            .iter()
            .map(|id| {
                let tags = http_get(
                    self.http_port,
                    &format!("/instances/{}/simplified-tags", id.as_str().unwrap()),
                )
                .expect("GET simplified-tags");
                tags["SOPClassUID"].as_str().unwrap().to_owned()
            })
            .collect()
    }

    pub fn count(&self) -> usize {
        http_get(self.http_port, "/instances")
            .and_then(|v| v.as_array().map(Vec::len))
            .unwrap_or(0)
    }

    pub fn destination(&self) -> DestinationConfig {
        DestinationConfig {
            name: "orthanc".into(),
            ae_title: "ORTHANC".into(),
            host: "127.0.0.1".into(),
            port: self.dicom_port,
            calling_ae_title: None,
            connect_timeout_secs: 5.0,
            dimse_timeout_secs: 30.0,
            tls: None,
        }
    }
}

/// GET on Orthanc's REST API; `None` when it does not answer 200 with JSON.
pub fn http_get(port: u16, path: &str) -> Option<serde_json::Value> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return None;
    }
    serde_json::from_str(body).ok()
}
