//! The spool's space: a real ENOSPC on a tmpfs spool (A700, recovery), a spool short of
//! space releasing an analysed study early, and the configured free-space floor.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::events::{of, EventLog};
use crate::common::{free_port, wait_until, Mosquitto, Subscriber};
use crate::results::{assert_documented_id, complete_ids, delivered, ids_on, one_of};
use crate::scu::{paths, store, ScuReport};
use crate::site::{analyses, releases, Site};
use crate::studies::{assert_intact, sources, spool_tmp_files, spooled, study, study_of, Source};
use crate::tmpfs::Tmpfs;
use crate::{one_at_a_time, QUIET_PERIOD, RESULT_TIMEOUT, RESULT_TOPIC, RETENTION_2S, TOPICS};

/// Checks shared by the disk-full tests after the refusal: storescu got exactly one A700
/// and stopped (its default), what it was told Success for is in the spool and intact, the
/// refused instance is not, and no temp file is left behind.
fn assert_refused_with_a700(report: &ScuReport, all: &[Source], spool: &Path) {
    assert!(!report.status.success(), "{}", report.log);
    assert_eq!(report.refused.len(), 1, "{}", report.log);
    let (refused, status) = &report.refused[0];
    assert_eq!(
        status, "Refused: OutOfResources",
        "A700 as storescu prints it"
    );
    let on_disk = spooled(spool);
    for path in &report.acked {
        let source = all.iter().find(|s| &s.path == path).unwrap();
        let file = on_disk
            .get(&source.sop)
            .unwrap_or_else(|| panic!("{} was acknowledged but is not in the spool", source.sop));
        assert_intact(source, file);
    }
    let refused = all.iter().find(|s| &s.path == refused).unwrap();
    assert!(!on_disk.contains_key(&refused.sop), "refused but stored");
    assert_eq!(
        spool_tmp_files(spool),
        Vec::<PathBuf>::new(),
        "temp files left"
    );
}

/// The refused instance of `report` (one, [`assert_refused_with_a700`]) is recorded among
/// `run`'s events as refused for `reason` (`docs/events.schema.json`).
fn assert_refused_for(run: &mut EventLog, report: &ScuReport, all: &[Source], reason: &str) {
    let refused = all.iter().find(|s| s.path == report.refused[0].0).unwrap();
    let event = run.wait_for("the refusal event", Duration::from_secs(10), |e| {
        e["event"] == "instance_refused" && e["sop_instance_uid"] == refused.sop.as_str()
    });
    assert_eq!(event["reason"], reason, "{event}");
}

/// After the refusal is over: the rest of the study is sent again, and the series is
/// analysed once with every instance and delivered under its id. Returns seconds from the
/// last response to the result.
fn assert_recovers(
    port: u16,
    acked: &[PathBuf],
    all: &[Source],
    sub: &Subscriber,
    site: &Site,
) -> f64 {
    let rest = paths(all.iter().filter(|s| !acked.contains(&s.path)));
    let report = store(port, &rest);
    assert!(report.status.success(), "{}", report.log);
    let last = Instant::now();
    let series = &all[0].series;
    let candidates = complete_ids(all);
    sub.wait_for_within("the result", RESULT_TIMEOUT, |_| {
        one_of(&ids_on(sub, RESULT_TOPIC), &candidates).is_some()
    });
    let id = one_of(&ids_on(sub, RESULT_TOPIC), &candidates).unwrap();
    let took = last.elapsed().as_secs_f64();
    // Released once its study is forgotten (a short retention in these tests).
    wait_until("the series to be released", RESULT_TIMEOUT, || {
        !releases(&site.all_events(), series).is_empty()
    });
    let events = site.all_events();
    assert_eq!(
        analyses(&events, series),
        vec![all.len()],
        "one analysis, every instance"
    );
    assert_eq!(releases(&events, series), vec![all.len()]);
    let (result, _) = delivered(sub, &id);
    assert_eq!(result["series_instance_uid"], series.as_str());
    assert_documented_id(&result, all);
    took
}

