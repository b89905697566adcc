//! The Prometheus endpoint: `[metrics]` config, the registry fed by the event stream
//! ([`crate::events`]) and the key figures, and the `GET /metrics` server.
//!
//! [`Metrics`] is an event [`Sink`]: counters and histograms move as stages emit events.
//! Gauges of state (queue depths, outbox, spool, stuck stages, last result) are read from
//! [`Events::figures`] when scraped. The registry and the text format (Prometheus 0.0.4,
//! which `promtool check metrics` reads) are metrics-exporter-prometheus's; the server is
//! axum, both already built for rumqttd. docs/METRICS.md lists every metric.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use metrics::{Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::events::{Event, Events, Figures, Sink};

/// `[metrics]` section: the Prometheus endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve `GET /metrics` (default false).
    pub enabled: bool,
    /// Address and port to listen on (default `127.0.0.1:9464`).
    pub listen: String,
    /// Allow a `listen` address other than loopback (default false). The endpoint has
    /// no authentication; expose it only on a management network.
    pub allow_remote: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: false,
            listen: "127.0.0.1:9464".into(),
            allow_remote: false,
        }
    }
}

impl MetricsConfig {
    pub fn validate(&self) -> Result<()> {
        let addr = self.addr()?;
        ensure!(
            addr.ip().is_loopback() || self.allow_remote,
            "metrics.listen = {addr} is not a loopback address: the endpoint has no \
             authentication; set metrics.allow_remote = true to serve it there anyway"
        );
        Ok(())
    }

    /// The listening address.
    pub fn addr(&self) -> Result<SocketAddr> {
        self.listen.parse().with_context(|| {
            format!(
                "metrics.listen must be an IP address and port, got {:?}",
                self.listen
            )
        })
    }

    /// Enabled on an address other than loopback (allowed by `allow_remote`).
    pub fn is_remote(&self) -> bool {
        self.enabled && self.addr().is_ok_and(|a| !a.ip().is_loopback())
    }
}

/// Histogram buckets, seconds: from half a second (a study's last slice to its series
/// being complete on a fast box) to half an hour (a long study on a CPU-only box).
const BUCKETS: &[f64] = &[
    0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];

static META: Metadata<'static> = Metadata::new("cspine_triage", Level::INFO, None);

/// The registry.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

