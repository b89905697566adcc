//! Unit tests of the spool: the write protocol, duplicates and corrections, the life
//! cycle (marks, release, recovery) and the directory cache against concurrent removal.

use std::fs::{self, File};
use std::path::Path;

use dicom_dictionary_std::tags;
use time::OffsetDateTime;

use super::incoming::WRITE_CHUNK;
use super::lifecycle::release;
use super::*;

#[test]
fn safe_names() {
    assert_eq!(safe_name("1.2.3"), "1.2.3");
    let bad = safe_name("../../etc/passwd");
    assert!(bad.starts_with('x') && !bad.contains('/') && bad.len() == 41);
    assert_ne!(safe_name("a"), safe_name("b"));
}

#[test]
fn the_spool_root_is_made_durable() {
    let dir = tempfile::tempdir().unwrap();
    create_dir_all_durably(&dir.path().join("b/c")).unwrap();
    assert!(dir.path().join("b/c").is_dir());
    // Already there: fine again.
    create_dir_all_durably(&dir.path().join("b/c")).unwrap();
}

#[test]
fn free_space_floor() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), "CSPINE", 0).unwrap();
    spool.check_free_space().unwrap();
    let spool = Spool::open(dir.path(), "CSPINE", u64::MAX / (1 << 21)).unwrap();
    let err = spool.check_free_space().unwrap_err().to_string();
    assert!(err.contains("min_free_space_mb"), "{err}");
}

fn dataset(study: &str, series: &str, sop: &str) -> Vec<u8> {
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_object::InMemDicomObject;
    use dicom_transfer_syntax_registry::entries::EXPLICIT_VR_LITTLE_ENDIAN;
    let obj = InMemDicomObject::from_element_iter([
        DataElement::new(
            tags::SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from("1.2.840.10008.5.1.4.1.1.2"),
        ),
        DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, PrimitiveValue::from(sop)),
        DataElement::new(
            tags::STUDY_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(study),
        ),
        DataElement::new(
            tags::SERIES_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(series),
        ),
    ]);
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, &EXPLICIT_VR_LITTLE_ENDIAN.erased())
        .unwrap();
    out
}

fn header(sop: &str) -> InstanceHeader {
    InstanceHeader {
        sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
        sop_instance_uid: sop.into(),
        transfer_syntax_uid: "1.2.840.10008.1.2.1".into(),
        calling_ae: "CTSCANNER".into(),
        received_at: OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap(),
    }
}

fn store(spool: &Spool, sop: &str, data: &[u8]) -> Result<Stored, StoreError> {
    let mut incoming = spool.begin(header(sop)).unwrap();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(incoming.push(data));
    spool.commit(incoming)
}

#[test]
fn a_series_whose_result_is_committed_but_not_marked_is_marked_at_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), "CSPINE", 0).unwrap();
    for (series, sop) in [
        ("1.2.3.4", "1.2.3.4.1"),
        ("1.2.3.4", "1.2.3.4.2"),
        ("1.2.3.5", "1.2.3.5.1"),
    ] {
        store(&spool, sop, &dataset("1.2.3", series, sop)).unwrap();
    }
    // Only series 1.2.3.4 has a result waiting in the outbox, for both its instances.
    let (events, recorder) = crate::events::Events::recording();
    let committed = |series: &str, sops: &[String]| {
        (series == "1.2.3.4" && sops == ["1.2.3.4.1", "1.2.3.4.2"]).then(|| "id-4".to_string())
    };
    let recovered =
        mark_committed(dir.path(), recover(dir.path()).unwrap(), committed, &events).unwrap();
    assert_eq!(
        recorder.events(),
        [crate::events::Event::SeriesMarked {
            study_instance_uid: "1.2.3".into(),
            series_instance_uid: "1.2.3.4".into(),
            result_id: "id-4".into(),
            instances: 2,
            cause: crate::events::MarkCause::WaitingInOutbox,
        }]
    );
    let left: Vec<&str> = recovered
        .instances
        .iter()
        .map(|i| i.sop_instance_uid.as_str())
        .collect();
    assert_eq!(
        left,
        ["1.2.3.5.1"],
        "the other series is assembled as before"
    );
    assert_eq!(recovered.analysed.len(), 1);
    assert_eq!(recovered.analysed[0].mark.result_id, "id-4");
    assert_eq!(recovered.analysed[0].instances.len(), 2);
    // Durable: the next recovery finds the mark by itself.
    let again = recover(dir.path()).unwrap();
    assert_eq!(again.analysed.len(), 1);
    assert_eq!(
        again.analysed[0].mark.sop_instance_uids,
        ["1.2.3.4.1", "1.2.3.4.2"]
    );
    assert_eq!(again.instances.len(), 1);
}

