//! The spool janitor: the task that keeps the spool in step with the stages downstream.
//! A result committed to the outbox (from then on the outbox guarantees delivery) gets
//! its series' analysed mark written (fsynced), and the assembler is told; the instances
//! stay for late instances. Files are removed when the assembler releases them. Both go
//! through the [`Spool`] the SCP stores with, so a removed directory is recreated by the
//! next store into it.
//!
//! The janitor knows its inputs only by the spool's own vocabulary ([`MarkRequest`],
//! [`Release`]): the stages above convert their messages into these, so that the spool
//! never depends on them. Each mark and removal is recorded on the event stream
//! ([`Event::SeriesMarked`], [`Event::SpoolReleased`]).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use tokio::sync::mpsc;

use super::Spool;
use crate::events::{Event, Events, MarkCause, ReleaseReason};

/// A result that analysed `sop_instance_uids` of a series is durably in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MarkRequest {
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub result_id: String,
    pub sop_instance_uids: Vec<String>,
    /// Better series of the same study that could not be built, dealt with by the same
    /// result (it is their fallback's): marked as analysed too.
    pub stood_in_for: Vec<StoodInFor>,
}

/// A series that a [`MarkRequest`]'s result stood in for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoodInFor {
    pub series_instance_uid: String,
    pub sop_instance_uids: Vec<String>,
    /// Why it could not be built (for the log).
    pub reason: String,
}

/// Spool files the assembler no longer needs (sent by the assembler).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    /// Spool files to remove.
    pub paths: Vec<PathBuf>,
    /// Why ([`ReleaseReason::StudyForgotten`]: the series' analysed mark goes too).
    pub reason: ReleaseReason,
}

impl Release {
    /// The study is forgotten: the series' analysed mark goes too.
    pub fn forgotten(&self) -> bool {
        self.reason.forgets()
    }
}

/// Runs the janitor until both channels close. `on_marked` is called once per
/// [`MarkRequest`] after its mark is written (or could not be: the result is committed
/// either way), with the request.
pub async fn keep_spool<C: Into<MarkRequest> + Send>(
    spool: Arc<Spool>,
    mut committed: mpsc::Receiver<C>,
    mut released: mpsc::Receiver<Release>,
    on_marked: impl Fn(MarkRequest) + Send,
    events: Events,
) -> Result<()> {
    loop {
        tokio::select! {
            Some(c) = committed.recv() => {
                let request: MarkRequest = c.into();
                mark_all(&spool, &request, &events).await?;
                on_marked(request);
            }
            Some(r) = released.recv() => release(&spool, r, &events).await?,
            else => return Ok(()),
        }
    }
}

/// Removes the files of `r`, off the async runtime.
async fn release(spool: &Arc<Spool>, r: Release, events: &Events) -> Result<()> {
    let spool = spool.clone();
    let forget = r.forgotten();
    let Release {
        study_instance_uid: study,
        series_instance_uid: series,
        paths,
        reason,
    } = r;
    let (study_uid, series_uid) = (study.clone(), series.clone());
    let removed =
        tokio::task::spawn_blocking(move || spool.release(&study_uid, &series_uid, &paths, forget))
            .await?;
    let shown = series.escape_debug();
    match removed {
        Ok(n) => {
            log::info!("series {shown} ({reason}): {n} instances removed from the spool");
            events.emit(Event::SpoolReleased {
                study_instance_uid: study,
                series_instance_uid: series,
                instances: n,
                reason,
            });
        }
        // Not fatal: the files stay, and are found again after a restart.
        Err(e) => log::warn!("cannot remove instances of series {shown} from the spool: {e:#}"),
    }
    Ok(())
}

/// Marks the series of `c` and every series it stood in for.
async fn mark_all(spool: &Arc<Spool>, c: &MarkRequest, events: &Events) -> Result<()> {
    // Peer-supplied UIDs: control characters escaped (no forged log lines); a clean UID
    // reads as itself.
    let series = &c.series_instance_uid;
    let shown = series.escape_debug();
    let outcome = mark(spool, c, series, &c.sop_instance_uids).await?;
    match &outcome {
        Ok(Some(n)) => log::info!(
            "series {shown} (result {} is in the outbox): {} analysed instances marked in \
             the spool ({n} in its mark); kept until its study is forgotten",
            c.result_id,
            c.sop_instance_uids.len()
        ),
        Ok(None) => log::info!(
            "series {shown} (result {} is in the outbox): not in the spool",
            c.result_id
        ),
        // Not fatal: after a restart the series is analysed again, giving the same result
        // id (same instances, model and status), which the outbox and subscribers
        // de-duplicate.
        Err(e) => log::warn!("cannot mark series {shown} analysed in the spool: {e:#}"),
    }
    let marked = outcome
        .as_ref()
        .map(|n| n.map(|_| c.sop_instance_uids.len()));
    events.emit(mark_event(c, series, marked, MarkCause::ResultCommitted));
    for failed in &c.stood_in_for {
        let failed_series = &failed.series_instance_uid;
        let failed_shown = failed_series.escape_debug();
        let outcome = mark(spool, c, failed_series, &failed.sop_instance_uids).await?;
        match &outcome {
            Ok(n) => log::info!(
                "series {failed_shown} (could not be built: {}; fallback {shown} analysed, \
                 result {}): {} instances marked in the spool",
                failed.reason,
                c.result_id,
                n.unwrap_or(0)
            ),
            Err(e) => log::warn!("cannot mark series {failed_shown} in the spool: {e:#}"),
        }
        let marked = outcome
            .as_ref()
            .map(|n| n.map(|_| failed.sop_instance_uids.len()));
        events.emit(mark_event(
            c,
            failed_series,
            marked,
            MarkCause::FallbackResult,
        ));
    }
    Ok(())
}

/// The event of a mark of `series` for `c`: `marked` is the outcome, with the number of
/// instances marked (`None`: the series is no longer in the spool).
fn mark_event(
    c: &MarkRequest,
    series: &str,
    marked: Result<Option<usize>, &anyhow::Error>,
    cause: MarkCause,
) -> Event {
    let (study_instance_uid, series_instance_uid, result_id) = (
        c.study_instance_uid.clone(),
        series.to_owned(),
        c.result_id.clone(),
    );
    match marked {
        Ok(instances) => Event::SeriesMarked {
            study_instance_uid,
            series_instance_uid,
            result_id,
            instances: instances.unwrap_or(0),
            cause,
        },
        Err(_) => Event::SeriesMarkFailed {
            study_instance_uid,
            series_instance_uid,
            result_id,
            cause,
        },
    }
}

/// Writes the analysed mark of `series` (instances `sops`) for request `c`, off the async
/// runtime.
async fn mark(
    spool: &Arc<Spool>,
    c: &MarkRequest,
    series: &str,
    sops: &[String],
) -> Result<Result<Option<usize>>> {
    let (spool, study, series, id, sops) = (
        spool.clone(),
        c.study_instance_uid.clone(),
        series.to_owned(),
        c.result_id.clone(),
        sops.to_vec(),
    );
    Ok(tokio::task::spawn_blocking(move || {
        spool.mark_analysed(&study, &series, &id, &sops, time::OffsetDateTime::now_utc())
    })
    .await?)
}
