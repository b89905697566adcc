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
//!
//! Where things are: `event.rs` (the kinds), `reasons.rs` (the typed reasons and values
//! they carry), `early.rs` (why an early analysis is withheld), `figures.rs` (the key figures), `json_lines.rs` (the file sink); this
//! file holds the handle and the [`Sink`] trait.

mod early;
mod event;
mod figures;
mod json_lines;
mod reasons;

use std::sync::{Arc, Mutex, MutexGuard};

use time::OffsetDateTime;

pub use early::{EarlyWithholdKind, EarlyWithholdReason, SlabEnd};
pub use event::Event;
pub use figures::{Figures, QueueDepths};
pub use json_lines::JsonLines;
pub use reasons::{
    AnalysisStatus, AssociationRefusal, CommitFailure, InstanceRefusal, MarkCause, ReleaseReason,
    SeriesCompletion, StageDurations,
};

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

/// A sink that keeps every event, for unit tests ([`Events::recording`]).
#[cfg(test)]
#[derive(Default)]
pub(crate) struct Recorder(Mutex<Vec<Event>>);

#[cfg(test)]
impl Recorder {
    /// What was recorded so far.
    pub(crate) fn events(&self) -> Vec<Event> {
        lock(&self.0).clone()
    }
}

#[cfg(test)]
impl Sink for Recorder {
    fn record(&self, _at: OffsetDateTime, event: &Event) {
        lock(&self.0).push(event.clone());
    }
}

#[cfg(test)]
impl Events {
    /// A stream that records into the returned [`Recorder`].
    pub(crate) fn recording() -> (Events, Arc<Recorder>) {
        let recorder = Arc::new(Recorder::default());
        (Events::new(vec![recorder.clone()]), recorder)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