#[test]
fn directories_left_by_an_earlier_run_are_made_durable_before_success() {
    let dir = tempfile::tempdir().unwrap();
    // What a run killed between its mkdirs and their parents' fsyncs leaves behind.
    fs::create_dir_all(dir.path().join("1.2.3/1.2.3.4")).unwrap();
    let spool = Spool::open(dir.path(), "CSPINE", 0).unwrap();
    let ds = dataset("1.2.3", "1.2.3.4", "1.2.3.4.5");
    assert!(matches!(
        store(&spool, "1.2.3.4.5", &ds),
        Ok(Stored::New(_))
    ));
    let known = spool.known_durable();
    assert_eq!(
        known,
        [dir.path().join("1.2.3"), dir.path().join("1.2.3/1.2.3.4")]
            .into_iter()
            .collect(),
        "both existing levels had their parents fsynced"
    );
    // A restart: the same instance again is a duplicate, answered once its directory
    // is durable in this process too.
    drop(spool);
    let spool = Spool::open(dir.path(), "CSPINE", 0).unwrap();
    assert!(matches!(
        store(&spool, "1.2.3.4.5", &ds),
        Ok(Stored::Duplicate(_))
    ));
    assert_eq!(spool.known_durable().len(), 2);
}

#[test]
fn commit_reindex_duplicate_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), "CSPINE", 0).unwrap();
    let ds = dataset("1.2.3", "1.2.3.4", "1.2.3.4.5");
    let Ok(Stored::New(first)) = store(&spool, "1.2.3.4.5", &ds) else {
        panic!("not stored")
    };
    assert!(first.path.ends_with("1.2.3/1.2.3.4/1.2.3.4.5.dcm"));
    assert!(matches!(
        store(&spool, "1.2.3.4.5", &ds),
        Ok(Stored::Duplicate(_))
    ));
    // Command and data set disagree: refused, nothing left behind.
    assert!(matches!(
        store(&spool, "9.9", &ds),
        Err(StoreError::Mismatch(_))
    ));
    assert!(matches!(
        store(&spool, "1.2.3.4.6", &ds[..ds.len() - 3]),
        Err(StoreError::CannotUnderstand(_))
    ));
    assert_eq!(fs::read_dir(dir.path().join(TMP_DIR)).unwrap().count(), 0);

    let found = reindex(dir.path()).unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].calling_ae, "CTSCANNER");
    assert_eq!(found[0].received_at, header("x").received_at);
    assert_eq!(found[0].series_instance_uid, "1.2.3.4");

    // An instance larger than the write chunk is streamed to disk in pieces.
    let big = {
        use dicom_core::{DataElement, PrimitiveValue, VR};
        use dicom_object::InMemDicomObject;
        use dicom_transfer_syntax_registry::entries::EXPLICIT_VR_LITTLE_ENDIAN;
        let mut obj = InMemDicomObject::read_dataset_with_ts(
            &dataset("1.2.3", "1.2.3.4", "1.2.3.4.7")[..],
            &EXPLICIT_VR_LITTLE_ENDIAN.erased(),
        )
        .unwrap();
        obj.put(DataElement::new(
            tags::PIXEL_DATA,
            VR::OB,
            PrimitiveValue::from(vec![7u8; WRITE_CHUNK + 1000]),
        ));
        let mut out = Vec::new();
        obj.write_dataset_with_ts(&mut out, &EXPLICIT_VR_LITTLE_ENDIAN.erased())
            .unwrap();
        out
    };
    let mut incoming = spool.begin(header("1.2.3.4.7")).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    for piece in big.chunks(65536) {
        rt.block_on(incoming.push(piece));
    }
    let Ok(Stored::New(stored)) = spool.commit(incoming) else {
        panic!("big instance not stored")
    };
    assert!(fs::metadata(&stored.path).unwrap().len() > big.len() as u64);

    assert_eq!(spool.delete_series("1.2.3", "1.2.3.4").unwrap(), 2);
    assert!(!dir.path().join("1.2.3").exists());
    assert!(reindex(dir.path()).unwrap().is_empty());
}

