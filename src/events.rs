//! The structured event stream: what happened to associations, instances, series and
//! results, as typed [`Event`]s. It sits below every stage (beside `heartbeat`) so the
//! SCP, the series stage and the alert stage can all emit without importing the service
//! layer.
//!
//! A stage holds an [`Events`] handle (cheap to clone; [`Events::default`] records
//! nothing) and calls [`Events::emit`] once per item at its task boundary. The handle
//! fans each event out to its [`Sink`]s: the Prometheus registry
//! (`service::metrics`) and, when `[service] events_path` is set, a [`JsonLines`] file
//! (one JSON object per line, `{"at": <RFC 3339>, "event": <kind>, ...}`; no fsync: it is
//! a record for tests and operators, not a durable queue). The format is
//! `docs/events.schema.json`.
//!
//! It also carries the daemon's key [`Figures`] (queue depths, outbox, spool, stuck
//! stages, last result): the daemon, which sees every stage, installs a source with
//! [`Events::set_figures`]; the metrics endpoint and the retained MQTT status read them
//! with [`Events::figures`].

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{Context, Result};
use serde::Serialize;
use time::OffsetDateTime;

/// One thing that happened. Serialised with its kind in `event` (snake_case).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// An association was accepted (A-ASSOCIATE-AC sent).
    AssociationOpened { peer: String, calling_ae: String },
    /// A connection or association request was refused.
    AssociationRefused {
        peer: String,
        reason: AssociationRefusal,
    },
    /// An accepted association ended (released, aborted or closed).
    AssociationClosed {
        peer: String,
        calling_ae: String,
        stored: u64,
        duplicates: u64,
        failed: u64,
    },
    /// A C-STORE was answered with Success: the instance is durably in the spool
    /// (`duplicate`: it already was, nothing new was written).
    InstanceStored {
        calling_ae: String,
        sop_instance_uid: String,
        duplicate: bool,
    },
    /// A C-STORE was answered with a failure status.
    InstanceRefused {
        calling_ae: String,
        sop_instance_uid: String,
        reason: InstanceRefusal,
    },
    /// A series is complete and its volume built: it goes to inference.
    SeriesComplete {
        study_instance_uid: String,
        series_instance_uid: String,
        instances: usize,
    },
    /// A candidate series could not be built; it is published as a `failed` result.
    SeriesFailed {
        study_instance_uid: String,
        series_instance_uid: String,
        instances: usize,
        reason: String,
    },
    /// A series (or some of its instances) will not be analysed: not an axial CT volume,
    /// or the study was analysed with a better series.
    SeriesSkipped {
        study_instance_uid: String,
        series_instance_uid: String,
        instances: usize,
        reason: String,
    },
    /// Inference produced a result for a series (the alert stage received it).
    AnalysisDone {
        result_id: String,
        study_instance_uid: String,
        series_instance_uid: String,
        status: AnalysisStatus,
        instances: usize,
        durations: StageDurations,
    },
    /// The result is durably in the outbox (`already_queued`: an undelivered entry with
    /// the same id was there and was kept).
    ResultCommitted {
        result_id: String,
        already_queued: bool,
    },
    /// The broker acknowledged the result: it left the outbox.
    ResultPublished { result_id: String },
    /// The outbox changed (a commit or a delivery).
    OutboxDepth { entries: usize, bytes: u64 },
    /// A PACS destination stored a DICOM result object (Success or Warning): it left the
    /// destination's queue, `queued_to_delivered_secs` after it was queued.
    PacsObjectDelivered {
        destination: String,
        sop_instance_uid: String,
        queued_to_delivered_secs: Option<f64>,
    },
    /// A PACS destination refused a DICOM result object for good: moved to `rejected/`.
    PacsObjectRejected {
        destination: String,
        sop_instance_uid: String,
    },
}

/// Why a connection or association was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AssociationRefusal {
    /// `dicom.max_associations` associations were open.
    AllSlots,
    /// The peer's address had all the associations it may have.
    ThisAddress,
    /// Every `dicom.allowed_calling_aes` entry is pinned to another address: closed at
    /// accept.
    AddressNotAllowed,
    /// A-ASSOCIATE-RJ after negotiation (AE titles, allow-list, no usable context).
    Rejected,
    /// The request was invalid or did not come in time.
    InvalidRequest,
}

/// Why a C-STORE was refused (the DIMSE status class in brackets).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceRefusal {
    /// The data set cannot be parsed (C000).
    CannotUnderstand,
    /// The data set does not match the command (A900).
    Mismatch,
    /// Larger than `dicom.max_instance_mb` (A700).
    TooLarge,
    /// Storing it would take the spool below `dicom.min_free_space_mb` (A700).
    ShortOfSpace,
    /// Disk full, I/O error (A700).
    OutOfResources,
    /// Refused before its data set was stored: SOP class or context not served, bad
    /// command (the SCP drains it and answers with a failure status).
    NotAccepted,
}

/// A result's status (mirrors `result::Status`, which sits above this module).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AnalysisStatus {
    Positive,
    Negative,
    Indeterminate,
    Failed,
}