/// A real ENOSPC: the spool is a 24 MiB tmpfs, filled by another file to ~6 MiB free; a
/// 128-slice study (16.5 MB) gets A700 once the disk is full, everything acknowledged
/// before is intact, and once the filler is deleted the same daemon takes the rest and
/// delivers the result. Skipped, with the reason printed, where tmpfs cannot be mounted
/// (the free-space floor test below runs everywhere).
#[test]
fn disk_full_on_a_tmpfs_spool_answers_a700_and_recovers_when_space_returns() {
    let _serial = one_at_a_time();
    let tmp = tempfile::tempdir().unwrap();
    let spool = tmp.path().join("spool");
    let Some(mount) = Tmpfs::mount_or_skip(&spool, 24, "disk full on a tmpfs spool") else {
        return;
    };
    let all = sources(&study(&tmp.path().join("a"), 7301, "C6", "1.5"));
    let broker = Mosquitto::start();
    let sub = Subscriber::start(broker.port, TOPICS);
    let port = free_port();
    // No floor: the write itself must fail. A short retention: the spool ends empty.
    let site = Site::new(
        tmp.path(),
        port,
        &broker.url(),
        "min_free_space_mb = 0",
        RETENTION_2S,
        "",
    );
    let mut run = site.events_from_now();
    let daemon = site.start(&["--quiet-period", QUIET_PERIOD]);

    // Another writer leaves ~6 MiB.
    let filler = spool.join(".filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0x5a_u8; 1 << 20];
        while mount.free_bytes() > (6 << 20) + (1 << 20) {
            f.write_all(&chunk).unwrap();
        }
        f.sync_all().unwrap();
    }
    let free_before = mount.free_bytes();

    let report = store(port, &paths(&all));
    assert_refused_with_a700(&report, &all, &spool);
    // The write itself failed (ENOSPC), not the floor check (the floor is 0).
    assert_refused_for(&mut run, &report, &all, "out_of_resources");
    assert!(report.acked.len() >= 10, "{}", report.log);

    // Space returns: the same daemon, no restart.
    std::fs::remove_file(&filler).unwrap();
    let took = assert_recovers(port, &report.acked, &all, &sub, &site);
    wait_until("the spool to be empty", RESULT_TIMEOUT, || {
        spooled(&spool).is_empty()
    });
    site.assert_events_valid();
    eprintln!(
        "tmpfs spool: {:.1} MiB free, {} of {} instances acknowledged, then A700 (ENOSPC); \
         after the clean-up the rest was taken and the result arrived {took:.1} s after the \
         last response (quiet period {QUIET_PERIOD} s)",
        free_before as f64 / (1 << 20) as f64,
        report.acked.len(),
        all.len()
    );
    drop(daemon);
}