#[test]
fn a_declared_length_beyond_the_data_is_refused_quickly_and_nothing_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), "CSPINE", 0).unwrap();
    let mut ds = dataset("1.2.3", "1.2.3.4", "1.2.3.4.5");
    // Pixel Data, OB, declared 0x7FFFFFFE bytes, 4 present (tests/reliability/fuzz_network.py).
    ds.extend_from_slice(&[0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0]);
    ds.extend_from_slice(&0x7FFF_FFFEu32.to_le_bytes());
    ds.extend_from_slice(b"abcd");
    let t = std::time::Instant::now();
    let Err(StoreError::CannotUnderstand(why)) = store(&spool, "1.2.3.4.5", &ds) else {
        panic!("accepted")
    };
    assert!(t.elapsed().as_secs() < 2, "took {:?}", t.elapsed());
    assert!(
        why.contains("element (7FE0,0010) OB at offset")
            && why.contains("declares 2147483646 bytes, but only 4 follow"),
        "{why}"
    );
    assert_eq!(fs::read_dir(dir.path().join(TMP_DIR)).unwrap().count(), 0);
    assert!(reindex(dir.path()).unwrap().is_empty());
}

#[test]
fn reindex_moves_unreadable_files_aside() {
    let dir = tempfile::tempdir().unwrap();
    let series = dir.path().join("1.2").join("1.2.3");
    fs::create_dir_all(&series).unwrap();
    fs::write(series.join("1.2.3.4.dcm"), b"not dicom").unwrap();
    assert!(reindex(dir.path()).unwrap().is_empty());
    assert!(dir.path().join(REJECTED_DIR).join("1.2.3.4.dcm").is_file());
    // The same name rejected again (another series): both are kept.
    fs::write(series.join("1.2.3.4.dcm"), b"not dicom either").unwrap();
    assert!(reindex(dir.path()).unwrap().is_empty());
    assert_eq!(
        fs::read(dir.path().join(REJECTED_DIR).join("1.2.3.4.dcm.1")).unwrap(),
        b"not dicom either"
    );
}

#[test]
fn reindex_rejects_a_spool_file_cut_short_in_its_pixel_data() {
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_object::InMemDicomObject;
    use dicom_transfer_syntax_registry::entries::EXPLICIT_VR_LITTLE_ENDIAN;
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), "CSPINE", 0).unwrap();
    let ts = EXPLICIT_VR_LITTLE_ENDIAN.erased();
    let with_pixels = |sop: &str| {
        let mut obj =
            InMemDicomObject::read_dataset_with_ts(&dataset("1.2.3", "1.2.3.4", sop)[..], &ts)
                .unwrap();
        obj.put(DataElement::new(
            tags::PIXEL_DATA,
            VR::OW,
            PrimitiveValue::from(vec![3u8; 4096]),
        ));
        let mut out = Vec::new();
        obj.write_dataset_with_ts(&mut out, &ts).unwrap();
        out
    };
    let stored = |sop: &str| match store(&spool, sop, &with_pixels(sop)) {
        Ok(Stored::New(i)) => i,
        other => panic!("not stored: {other:?}"),
    };
    let (good, cut) = (stored("1.2.3.4.1"), stored("1.2.3.4.2"));
    let len = fs::metadata(&cut.path).unwrap().len();
    File::options()
        .write(true)
        .open(&cut.path)
        .unwrap()
        .set_len(len - 1000)
        .unwrap();
    let found = reindex(dir.path()).unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].path, good.path);
    assert!(!cut.path.exists());
    assert!(dir
        .path()
        .join(REJECTED_DIR)
        .join("1.2.3.4.2.dcm")
        .is_file());
}