/// Every metric: name, kind, help. Described once, so each has a HELP and TYPE line.
const DESCRIBED: &[(&str, Kind, &str)] = &[
    (
        "cspine_associations_opened_total",
        Kind::Counter,
        "DICOM associations accepted.",
    ),
    (
        "cspine_associations_refused_total",
        Kind::Counter,
        "DICOM connections or associations refused, by reason.",
    ),
    (
        "cspine_associations_open",
        Kind::Gauge,
        "DICOM associations open now.",
    ),
    (
        "cspine_instances_received_total",
        Kind::Counter,
        "C-STOREs answered with Success (duplicates included).",
    ),
    (
        "cspine_instances_refused_total",
        Kind::Counter,
        "C-STOREs answered with a failure status, by reason.",
    ),
    (
        "cspine_series_complete_total",
        Kind::Counter,
        "Series complete and built, sent to inference.",
    ),
    (
        "cspine_series_failed_total",
        Kind::Counter,
        "Candidate series that could not be built (published as failed).",
    ),
    (
        "cspine_series_skipped_total",
        Kind::Counter,
        "Series (or parts) not analysed: not axial CT, or a better series was.",
    ),
    (
        "cspine_series_analysed_total",
        Kind::Counter,
        "Results produced, by status.",
    ),
    (
        "cspine_results_committed_total",
        Kind::Counter,
        "Results committed to the outbox.",
    ),
    (
        "cspine_results_published_total",
        Kind::Counter,
        "Results acknowledged by the MQTT broker.",
    ),
    (
        "cspine_receive_to_series_complete_seconds",
        Kind::Histogram,
        "First instance received to series complete.",
    ),
    (
        "cspine_series_complete_to_inference_done_seconds",
        Kind::Histogram,
        "Series complete to inference done.",
    ),
    (
        "cspine_inference_done_to_published_seconds",
        Kind::Histogram,
        "Inference done to the result committed and first published.",
    ),
    (
        "cspine_queued_to_pacs_delivered_seconds",
        Kind::Histogram,
        "DICOM result object queued for a PACS destination to stored there.",
    ),
    (
        "cspine_pacs_objects_total",
        Kind::Counter,
        "DICOM result objects a PACS destination stored or refused for good, by destination and outcome.",
    ),
    (
        "cspine_queue_depth",
        Kind::Gauge,
        "Items waiting, by queue (instances, volumes, results, outbox).",
    ),
    (
        "cspine_outbox_oldest_entry_age_seconds",
        Kind::Gauge,
        "Age of the oldest undelivered outbox entry (0: empty).",
    ),
    (
        "cspine_spool_bytes",
        Kind::Gauge,
        "Bytes of files in the DICOM spool.",
    ),
    (
        "cspine_spool_free_bytes",
        Kind::Gauge,
        "Free bytes on the spool's file system.",
    ),
    (
        "cspine_stages_stuck",
        Kind::Gauge,
        "Pipeline stages without progress within their allowed stall time.",
    ),
    (
        "cspine_last_result_timestamp_seconds",
        Kind::Gauge,
        "Unix time of the last result committed (0: none yet).",
    ),
    (
        "cspine_model_info",
        Kind::Gauge,
        "The model and runtime in use (value 1).",
    ),
];

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Metrics {
    pub fn new() -> Result<Metrics> {
        let recorder = PrometheusBuilder::new()
            .set_buckets(BUCKETS)
            .context("histogram buckets")?
            .build_recorder();
        for (name, kind, help) in DESCRIBED {
            let (name, help) = ((*name).into(), (*help).into());
            match kind {
                Kind::Counter => recorder.describe_counter(name, None, help),
                Kind::Gauge => recorder.describe_gauge(name, None, help),
                Kind::Histogram => recorder.describe_histogram(name, None, help),
            }
        }
        let handle = recorder.handle();
        let metrics = Metrics { recorder, handle };
        // Counters without labels show from the start, at 0.
        for name in [
            "cspine_associations_opened_total",
            "cspine_instances_received_total",
            "cspine_series_complete_total",
            "cspine_series_failed_total",
            "cspine_series_skipped_total",
            "cspine_results_committed_total",
            "cspine_results_published_total",
        ] {
            metrics.count(name, Vec::new(), 0);
        }
        metrics.gauge("cspine_associations_open", Vec::new(), 0.0);
        Ok(metrics)
    }

    /// `cspine_model_info{name, version, sha256, runtime} 1`.
    pub fn set_model(&self, model: &crate::result::ModelInfo, runtime: &str) {
        let labels = vec![
            Label::new("name", model.name.clone()),
            Label::new("version", model.version.clone()),
            Label::new("sha256", model.sha256.clone()),
            Label::new("runtime", runtime.to_owned()),
        ];
        self.gauge("cspine_model_info", labels, 1.0);
    }

    fn count(&self, name: &'static str, labels: Vec<Label>, by: u64) {
        let key = Key::from_parts(name, labels);
        self.recorder.register_counter(&key, &META).increment(by);
    }

    fn gauge(&self, name: &'static str, labels: Vec<Label>, value: f64) {
        let key = Key::from_parts(name, labels);
        self.recorder.register_gauge(&key, &META).set(value);
    }

    fn gauge_add(&self, name: &'static str, by: f64) {
        let key = Key::from_name(name);
        self.recorder.register_gauge(&key, &META).increment(by);
    }

    fn observe(&self, name: &'static str, secs: Option<f64>) {
        if let Some(secs) = secs {
            let key = Key::from_name(name);
            self.recorder.register_histogram(&key, &META).record(secs);
        }
    }

    /// Sets the state gauges from `figures`.
    fn set_figures(&self, figures: &Figures, now: OffsetDateTime) {
        let q = figures.queues;
        for (queue, depth) in [
            ("instances", q.instances),
            ("volumes", q.volumes),
            ("results", q.results),
            ("outbox", q.outbox),
            ("pacs", q.pacs),
        ] {
            let labels = vec![Label::new("queue", queue)];
            self.gauge("cspine_queue_depth", labels, depth as f64);
        }
        let age = figures
            .outbox_oldest
            .map_or(0.0, |t| (now - t).as_seconds_f64().max(0.0));
        self.gauge("cspine_outbox_oldest_entry_age_seconds", Vec::new(), age);
        self.gauge("cspine_spool_bytes", Vec::new(), figures.spool_bytes as f64);
        let free = figures.spool_free_bytes as f64;
        self.gauge("cspine_spool_free_bytes", Vec::new(), free);
        let stuck = figures.stuck_stages.len() as f64;
        self.gauge("cspine_stages_stuck", Vec::new(), stuck);
        let last = figures
            .last_result
            .map_or(0.0, |t| t.unix_timestamp_nanos() as f64 / 1e9);
        self.gauge("cspine_last_result_timestamp_seconds", Vec::new(), last);
    }

    /// The text exposition, with the state gauges read from `events` now.
    pub fn render(&self, events: &Events) -> String {
        if let Some(figures) = events.figures() {
            self.set_figures(&figures, OffsetDateTime::now_utc());
        }
        self.handle.render()
    }
}

