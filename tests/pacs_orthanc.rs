//! PACS delivery against a real PACS: Orthanc (Debian package `orthanc`), started by each
//! test on free loopback ports with its own storage, and asserted through its REST API.
//! The objects are real DICOM files from pydicom's test data (an SR, a Secondary Capture,
//! a CT, and an MR in Implicit VR), wrapped as `ResultObject`s.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::orthanc::Orthanc;
use common::pki::Pki;
use common::{free_port, wait_until};
use cspine_triage::heartbeat::Heartbeat;
use cspine_triage::pacs::{Delivery, PacsConfig};
use cspine_triage::report::{ResultObject, ResultObjectKind};
use dicom_core::{DataElement, VR};
use dicom_dictionary_std::tags;

const ARRIVAL: Duration = Duration::from_secs(60);

fn testdata_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = Command::new("python3")
            .args([
                "-c",
                "import os, pydicom.data; \
                 print(os.path.dirname(pydicom.data.get_testdata_file('CT_small.dcm')))",
            ])
            .output()
            .expect("python3 with pydicom (tests/requirements.txt)");
        assert!(out.status.success(), "pydicom's test data not found");
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
}

/// A real DICOM file as a result object; with `new_uid`, under that SOP Instance UID.
fn object(file: &str, new_uid: Option<&str>) -> ResultObject {
    object_as(file, new_uid, None)
}

/// [`object`], and with `new_class` under that SOP Class UID.
fn object_as(file: &str, new_uid: Option<&str>, new_class: Option<&str>) -> ResultObject {
    let mut obj = dicom_object::open_file(testdata_dir().join(file)).unwrap();
    if let Some(uid) = new_uid {
        obj.put(DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, uid));
        obj.update_meta(|meta| meta.media_storage_sop_instance_uid = uid.to_owned());
    }
    if let Some(class) = new_class {
        obj.put(DataElement::new(tags::SOP_CLASS_UID, VR::UI, class));
        obj.update_meta(|meta| meta.media_storage_sop_class_uid = class.to_owned());
    }
    let text = |tag| {
        obj.element(tag)
            .unwrap()
            .to_str()
            .unwrap()
            .trim_end_matches('\0')
            .to_owned()
    };
    let mut part10 = Vec::new();
    obj.write_all(&mut part10).unwrap();
    let sop_class_uid = obj
        .meta()
        .media_storage_sop_class_uid
        .trim_end_matches('\0')
        .to_owned();
    ResultObject {
        kind: match sop_class_uid.as_str() {
            "1.2.840.10008.5.1.4.1.1.7" => ResultObjectKind::SecondaryCapture,
            "1.2.840.10008.5.1.4.1.1.88.59" => ResultObjectKind::KeyObjectSelection,
            _ => ResultObjectKind::StructuredReport,
        },
        sop_class_uid,
        sop_instance_uid: text(tags::SOP_INSTANCE_UID),
        series_instance_uid: text(tags::SERIES_INSTANCE_UID),
        study_instance_uid: text(tags::STUDY_INSTANCE_UID),
        part10,
    }
}

fn objects() -> Vec<ResultObject> {
    [
        "reportsi.dcm",
        "SC_rgb_small_odd.dcm",
        "CT_small.dcm",
        "MR_small_implicit.dcm",
    ]
    .into_iter()
    .map(|f| object(f, None))
    .collect()
}

fn pacs_config(queue_dir: &Path, orthanc: &Orthanc) -> PacsConfig {
    let config = PacsConfig {
        queue_dir: queue_dir.to_path_buf(),
        retry_initial_secs: 0.1,
        retry_max_secs: 0.5,
        destinations: vec![orthanc.destination()],
    };
    config.validate().unwrap();
    config
}