#[test]
fn open_removes_leftover_temp_files() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join(TMP_DIR)).unwrap();
    fs::write(dir.path().join(TMP_DIR).join("1-1.part"), b"partial").unwrap();
    Spool::open(dir.path(), "CSPINE", 0).unwrap();
    assert_eq!(fs::read_dir(dir.path().join(TMP_DIR)).unwrap().count(), 0);
}

#[test]
fn analysed_mark_recover_and_release() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let spool = Spool::open(root, "CSPINE", 0).unwrap();
    let sops = ["1.2.3.4.1", "1.2.3.4.2", "1.2.3.4.3"];
    let mut paths = Vec::new();
    for sop in &sops[..2] {
        let Ok(Stored::New(i)) = store(&spool, sop, &dataset("1.2.3", "1.2.3.4", sop)) else {
            panic!("not stored")
        };
        paths.push(i.path);
    }
    let at = OffsetDateTime::from_unix_timestamp(1_700_000_100).unwrap();
    let two: Vec<String> = sops[..2].iter().map(|s| s.to_string()).collect();
    assert_eq!(
        mark_analysed(root, "1.2.3", "1.2.3.4", "id1", &two, at).unwrap(),
        Some(2)
    );
    // No spool directory for it: nothing to mark.
    assert_eq!(
        mark_analysed(root, "1.2.3", "9.9", "id0", &two, at).unwrap(),
        None
    );
    let series_dir = root.join("1.2.3").join("1.2.3.4");
    let mark = read_mark(&series_dir).unwrap();
    assert_eq!(mark.result_id, "id1");
    assert_eq!(mark.analysed_at, at);
    assert!(mark.covers("1.2.3.4.1") && !mark.covers("1.2.3.4.3"));

    // Everything in the spool is analysed: remembered, nothing to assemble.
    let r = recover(root).unwrap();
    assert!(r.instances.is_empty(), "{:?}", r.instances);
    assert_eq!(r.analysed.len(), 1);
    assert_eq!(r.analysed[0].instances.len(), 2);
    assert_eq!(r.analysed[0].mark, mark);

    // A late instance after the mark: it is to be assembled (the series re-opens).
    let Ok(Stored::New(late)) = store(&spool, sops[2], &dataset("1.2.3", "1.2.3.4", sops[2]))
    else {
        panic!("not stored")
    };
    let r = recover(root).unwrap();
    assert_eq!(r.instances.len(), 1);
    assert_eq!(r.instances[0].sop_instance_uid, sops[2]);
    assert_eq!(r.analysed[0].instances.len(), 2);

    // The revision's mark is the union of what was analysed.
    let at2 = at + time::Duration::seconds(5);
    assert_eq!(
        mark_analysed(root, "1.2.3", "1.2.3.4", "id2", &[sops[2].to_string()], at2).unwrap(),
        Some(3)
    );
    let r = recover(root).unwrap();
    assert!(r.instances.is_empty());
    assert_eq!(r.analysed[0].instances.len(), 3);
    assert_eq!(r.analysed[0].mark.result_id, "id2");
    assert_eq!(
        fs::read_dir(&series_dir).unwrap().count(),
        4,
        "3 instances + mark"
    );

    // A partial release (not forgetting) keeps the mark while instances are left.
    assert_eq!(
        release(root, "1.2.3", "1.2.3.4", &paths[..1], false).unwrap(),
        1
    );
    assert!(series_dir.join(MARK_FILE).is_file());
    // A path outside the series directory is never removed.
    let outside = root.join("elsewhere.dcm");
    fs::write(&outside, b"x").unwrap();
    assert_eq!(
        release(
            root,
            "1.2.3",
            "1.2.3.4",
            std::slice::from_ref(&outside),
            true
        )
        .unwrap(),
        0
    );
    assert!(outside.is_file());
    // Forgetting: files, then the mark, then the empty directories.
    let rest = [paths[1].clone(), late.path.clone(), paths[0].clone()];
    assert_eq!(release(root, "1.2.3", "1.2.3.4", &rest, true).unwrap(), 2);
    assert!(!root.join("1.2.3").exists());
    assert!(recover(root).unwrap().analysed.is_empty());
}

