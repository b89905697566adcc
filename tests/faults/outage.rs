//! The broker down: results wait in the outbox across a kill -9 and arrive once it is up;
//! and a crash between a result's commit and its series' mark, made deterministic with the
//! broker down.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::events::{is_of_series, EventLog};
use crate::common::{free_port, wait_until, Mosquitto, SubOptions, Subscriber};
use crate::results::{assert_documented_id, complete_ids, delivered, ids_on, outbox_ids};
use crate::scu::{paths, store};
use crate::site::{analyses, commits, Site};
use crate::studies::{sources, spooled, study, study_of};
use crate::{one_at_a_time, RESULT_TIMEOUT, RESULT_TOPIC, TOPICS};

/// A dashboard subscribed while the broker was still up, with a persistent session (the
/// broker keeps its subscription and queues QoS 1 messages for it, docs/ALERTS.md), then
/// the broker stopped: `broker.restart()` brings it back on the same port.
fn dashboard_then_broker_down(client_id: &'static str) -> (Mosquitto, Subscriber) {
    let mut broker = Mosquitto::start();
    let sub = Subscriber::start_with(
        broker.port,
        TOPICS,
        SubOptions {
            client_id,
            persistent: true,
            ..SubOptions::default()
        },
    );
    broker.stop();
    (broker, sub)
}

