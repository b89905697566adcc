//! The stage's loop ([`Alerts::run`]): each result from inference completed with what
//! only this stage knows, its DICOM result objects built, committed to the outbox,
//! queued for PACS, reported on `committed`, and published by the MQTT task.

use std::sync::Arc;

use anyhow::{Context, Result};
use time::OffsetDateTime;
use tokio::sync::mpsc;

use super::committed::Committed;
use super::config::AlertConfig;
use super::mqtt::{self, StatusInfo};
use super::outbox;
use super::stage::Alerts;
use super::stage_events::{analysis_done, outbox_depth, published_now};
use crate::heartbeat::Heartbeat;
use crate::report::{self, ResultObject};
use crate::result::{self, ResultMessage};

impl Alerts {
    /// The DICOM result objects of `message` when a PACS is configured and
    /// `[report].objects` selects it; none when not, or when they cannot be built (logged:
    /// the result is published anyway).
    fn build_dicom_objects(&self, message: &ResultMessage) -> Vec<ResultObject> {
        if self.pacs.is_none() || !self.report.selects(message.result.status) {
            return Vec::new();
        }
        match report::build_result_objects(message, &self.report) {
            Ok(objects) => objects,
            Err(e) => {
                log::error!(
                    "result {} (series {}): no DICOM result objects: {e}",
                    message.result.id,
                    crate::dicom::peer_text::peer_str(&message.result.series_instance_uid)
                );
                Vec::new()
            }
        }
    }

