//! A real ENOSPC under the outbox: the result waits (nothing committed, marked or
//! released) until space returns, also across kills.

use std::collections::BTreeSet;
use std::time::Instant;

use serde_json::Value;

use crate::common::events::{is_of_series, of};
use crate::common::{free_port, wait_until, Mosquitto, Subscriber};
use crate::results::{
    assert_documented_id, complete_ids, delivered, ids_on, outbox_ids, published_at,
};
use crate::scu::{paths, store};
use crate::site::{analyses, commits, releases, Site};
use crate::studies::{analysed_mark, sources, spooled, study};
use crate::tmpfs::{fill_up, Tmpfs};
use crate::{one_at_a_time, RESULT_TIMEOUT, RESULT_TOPIC, RETENTION_2S, TOPICS};

/// A real ENOSPC under the outbox: the outbox directory is a 1 MiB tmpfs (mounted when the
/// test runs as root and `mount -t tmpfs` works, otherwise it prints `SKIPPED ...` and
/// returns), filled to the last page by another file, so that committing a result fails.
///
/// First without a restart: the commit failure is recorded (`outbox_commit_retry`) with
/// the id and the cause (`no_space`) and retried (every 5 s), nothing is published, the series is neither marked analysed nor
/// released from the spool (its 2 s retention passes meanwhile), and the outbox holds no
/// entry or temp file; once the filler is deleted the same daemon commits the result
/// (`timings.published` is after the space returned), marks the series, delivers the
/// result under its documented id and releases the series.
///
/// Then a second study while the disk is full again, and kill -9 while its commit fails;
/// a restart while the disk is still full (the daemon starts, analyses the series again
/// from the spool and fails the same way), kill -9 again; space returns, a restart:
/// the result arrives, committed once, under its documented id; the first study is
/// neither analysed nor delivered again.
#[test]
fn disk_full_under_the_outbox_holds_the_result_until_space_returns_even_across_kills() {
    let _serial = one_at_a_time();
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let outbox = tmp.path().join("outbox");
    let Some(mount) = Tmpfs::mount_or_skip(&outbox, 1, "disk full under the outbox") else {
        return;
    };
    let first = sources(&study(&tmp.path().join("a"), 7701, "C3", "1.5"));
    let second = sources(&study(&tmp.path().join("b"), 7702, "none", "1.5"));
    let (ids1, ids2) = (complete_ids(&first), complete_ids(&second));
    let broker = Mosquitto::start();
    let sub = Subscriber::start(broker.port, TOPICS);
    let port = free_port();
    let spool = tmp.path().join("spool");
    // A short retention: a series whose result is committed leaves the spool 2 s after
    // its last instance; one whose result is not committed must stay.
    let site = Site::new(tmp.path(), port, &broker.url(), "", RETENTION_2S, "");
    let serve_args = ["--quiet-period", "1"];
    let failure = "outbox_commit_retry";

    // 1. Full, then space returns; the same daemon.
    let mut run = site.events_from_now();
    let mut daemon = site.start(&serve_args);
    let filler = fill_up(&outbox);
    assert_eq!(mount.free_bytes(), 0);
    let report = store(port, &paths(&first));
    assert!(report.status.success(), "{}", report.log);
    let full_at = Instant::now();
    // Two failed attempts: recorded, with their cause, and retried.
    wait_until("two failed commits", RESULT_TIMEOUT, || {
        run.of(failure).len() >= 2
    });
    let events = run.read().to_vec();
    let failures: Vec<&Value> = of(&events, failure).collect();
    for e in &failures {
        assert_eq!(e["reason"], "no_space", "{e}");
        assert_eq!(e["retry_in_secs"], 5.0, "{e}");
        assert!(ids1.contains(e["result_id"].as_str().unwrap()), "{e}");
    }
    let id1 = failures[0]["result_id"].as_str().unwrap().to_string();
    let example = failures[0].to_string();
    // Nothing committed, published, marked or released; the spool holds the series.
    assert_eq!(of(&events, "result_committed").count(), 0);
    assert_eq!(outbox_ids(&outbox), Vec::<String>::new());
    let leftovers: Vec<String> = std::fs::read_dir(&outbox)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".lock" && n != ".filler")
        .collect();
    assert!(leftovers.is_empty(), "outbox files: {leftovers:?}");
    assert!(
        analysed_mark(&spool, &first[0]).is_none(),
        "marked before its commit"
    );
    assert!(analyses(&events, &first[0].series).is_empty());
    assert!(
        releases(&events, &first[0].series).is_empty(),
        "released before its commit"
    );
    assert_eq!(spooled(&spool).len(), first.len());
    assert!(sub.on(RESULT_TOPIC).is_empty());
    let waited = full_at.elapsed();

    std::fs::remove_file(&filler).unwrap();
    let space_back = time::OffsetDateTime::now_utc();
    let space_back_at = Instant::now();
    sub.wait_for_within("the first result", RESULT_TIMEOUT, |_| {
        ids_on(&sub, RESULT_TOPIC).contains(&id1)
    });
    let took1 = space_back_at.elapsed();
    wait_until("the first series released", RESULT_TIMEOUT, || {
        !releases(run.read(), &first[0].series).is_empty()
    });
    wait_until("the outbox to drain", RESULT_TIMEOUT, || {
        outbox_ids(&outbox).is_empty()
    });
    let events = run.read().to_vec();
    let (r1, n1) = delivered(&sub, &id1);
    assert_documented_id(&r1, &first);
    assert!(
        published_at(&r1) > space_back,
        "published is the commit: {r1}"
    );
    assert_eq!(commits(&events, &id1), 1);
    assert_eq!(analyses(&events, &first[0].series), vec![first.len()]);
    assert_eq!(releases(&events, &first[0].series), vec![first.len()]);
    // In that order: the failures, the commit, the mark, the release.
    let series1 = first[0].series.as_str();
    let at = |what: &str, pred: &dyn Fn(&Value) -> bool| {
        events
            .iter()
            .position(pred)
            .unwrap_or_else(|| panic!("no {what} event"))
    };
    let failed = at("failure", &|e| e["event"] == failure);
    let committed = at("commit", &|e| {
        e["event"] == "result_committed" && e["result_id"] == id1.as_str()
    });
    let marked = at("mark", &|e| is_of_series(e, "series_marked", series1));
    let released = at("release", &|e| {
        is_of_series(e, "spool_released", series1) && e["reason"] == "study_forgotten"
    });
    assert!(
        failed < committed && committed < marked && marked < released,
        "{failed} {committed} {marked} {released}"
    );
    let failed_attempts1 = of(&events, failure).count();

    // 2. Full again: kill -9 while the second result cannot be committed.
    let filler = fill_up(&outbox);
    let mut since = site.events_from_now();
    let report = store(port, &paths(&second));
    assert!(report.status.success(), "{}", report.log);
    let failed = since.wait_for("the second result's commit to fail", RESULT_TIMEOUT, |e| {
        e["event"] == failure
    });
    let id2 = failed["result_id"].as_str().unwrap().to_string();
    assert!(ids2.contains(&id2));
    daemon.kill9();
    assert_eq!(outbox_ids(&outbox), Vec::<String>::new());
    assert!(analysed_mark(&spool, &second[0]).is_none());
    assert_eq!(
        spooled(&spool).len(),
        second.len(),
        "the second series waits in the spool"
    );

    // Restarted while the disk is still full: it starts, analyses the series again from
    // the spool, and cannot commit it either.
    let mut run = site.events_from_now();
    let mut daemon = site.start(&serve_args);
    run.wait_for(
        "the commit to fail after the restart",
        RESULT_TIMEOUT,
        |e| e["event"] == failure && e["result_id"] == id2.as_str() && e["reason"] == "no_space",
    );
    daemon.kill9();
    assert_eq!(outbox_ids(&outbox), Vec::<String>::new());

    // Space returns, then a restart.
    std::fs::remove_file(&filler).unwrap();
    let restart = Instant::now();
    let daemon = site.start(&serve_args);
    sub.wait_for_within("the second result", RESULT_TIMEOUT, |_| {
        ids_on(&sub, RESULT_TOPIC).contains(&id2)
    });
    let took2 = restart.elapsed();
    wait_until("the outbox to drain", RESULT_TIMEOUT, || {
        outbox_ids(&outbox).is_empty()
    });
    wait_until("the spool to be empty", RESULT_TIMEOUT, || {
        spooled(&spool).is_empty() && !releases(&site.all_events(), &second[0].series).is_empty()
    });
    let events = site.all_events();
    let (r2, n2) = delivered(&sub, &id2);
    assert_documented_id(&r2, &second);
    assert_eq!(
        ids_on(&sub, RESULT_TOPIC),
        BTreeSet::from([id1.clone(), id2.clone()]),
        "nothing else"
    );
    assert_eq!(
        delivered(&sub, &id1).1,
        n1,
        "the first result is not delivered again"
    );
    assert_eq!(commits(&events, &id2), 1, "committed once");
    assert_eq!(
        commits(&events, &id1),
        1,
        "the first series is not analysed again"
    );
    assert_eq!(analyses(&events, &first[0].series), vec![first.len()]);
    assert_eq!(analyses(&events, &second[0].series), vec![second.len()]);
    assert_eq!(releases(&events, &second[0].series), vec![second.len()]);
    eprintln!(
        "outbox on a full 1 MiB tmpfs: {failed_attempts1} failed commits of the first result in \
         {:.1} s (ENOSPC, recorded, retried every 5 s; series neither marked nor released), \
         result delivered {:.1} s after the space returned, without a restart, {n1} cop(y/ies); \
         second result: {} failed commits across two runs killed with SIGKILL (one started on \
         the full disk), delivered {:.1} s after the restart that followed the clean-up, {n2} \
         cop(y/ies), committed once; test {:.1} s; the first failure: {example}",
        waited.as_secs_f64(),
        took1.as_secs_f64(),
        of(&events, failure).count() - failed_attempts1,
        took2.as_secs_f64(),
        started.elapsed().as_secs_f64(),
    );
    site.assert_events_valid();
    drop(daemon);
}
