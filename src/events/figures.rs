//! The daemon's key [`Figures`] (queue depths, outbox, spool, stuck stages, last result),
//! as the retained MQTT status and the metrics endpoint read them.

use serde::Serialize;
use time::OffsetDateTime;

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