/// A spool short of space (below twice `min_free_space_mb`, above the floor itself): an
/// analysed study is released as soon as its result is committed, not an hour later
/// (`completed_retention_secs = 3600`), so that the next study is not refused. A tmpfs 8
/// MiB larger than the study, floor 5 MiB: the study is accepted whole and leaves about
/// 7.5 MiB, below 10. Skipped, with the reason printed, where tmpfs cannot be mounted.
#[test]
fn short_of_space_an_analysed_study_is_released_before_its_retention() {
    let _serial = one_at_a_time();
    let tmp = tempfile::tempdir().unwrap();
    let spool = tmp.path().join("spool");
    let all = sources(&study(&tmp.path().join("a"), 7302, "C4", "1.5"));
    let study_bytes: u64 = all
        .iter()
        .map(|s| std::fs::metadata(&s.path).unwrap().len())
        .sum();
    // The study plus 8 MiB: it leaves about 7.5 MiB once spooled.
    let Some(mount) = Tmpfs::mount_or_skip(
        &spool,
        study_bytes.div_ceil(1 << 20) + 8,
        "spool short of space on a tmpfs",
    ) else {
        return;
    };
    let broker = Mosquitto::start();
    let sub = Subscriber::start(broker.port, TOPICS);
    let port = free_port();
    let site = Site::new(
        tmp.path(),
        port,
        &broker.url(),
        "min_free_space_mb = 5",
        "completed_retention_secs = 3600.0",
        "",
    );
    let daemon = site.start(&[]);
    let free_before = mount.free_bytes();
    assert!(
        free_before > 10 << 20,
        "{free_before} bytes free before the study"
    );

    let report = store(port, &paths(&all));
    assert!(report.status.success(), "{}", report.log);
    assert_eq!(report.acked.len(), all.len(), "{}", report.log);
    let free_after = mount.free_bytes();
    assert!(
        (5 << 20..10 << 20).contains(&free_after),
        "the study must leave the spool between the floor and twice it: {free_after} bytes"
    );
    let last = Instant::now();
    let candidates = complete_ids(&all);
    sub.wait_for_within("the result", RESULT_TIMEOUT, |_| {
        one_of(&ids_on(&sub, RESULT_TOPIC), &candidates).is_some()
    });
    wait_until("the spool to be empty", Duration::from_secs(60), || {
        spooled(&spool).is_empty()
    });
    let released = last.elapsed().as_secs_f64();
    // The release is recorded once its files are gone.
    let series = &all[0].series;
    wait_until("the release recorded", Duration::from_secs(10), || {
        !releases(&site.all_events(), series).is_empty()
    });
    let events = site.all_events();
    let study_uid = study_of(&all[0]);
    assert!(
        of(&events, "spool_short_of_space").any(|e| e["study_instance_uid"] == study_uid),
        "the study released early for space"
    );
    assert_eq!(analyses(&events, series), vec![all.len()], "one analysis");
    assert_eq!(
        releases(&events, series),
        vec![all.len()],
        "released whole, once"
    );
    assert!(mount.free_bytes() > 10 << 20, "the space came back");
    eprintln!(
        "spool short of space: {:.1} MiB free after {} instances (floor 5 MiB); result \
         committed and the study released {released:.1} s after the last response, \
         retention 3600 s",
        free_after as f64 / (1 << 20) as f64,
        all.len()
    );
    site.assert_events_valid();
    drop(daemon);
}

/// The configured floor (`dicom.min_free_space_mb`) through the whole daemon, runnable
/// anywhere: half a study is acknowledged, the daemon restarts with a floor above the free
/// space and answers A700 to the rest while the first half stays intact in the spool, then
/// restarts with the floor lowered, takes the rest and delivers one result for the whole
/// series.
#[test]
fn below_the_free_space_floor_a700_keeps_what_was_acknowledged_and_recovers() {
    let _serial = one_at_a_time();
    let tmp = tempfile::tempdir().unwrap();
    let all = sources(&study(&tmp.path().join("a"), 7401, "C4", "1.5"));
    let (half, _) = all.split_at(all.len() / 2);
    let broker = Mosquitto::start();
    let sub = Subscriber::start(broker.port, TOPICS);
    let port = free_port();
    let spool = tmp.path().join("spool");
    let serve_args = ["--quiet-period", QUIET_PERIOD];
    let floor = |mb: u64| format!("min_free_space_mb = {mb}");
    let site = Site::new(tmp.path(), port, &broker.url(), &floor(0), RETENTION_2S, "");

    let mut daemon = site.start(&serve_args);
    let report = store(port, &paths(half));
    assert!(report.status.success(), "{}", report.log);
    let mut acked = report.acked;
    daemon.kill9();

    // More than any disk has free.
    let site = site.reconfigure(&floor(1 << 40), RETENTION_2S, "");
    let mut run = site.events_from_now();
    let mut daemon = site.start(&serve_args);
    let report = store(
        port,
        &paths(all.iter().filter(|s| !acked.contains(&s.path))),
    );
    assert!(report.acked.is_empty(), "{}", report.log);
    assert_refused_with_a700(&report, &all, &spool);
    let on_disk = spooled(&spool);
    for s in half {
        assert_intact(s, &on_disk[&s.sop]);
    }
    // Refused for the floor (`dicom.min_free_space_mb`).
    assert_refused_for(&mut run, &report, &all, "short_of_space");
    daemon.kill9();
    acked.extend(report.acked);

    let site = site.reconfigure(&floor(0), RETENTION_2S, "");
    let daemon = site.start(&serve_args);
    let took = assert_recovers(port, &acked, &all, &sub, &site);
    eprintln!(
        "free-space floor: {} acknowledged, A700 while the floor was above the free space, \
         result {took:.1} s after the last response once it was lowered",
        half.len()
    );
    site.assert_events_valid();
    drop(daemon);
}