/// A label value from an enum's serde name (`short_of_space`, `positive`).
fn label(key: &'static str, value: &impl Serialize) -> Vec<Label> {
    let value = serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    vec![Label::new(key, value)]
}

impl Sink for Metrics {
    fn record(&self, _at: OffsetDateTime, event: &Event) {
        match event {
            Event::AssociationOpened { .. } => {
                self.count("cspine_associations_opened_total", Vec::new(), 1);
                self.gauge_add("cspine_associations_open", 1.0);
            }
            Event::AssociationClosed { .. } => self.gauge_add("cspine_associations_open", -1.0),
            Event::AssociationRefused { reason, .. } => {
                let labels = label("reason", reason);
                self.count("cspine_associations_refused_total", labels, 1)
            }
            Event::InstanceStored { .. } => {
                self.count("cspine_instances_received_total", Vec::new(), 1)
            }
            Event::InstanceRefused { reason, .. } => {
                self.count("cspine_instances_refused_total", label("reason", reason), 1)
            }
            Event::SeriesComplete { .. } => {
                self.count("cspine_series_complete_total", Vec::new(), 1)
            }
            Event::SeriesFailed { .. } => self.count("cspine_series_failed_total", Vec::new(), 1),
            Event::SeriesSkipped { .. } => self.count("cspine_series_skipped_total", Vec::new(), 1),
            Event::AnalysisDone {
                status, durations, ..
            } => {
                self.count("cspine_series_analysed_total", label("status", status), 1);
                let d = durations;
                let names = [
                    (
                        "cspine_receive_to_series_complete_seconds",
                        d.receive_to_complete_secs,
                    ),
                    (
                        "cspine_series_complete_to_inference_done_seconds",
                        d.complete_to_inference_done_secs,
                    ),
                    (
                        "cspine_inference_done_to_published_seconds",
                        d.inference_done_to_published_secs,
                    ),
                ];
                for (name, secs) in names {
                    self.observe(name, secs);
                }
            }
            Event::ResultCommitted { .. } => {
                self.count("cspine_results_committed_total", Vec::new(), 1)
            }
            Event::ResultPublished { .. } => {
                self.count("cspine_results_published_total", Vec::new(), 1)
            }
            Event::OutboxDepth { entries, .. } => {
                let labels = vec![Label::new("queue", "outbox")];
                self.gauge("cspine_queue_depth", labels, *entries as f64)
            }
            Event::PacsObjectDelivered {
                destination,
                queued_to_delivered_secs,
                ..
            } => {
                let labels = vec![
                    Label::new("destination", destination.clone()),
                    Label::new("outcome", "delivered"),
                ];
                self.count("cspine_pacs_objects_total", labels, 1);
                let name = "cspine_queued_to_pacs_delivered_seconds";
                self.observe(name, *queued_to_delivered_secs);
            }
            Event::PacsObjectRejected { destination, .. } => {
                let labels = vec![
                    Label::new("destination", destination.clone()),
                    Label::new("outcome", "rejected"),
                ];
                self.count("cspine_pacs_objects_total", labels, 1);
            }
            // In the event file only: the metrics above and the scraped figures cover them.
            Event::Ready
            | Event::SeriesAssembled { .. }
            | Event::SeriesReopened { .. }
            | Event::SeriesRemembered { .. }
            | Event::AnalysisStarted { .. }
            | Event::EarlyAnalysisWithheld { .. }
            | Event::InferenceStarted { .. }
            | Event::InferenceDone { .. }
            | Event::OutboxCommitRetry { .. }
            | Event::OutboxReplay { .. }
            | Event::BrokerConnected { .. }
            | Event::BrokerConnectionFailed { .. }
            | Event::SeriesMarked { .. }
            | Event::SeriesMarkFailed { .. }
            | Event::SpoolReleased { .. }
            | Event::SpoolShortOfSpace { .. } => {}
        }
    }
}