/// Runs the delivery stage on `rt` until the returned task is aborted.
fn start_senders(rt: &tokio::runtime::Runtime, delivery: &Delivery) -> tokio::task::JoinHandle<()> {
    let delivery = delivery.clone();
    rt.spawn(async move {
        let heartbeat = Heartbeat::new("pacs", Duration::from_secs(60), Instant::now());
        let _ = delivery.run(heartbeat).await;
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn uids(objects: &[ResultObject]) -> BTreeMap<String, usize> {
    objects
        .iter()
        .map(|o| (o.sop_instance_uid.clone(), 1))
        .collect()
}

fn wait_for_all(orthanc: &Orthanc, delivery: &Delivery, n: usize) {
    wait_until(
        "every object in Orthanc and the queue empty",
        ARRIVAL,
        || orthanc.count() >= n && delivery.depth()[0].entries == 0,
    );
}

#[test]
fn queued_objects_are_delivered_once_each() {
    let mut orthanc = Orthanc::configure();
    orthanc.start();
    let queue = tempfile::tempdir().unwrap();
    let rt = runtime();
    let delivery = Delivery::open(&pacs_config(queue.path(), &orthanc), "CSPINE").unwrap();
    let senders = start_senders(&rt, &delivery);
    let objects = objects();
    delivery.enqueue(&objects).unwrap();
    wait_for_all(&orthanc, &delivery, objects.len());
    assert_eq!(orthanc.instances(), uids(&objects));
    // Each arrived as what it is (SR, Secondary Capture, CT, RT Plan).
    let classes: std::collections::BTreeSet<String> =
        objects.iter().map(|o| o.sop_class_uid.clone()).collect();
    assert_eq!(orthanc.sop_classes(), classes);
    senders.abort();
}

#[test]
fn objects_queued_while_the_pacs_is_down_arrive_after_it_starts() {
    let mut orthanc = Orthanc::configure();
    let queue = tempfile::tempdir().unwrap();
    let rt = runtime();
    let delivery = Delivery::open(&pacs_config(queue.path(), &orthanc), "CSPINE").unwrap();
    let senders = start_senders(&rt, &delivery);
    let objects = objects();
    delivery.enqueue(&objects).unwrap();
    let depth = &delivery.depth()[0];
    assert_eq!(
        (depth.destination.as_str(), depth.entries),
        ("orthanc", objects.len())
    );
    assert!(depth.oldest_age.is_some());
    orthanc.start();
    wait_for_all(&orthanc, &delivery, objects.len());
    assert_eq!(orthanc.instances(), uids(&objects));
    assert_eq!(delivery.depth()[0].oldest_age, None);
    senders.abort();
}

#[test]
fn a_restarted_delivery_sends_what_the_previous_one_queued() {
    let mut orthanc = Orthanc::configure();
    let queue = tempfile::tempdir().unwrap();
    let objects = objects();
    {
        // The first "daemon": queues, tries a PACS that is down, and goes away.
        let rt = runtime();
        let delivery = Delivery::open(&pacs_config(queue.path(), &orthanc), "CSPINE").unwrap();
        let senders = start_senders(&rt, &delivery);
        delivery.enqueue(&objects).unwrap();
        senders.abort();
        drop(delivery);
        rt.shutdown_timeout(Duration::from_secs(5));
    }
    orthanc.start();
    let rt = runtime();
    let delivery = Delivery::open(&pacs_config(queue.path(), &orthanc), "CSPINE").unwrap();
    assert_eq!(delivery.depth()[0].entries, objects.len());
    let senders = start_senders(&rt, &delivery);
    wait_for_all(&orthanc, &delivery, objects.len());
    assert_eq!(orthanc.instances(), uids(&objects));
    senders.abort();
}

#[test]
fn the_same_object_enqueued_twice_is_queued_and_delivered_once() {
    let mut orthanc = Orthanc::configure();
    let queue = tempfile::tempdir().unwrap();
    let rt = runtime();
    let delivery = Delivery::open(&pacs_config(queue.path(), &orthanc), "CSPINE").unwrap();
    let objects = objects();
    let twice: Vec<ResultObject> = objects.iter().chain(&objects).cloned().collect();
    delivery.enqueue(&twice).unwrap();
    delivery.enqueue(&objects[..1]).unwrap();
    assert_eq!(delivery.depth()[0].entries, objects.len());
    let queued = std::fs::read_dir(delivery.queue_dir("orthanc").unwrap())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "entry")
        })
        .count();
    assert_eq!(queued, objects.len());
    orthanc.start();
    let senders = start_senders(&rt, &delivery);
    wait_for_all(&orthanc, &delivery, objects.len());
    assert_eq!(orthanc.instances(), uids(&objects));
    senders.abort();
}