/// The broker is down from before the daemon starts: two studies arrive, one before and
/// one after a kill -9 of the daemon, their results wait in the outbox (the spool keeps
/// the analysed series, marked analysed), and both reach a dashboard with a persistent
/// session once the broker is up, in order, under their documented ids, the first one
/// exactly as committed before the restart: the restarted daemon finds the first series
/// marked analysed in the spool and does not analyse it again.
#[test]
fn broker_down_results_wait_in_the_outbox_across_a_restart_then_arrive() {
    let _serial = one_at_a_time();
    let tmp = tempfile::tempdir().unwrap();
    let (mut broker, sub) = dashboard_then_broker_down("faults-dashboard");
    let down = Instant::now();

    let first = sources(&study(&tmp.path().join("a"), 7201, "C3", "1.5"));
    let second = sources(&study(&tmp.path().join("b"), 7202, "none", "1.5"));
    let (ids1, ids2) = (complete_ids(&first), complete_ids(&second));
    // The single outbox entry, once it is one of `candidates`.
    let queued = |candidates: &BTreeSet<String>| {
        let ids = outbox_ids(&tmp.path().join("outbox"));
        match &ids[..] {
            [id] if candidates.contains(id) => Some(id.clone()),
            _ => None,
        }
    };
    let port = free_port();
    // Retry the broker every second at most, so the test does not wait out a long backoff.
    let site = Site::new(
        tmp.path(),
        port,
        &broker.url(),
        "",
        "",
        "reconnect_max_secs = 1.0",
    );
    let outbox = tmp.path().join("outbox");
    let spool = tmp.path().join("spool");
    let serve_args = ["--quiet-period", "2"];

    let mut run = site.events_from_now();
    let mut daemon = site.start(&serve_args);
    let report = store(port, &paths(&first));
    assert!(report.status.success(), "{}", report.log);
    wait_until("the first result in the outbox", RESULT_TIMEOUT, || {
        queued(&ids1).is_some()
    });
    let id1 = queued(&ids1).unwrap();
    wait_until(
        "the first series marked analysed in the spool",
        RESULT_TIMEOUT,
        || !analyses(run.read(), &first[0].series).is_empty(),
    );
    assert_eq!(
        spooled(&spool).len(),
        first.len(),
        "the analysed series stays in the spool while its study is remembered"
    );
    run.wait_for("a failed broker connection", RESULT_TIMEOUT, |e| {
        e["event"] == "broker_connection_failed"
    });

    // Power cut while the broker is still down; the outbox is all there is of result 1.
    daemon.kill9();
    let restarted_at = time::OffsetDateTime::now_utc();
    let mut run = site.events_from_now();
    let daemon = site.start(&serve_args);
    assert_eq!(
        outbox_ids(&outbox),
        std::slice::from_ref(&id1),
        "the outbox survives kill -9"
    );
    // The spool's analysed mark survives it too: the series is remembered, not analysed
    // again (checked below: result 1 committed once).
    let remembered = run.wait_for("the first series remembered", RESULT_TIMEOUT, |e| {
        is_of_series(e, "series_remembered", &first[0].series)
    });
    assert_eq!(remembered["study_instance_uid"], study_of(&first[0]));
    assert_eq!(remembered["instances"], first.len());
    assert_eq!(remembered["result_id"], id1.as_str());
    let report = store(port, &paths(&second));
    assert!(report.status.success(), "{}", report.log);
    wait_until("both results in the outbox", RESULT_TIMEOUT, || {
        let ids = outbox_ids(&outbox);
        ids.len() == 2 && ids[0] == id1 && ids2.contains(&ids[1])
    });
    let id2 = outbox_ids(&outbox)[1].clone();
    // Still nothing delivered, and the daemon is trying.
    let failures = |run: &mut EventLog| run.of("broker_connection_failed").len();
    wait_until(
        "reconnect attempts after the restart",
        RESULT_TIMEOUT,
        || failures(&mut run) >= 2,
    );
    assert_eq!(
        outbox_ids(&outbox).len(),
        2,
        "nothing leaves unacknowledged"
    );
    // FAULTS_OUTAGE_SECS=180 holds the broker down for minutes (the outage; not
    // the default, to keep the test short: nothing in the daemon depends on the length
    // beyond the reconnect backoff cap).
    if let Some(secs) = std::env::var("FAULTS_OUTAGE_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
    {
        let hold = Duration::from_secs_f64(secs);
        while down.elapsed() < hold {
            std::thread::sleep(Duration::from_millis(200));
        }
        assert_eq!(
            outbox_ids(&outbox),
            [id1.clone(), id2.clone()],
            "still queued"
        );
    }
    let outage = down.elapsed();

    broker.restart();
    let up = Instant::now();
    sub.wait_for_within("both results after the outage", RESULT_TIMEOUT, |_| {
        let ids = ids_on(&sub, RESULT_TOPIC);
        ids.contains(&id1) && ids.contains(&id2)
    });
    let delivery = up.elapsed();
    wait_until("the outbox to drain", RESULT_TIMEOUT, || {
        outbox_ids(&outbox).is_empty()
    });
    let events = site.all_events();

    // In commit order, under the documented ids, nothing else.
    let order: Vec<String> = sub
        .on(RESULT_TOPIC)
        .iter()
        .map(|m| serde_json::from_slice::<serde_json::Value>(&m.payload).unwrap()["id"].clone())
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let mut distinct = order.clone();
    distinct.dedup();
    assert_eq!(distinct, [id1.clone(), id2.clone()], "order: {order:?}");
    let (r1, n1) = delivered(&sub, &id1);
    let (r2, n2) = delivered(&sub, &id2);
    assert_eq!(r1["series_instance_uid"], first[0].series.as_str());
    assert_eq!(r2["series_instance_uid"], second[0].series.as_str());
    assert_documented_id(&r1, &first);
    assert_documented_id(&r2, &second);
    // Result 1 is the one committed before the kill, replayed from the outbox: not
    // analysed again by the second daemon (its spool copy is marked analysed).
    let published = |r: &serde_json::Value| {
        time::OffsetDateTime::parse(
            r["timings"]["published"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
    };
    assert!(published(&r1) < restarted_at, "{r1}");
    assert!(published(&r2) > restarted_at, "{r2}");
    assert_eq!(commits(&events, &id1), 1);
    assert_eq!(commits(&events, &id2), 1);
    assert_eq!(analyses(&events, &first[0].series), vec![first.len()]);
    assert_eq!(analyses(&events, &second[0].series), vec![second.len()]);
    assert_eq!(
        spooled(&spool).len(),
        first.len() + second.len(),
        "both analysed series are kept while their studies are remembered"
    );
    eprintln!(
        "broker down {:.1} s (daemon killed and restarted meanwhile, {} failed connects after \
         the restart); both results delivered {:.2} s after the broker came up, copies {n1} \
         and {n2}",
        outage.as_secs_f64(),
        failures(&mut run),
        delivery.as_secs_f64()
    );
    site.assert_events_valid();
    drop(daemon);
}

// ---------------------------------------------------------------- commit before mark

/// A crash between the outbox commit of a result and the spool's analysed mark of its
/// series (the window the kill test through analysis hits about once in 20 kills). Made
/// deterministic here: the broker is down, so the result waits in the outbox; the daemon
/// is killed after the mark and the mark is deleted, as if the kill had come before it.
/// The restart finds the waiting result, marks the series from it and does not analyse it
/// again: one commit, one analysis, and the subscriber gets byte-identical copies of one
/// payload (before, the series was analysed again and a second copy of the id went out
/// with other `timings`).
#[test]
fn a_result_committed_before_its_series_was_marked_is_not_analysed_again() {
    let _serial = one_at_a_time();
    let tmp = tempfile::tempdir().unwrap();
    let (mut broker, sub) = dashboard_then_broker_down("faults-commit-mark");
    let all = sources(&study(&tmp.path().join("a"), 7501, "C5", "1.5"));
    let ids = complete_ids(&all);
    let outbox = tmp.path().join("outbox");
    let spool = tmp.path().join("spool");
    let port = free_port();
    let site = Site::new(
        tmp.path(),
        port,
        &broker.url(),
        "",
        "",
        "reconnect_max_secs = 1.0",
    );
    let serve_args = ["--quiet-period", "2"];
    let mut daemon = site.start(&serve_args);
    let report = store(port, &paths(&all));
    assert!(report.status.success(), "{}", report.log);
    let series = &all[0].series;
    wait_until("the series marked analysed", RESULT_TIMEOUT, || {
        !analyses(&site.all_events(), series).is_empty()
    });
    let id = outbox_ids(&outbox)
        .into_iter()
        .find(|i| ids.contains(i))
        .expect("the result waits in the outbox");
    daemon.kill9();
    let mark = spool
        .join(study_of(&all[0]))
        .join(series)
        .join(".analysed.json");
    std::fs::remove_file(&mark).unwrap_or_else(|e| panic!("{}: {e}", mark.display()));

    let mut run = site.events_from_now();
    let daemon = site.start(&serve_args);
    let restored = run.wait_for("the mark restored from the outbox", RESULT_TIMEOUT, |e| {
        e["event"] == "series_marked" && e["cause"] == "waiting_in_outbox"
    });
    assert_eq!(restored["result_id"], id.as_str(), "{restored}");
    assert_eq!(restored["series_instance_uid"], series.as_str());
    assert_eq!(restored["instances"], all.len());
    broker.restart();
    sub.wait_for_within("the result", RESULT_TIMEOUT, |_| {
        ids_on(&sub, RESULT_TOPIC).contains(&id)
    });
    wait_until("the outbox to drain", RESULT_TIMEOUT, || {
        outbox_ids(&outbox).is_empty()
    });
    // Longer than the quiet period: an analysis after the restart would have come by now.
    std::thread::sleep(Duration::from_secs(5));
    let events = site.all_events();
    assert_eq!(commits(&events, &id), 1, "committed once");
    assert_eq!(analyses(&events, series), vec![all.len()], "analysed once");
    let again: Vec<&Value> = run
        .read()
        .iter()
        .filter(|e| e["event"] == "analysis_started" || e["event"] == "inference_started")
        .collect();
    assert!(
        again.is_empty(),
        "analysed again after the restart: {again:?}"
    );
    assert_eq!(
        ids_on(&sub, RESULT_TOPIC),
        [id.clone()].into_iter().collect()
    );
    let (result, copies) = delivered(&sub, &id);
    assert_documented_id(&result, &all);
    eprintln!("commit before mark: mark restored from the outbox; {copies} identical copies");
    site.assert_events_valid();
    drop(daemon);
}
