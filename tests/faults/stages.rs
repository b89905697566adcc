//! Where a kill of the test through analysis lands: what it aims at ([`Aim`]) and, read
//! back from the events of the run it ended, the stages that were in progress
//! ([`stages_at_kill`]).

use std::collections::{BTreeMap, BTreeSet};

use rand::Rng;
use serde_json::Value;

/// Where a kill can land, in pipeline order (what [`stages_at_kill`] reports).
pub const STAGES: [&str; 8] = [
    "start-up",
    "receiving",
    "quiet period",
    "volume building",
    "inference",
    "outbox commit",
    "spool mark",
    "publish",
];

/// What a kill aims at: a moment relative to the daemon's start, the scanner's responses,
/// the end of a study's stream or an event of the daemon.
#[derive(Debug, Clone, Copy)]
pub enum Aim {
    /// `ms` after the daemon was started (re-index, model, port), no scanner.
    StartUp { ms: u64 },
    /// `us` after the k-th Success response of this run (k = 0: after the scanner started).
    Response { k: usize, us: u64 },
    /// `us` after a study's stream ended in this run, or after `ready` when a complete
    /// series waits for its analysis: the quiet period.
    QuietPeriod { us: u64 },
    /// `us` after the first event of this run of this `kind`.
    Event { kind: &'static str, us: u64 },
}

impl Aim {
    /// Draws one aim. Every kill draws the same numbers in the same order, so a seed replays
    /// the same draws (where they land depends on timing, as in the other kill test).
    /// Without `work_left` (every series' whole result is out) only start-up is left.
    pub fn draw(
        rng: &mut rand_chacha::ChaCha8Rng,
        max_k: usize,
        stream_left: bool,
        work_left: bool,
    ) -> Aim {
        let roll = rng.gen_range(0..100u32);
        let k = rng.gen_range(0..=max_k);
        let frac: f64 = rng.gen();
        let within = |max_us: f64| (frac * max_us) as u64;
        // When every instance is acknowledged, the draws meant for the stream go to the
        // later stages.
        let roll = if !work_left {
            0
        } else if !stream_left && (10..40).contains(&roll) {
            40 + (roll - 10) * 2
        } else {
            roll
        };
        match roll {
            0..=9 => Aim::StartUp {
                ms: within(400_000.0) / 1000,
            },
            10..=39 => Aim::Response {
                k,
                us: if k == 0 {
                    within(100_000.0)
                } else {
                    within(12_000.0)
                },
            },
            40..=49 => Aim::QuietPeriod {
                us: within(900_000.0),
            },
            // The series is complete: its volume is being built.
            50..=61 => Aim::Event {
                kind: "analysis_started",
                us: within(150_000.0),
            },
            62..=75 => Aim::Event {
                kind: "inference_started",
                us: within(700_000.0),
            },
            // Inference has ended: verdict, key image, outbox commit.
            76..=85 => Aim::Event {
                kind: "inference_done",
                us: within(10_000.0),
            },
            // The result is in the outbox: spool mark, publish, PUBACK, removal (a few ms
            // in all here).
            _ => Aim::Event {
                kind: "result_committed",
                us: within(3_000.0),
            },
        }
    }
}

/// The stages a daemon was in when it was killed, read from the events of that run
/// (`events`), with the series each concerns: `receiving` (the scanner's association was
/// sending) and `quiet` (series that had every instance in the spool, not yet analysed
/// whole, and not yet complete in this run) come from the test.
pub fn stages_at_kill(
    events: &[Value],
    receiving: bool,
    quiet: &[String],
) -> Vec<(&'static str, String)> {
    let mut ready = false;
    // Series -> the stage its last event put it in.
    let mut state: BTreeMap<String, &'static str> = BTreeMap::new();
    let mut marks_pending: BTreeMap<String, i64> = BTreeMap::new();
    // Id -> series of the results analysed in this run (`analysis_done` comes with the
    // commit).
    let mut analysed: BTreeMap<String, String> = BTreeMap::new();
    // Id -> series of results committed in this run and not yet delivered.
    let mut unpublished: BTreeMap<String, String> = BTreeMap::new();
    let mut from_before: i64 = 0;
    let mut completed: BTreeSet<String> = BTreeSet::new();
    for e in events {
        let text = |key: &str| e[key].as_str().unwrap_or_default().to_string();
        let series = text("series_instance_uid");
        match e["event"].as_str().unwrap_or_default() {
            "ready" => ready = true,
            "series_assembled" | "analysis_started" => {
                completed.insert(series.clone());
                state.insert(series, "volume building");
            }
            // Late instances (after a partial analysis): the series waits for a quiet
            // period again, while that analysis goes on.
            "series_reopened" => {
                completed.remove(&series);
            }
            "inference_started" => {
                state.insert(series, "inference");
            }
            "inference_done" => {
                state.insert(series, "outbox commit");
            }
            "analysis_done" => {
                analysed.insert(text("result_id"), series);
            }
            "result_committed" => {
                let id = text("result_id");
                let series = analysed.get(&id).cloned().unwrap_or_default();
                state.remove(&series);
                *marks_pending.entry(series.clone()).or_default() += 1;
                if e["already_queued"] == false {
                    unpublished.insert(id, series);
                }
            }
            "series_marked" | "series_mark_failed" if e["cause"] == "result_committed" => {
                *marks_pending.entry(series).or_default() -= 1;
            }
            // Not committed in this run: from the outbox of a previous one.
            "result_published" if unpublished.remove(&text("result_id")).is_none() => {
                from_before -= 1;
            }
            "outbox_replay" => from_before = e["pending"].as_i64().unwrap(),
            _ => {}
        }
    }
    let mut stages = Vec::new();
    if !ready {
        // Nothing runs before the daemon is ready (the outbox is replayed, the recovered
        // series assembled, the port opened only then).
        stages.push(("start-up", String::new()));
        return stages;
    }
    if receiving {
        stages.push(("receiving", String::new()));
    }
    for s in quiet.iter().filter(|s| !completed.contains(*s)) {
        stages.push(("quiet period", s.clone()));
    }
    for (s, stage) in state {
        stages.push((stage, s));
    }
    for (s, n) in marks_pending {
        if n > 0 {
            stages.push(("spool mark", s));
        }
    }
    for s in unpublished.into_values() {
        stages.push(("publish", s));
    }
    if from_before > 0 {
        stages.push(("publish", "(from the outbox)".into()));
    }
    stages.sort_by_key(|(stage, _)| STAGES.iter().position(|s| s == stage));
    stages.dedup();
    stages
}