    /// Durably queues `objects` for the PACS destinations (blocking file I/O, off the
    /// runtime's threads). A write that fails (a full disk) is retried every second, beating
    /// the heartbeat, so objects are never dropped; an object that fails its own checks is
    /// an error in its builder, logged and not retried.
    async fn queue_for_pacs(&self, heartbeat: &Heartbeat, id: &str, objects: Vec<ResultObject>) {
        let Some(delivery) = &self.pacs else { return };
        if objects.is_empty() {
            return;
        }
        let objects = Arc::new(objects);
        loop {
            let (d, o) = (delivery.clone(), objects.clone());
            let outcome = tokio::task::spawn_blocking(move || d.enqueue(&o)).await;
            match outcome {
                Ok(Ok(())) => return,
                Ok(Err(e @ crate::pacs::PacsError::InvalidObject { .. })) => {
                    log::error!("result {id}: DICOM result objects not queued for PACS: {e}");
                    return;
                }
                Ok(Err(e)) => log::error!(
                    "result {id}: cannot queue the DICOM result objects for PACS, retrying: {e}"
                ),
                Err(e) => log::error!("result {id}: PACS queueing task failed, retrying: {e}"),
            }
            heartbeat.beat();
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    }

    /// Commits every message from `rx` and publishes the outbox until `rx` is closed (all
    /// senders dropped); then drains for up to `shutdown_drain_secs` and says offline.
    /// When the outbox is full, `rx` is not read: upstream waits (backpressure).
    /// `heartbeat` beats while waiting for results and while a commit is retried.
    pub async fn run(
        self,
        heartbeat: Heartbeat,
        status: StatusInfo,
        mut rx: mpsc::Receiver<ResultMessage>,
        committed: Option<mpsc::Sender<Committed>>,
    ) -> Result<()> {
        let pending = self.outbox.len();
        if pending > 0 {
            // Results of a previous run (the outbox logged them when it was opened).
            self.events
                .emit(crate::events::Event::OutboxReplay { pending });
        }
        let wake = Arc::new(tokio::sync::Notify::new());
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let delivery = tokio::spawn(mqtt::deliver(
            self.config.clone(),
            self.url.clone(),
            status,
            self.outbox.clone(),
            wake.clone(),
            stop_rx,
            self.events.clone(),
        ));

        while let Some(message) = heartbeat.recv(&mut rx).await {
            // Built before the commit, so that the committed result names them.
            let dicom_objects_for_pacs = self.build_dicom_objects(&message);
            let ResultMessage {
                mut result,
                patient_id,
                key_image_png,
                sop_instance_uids,
                failed_better,
                source: _,
            } = message;
            result.dicom_objects = dicom_objects_for_pacs
                .iter()
                .map(report::object_ref)
                .collect();
            if !id_is_topic_safe(&result.id) {
                // Still published (never dropped); the key image topic replaces the
                // offending characters. An inference bug, not something to lose a result over.
                log::error!(
                    "result id {:?} (series {}) is not in the schema's form [A-Za-z0-9._:-]+",
                    result.id,
                    result.series_instance_uid
                );
            }
            result.schema = result::SCHEMA_V1.to_owned();
            result.patient_ref = self.refs.reference(&patient_id);
            result.site = self.config.site.clone();
            result.device = self.config.device.clone();
            let positive = result.status == result::Status::Positive;
            let (id, study, series) = (
                result.id.clone(),
                result.study_instance_uid.clone(),
                result.series_instance_uid.clone(),
            );
            let status = result.status;
            let (analysed, inference_end) = (analysis_done(&result), result.timings.inference_end);
            let identifiers = self.identifiers.clone();
            // `published` is the moment of the (last) commit attempt: a full outbox may
            // make us wait, and the result must not claim an earlier time.
            let payload = move || {
                let mut result = result.clone();
                result.timings.published = Some(OffsetDateTime::now_utc());
                identifiers.to_json(&result)
            };
            let outcome = self
                .outbox
                .commit_waiting(
                    &heartbeat,
                    &self.events,
                    &id,
                    positive,
                    payload,
                    key_image_png,
                )
                .await;
            let already_queued = matches!(outcome, outbox::CommitOutcome::AlreadyQueued(_));
            self.events.emit(published_now(analysed, inference_end));
            self.events.emit(crate::events::Event::ResultCommitted {
                result_id: id.clone(),
                already_queued,
            });
            self.events.emit(outbox_depth(&self.outbox));
            // Journal fields (src/service/logging.rs), for `journalctl RESULT_ID=…`.
            let (f_id, f_study, f_series) = (id.as_str(), study.as_str(), series.as_str());
            if already_queued {
                log::info!(
                    result_id = f_id, study_instance_uid = f_study, series_instance_uid = f_series;
                    "result {id} (series {series}) is already waiting in the outbox; kept the \
                     queued one"
                );
            } else {
                log::info!(
                    result_id = f_id, study_instance_uid = f_study, series_instance_uid = f_series;
                    "result {id} ({status:?}, series {series}) committed to the outbox as \
                     entry {}",
                    outcome.seq()
                );
            }
            wake.notify_one();
            // After the commit and the MQTT wake-up, so publishing never waits for it; before
            // `Committed`, so the spool keeps the series (and a crash re-analyses it, giving
            // the same object UIDs) until the objects are durably queued.
            self.queue_for_pacs(&heartbeat, &id, dicom_objects_for_pacs)
                .await;
            if let Some(tx) = &committed {
                // The receiver going away is the caller's business, not a reason to stop.
                let _ = heartbeat
                    .send(
                        tx,
                        Committed {
                            id,
                            study_instance_uid: study,
                            series_instance_uid: series,
                            seq: outcome.seq(),
                            already_queued,
                            sop_instance_uids,
                            failed_better,
                        },
                    )
                    .await;
            }
        }
        // Input closed on purpose (shutdown): the drain below is bounded by its own timeout.
        heartbeat.finish();

        let _ = stop_tx.send(true);
        delivery.await.context("MQTT delivery task panicked")?
    }
}

/// The schema's form for `id`, which is also an MQTT topic level (`keyimage/<id>`).
fn id_is_topic_safe(id: &str) -> bool {
    !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// [`Alerts::open`] + [`Alerts::run`] in one call.
pub async fn run_alerts(
    config: AlertConfig,
    heartbeat: Heartbeat,
    status: StatusInfo,
    rx: mpsc::Receiver<ResultMessage>,
    committed: Option<mpsc::Sender<Committed>>,
) -> Result<()> {
    Alerts::open(&config)?
        .run(heartbeat, status, rx, committed)
        .await
}