#[test]
fn forgetting_keeps_an_instance_that_arrived_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let spool = Spool::open(root, "CSPINE", 0).unwrap();
    let store_one = |sop: &str| match store(&spool, sop, &dataset("1.2.3", "1.2.3.4", sop)) {
        Ok(Stored::New(i)) => i,
        _ => panic!("not stored"),
    };
    let known = store_one("1.2.3.4.1");
    let at = OffsetDateTime::now_utc();
    mark_analysed(root, "1.2.3", "1.2.3.4", "id", &["1.2.3.4.1".into()], at).unwrap();
    // Stored after the assembler decided to forget the study: not in the release.
    store_one("1.2.3.4.2");
    assert_eq!(
        release(root, "1.2.3", "1.2.3.4", &[known.path], true).unwrap(),
        1
    );
    let r = recover(root).unwrap();
    assert!(r.analysed.is_empty(), "the mark went with the study");
    assert_eq!(r.instances.len(), 1, "the newcomer is assembled");
    assert_eq!(r.instances[0].sop_instance_uid, "1.2.3.4.2");
}

#[test]
fn recover_cleans_a_mark_without_instances_and_ignores_a_bad_mark() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let spool = Spool::open(root, "CSPINE", 0).unwrap();
    // A crash after the files of a forgotten series were removed, before its mark.
    let gone = root.join("1.2.3").join("1.2.3.5");
    fs::create_dir_all(&gone).unwrap();
    fs::write(gone.join(MARK_FILE), b"{}").unwrap();
    // An unreadable mark: the series is assembled (analysed again), the safe side.
    let Ok(Stored::New(_)) = store(
        &spool,
        "1.2.3.4.1",
        &dataset("1.2.3", "1.2.3.4", "1.2.3.4.1"),
    ) else {
        panic!("not stored")
    };
    fs::write(
        root.join("1.2.3").join("1.2.3.4").join(MARK_FILE),
        b"not json",
    )
    .unwrap();
    let r = recover(root).unwrap();
    assert!(r.analysed.is_empty());
    assert_eq!(r.instances.len(), 1);
    assert!(
        !gone.exists(),
        "the orphan mark and its directory are removed"
    );
}

/// [`dataset`] with a Patient's Name, so that two versions of one instance differ.
fn dataset_named(study: &str, series: &str, sop: &str, name: &str) -> Vec<u8> {
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_object::InMemDicomObject;
    use dicom_transfer_syntax_registry::entries::EXPLICIT_VR_LITTLE_ENDIAN;
    let mut obj = InMemDicomObject::new_empty();
    for (tag, vr, v) in [
        (tags::PATIENT_NAME, VR::PN, name),
        (tags::SOP_CLASS_UID, VR::UI, "1.2.840.10008.5.1.4.1.1.2"),
        (tags::SOP_INSTANCE_UID, VR::UI, sop),
        (tags::STUDY_INSTANCE_UID, VR::UI, study),
        (tags::SERIES_INSTANCE_UID, VR::UI, series),
    ] {
        obj.put(DataElement::new(tag, vr, PrimitiveValue::from(v)));
    }
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, &EXPLICIT_VR_LITTLE_ENDIAN.erased())
        .unwrap();
    out
}

