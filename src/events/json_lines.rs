//! The JSON-lines sink ([`JsonLines`]): one object per event appended to the file named by
//! `[service] events_path` (`docs/events.schema.json`).

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use anyhow::{Context, Result};
use serde::Serialize;
use time::OffsetDateTime;

use super::{lock, Event, Sink};

/// Appends one JSON object per event to a file (`[service] events_path`).
pub struct JsonLines {
    file: Mutex<File>,
}

#[derive(Serialize)]
struct Line<'a> {
    #[serde(with = "time::serde::rfc3339")]
    at: OffsetDateTime,
    #[serde(flatten)]
    event: &'a Event,
}

impl JsonLines {
    /// Opens `path` for appending (created if missing).
    pub fn open(path: &Path) -> Result<JsonLines> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open the event file {}", path.display()))?;
        Ok(JsonLines {
            file: Mutex::new(file),
        })
    }
}

impl Sink for JsonLines {
    fn record(&self, at: OffsetDateTime, event: &Event) {
        let mut line = match serde_json::to_vec(&Line { at, event }) {
            Ok(line) => line,
            Err(e) => return log::warn!("event not serialisable: {e}"),
        };
        line.push(b'\n');
        // One write per line (O_APPEND): readers never see half a line from us.
        if let Err(e) = lock(&self.file).write_all(&line) {
            log::warn!("cannot write to the event file: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::events::{Events, InstanceRefusal};

    #[test]
    fn json_lines_hold_one_tagged_object_per_event() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let events = Events::new(vec![Arc::new(JsonLines::open(&path).unwrap())]);
        events.emit(Event::InstanceRefused {
            calling_ae: "CT1".into(),
            sop_instance_uid: "1.2".into(),
            reason: InstanceRefusal::ShortOfSpace,
        });
        events.emit(Event::ResultCommitted {
            result_id: "r1".into(),
            already_queued: false,
        });
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["event"], "instance_refused");
        assert_eq!(lines[0]["reason"], "short_of_space");
        assert_eq!(lines[1]["event"], "result_committed");
        assert!(lines[1]["at"].as_str().unwrap().ends_with('Z'));
    }
}