#[test]
fn an_object_the_pacs_refuses_is_set_aside_and_the_rest_is_delivered() {
    let mut orthanc = Orthanc::configure();
    orthanc.start();
    let queue = tempfile::tempdir().unwrap();
    let rt = runtime();
    let delivery = Delivery::open(&pacs_config(queue.path(), &orthanc), "CSPINE").unwrap();
    // A SOP class Orthanc does not know: it refuses the presentation context.
    let refused = object_as(
        "CT_small.dcm",
        Some("1.2.826.0.1.3680043.10.1178.99"),
        Some("1.2.826.0.1.3680043.10.1178.7.7"),
    );
    let mut objects = vec![refused.clone()];
    objects.extend(self::objects());
    delivery.enqueue(&objects).unwrap();
    let senders = start_senders(&rt, &delivery);
    wait_for_all(&orthanc, &delivery, objects.len() - 1);
    assert_eq!(orthanc.instances(), uids(&objects[1..]));
    let rejected = delivery
        .queue_dir("orthanc")
        .unwrap()
        .join(cspine_triage::pacs::REJECTED_DIR)
        .join(format!("{}.entry", refused.sop_instance_uid));
    assert!(rejected.exists(), "{} missing", rejected.display());
    senders.abort();
}

#[test]
fn an_invalid_object_queues_nothing() {
    let orthanc = Orthanc::configure();
    let queue = tempfile::tempdir().unwrap();
    let delivery = Delivery::open(&pacs_config(queue.path(), &orthanc), "CSPINE").unwrap();
    let mut objects = objects();
    objects[1].sop_instance_uid = "../../etc".into();
    let err = delivery.enqueue(&objects).unwrap_err();
    assert!(matches!(
        err,
        cspine_triage::pacs::PacsError::InvalidObject { .. }
    ));
    objects[1] = object("SC_rgb_small_odd.dcm", None);
    objects[1].sop_instance_uid = "1.2.3.4".into(); // the file says otherwise
    assert!(delivery.enqueue(&objects).is_err());
    assert_eq!(delivery.depth()[0].entries, 0);
}

/// The daemon binary with Orthanc as its destination: objects left in its queue are sent
/// after the start; a kill -9 in the middle of sending loses nothing, and every object is
/// in Orthanc once after the restart.
#[test]
fn daemon_killed_mid_delivery_sends_the_rest_after_restart() {
    let mut orthanc = Orthanc::configure();
    let dir = tempfile::tempdir().unwrap();
    let queue_dir = dir.path().join("pacs");
    let objects: Vec<ResultObject> = (0..40)
        .map(|i| {
            object(
                "CT_small.dcm",
                Some(&format!("1.2.826.0.1.3680043.10.1178.{i}")),
            )
        })
        .collect();
    {
        // Queued the way the daemon's report step queues them (no daemon runs yet).
        let delivery = Delivery::open(&pacs_config(&queue_dir, &orthanc), "CSPINE").unwrap();
        delivery.enqueue(&objects).unwrap();
    }
    orthanc.start();
    let mosquitto = common::Mosquitto::start();
    let dicom_port = free_port();
    let config = common::serve_config(
        dir.path(),
        dicom_port,
        &mosquitto.url(),
        &format!(
            "\n[pacs]\nqueue_dir = \"{}\"\nretry_initial_secs = 0.1\nretry_max_secs = 0.5\n\
             [[pacs.destinations]]\nname = \"orthanc\"\nae_title = \"ORTHANC\"\n\
             host = \"127.0.0.1\"\nport = {}\n",
            queue_dir.display(),
            orthanc.dicom_port
        ),
    );
    let mut daemon = common::spawn_serve(&config, dicom_port, &[]);
    wait_until("the first objects in Orthanc", ARRIVAL, || {
        orthanc.count() > 0
    });
    daemon.kill9();
    let entries_left = || {
        std::fs::read_dir(queue_dir.join("orthanc"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "entry")
            })
            .count()
    };
    let (left, stored) = (entries_left(), orthanc.count());
    eprintln!("killed with {stored} object(s) in Orthanc and {left} still queued");
    assert!(left + stored >= objects.len(), "nothing is lost");
    let _daemon = common::spawn_serve(&config, dicom_port, &[]);
    wait_until("every object in Orthanc", ARRIVAL, || {
        orthanc.count() >= objects.len() && entries_left() == 0
    });
    assert_eq!(orthanc.instances(), uids(&objects));
    assert!(!queue_dir.join("orthanc/rejected").exists());
}

