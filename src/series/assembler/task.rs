//! The series stage as a tokio task, [`run_assembler`]: feeds the [`Assembler`] with
//! stored instances (headers read on a blocking thread) and feedback, polls it at its
//! deadlines, and builds the chosen series one at a time. It emits the stage's events
//! ([`SpoolLinks::events`]).

use std::time::Instant;

use anyhow::Result;
use tokio::sync::mpsc;

use super::build::{build_recorded, BuildAttempts};
use super::job::{DropReason, Feedback, SeriesJob};
use super::links::{SpoolLinks, SPACE_CHECK};
use super::machine::Assembler;
use crate::dicom::StoredInstance;
use crate::heartbeat::Heartbeat;
use crate::series::header::InstanceHeader;
use crate::series::{AssemblyConfig, SeriesKey, SeriesOutcome};

/// Capacity of the queue between assembly and the volume builder (jobs are small: paths
/// and headers). When full, assembly waits, which in turn slows the SCP down.
const BUILD_QUEUE: usize = 16;

/// The series stage: reads [`StoredInstance`]s from `rx`, sends a [`SeriesOutcome`] per
/// analysed series to `tx`. Volumes are built one at a time on a blocking thread (memory
/// bound: one volume in construction). Returns when `rx` is closed (after building what
/// was already decided) or `tx` is closed. Series still assembling at shutdown are in the
/// spool and are re-sent by its re-index at the next start.
pub async fn run_assembler(
    config: AssemblyConfig,
    heartbeat: Heartbeat,
    mut rx: mpsc::Receiver<StoredInstance>,
    tx: mpsc::Sender<SeriesOutcome>,
    links: SpoolLinks,
) -> Result<()> {
    config.validate()?;
    let limits = config.volume_limits();
    let SpoolLinks {
        window,
        analysed,
        releases,
        mut feedback,
        spool_short_of_space,
        spool_dir,
        events,
    } = links;
    let build_attempts = spool_dir.map(|spool_dir| BuildAttempts {
        spool_dir,
        max: config.max_build_attempts,
    });
    let mut next_space_check = Instant::now();
    // Jobs that end without an outcome (a panic) are reported like the others.
    let (dropped_tx, mut dropped_rx) = mpsc::unbounded_channel::<Feedback>();
    let (job_tx, mut job_rx) = mpsc::channel::<SeriesJob>(BUILD_QUEUE);
    let outcome_events = events.clone();
    let builder = tokio::spawn(async move {
        while let Some(job) = job_rx.recv().await {
            let (study, series) = (
                job.meta.study_instance_uid.clone(),
                job.meta.series_instance_uid.clone(),
            );
            let window = window.clone();
            let attempts = build_attempts.clone();
            let outcome = match tokio::task::spawn_blocking(move || {
                build_recorded(job, window.as_ref(), &limits, attempts.as_ref())
            })
            .await
            {
                Ok(outcome) => outcome,
                Err(e) => {
                    log::error!("volume building of series {series} panicked: {e}");
                    let _ = dropped_tx.send(Feedback::Dropped {
                        series: SeriesKey::new(study, series),
                        reason: DropReason::BuildPanicked(e.to_string()),
                    });
                    continue;
                }
            };
            if let Some(fallback) = outcome.fallback_event() {
                outcome_events.emit(fallback);
            }
            outcome_events.emit(outcome.event());
            if tx.send(outcome).await.is_err() {
                log::warn!("series outcome receiver closed: stopping the volume builder");
                break;
            }
        }
    });

    let mut assembler = Assembler::new(config).with_feedback(feedback.is_some());
    for series in analysed {
        heartbeat.beat();
        let headers = tokio::task::spawn_blocking(move || {
            let mut headers = Vec::with_capacity(series.instances.len());
            for stored in &series.instances {
                match InstanceHeader::read(&stored.path) {
                    Ok(h) => headers.push((stored.clone(), h)),
                    Err(e) => log::error!(
                        "instance {} of series {} not restored: {e:#}",
                        stored.sop_instance_uid,
                        stored.series_instance_uid
                    ),
                }
            }
            (series, headers)
        })
        .await?;
        let (series, headers) = headers;
        assembler.restore(&series, headers, Instant::now());
    }
    loop {
        heartbeat.beat();
        let deadline = assembler.next_deadline();
        let mut idle = Instant::now() + heartbeat.idle_beat_period();
        if spool_short_of_space.is_some() {
            idle = idle.min(next_space_check);
        }
        let deadline = Some(deadline.map_or(idle, |d| d.min(idle)));
        let received = tokio::select! {
            msg = rx.recv() => Some(msg),
            Some(f) = recv_feedback(&mut feedback) => {
                assembler.feedback(f);
                None
            }
            Some(f) = dropped_rx.recv() => {
                if assembler.feedback {
                    assembler.feedback(f);
                }
                None
            }
            _ = sleep_until(deadline) => None,
        };
        match received {
            Some(None) => break,
            Some(Some(stored)) => {
                let path = stored.path.clone();
                match tokio::task::spawn_blocking(move || InstanceHeader::read(&path)).await? {
                    Ok(header) => assembler.add(&stored, header, Instant::now()),
                    Err(e) => log::error!(
                        "instance {} of series {} not assembled: {e:#}",
                        stored.sop_instance_uid,
                        stored.series_instance_uid
                    ),
                }
            }
            None => {}
        }
        if let Some(short) = &spool_short_of_space {
            let now = Instant::now();
            if now >= next_space_check {
                next_space_check = now + SPACE_CHECK;
                if (short.0)() {
                    if let Some(study) = assembler.forget_oldest_finished(now) {
                        log::warn!(
                            "spool short of space (below twice dicom.min_free_space_mb): \
                             releasing analysed study {study} before \
                             series.completed_retention_secs is over"
                        );
                        events.emit(crate::events::Event::SpoolShortOfSpace {
                            study_instance_uid: study,
                        });
                    }
                }
            }
        }
        let jobs = assembler.poll(Instant::now());
        for event in assembler.take_events() {
            events.emit(event);
        }
        for job in jobs {
            events.emit(job.started_event());
            if heartbeat.send(&job_tx, job).await.is_err() {
                log::warn!("volume builder stopped: stopping the assembler");
                return Ok(());
            }
        }
        // Skips were logged when recorded.
        for skip in assembler.take_skips() {
            events.emit(skip.event());
        }
        for release in assembler.take_releases() {
            if let Some(releases) = &releases {
                let _ = releases.send(release).await;
            }
        }
    }
    drop(job_tx);
    builder.await?;
    Ok(())
}

async fn recv_feedback(rx: &mut Option<mpsc::UnboundedReceiver<Feedback>>) -> Option<Feedback> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}
