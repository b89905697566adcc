//! kill -9 through analysis: kills aimed at every stage a series goes through, and every
//! series' whole result still arrives.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use crate::common::events::{is_of_series, of};
use crate::common::{free_port, wait_until, Mosquitto, Subscriber};
use crate::results::{
    assert_documented_id, complete_ids, ids_on, one_of, outbox_ids, payloads_by_id, published_at,
};
use crate::scu::{paths, store, Scu};
use crate::site::{duplicates, Site};
use crate::stages::{stages_at_kill, Aim, STAGES};
use crate::studies::{
    analysed_mark, assert_intact, of_series, series_sizes, sources, spool_rejected, spooled, study,
    Source,
};
use crate::{faults_seed, one_at_a_time, ALERT_TOPIC, RESULT_TIMEOUT, RESULT_TOPIC, TOPICS};

/// kill -9 at 20 random moments while five studies are sent one after another, with a 1 s
/// quiet period, so that kills land in every stage a series goes through: receiving, the
/// quiet period, volume building, inference, the outbox commit, the spool's analysed mark
/// and the MQTT publish. Some kills are drawn relative to the scanner's responses, others
/// relative to events the daemon records as a series moves on (`analysis_started`,
/// `inference_started`, `inference_done`, `result_committed`), and the stage each kill
/// landed in is read back from the events of its run ([`stages_at_kill`]). After each kill
/// the daemon is restarted and the scanner re-sends what it got no Success for.
///
/// What docs/ALERTS.md promises, and so what is asserted:
/// - every instance the scanner was told Success for is in the spool after every kill,
///   intact; at the end every instance is there (the default retention keeps them), none
///   rejected, and each series' analysed mark names its whole series and its full result;
/// - for every series a result of **all** its instances arrives, under the id the
///   documented formula gives for that instance set, and not `failed`; it is the series'
///   result with the latest `timings.published` (the one a dashboard shows);
/// - any other id that arrives is a revised-away earlier result of one of these series
///   with fewer instances: a restart gap longer than the quiet period completes a series
///   early. Allowed (a revision follows under a new id), counted and printed;
/// - copies of one id are byte-identical re-deliveries, or the same analysis done again
///   (a kill after the outbox commit and before the spool mark analyses the series again
///   after the restart: same instances, model and status, so the same id; only `timings`
///   differs). ALERTS.md allows both; the second is counted and printed, and must not
///   differ in anything but `timings`;
/// - `alert` carries exactly the `result` payloads of positive ids, nothing else;
/// - the outbox drains.
#[test]
fn kill_9_during_analysis_and_publishing_every_series_result_arrives() {
    const KILLS: usize = 20;
    const STUDIES: u64 = 5;
    /// How long a kill waits for its aim before it kills anyway.
    const AIM_TIMEOUT: Duration = Duration::from_secs(8);
    let _serial = one_at_a_time();
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start();
    let sub = Subscriber::start(broker.port, TOPICS);

    // Five studies of ~110 slices (1.5 mm), every other one with a fracture.
    let fractures = ["C2", "none", "C5", "none", "C7"];
    let studies: Vec<Vec<Source>> = (0..STUDIES)
        .map(|i| {
            let dirs = study(
                &tmp.path().join(format!("s{i}")),
                7601 + i,
                fractures[i as usize % fractures.len()],
                "1.5",
            );
            sources(&dirs)
        })
        .collect();
    let all: Vec<Source> = studies.iter().flatten().cloned().collect();
    let sizes = series_sizes(&all);
    let source_of: HashMap<PathBuf, Source> =
        all.iter().map(|s| (s.path.clone(), s.clone())).collect();
    let label: HashMap<String, String> = studies
        .iter()
        .enumerate()
        .map(|(i, s)| (s[0].series.clone(), format!("s{}", i + 1)))
        .collect();
    let spool = tmp.path().join("spool");
    let outbox = tmp.path().join("outbox");
    let port = free_port();
    // The default retention (an hour): nothing leaves the spool during the test, so every
    // acknowledged instance must be found there after every kill.
    let site = Site::new(
        tmp.path(),
        port,
        &broker.url(),
        "",
        "completed_retention_secs = 3600.0",
        "",
    );
    let serve_args = ["--quiet-period", "1"];

    let seed = faults_seed();
    eprintln!("kill -9 through analysis: FAULTS_SEED={seed} (set it to replay the same aims)");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let max_k = studies[0].len() / 6;

    let mut acked: BTreeSet<String> = BTreeSet::new();
    // Studies whose stream has begun: the scanner resumes those at once after a restart.
    let mut begun: BTreeSet<usize> = BTreeSet::new();
    let candidates: BTreeMap<String, BTreeSet<String>> = sizes
        .keys()
        .map(|s| (s.clone(), complete_ids(&of_series(&all, s))))
        .collect();
    let mut hits: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut stored_unanswered: BTreeSet<String> = BTreeSet::new();
    let storm = Instant::now();
    for kill in 1..=KILLS {
        let delivered_whole: BTreeSet<String> = {
            let got = ids_on(&sub, RESULT_TOPIC);
            candidates
                .iter()
                .filter(|(_, c)| one_of(&got, c).is_some())
                .map(|(series, _)| series.clone())
                .collect()
        };
        let stream_left = acked.len() < all.len();
        let work_left = stream_left || delivered_whole.len() < sizes.len();
        let aim = Aim::draw(&mut rng, max_k, stream_left, work_left);
        // The scanner's pause between two studies in this run, counted from the moment the
        // earlier study is complete in the daemon (its quiet period over): short ones make
        // the next stream overlap the analysis.
        let pause = Duration::from_millis(rng.gen_range(0..1500));
        let mut next_study_at: Option<Instant> = None;
        // This run's events.
        let mut run = site.events_from_now();
        let spawned = Instant::now();
        let mut daemon = match aim {
            Aim::StartUp { .. } => site.spawn(&serve_args),
            _ => site.start(&serve_args),
        };
        // Series acknowledged whole and not yet analysed whole when this run starts: their
        // quiet period runs again after the restart.
        let waiting_at_start = sizes.iter().any(|(series, &n)| {
            let of = of_series(&all, series);
            of.iter().all(|s| acked.contains(&s.sop))
                && analysed_mark(&spool, &of[0])
                    .is_none_or(|m| m["sop_instance_uids"].as_array().map(Vec::len) != Some(n))
        });
        let mut scu: Option<(usize, Scu)> = None;
        let mut run_acked: Vec<PathBuf> = Vec::new();
        let mut responses_before = 0; // Success responses of finished associations
        let mut scanner_started: Option<Instant> = None;
        let mut stream_ended: Option<Instant> = None;
        let mut trigger: Option<(Instant, String)> = None;
        let (moment, receiving);
        loop {
            let now = Instant::now();
            // The scanner: one association per study, the studies in order; an interrupted
            // study is resumed at once, a new one starts `pause` after the one before is
            // complete in this run (or its whole result was out before the run), so that
            // the stream does not run far ahead of the analyses.
            if let Some((i, s)) = &mut scu {
                if s.exited() {
                    let i = *i;
                    let report = scu.take().unwrap().1.finish();
                    assert!(report.refused.is_empty(), "{:?}", report.refused);
                    assert!(report.status.success(), "study {i}: {}", report.log);
                    responses_before += report.acked.len();
                    acked.extend(report.acked.iter().map(|p| source_of[p].sop.clone()));
                    run_acked.extend(report.acked);
                    stream_ended.get_or_insert(now);
                }
            }
            if scu.is_none() && !matches!(aim, Aim::StartUp { .. }) {
                let next = studies
                    .iter()
                    .position(|st| st.iter().any(|s| !acked.contains(&s.sop)));
                if let Some(i) = next {
                    if next_study_at.is_none() && !begun.contains(&i) {
                        let before = i.checked_sub(1).map(|b| &studies[b][0]);
                        let gate_open = before.is_none_or(|b| {
                            delivered_whole.contains(&b.series)
                                || run.any(|e| is_of_series(e, "series_assembled", &b.series))
                        });
                        if gate_open {
                            next_study_at = Some(now + pause);
                        }
                    }
                    if begun.contains(&i) || next_study_at.is_some_and(|t| now >= t) {
                        begun.insert(i);
                        next_study_at = None;
                        let files = paths(studies[i].iter().filter(|s| !acked.contains(&s.sop)));
                        scu = Some((i, Scu::start(port, &files)));
                        scanner_started.get_or_insert(now);
                    }
                }
            }
            // The aim.
            if trigger.is_none() {
                trigger = match aim {
                    Aim::StartUp { ms } => Some((
                        spawned + Duration::from_millis(ms),
                        format!("{ms} ms after start-up began"),
                    )),
                    Aim::Response { k: 0, us } => scanner_started.map(|t| {
                        (
                            t + Duration::from_micros(us),
                            format!("{:.1} ms after the scanner started", us as f64 / 1e3),
                        )
                    }),
                    Aim::Response { k, us } => {
                        let n = responses_before + scu.as_ref().map_or(0, |(_, s)| s.successes());
                        // Fewer than k left: after the last one.
                        (n >= k || acked.len() == all.len()).then(|| {
                            (
                                now + Duration::from_micros(us),
                                format!("{:.1} ms after response {k}", us as f64 / 1e3),
                            )
                        })
                    }
                    Aim::QuietPeriod { us } => {
                        let ready = waiting_at_start && run.any(|e| e["event"] == "ready");
                        stream_ended.or(ready.then_some(now)).map(|t| {
                            (
                                t + Duration::from_micros(us),
                                format!(
                                    "{:.0} ms after a study's last instance or the restart",
                                    us as f64 / 1e3
                                ),
                            )
                        })
                    }
                    Aim::Event { kind, us } => run.any(|e| e["event"] == kind).then(|| {
                        (
                            now + Duration::from_micros(us),
                            format!("{:.1} ms after {kind}", us as f64 / 1e3),
                        )
                    }),
                };
                if trigger.is_none() && now.duration_since(spawned) > AIM_TIMEOUT {
                    trigger = Some((now, format!("{aim:?} not reached in {AIM_TIMEOUT:?}")));
                }
            }
            if let Some((at, what)) = &trigger {
                if now >= *at {
                    moment = what.clone();
                    receiving = scu.as_mut().is_some_and(|(_, s)| !s.exited());
                    break;
                }
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        daemon.kill9();
        daemon.wait_exit(Duration::from_secs(10));
        let events = run.read().to_vec();
        if let Some((_, s)) = scu.take() {
            let report = s.finish();
            assert!(
                report.refused.is_empty(),
                "kill {kill}: {:?}",
                report.refused
            );
            acked.extend(report.acked.iter().map(|p| source_of[p].sop.clone()));
            run_acked.extend(report.acked);
        }

        // Every instance acknowledged so far is in the spool; those of this run intact.
        let on_disk = spooled(&spool);
        for sop in &acked {
            assert!(
                on_disk.contains_key(sop),
                "kill {kill} ({moment}): instance {sop} was acknowledged but is not in the spool"
            );
        }
        for path in &run_acked {
            let source = &source_of[path];
            assert_intact(source, &on_disk[&source.sop]);
        }
        stored_unanswered.extend(on_disk.keys().filter(|s| !acked.contains(*s)).cloned());

        // Where it landed.
        let quiet: Vec<String> = sizes
            .iter()
            .filter(|(series, &n)| {
                let of = of_series(&all, series);
                of.iter().filter(|s| on_disk.contains_key(&s.sop)).count() == n
                    && analysed_mark(&spool, &of[0])
                        .is_none_or(|m| m["sop_instance_uids"].as_array().map(Vec::len) != Some(n))
            })
            .map(|(series, _)| series.clone())
            .collect();
        let stages = stages_at_kill(&events, receiving, &quiet);
        let mut landed: Vec<&str> = stages.iter().map(|(stage, _)| *stage).collect();
        landed.dedup();
        for stage in &landed {
            *hits.entry(stage).or_default() += 1;
        }
        let described: Vec<String> = stages
            .iter()
            .map(|(stage, series)| match label.get(series) {
                Some(l) => format!("{stage} {l}"),
                None if series.is_empty() => stage.to_string(),
                None => format!("{stage} {series}"),
            })
            .collect();
        eprintln!(
            "kill {kill:2} ({moment}): {}; {} acknowledged in this run, {}/{} in total",
            if described.is_empty() {
                "nothing in progress".to_string()
            } else {
                described.join(", ")
            },
            run_acked.len(),
            acked.len(),
            all.len()
        );
    }
    let storm = storm.elapsed();

    // Final start: the scanner sends what it has no Success for, study by study.
    let final_start = Instant::now();
    let daemon = site.start(&serve_args);
    let mut sent_at_the_end = 0;
    for study in &studies {
        let rest = paths(study.iter().filter(|s| !acked.contains(&s.sop)));
        if rest.is_empty() {
            continue;
        }
        let report = store(port, &rest);
        assert!(report.status.success(), "final send: {}", report.log);
        acked.extend(report.acked.iter().map(|p| source_of[p].sop.clone()));
        sent_at_the_end += report.acked.len();
    }
    assert_eq!(acked.len(), all.len(), "every instance acknowledged");

    sub.wait_for_within(
        "a whole-series result for each series",
        RESULT_TIMEOUT,
        |_| {
            let got = ids_on(&sub, RESULT_TOPIC);
            candidates.values().all(|c| one_of(&got, c).is_some())
        },
    );
    let time_to_results = final_start.elapsed();
    wait_until("the outbox to drain", RESULT_TIMEOUT, || {
        outbox_ids(&outbox).is_empty()
    });
    // The mark of the last series is written after its commit: wait for it too.
    wait_until("every series marked analysed whole", RESULT_TIMEOUT, || {
        studies.iter().all(|st| {
            analysed_mark(&spool, &st[0])
                .and_then(|m| m["sop_instance_uids"].as_array().map(Vec::len))
                == Some(st.len())
        })
    });
    let events = site.all_events();
    let total = started.elapsed();

    // The spool: everything, nothing rejected, each series marked with its full result.
    let on_disk = spooled(&spool);
    assert_eq!(on_disk.len(), all.len(), "every instance is in the spool");
    assert!(
        spool_rejected(&spool).is_empty(),
        "the re-index rejected files: {:?}",
        spool_rejected(&spool)
    );

    // The results.
    let results = payloads_by_id(&sub, RESULT_TOPIC);
    let alerts = payloads_by_id(&sub, ALERT_TOPIC);
    let parse = |p: &[u8]| serde_json::from_slice::<serde_json::Value>(p).unwrap();
    let mut full: BTreeMap<String, String> = BTreeMap::new(); // series -> id
    let mut partial: Vec<(String, u64)> = Vec::new(); // (series label, instances)
    let mut analysed_again = 0;
    let mut latest: BTreeMap<String, (time::OffsetDateTime, String)> = BTreeMap::new();
    for (id, copies) in &results {
        let first = parse(&copies[0]);
        let series = first["series_instance_uid"].as_str().unwrap().to_string();
        assert!(
            sizes.contains_key(&series),
            "a result for no series sent: {first}"
        );
        if candidates[&series].contains(id) {
            assert_documented_id(&first, &of_series(&all, &series));
            assert_ne!(first["status"], "failed", "{first}");
            full.insert(series.clone(), id.clone());
        } else {
            let n = first["instances"].as_u64().unwrap();
            assert!(
                n < sizes[&series] as u64,
                "result {id} is neither the whole series' nor an earlier partial one: {first}"
            );
            partial.push((label[&series].clone(), n));
        }
        if copies.len() > 1 {
            let mut bare: Vec<serde_json::Value> = copies.iter().map(|c| parse(c)).collect();
            for v in &mut bare {
                v.as_object_mut().unwrap().remove("timings");
            }
            assert!(
                bare.iter().all(|v| v == &bare[0]),
                "copies of result {id} differ in more than their timings:\n{}",
                copies
                    .iter()
                    .map(|c| String::from_utf8_lossy(c).into_owned())
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            analysed_again += 1;
        }
        for copy in copies {
            let at = published_at(&parse(copy));
            let entry = latest.entry(series.clone()).or_insert((at, id.clone()));
            if at > entry.0 {
                *entry = (at, id.clone());
            }
        }
        if first["status"] == "positive" {
            assert_eq!(
                alerts.get(id),
                Some(copies),
                "alert copies of positive {id}"
            );
        } else {
            assert!(
                !alerts.contains_key(id),
                "alert for a {} result",
                first["status"]
            );
        }
    }
    assert!(
        alerts.keys().all(|id| results.contains_key(id)),
        "an alert without its result"
    );
    for (series, id) in &full {
        assert_eq!(
            &latest[series].1, id,
            "series {series}: the whole-series result is the latest published"
        );
        let mark = analysed_mark(&spool, &of_series(&all, series)[0]).unwrap();
        assert_eq!(mark["result_id"], id.as_str(), "{mark}");
    }
    assert_eq!(full.len(), sizes.len());

    // The kills did reach past the stream (the aims make about half of them wait for a
    // series' analysis).
    let later: usize = STAGES[3..]
        .iter()
        .map(|s| hits.get(s).copied().unwrap_or(0))
        .sum();
    assert!(
        later >= 3,
        "only {later} kills landed after a series was complete: {hits:?}"
    );
    let hits_line: Vec<String> = STAGES
        .iter()
        .map(|s| format!("{s} {}", hits.get(s).copied().unwrap_or(0)))
        .collect();
    eprintln!(
        "kill -9 x {KILLS} through analysis in {:.1} s: {} instances in {} series, 0 \
         acknowledged instances missing after any kill ({} stored but unanswered at a kill, {} \
         re-sent instances answered from the spool); kills per stage: {}; final start: {} \
         instances sent, every series' whole result out {:.1} s after it; {} earlier partial \
         result(s) (series, instances) {:?}; {} id(s) delivered again from a second analysis \
         (same id, other timings), {} found theirs still in the outbox; {} commits in all; \
         test {:.1} s",
        storm.as_secs_f64(),
        all.len(),
        sizes.len(),
        stored_unanswered.len(),
        duplicates(&events),
        hits_line.join(", "),
        sent_at_the_end,
        time_to_results.as_secs_f64(),
        partial.len(),
        partial,
        analysed_again,
        of(&events, "result_committed")
            .filter(|e| e["already_queued"] == true)
            .count(),
        of(&events, "result_committed")
            .filter(|e| e["already_queued"] == false)
            .count(),
        total.as_secs_f64()
    );
    site.assert_events_valid();
    drop(daemon);
}
