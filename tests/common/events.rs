//! The daemon's event stream as the tests read it: the JSON-lines file named by
//! `[service] events_path` (one object per line, `docs/events.schema.json`), read as it
//! grows, so that a test can wait for an event or look back at a run's events.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use super::{repo_root, wait_until};

/// The `[service]` table that makes a daemon write its events to `path` (append it to a
/// config, after every other table's keys).
pub fn service_table(path: &Path) -> String {
    format!("\n[service]\nevents_path = \"{}\"\n", path.display())
}

/// The events a file holds from some point on, read incrementally: every
/// [`EventLog::read`] adds what was appended since (complete lines only: a daemon still
/// running may be writing one).
#[derive(Debug)]
pub struct EventLog {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
    events: Vec<Value>,
}

impl EventLog {
    /// Every event in the file (across daemon runs), read so far.
    pub fn whole(path: &Path) -> EventLog {
        EventLog::at(path, 0)
    }

    /// The events appended to `path` from now on: those of a daemon started after this
    /// call (several daemons may append to one file, one after the other).
    pub fn from_now(path: &Path) -> EventLog {
        let end = std::fs::metadata(path).map_or(0, |m| m.len());
        EventLog::at(path, end)
    }

    fn at(path: &Path, offset: u64) -> EventLog {
        EventLog {
            path: path.to_path_buf(),
            offset,
            partial: Vec::new(),
            events: Vec::new(),
        }
    }

    /// Catches up with the file and returns every event so far, in order.
    pub fn read(&mut self) -> &[Value] {
        if let Ok(mut file) = std::fs::File::open(&self.path) {
            let mut bytes = Vec::new();
            file.seek(SeekFrom::Start(self.offset)).unwrap();
            file.read_to_end(&mut bytes).unwrap();
            self.offset += bytes.len() as u64;
            self.partial.extend_from_slice(&bytes);
            if let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') {
                let lines: Vec<u8> = self.partial.drain(..=end).collect();
                for line in lines.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                    let event = serde_json::from_slice(line).unwrap_or_else(|e| {
                        panic!(
                            "{}: {e}: {}",
                            self.path.display(),
                            String::from_utf8_lossy(line)
                        )
                    });
                    self.events.push(event);
                }
            }
        }
        &self.events
    }

    /// The events of `kind` so far.
    pub fn of(&mut self, kind: &str) -> Vec<Value> {
        of(self.read(), kind).cloned().collect()
    }

    /// Whether an event so far matches `pred`.
    pub fn any(&mut self, pred: impl FnMut(&Value) -> bool) -> bool {
        self.read().iter().any(pred)
    }

    /// Waits (polling) until an event matches `pred`; fails the test with `what` after
    /// `timeout`. Returns the first match.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Value {
        wait_until(what, timeout, || self.read().iter().any(&mut pred));
        self.read().iter().find(|e| pred(e)).cloned().unwrap()
    }
}

/// The events of `kind` among `events`.
pub fn of<'a>(events: &'a [Value], kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    events.iter().filter(move |e| e["event"] == kind)
}

/// Whether `event` is of `kind` and concerns series `series`.
pub fn is_of_series(event: &Value, kind: &str, series: &str) -> bool {
    event["event"] == kind && event["series_instance_uid"] == series
}

/// Validates every line of the event file at `path` against `docs/events.schema.json`
/// (`tests/python/alert_validate.py`, which reads a `.jsonl` file line by line).
pub fn assert_valid_event_file(path: &Path) {
    assert_eq!(
        path.extension().and_then(|e| e.to_str()),
        Some("jsonl"),
        "{}",
        path.display()
    );
    let out = Command::new("python3")
        .arg(repo_root().join("tests/python/alert_validate.py"))
        .arg(repo_root().join("docs/events.schema.json"))
        .arg(path)
        .output()
        .expect("run tests/python/alert_validate.py");
    assert!(
        out.status.success(),
        "events.schema.json: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