#[test]
fn a_study_released_whole_takes_new_series_and_late_instances_again() {
    // The scout is released alone (not analysable), which removes its series and then
    // its study directory; the axial series of the same study arrives afterwards.
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), "CSPINE", 0).unwrap();
    let Stored::New(scout) = store(
        &spool,
        "1.2.3.1.1",
        &dataset("1.2.3", "1.2.3.1", "1.2.3.1.1"),
    )
    .unwrap() else {
        panic!("new")
    };
    spool
        .release("1.2.3", "1.2.3.1", std::slice::from_ref(&scout.path), true)
        .unwrap();
    assert!(
        !dir.path().join("1.2.3").exists(),
        "study directory removed"
    );
    for sop in ["1.2.3.2.1", "1.2.3.2.2"] {
        assert!(matches!(
            store(&spool, sop, &dataset("1.2.3", "1.2.3.2", sop)),
            Ok(Stored::New(_))
        ));
    }
    // The same again after the study is forgotten by a whole-series removal, and a
    // late instance of the first series.
    spool.delete_series("1.2.3", "1.2.3.2").unwrap();
    assert!(!dir.path().join("1.2.3").exists());
    assert!(matches!(
        store(
            &spool,
            "1.2.3.1.2",
            &dataset("1.2.3", "1.2.3.1", "1.2.3.1.2")
        ),
        Ok(Stored::New(_))
    ));
    assert_eq!(reindex(dir.path()).unwrap().len(), 1);
}

#[test]
fn a_release_racing_with_stores_never_fails_a_store() {
    // One thread stores instance after instance into one series while another keeps
    // releasing them (removing the emptied series and study directories): every store
    // must succeed, recreating what was removed under it.
    let dir = tempfile::tempdir().unwrap();
    let spool = std::sync::Arc::new(Spool::open(dir.path(), "CSPINE", 0).unwrap());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let janitor = {
        let (spool, stop) = (spool.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut releases = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let series = dir_of(spool.root(), "1.2.3", "1.2.3.4");
                let paths: Vec<_> = fs::read_dir(&series)
                    .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
                    .unwrap_or_default();
                spool.release("1.2.3", "1.2.3.4", &paths, true).unwrap();
                releases += 1;
            }
            releases
        })
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    for k in 0..300 {
        let sop = format!("1.2.3.4.{k}");
        let mut incoming = spool.begin(header(&sop)).unwrap();
        rt.block_on(incoming.push(&dataset("1.2.3", "1.2.3.4", &sop)));
        let stored = spool.commit(incoming);
        assert!(
            matches!(stored, Ok(Stored::New(_))),
            "store {k}: {stored:?}"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(janitor.join().unwrap() > 0);
}

fn dir_of(root: &Path, study: &str, series: &str) -> std::path::PathBuf {
    root.join(study).join(series)
}

#[test]
fn the_same_uid_with_other_content_replaces_and_is_no_longer_covered_by_the_mark() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), "CSPINE", 0).unwrap();
    let (study, series, sop) = ("1.2.3", "1.2.3.4", "1.2.3.4.5");
    let first = dataset_named(study, series, sop, "FIRST");
    assert!(matches!(store(&spool, sop, &first), Ok(Stored::New(_))));
    // The same bytes again: an idempotent duplicate.
    assert!(matches!(
        store(&spool, sop, &first),
        Ok(Stored::Duplicate(_))
    ));
    spool
        .mark_analysed(
            study,
            series,
            "r1",
            &[sop.to_string()],
            OffsetDateTime::now_utc(),
        )
        .unwrap();
    let corrected = dataset_named(study, series, sop, "CORRECTED");
    let Ok(Stored::Replaced(instance)) = store(&spool, sop, &corrected) else {
        panic!("a corrected re-send replaces the first version")
    };
    assert_eq!(instance.arrival, crate::dicom::Arrival::Correction);
    let bytes = fs::read(&instance.path).unwrap();
    assert!(bytes.windows(9).any(|w| w == b"CORRECTED"));
    // A restart analyses the corrected version: the mark no longer covers it.
    let recovered = recover(dir.path()).unwrap();
    assert_eq!(recovered.instances.len(), 1);
    assert!(recovered.analysed.is_empty());
    assert!(matches!(
        store(&spool, sop, &corrected),
        Ok(Stored::Duplicate(_))
    ));
}