/// The event stream of the daemon: the metrics registry when `[metrics] enabled`, the
/// JSON-lines file when `[service] events_path` is set.
pub fn open_events(
    metrics: &MetricsConfig,
    events_path: Option<&Path>,
) -> Result<(Events, Option<Arc<Metrics>>)> {
    let mut sinks: Vec<Arc<dyn Sink>> = Vec::new();
    let registry = if metrics.enabled {
        let registry = Arc::new(Metrics::new()?);
        sinks.push(registry.clone());
        Some(registry)
    } else {
        None
    };
    if let Some(path) = events_path {
        sinks.push(Arc::new(crate::events::JsonLines::open(path)?));
    }
    Ok((Events::new(sinks), registry))
}

/// Binds the endpoint (so a taken port fails the start) and returns the server task.
pub async fn bind(
    config: &MetricsConfig,
    metrics: Arc<Metrics>,
    events: Events,
) -> Result<(SocketAddr, impl std::future::Future<Output = ()>)> {
    let addr = config.addr()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (metrics.listen)"))?;
    let local = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let text = metrics.render(&events);
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    text,
                )
            }
        }),
    );
    let serve = async move {
        if let Err(e) = axum::serve(listener, app).await {
            log::error!("metrics endpoint stopped: {e}");
        }
    };
    Ok((local, serve))
}

/// Bytes of the files under `dir` (the spool), 0 where unreadable.
pub fn tree_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack: Vec<PathBuf> = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.metadata() {
                Ok(meta) if meta.is_dir() => stack.push(entry.path()),
                Ok(meta) => total += meta.len(),
                Err(_) => {}
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_listen_needs_allow_remote() {
        let mut config = MetricsConfig {
            enabled: true,
            listen: "0.0.0.0:9464".into(),
            allow_remote: false,
        };
        assert!(config.validate().is_err());
        config.allow_remote = true;
        config.validate().unwrap();
        assert!(config.is_remote());
        config.listen = "[::1]:9464".into();
        config.allow_remote = false;
        config.validate().unwrap();
        assert!(!config.is_remote());
        config.listen = "localhost".into();
        assert!(config.validate().is_err());
    }

    #[test]
    fn events_move_counters_and_histograms() {
        use crate::events::{AnalysisStatus, InstanceRefusal, StageDurations};
        let metrics = Metrics::new().unwrap();
        let now = OffsetDateTime::now_utc();
        metrics.record(
            now,
            &Event::InstanceRefused {
                calling_ae: "CT".into(),
                sop_instance_uid: "1".into(),
                reason: InstanceRefusal::TooLarge,
            },
        );
        metrics.record(
            now,
            &Event::AnalysisDone {
                result_id: "r".into(),
                study_instance_uid: "1".into(),
                series_instance_uid: "2".into(),
                status: AnalysisStatus::Negative,
                instances: 3,
                durations: StageDurations {
                    receive_to_complete_secs: Some(1.5),
                    ..StageDurations::default()
                },
            },
        );
        let text = metrics.render(&Events::default());
        assert!(text.contains("cspine_instances_refused_total{reason=\"too_large\"} 1"));
        assert!(text.contains("cspine_series_analysed_total{status=\"negative\"} 1"));
        assert!(text.contains("cspine_receive_to_series_complete_seconds_count 1"));
        assert!(text.contains("cspine_instances_received_total 0"));
    }
}