/// DICOM TLS towards the PACS: Orthanc with DICOM TLS on and client certificates required
/// (mutual TLS) receives every object over TLS.
#[test]
fn delivery_over_tls_reaches_an_orthanc_with_dicom_tls() {
    let certs = tempfile::tempdir().unwrap();
    let pki = Pki::make(certs.path());
    let mut orthanc = Orthanc::configure_with(serde_json::json!({
        "DicomTlsEnabled": true,
        "DicomTlsCertificate": pki.path("server.pem"),
        "DicomTlsPrivateKey": pki.path("server.key"),
        "DicomTlsTrustedCertificates": pki.path("ca.pem"),
        "DicomTlsRemoteCertificateRequired": true,
    }));
    orthanc.start();
    let queue = tempfile::tempdir().unwrap();
    let mut config = pacs_config(queue.path(), &orthanc);
    config.destinations[0].tls = Some(cspine_triage::dicom::tls::TlsConfig {
        certificate: Some(pki.path("client.pem").into()),
        private_key: Some(pki.path("client.key").into()),
        ca: Some(pki.path("ca.pem").into()),
        ..Default::default()
    });
    config.validate().unwrap();
    let rt = runtime();
    let delivery = Delivery::open(&config, "CSPINE").unwrap();
    let senders = start_senders(&rt, &delivery);
    let objects = objects();
    delivery.enqueue(&objects).unwrap();
    wait_for_all(&orthanc, &delivery, objects.len());
    assert_eq!(orthanc.instances(), uids(&objects));
    senders.abort();
}

/// `GET /metrics` of the daemon: the Prometheus text exposition.
fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect /metrics");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (_, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    body.to_owned()
}

/// Orthanc's tags of the instance with SOP Instance UID `sop` (`?simplify`: sequences as
/// arrays of objects).
fn tags_of(orthanc: &Orthanc, sop: &str) -> serde_json::Value {
    let ids = common::orthanc::http_get(orthanc.http_port, "/instances").unwrap();
    for id in ids.as_array().unwrap() {
        let path = format!("/instances/{}/tags?simplify", id.as_str().unwrap());
        let tags = common::orthanc::http_get(orthanc.http_port, &path).unwrap();
        if tags["SOPInstanceUID"] == sop {
            return tags;
        }
    }
    panic!("{sop} is not in Orthanc");
}