#[test]
fn keep_first_drops_the_other_content() {
    let dir = tempfile::tempdir().unwrap();
    let options = SpoolOptions {
        duplicate_policy: DuplicatePolicy::KeepFirst,
        ..SpoolOptions::new("CSPINE")
    };
    let spool = Spool::open_with(dir.path(), options).unwrap();
    let sop = "1.2.3.4.5";
    store(
        &spool,
        sop,
        &dataset_named("1.2.3", "1.2.3.4", sop, "FIRST"),
    )
    .unwrap();
    let Ok(Stored::KeptFirst(instance)) = store(
        &spool,
        sop,
        &dataset_named("1.2.3", "1.2.3.4", sop, "SECOND"),
    ) else {
        panic!("kept first")
    };
    assert!(fs::read(&instance.path)
        .unwrap()
        .windows(5)
        .any(|w| w == b"FIRST"));
}

#[test]
fn an_instance_over_the_size_limit_is_refused_and_nothing_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let options = SpoolOptions {
        max_instance_mb: 1,
        ..SpoolOptions::new("CSPINE")
    };
    let spool = Spool::open_with(dir.path(), options).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut incoming = spool.begin(header("1.2.3.4.5")).unwrap();
    // 6 MiB in 64 KiB fragments: past the limit, and past a write chunk.
    let fragment = vec![0u8; 64 << 10];
    for _ in 0..96 {
        rt.block_on(incoming.push(&fragment));
    }
    let err = spool.commit(incoming).unwrap_err();
    assert!(matches!(err, StoreError::TooLarge { limit_mb: 1 }), "{err}");
    assert_eq!(fs::read_dir(dir.path().join(".tmp")).unwrap().count(), 0);
    assert!(reindex(dir.path()).unwrap().is_empty());
}

#[test]
fn build_attempts_are_counted_durably_and_go_with_the_series() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), "CSPINE", 0).unwrap();
    let Ok(Stored::New(i)) = store(
        &spool,
        "1.2.3.4.5",
        &dataset("1.2.3", "1.2.3.4", "1.2.3.4.5"),
    ) else {
        panic!("stored")
    };
    // A build that ends: nothing left over.
    assert_eq!(begin_attempt(dir.path(), "1.2.3", "1.2.3.4").unwrap(), 0);
    end_attempt(dir.path(), "1.2.3", "1.2.3.4").unwrap();
    // Two builds killed with the process: the third knows.
    assert_eq!(begin_attempt(dir.path(), "1.2.3", "1.2.3.4").unwrap(), 0);
    assert_eq!(begin_attempt(dir.path(), "1.2.3", "1.2.3.4").unwrap(), 1);
    assert_eq!(begin_attempt(dir.path(), "1.2.3", "1.2.3.4").unwrap(), 2);
    // The count does not make the series an instance, and goes with its files.
    assert_eq!(reindex(dir.path()).unwrap().len(), 1);
    spool.release("1.2.3", "1.2.3.4", &[i.path], true).unwrap();
    assert!(!dir.path().join("1.2.3").exists());
    // Not in the spool: nothing to count.
    assert_eq!(begin_attempt(dir.path(), "1.2.3", "1.2.3.4").unwrap(), 0);
}
