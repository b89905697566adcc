//! The daemon under test ([`Site`]): its config, with `[service] events_path` set so that
//! what it does can be read from its event file; starting it (each start's log kept, and
//! printed if the test fails); and the questions the tests ask of its events.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use serde_json::Value;

use crate::common::events::{assert_valid_event_file, of, service_table, EventLog};
use crate::common::{serve_command, serve_config_full, spawn_serve, Proc};

/// One test's daemon: config, DICOM port and event file (shared by every start, appended
/// to), and the logs of every daemon started, printed to stderr when the test fails while
/// the site is alive (what an assertion on events does not show).
pub struct Site {
    pub config: PathBuf,
    pub port: u16,
    pub events: PathBuf,
    dir: PathBuf,
    broker_url: String,
    logs: RefCell<Vec<Arc<Mutex<String>>>>,
}

impl Site {
    /// A config under `dir` (spool, outbox, events) as [`serve_config_full`] writes it,
    /// with the extra keys of its `[dicom]`, `[series]` and `[alert]` tables.
    pub fn new(
        dir: &Path,
        port: u16,
        broker_url: &str,
        dicom_extra: &str,
        series_extra: &str,
        alert_extra: &str,
    ) -> Site {
        let site = Site {
            config: PathBuf::new(),
            port,
            events: dir.join("events.jsonl"),
            dir: dir.to_path_buf(),
            broker_url: broker_url.to_owned(),
            logs: RefCell::new(Vec::new()),
        };
        site.reconfigure(dicom_extra, series_extra, alert_extra)
    }

    /// The same site with other extra keys (the next start reads them); same port, spool,
    /// outbox and event file.
    pub fn reconfigure(mut self, dicom_extra: &str, series_extra: &str, alert_extra: &str) -> Site {
        let alert_extra = format!("{alert_extra}\n{}", service_table(&self.events));
        self.config = serve_config_full(
            &self.dir,
            self.port,
            &self.broker_url,
            dicom_extra,
            series_extra,
            &alert_extra,
        );
        self
    }

    /// Starts `cspine-triage serve` and waits until its DICOM port accepts connections.
    pub fn start(&self, args: &[&str]) -> Proc {
        self.keep(spawn_serve(&self.config, self.port, args))
    }

    /// Starts it without waiting for anything (a kill during start-up).
    pub fn spawn(&self, args: &[&str]) -> Proc {
        self.keep(Proc::spawn(serve_command(&self.config, args)))
    }

    fn keep(&self, daemon: Proc) -> Proc {
        self.logs.borrow_mut().push(daemon.log.clone());
        daemon
    }

    /// Every event so far, of every start.
    pub fn all_events(&self) -> Vec<Value> {
        EventLog::whole(&self.events).read().to_vec()
    }

    /// The events appended from now on (those of the next start).
    pub fn events_from_now(&self) -> EventLog {
        EventLog::from_now(&self.events)
    }

    /// Checks every event written so far against `docs/events.schema.json`.
    pub fn assert_events_valid(&self) {
        assert_valid_event_file(&self.events);
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for (n, log) in self.logs.borrow().iter().enumerate() {
            let log = log.lock().unwrap_or_else(|p| p.into_inner());
            eprintln!(
                "---- daemon start {} of {}: log ----\n{log}",
                n + 1,
                self.logs.borrow().len()
            );
        }
        let tail = Command::new("tail")
            .args(["-n", "40"])
            .arg(&self.events)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        eprintln!("---- last events ({}) ----\n{tail}", self.events.display());
    }
}

/// How many instances each mark of `series` by one of its own committed results named (one
/// entry per result committed for it: `series_marked`, cause `result_committed`).
pub fn analyses(events: &[Value], series: &str) -> Vec<usize> {
    of(events, "series_marked")
        .filter(|e| e["series_instance_uid"] == series && e["cause"] == "result_committed")
        .map(|e| count(&e["instances"]))
        .collect()
}

/// How many instances each release of `series` from the spool removed once its study was
/// forgotten (`series.completed_retention_secs` after its last instance, its results
/// committed): `spool_released`, reason `study_forgotten`.
pub fn releases(events: &[Value], series: &str) -> Vec<usize> {
    of(events, "spool_released")
        .filter(|e| e["series_instance_uid"] == series && e["reason"] == "study_forgotten")
        .map(|e| count(&e["instances"]))
        .collect()
}

/// How often a result for `id` was committed to the outbox (not counting the commits that
/// found it already waiting there).
pub fn commits(events: &[Value], id: &str) -> usize {
    of(events, "result_committed")
        .filter(|e| e["result_id"] == id && e["already_queued"] == false)
        .count()
}

/// Re-sent instances the spool already held, answered Success without storing them again.
pub fn duplicates(events: &[Value]) -> usize {
    of(events, "instance_stored")
        .filter(|e| e["duplicate"] == true)
        .count()
}

fn count(v: &Value) -> usize {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}")) as usize
}