/// The whole box, as a PACS administrator sees it: a fractured phantom sent by DCMTK
/// `storescu` is analysed and its result published on MQTT while the PACS is down (the
/// alert does not wait for it); the daemon is killed (kill -9) and restarted, the PACS
/// comes up, and the structured report, the key object selection and the secondary
/// capture named in the result arrive in the source study, once each, the KOS referencing
/// instances of the analysed series.
#[test]
fn a_study_analysed_while_the_pacs_is_down_reaches_it_after_kill_9_and_restart() {
    let mut orthanc = Orthanc::configure();
    let dir = tempfile::tempdir().unwrap();
    let queue_dir = dir.path().join("pacs");
    let study = common::synth(&dir.path().join("fx"), 9101, "C5", &[]);
    let mosquitto = common::Mosquitto::start();
    let sub = common::Subscriber::start(mosquitto.port, "cspine/#");
    let (dicom_port, metrics_port) = (free_port(), free_port());
    let config = common::serve_config(
        dir.path(),
        dicom_port,
        &mosquitto.url(),
        &format!(
            "\n[pacs]\nqueue_dir = \"{}\"\nretry_initial_secs = 0.1\nretry_max_secs = 0.5\n\
             [[pacs.destinations]]\nname = \"orthanc\"\nae_title = \"ORTHANC\"\n\
             host = \"127.0.0.1\"\nport = {}\n\
             [metrics]\nenabled = true\nlisten = \"127.0.0.1:{metrics_port}\"\n",
            queue_dir.display(),
            orthanc.dicom_port
        ),
    );
    let mut daemon = common::spawn_serve(&config, dicom_port, &[]);
    let status = Command::new(common::dcmtk("storescu"))
        .args([
            "-aec",
            "CSPINE",
            "-aet",
            "CTSCANNER",
            "+sd",
            "+r",
            "127.0.0.1",
        ])
        .arg(dicom_port.to_string())
        .arg(&study[0])
        .status()
        .unwrap();
    assert!(status.success(), "storescu");
    let result = |sub: &common::Subscriber| {
        sub.messages()
            .iter()
            .filter(|m| m.topic.ends_with("/result"))
            .map(|m| serde_json::from_slice::<serde_json::Value>(&m.payload).unwrap())
            .next()
    };
    sub.wait_for_within("the result on MQTT", Duration::from_secs(300), |_| {
        result(&sub).is_some()
    });
    let result = result(&sub).unwrap();
    assert_eq!(result["status"], "positive", "{result}");
    let named: BTreeMap<String, String> = result["dicom_objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["sop_instance_uid"].as_str().unwrap().to_owned(),
                o["kind"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(named.len(), 3, "SR, KOS and SC: {result}");

    daemon.kill9();
    orthanc.start();
    let _daemon = common::spawn_serve(&config, dicom_port, &[]);
    wait_until("the result objects in Orthanc", ARRIVAL, || {
        orthanc.count() >= named.len()
    });
    let once: BTreeMap<String, usize> = named.keys().map(|k| (k.clone(), 1)).collect();
    assert_eq!(orthanc.instances(), once, "each object once");
    // The restarted daemon's metrics: at least the three objects delivered, each with its
    // latency (a restart that re-analyses the series sends them again; Orthanc keeps one).
    let at_least_3 = |metrics: &str, name: &str| {
        metrics.lines().any(|l| {
            l.strip_prefix(name)
                .and_then(|v| v.trim().parse::<f64>().ok())
                .is_some_and(|v| v >= 3.0)
        })
    };
    wait_until("the delivery metrics", ARRIVAL, || {
        let metrics = scrape(metrics_port);
        at_least_3(
            &metrics,
            "cspine_pacs_objects_total{destination=\"orthanc\",outcome=\"delivered\"}",
        ) && at_least_3(&metrics, "cspine_queued_to_pacs_delivered_seconds_count")
    });
    let source_series = result["series_instance_uid"].as_str().unwrap();
    for (sop, kind) in &named {
        let tags = tags_of(&orthanc, sop);
        assert_eq!(
            tags["StudyInstanceUID"], result["study_instance_uid"],
            "{kind}"
        );
        assert_ne!(
            tags["SeriesInstanceUID"], source_series,
            "{kind}: a new series"
        );
        if kind == "key_object_selection" {
            let evidence = &tags["CurrentRequestedProcedureEvidenceSequence"][0];
            let series = &evidence["ReferencedSeriesSequence"][0];
            assert_eq!(series["SeriesInstanceUID"], source_series, "{tags}");
            assert!(
                !series["ReferencedSOPSequence"]
                    .as_array()
                    .unwrap()
                    .is_empty(),
                "{tags}"
            );
        }
    }
}
