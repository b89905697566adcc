//! kill -9 while a stream of studies is received: nothing acknowledged is lost, and
//! each series is analysed once, whole.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use crate::common::{free_port, wait_until, Mosquitto, Subscriber};
use crate::results::{assert_documented_id, complete_ids, delivered, ids_on, one_of, outbox_ids};
use crate::scu::{paths, store, Scu};
use crate::site::{analyses, commits, duplicates, releases, Site};
use crate::studies::{
    assert_intact, of_series, series_sizes, sources, spool_rejected, spooled, study, Source,
};
use crate::{
    faults_seed, one_at_a_time, QUIET_PERIOD, RESULT_TIMEOUT, RESULT_TOPIC, RETENTION_2S, TOPICS,
};

/// kill -9 at random moments while a stream of two studies is sent: every instance the
/// scanner was told Success for is on disk after every crash; after the final restart
/// each series is analysed once, whole, and its result reaches the dashboard with the
/// documented id (repeats byte-identical).
#[test]
fn kill_9_during_a_stream_of_studies_loses_no_acknowledged_instance() {
    const KILLS: usize = 20;
    let _serial = one_at_a_time();
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start();
    let sub = Subscriber::start(broker.port, TOPICS);

    // Two studies of ~300 slices (0.6 mm), one with a fracture.
    let mut studies = study(&tmp.path().join("a"), 7101, "C2", "0.6");
    studies.extend(study(&tmp.path().join("b"), 7102, "none", "0.6"));
    let all = sources(&studies);
    let sizes = series_sizes(&all);
    let series_of: HashMap<PathBuf, Source> =
        all.iter().map(|s| (s.path.clone(), s.clone())).collect();
    let spool = tmp.path().join("spool");
    let port = free_port();
    // A short retention: the analysed series leave the spool soon after their results, so
    // that the test sees the spool end empty.
    let site = Site::new(tmp.path(), port, &broker.url(), "", RETENTION_2S, "");
    let serve_args = ["--quiet-period", QUIET_PERIOD];

    let seed = faults_seed();
    eprintln!("kill -9 test: FAULTS_SEED={seed} (set it to replay the same kill moments)");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    // At most this many Success responses before a kill, so that all the kills fall inside
    // the stream with room to spare.
    let max_k = all.len() * 2 / (3 * KILLS);

    let mut acked: BTreeSet<String> = BTreeSet::new();
    let mut stored_unanswered: BTreeSet<String> = BTreeSet::new();
    let storm = Instant::now();
    for kill in 1..=KILLS {
        let remaining = paths(all.iter().filter(|s| !acked.contains(&s.sop)));
        // A random moment. One kill in ten: while the daemon starts (re-indexing the spool,
        // loading the model, opening its port), the scanner retrying meanwhile. Otherwise
        // after k responses of this association (k = 0: within 100 ms of the scanner's
        // start), plus a random fraction of the next instance (receive, parse-back, fsync,
        // link, answer take ~10 ms here).
        let moment;
        let (mut daemon, scu) = if rng.gen_range(0..10) == 0 {
            let daemon = site.spawn(&serve_args);
            let scu = Scu::start(port, &remaining);
            let ms = rng.gen_range(0..400);
            std::thread::sleep(Duration::from_millis(ms));
            moment = format!("{ms} ms after start-up began");
            (daemon, scu)
        } else {
            let daemon = site.start(&serve_args);
            let mut scu = Scu::start(port, &remaining);
            let k = rng.gen_range(0..=max_k);
            if k == 0 {
                let ms = rng.gen_range(0..100);
                std::thread::sleep(Duration::from_millis(ms));
                moment = format!("{ms} ms after the scanner started");
            } else {
                let deadline = Instant::now() + Duration::from_secs(60);
                while scu.successes() < k && !scu.exited() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(1));
                }
                let us = rng.gen_range(0..12_000);
                std::thread::sleep(Duration::from_micros(us));
                moment = format!("{:.1} ms after response {k}", us as f64 / 1000.0);
            }
            (daemon, scu)
        };
        daemon.kill9();
        let report = scu.finish();
        assert!(
            !report.status.success(),
            "kill {kill} ({moment}): storescu finished the stream before the kill; the kills \
             must fall inside the stream\n{}",
            report.log
        );
        assert!(
            report.refused.is_empty(),
            "kill {kill}: {:?}",
            report.refused
        );
        acked.extend(report.acked.iter().map(|p| series_of[p].sop.clone()));

        // The crash state: every instance acknowledged so far is in the spool, intact
        // (unless its series was already analysed and forgotten: not expected here).
        let on_disk = spooled(&spool);
        let events = site.all_events();
        for sop in &acked {
            let source = all.iter().find(|s| &s.sop == sop).unwrap();
            match on_disk.get(sop) {
                Some(file) => {
                    if report.acked.contains(&source.path) {
                        assert_intact(source, file);
                    }
                }
                None => assert!(
                    !releases(&events, &source.series).is_empty(),
                    "kill {kill}: instance {sop} was acknowledged but is not in the spool"
                ),
            }
        }
        // An instance stored but not yet answered: storescu sends it again, the daemon
        // answers Success without storing it twice.
        stored_unanswered.extend(on_disk.keys().filter(|s| !acked.contains(*s)).cloned());
        eprintln!(
            "kill {kill:2} ({moment}): {:3} acknowledged in this association, {:3}/{} in total",
            report.acked.len(),
            acked.len(),
            all.len()
        );
    }
    let storm = storm.elapsed();
    assert!(acked.len() < all.len(), "the stream ended during the kills");
    let events = site.all_events();
    for series in sizes.keys() {
        assert!(
            analyses(&events, series).is_empty(),
            "series {series} was analysed during the kills (a restart gap longer than the \
             {QUIET_PERIOD} s quiet period?): a partial result"
        );
    }

    // Final start: the re-index keeps every acknowledged instance (none was rejected as
    // unreadable), and the scanner sends what it still has no Success for.
    let daemon = site.start(&serve_args);
    // (A series already analysed and forgotten has its instances in its result instead:
    // checked below against the instance count of the analysis.)
    let in_spool = |acked: &BTreeSet<String>| {
        let on_disk = spooled(&spool);
        let missing: Vec<&Source> = all
            .iter()
            .filter(|s| acked.contains(&s.sop) && !on_disk.contains_key(&s.sop))
            .collect();
        // A release in progress while the spool was listed is recorded once it is done.
        let deadline = Instant::now() + Duration::from_secs(10);
        for s in missing {
            while releases(&site.all_events(), &s.series).is_empty() {
                assert!(
                    Instant::now() < deadline,
                    "acknowledged, not in the spool: {}",
                    s.sop
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    in_spool(&acked);
    let remaining = paths(all.iter().filter(|s| !acked.contains(&s.sop)));
    let report = store(port, &remaining);
    assert!(report.status.success(), "final send: {}", report.log);
    let last_response = Instant::now();
    acked.extend(report.acked.iter().map(|p| series_of[p].sop.clone()));
    assert_eq!(acked.len(), all.len(), "every instance acknowledged");
    in_spool(&acked);

    let candidates: BTreeMap<String, BTreeSet<String>> = sizes
        .keys()
        .map(|s| (s.clone(), complete_ids(&of_series(&all, s))))
        .collect();
    sub.wait_for_within("a result for each series", RESULT_TIMEOUT, |_| {
        let got = ids_on(&sub, RESULT_TOPIC);
        candidates.values().all(|c| one_of(&got, c).is_some())
    });
    let got = ids_on(&sub, RESULT_TOPIC);
    let ids: BTreeMap<String, String> = candidates
        .iter()
        .map(|(series, c)| (series.clone(), one_of(&got, c).unwrap()))
        .collect();
    let time_to_results = last_response.elapsed();
    wait_until("the outbox to drain", RESULT_TIMEOUT, || {
        outbox_ids(&tmp.path().join("outbox")).is_empty()
    });
    // The analysed series stay in the spool until their study is forgotten (2 s after its
    // last instance here, once its result is committed). The release is recorded after its
    // files are gone (and its directories removed and fsynced): wait for its event too, or
    // the check below races with it.
    wait_until("the spool to be released", RESULT_TIMEOUT, || {
        let events = site.all_events();
        spooled(&spool).is_empty()
            && sizes
                .keys()
                .all(|series| !releases(&events, series).is_empty())
    });
    let events = site.all_events();
    assert!(
        spool_rejected(&spool).is_empty(),
        "the re-index rejected files: {:?}",
        spool_rejected(&spool)
    );

    // Each series analysed once, with every instance, committed once, kept in the spool
    // until its study was forgotten, then released whole; delivered as one result
    // (byte-identical copies allowed) under its documented id; nothing else.
    assert_eq!(
        ids_on(&sub, RESULT_TOPIC),
        ids.values().cloned().collect::<BTreeSet<_>>()
    );
    let mut copies = Vec::new();
    for (series, id) in &ids {
        assert_eq!(
            analyses(&events, series),
            vec![sizes[series]],
            "series {series}: one analysis of all {} instances",
            sizes[series]
        );
        assert_eq!(
            releases(&events, series),
            vec![sizes[series]],
            "series {series}: one release of all {} instances",
            sizes[series]
        );
        assert_eq!(commits(&events, id), 1, "result {id} committed once");
        let (result, n) = delivered(&sub, id);
        assert_eq!(result["series_instance_uid"], series.as_str());
        assert_documented_id(&result, &of_series(&all, series));
        assert_ne!(result["status"], "failed", "{result}");
        copies.push(n);
    }
    eprintln!(
        "kill -9 x {KILLS} in {:.1} s: {} instances in {} series, {} instances were found \
         stored but unanswered at a kill ({} re-sent instances answered from the spool); \
         results {:.1} s after the last response (quiet period {QUIET_PERIOD} s), copies \
         received {:?}",
        storm.as_secs_f64(),
        all.len(),
        sizes.len(),
        stored_unanswered.len(),
        duplicates(&events),
        time_to_results.as_secs_f64(),
        copies
    );
    site.assert_events_valid();
    drop(daemon);
}