/// Seconds spent between the pipeline's milestones of one result (from its `timings`);
/// `None` where a milestone is missing (e.g. a failed series never reached inference).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct StageDurations {
    /// First instance received → series complete.
    pub receive_to_complete_secs: Option<f64>,
    /// Series complete → inference done.
    pub complete_to_inference_done_secs: Option<f64>,
    /// Inference done → committed to the outbox and first sent (`timings.published`).
    pub inference_done_to_published_secs: Option<f64>,
}

impl StageDurations {
    /// Seconds from `from` to `to`, when both are known and in order.
    pub fn between(from: Option<OffsetDateTime>, to: Option<OffsetDateTime>) -> Option<f64> {
        let secs = (to? - from?).as_seconds_f64();
        (secs >= 0.0).then_some(secs)
    }
}

/// The daemon's key figures, as the retained MQTT status and the metrics endpoint show
/// them.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Figures {
    /// Items waiting in each hand-over queue.
    pub queues: QueueDepths,
    /// When the oldest undelivered outbox entry was committed.
    #[serde(with = "time::serde::rfc3339::option")]
    pub outbox_oldest: Option<OffsetDateTime>,
    /// Bytes of instances in the spool, and free bytes on its file system.
    pub spool_bytes: u64,
    pub spool_free_bytes: u64,
    /// Stages that have not shown progress within their allowed stall time.
    pub stuck_stages: Vec<String>,
    /// When the last result was committed to the outbox.
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_result: Option<OffsetDateTime>,
}

/// Queue depths: the bounded channels between the stages, and the outbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct QueueDepths {
    /// Stored instances waiting for the series stage.
    pub instances: usize,
    /// Built volumes waiting for inference.
    pub volumes: usize,
    /// Results waiting for the alert stage.
    pub results: usize,
    /// Results in the outbox, not yet acknowledged by the broker.
    pub outbox: usize,
    /// DICOM result objects waiting for PACS delivery, all destinations (0 without any).
    pub pacs: usize,
}

/// Where events go besides the figures.
pub trait Sink: Send + Sync {
    fn record(&self, at: OffsetDateTime, event: &Event);
}

type FiguresSource = Arc<dyn Fn() -> Figures + Send + Sync>;

/// A stage's handle on the event stream. Cheap to clone; the default records nothing.
#[derive(Clone, Default)]
pub struct Events {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    sinks: Vec<Arc<dyn Sink>>,
    figures: Mutex<Option<FiguresSource>>,
    last_result: Mutex<Option<OffsetDateTime>>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events")
            .field("sinks", &self.inner.as_ref().map_or(0, |i| i.sinks.len()))
            .finish()
    }
}

impl Events {
    /// A stream that fans out to `sinks` (none: only the figures are kept).
    pub fn new(sinks: Vec<Arc<dyn Sink>>) -> Events {
        Events {
            inner: Some(Arc::new(Inner {
                sinks,
                figures: Mutex::new(None),
                last_result: Mutex::new(None),
            })),
        }
    }

    /// Records `event` now.
    pub fn emit(&self, event: Event) {
        let Some(inner) = &self.inner else { return };
        let at = OffsetDateTime::now_utc();
        if let Event::ResultCommitted { .. } = event {
            *lock(&inner.last_result) = Some(at);
        }
        for sink in &inner.sinks {
            sink.record(at, &event);
        }
    }

    /// Installs what [`Events::figures`] reads (the daemon's view of every stage).
    pub fn set_figures(&self, source: impl Fn() -> Figures + Send + Sync + 'static) {
        if let Some(inner) = &self.inner {
            *lock(&inner.figures) = Some(Arc::new(source));
        }
    }

    /// The key figures now; `None` when no source is installed.
    pub fn figures(&self) -> Option<Figures> {
        let inner = self.inner.as_ref()?;
        let source = lock(&inner.figures).clone()?;
        let mut figures = source();
        figures.last_result = *lock(&inner.last_result);
        Some(figures)
    }
}

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

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn figures_come_from_the_source_and_the_last_commit() {
        assert_eq!(Events::default().figures(), None);
        let events = Events::new(Vec::new());
        assert_eq!(events.figures(), None);
        events.set_figures(|| Figures {
            spool_bytes: 7,
            ..Figures::default()
        });
        assert_eq!(events.figures().unwrap().last_result, None);
        events.emit(Event::ResultCommitted {
            result_id: "r".into(),
            already_queued: false,
        });
        let figures = events.figures().unwrap();
        assert_eq!(figures.spool_bytes, 7);
        assert!(figures.last_result.is_some());
    }

    #[test]
    fn durations_need_both_ends_in_order() {
        let t = OffsetDateTime::UNIX_EPOCH;
        let later = t + time::Duration::seconds(3);
        assert_eq!(StageDurations::between(Some(t), Some(later)), Some(3.0));
        assert_eq!(StageDurations::between(Some(later), Some(t)), None);
        assert_eq!(StageDurations::between(None, Some(t)), None);
    }
}
