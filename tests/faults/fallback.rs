//! A study whose best series cannot be built is analysed with a fallback series; after a
//! restart neither series is tried again.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::events::is_of_series;
use crate::common::{free_port, Mosquitto, Subscriber};
use crate::results::{complete_ids, ids_on, one_of};
use crate::scu::{paths, store};
use crate::site::Site;
use crate::studies::{sources, study, study_of, Source};
use crate::{one_at_a_time, RESULT_TIMEOUT, RESULT_TOPIC, TOPICS};

/// Rewrites a generated study as two series of one study, in `out/soft` and `out/bone`:
/// the original with a soft-tissue kernel, and a copy (new series and SOP Instance UIDs)
/// with a bone kernel, which ranks first, missing a slice in the middle, so that it
/// cannot be built and the soft series is analysed as its fallback.
fn soft_and_broken_bone(study_dir: &Path, out: &Path) -> (Vec<Source>, Vec<Source>) {
    let script = r#"
import sys, pathlib, pydicom
from pydicom.uid import generate_uid
src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
files = sorted(src.glob("*.dcm"), key=lambda p: int(p.stem))
(out / "soft").mkdir(parents=True); (out / "bone").mkdir()
bone_series = generate_uid()
for k, f in enumerate(files):
    ds = pydicom.dcmread(f)
    ds.ConvolutionKernel = "STANDARD"
    ds.save_as(out / "soft" / f.name)
    if k == len(files) // 2:
        continue
    ds.ConvolutionKernel = "BONE"
    ds.SeriesInstanceUID = bone_series
    ds.SeriesNumber = int(ds.get("SeriesNumber", 1)) + 1
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(out / "bone" / f.name)
"#;
    let status = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(study_dir)
        .arg(out)
        .status()
        .expect("python3 with pydicom");
    assert!(status.success());
    (sources(&[out.join("soft")]), sources(&[out.join("bone")]))
}

/// The best series of a study (bone kernel) cannot be built (a missing slice) and its
/// fallback (soft kernel) is analysed: its result marks both series in the spool, so
/// that a restart within the retention neither analyses the soft series again nor tries
/// the broken bone series on its own (which used to publish its `failed` result as a new
/// revision of the study).
#[test]
fn after_a_restart_a_series_its_fallback_stood_in_for_is_not_tried_again() {
    let _serial = one_at_a_time();
    let tmp = tempfile::tempdir().unwrap();
    let generated = study(&tmp.path().join("gen"), 7401, "none", "1.5");
    let (soft, bone) = soft_and_broken_bone(&generated[0], &tmp.path().join("two"));
    // The copies lie outside synth's `train_images/<study>/`: the study from the original.
    let study_uid = study_of(&sources(&generated)[0]);
    let broker = Mosquitto::start();
    let sub = Subscriber::start(broker.port, TOPICS);
    let port = free_port();
    let site = Site::new(tmp.path(), port, &broker.url(), "", "", "");
    let serve_args = ["--quiet-period", "2"];
    let mut run = site.events_from_now();
    let mut daemon = site.start(&serve_args);
    let report = store(port, &paths(soft.iter().chain(&bone)));
    assert!(report.status.success(), "{}", report.log);
    let soft_ids = complete_ids(&soft);
    sub.wait_for_within("the fallback's result", RESULT_TIMEOUT, |_| {
        one_of(&ids_on(&sub, RESULT_TOPIC), &soft_ids).is_some()
    });
    // The broken series is marked with the fallback's result.
    let soft_id = one_of(&ids_on(&sub, RESULT_TOPIC), &soft_ids).unwrap();
    let marked = run.wait_for("the broken series marked", RESULT_TIMEOUT, |e| {
        is_of_series(e, "series_marked", &bone[0].series)
    });
    assert_eq!(marked["cause"], "fallback_result", "{marked}");
    assert_eq!(marked["result_id"], soft_id.as_str(), "{marked}");
    assert!(
        run.any(|e| is_of_series(e, "analysis_started", &soft[0].series) && e["fallback"] == true),
        "the soft series analysed as the fallback"
    );

    // Restart within the retention (an hour by default).
    daemon.kill9();
    let mut run = site.events_from_now();
    let daemon = site.start(&serve_args);
    // Both series remembered as analysed.
    for series in [&soft[0].series, &bone[0].series] {
        let remembered = run.wait_for("the series remembered", RESULT_TIMEOUT, |e| {
            is_of_series(e, "series_remembered", series)
        });
        assert_eq!(remembered["study_instance_uid"], study_uid.as_str());
        assert_eq!(remembered["result_id"], soft_id.as_str(), "{remembered}");
    }
    // Quiet period, study quiet period and a build would be over by now.
    std::thread::sleep(Duration::from_secs(8));
    let ids = ids_on(&sub, RESULT_TOPIC);
    assert_eq!(ids.len(), 1, "one result in all, the fallback's: {ids:?}");
    let started = run.of("analysis_started");
    assert!(
        started.is_empty(),
        "analysed after the restart: {started:?}"
    );
    eprintln!(
        "fallback: {} bone instances (one missing) and {} soft; one result before the \
         restart, none after",
        bone.len(),
        soft.len()
    );
    site.assert_events_valid();
    drop(daemon);
}
