//! `cspine-triage serve`: start-up order, the stage tasks and the channels between them,
//! and shutdown.
//!
//! ```text
//! Scp ──StoredInstance──▶ assembler ──SeriesOutcome──▶ inference ──ResultMessage──▶ Alerts
//!                          │     ▲                                                    │
//!                  Release │     │ Feedback (committed)                               │
//!                          ▼     │                                                    │
//!                      spool janitor ◀────── Committed (result durably in the outbox) ◀┘
//! ```
//!
//! The janitor ([`spool::keep_spool`], part of the spool, which owns its files) writes a
//! series' analysed mark once its result is committed and tells the assembler; it removes
//! spool files when the assembler releases them: at once for
//! instances that can never be analysed, otherwise when the assembler forgets the study
//! (`series.completed_retention_secs` after its last instance, and only once its results
//! are committed), so that late instances are analysed with the earlier ones.
//!
//! Every hand-over is a bounded channel, so a slow stage slows the one before it down
//! (down to the SCU's C-STORE responses) instead of piling up memory. Everything in
//! flight is also on disk (spool, outbox): a crash at any point loses nothing that was
//! acknowledged; the restart re-indexes the spool and the outbox and carries on.

use std::future::Future;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::health::{self, Health};
use super::notify;
use crate::alert::{self, Alerts};
use crate::config::Config;
use crate::dicom::{spool, Scp};
use crate::inference::Pipeline;
use crate::series::{Feedback, SeriesKey, SpoolLinks};
use crate::test_hooks::TestHooks;

/// Instances waiting for the assembler: enough for a burst of several scanners.
const INSTANCE_QUEUE: usize = 1024;
/// Volumes waiting for inference: one, since a volume can be hundreds of MB.
const VOLUME_QUEUE: usize = 1;
/// Results waiting for the outbox.
const RESULT_QUEUE: usize = 16;

/// Runs the daemon until SIGTERM or SIGINT.
pub fn serve(config: Config) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("cspine")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run(config))
}

async fn run(config: Config) -> Result<()> {
    // Read once, here only; the stages get what they use.
    let hooks = TestHooks::from_env();
    hooks.warn_if_set();
    // Start-up order: everything that can fail fails before READY=1, and the DICOM port
    // opens last, so no scanner is told Success by a daemon that cannot analyse or publish.
    let pipeline = tokio::task::spawn_blocking({
        let config = config.inference.clone();
        let hooks = hooks.clone();
        move || Pipeline::load(&config).map(|p| p.with_test_hooks(&hooks))
    })
    .await
    .context("model loading panicked")??;
    let model = pipeline.model_info();
    log::info!(
        "model {} {} loaded (sha256 {}), runtime {}",
        model.name,
        model.version,
        model.sha256,
        pipeline.engine.runtime()
    );

    let (events, metrics) =
        super::metrics::open_events(&config.metrics, config.service.events_path.as_deref())?;
    if let Some(metrics) = &metrics {
        metrics.set_model(&model, pipeline.engine.runtime());
    }
    let pipeline = Arc::new(pipeline.with_events(events.clone()));
    // PACS delivery only when destinations are configured; its queues are re-read here,
    // so objects a previous run did not deliver are sent after the start.
    let pacs_delivery = if config.pacs.destinations.is_empty() {
        None
    } else {
        Some(
            crate::pacs::Delivery::open(&config.pacs, &config.dicom.ae_title)?
                .with_events(events.clone()),
        )
    };
    let alerts = Alerts::open(&config.alert)?
        .with_events(events.clone())
        .with_report(config.report.clone())
        .with_pacs(pacs_delivery.clone());
    log::info!(
        "outbox {} open; publishing to {}",
        config.alert.outbox_dir.display(),
        alerts.broker_url()
    );

    // Before anything is published: a result still waiting in the outbox marks its series
    // if a crash came before the mark (see `spool::mark_committed`).
    let waiting: std::collections::HashSet<String> = alerts
        .outbox()
        .pending()
        .into_iter()
        .map(|entry| entry.id)
        .collect();
    let spool::Recovered {
        instances: recovered,
        analysed,
    } = spool::mark_committed(
        &config.dicom.spool_dir,
        spool::recover(&config.dicom.spool_dir)?,
        |series, sops| {
            use crate::result::{result_id, Status};
            Status::ALL
                .into_iter()
                .map(|status| result_id(series, &model.sha256, status, sops))
                .find(|id| waiting.contains(id))
        },
        &events,
    )?;
    // One line per series, not per instance: a crash mid-study leaves hundreds.
    let mut per_series = std::collections::BTreeMap::<(&str, &str), (&str, usize)>::new();
    for instance in &recovered {
        let key = (
            instance.study_instance_uid.as_str(),
            instance.series_instance_uid.as_str(),
        );
        per_series
            .entry(key)
            .or_insert((instance.calling_ae.as_str(), 0))
            .1 += 1;
    }
    for ((study, series), (calling_ae, count)) in per_series {
        log::info!(
            study_instance_uid = study, series_instance_uid = series, calling_ae = calling_ae;
            "recovered from spool: {count} instances of series {series} (from {calling_ae})"
        );
    }
    if !recovered.is_empty() {
        log::info!(
            "{} instances recovered from the spool; their series resume",
            recovered.len()
        );
    }
    if !analysed.is_empty() {
        log::info!(
            "{} analysed series ({} instances) kept in the spool for late instances",
            analysed.len(),
            analysed.iter().map(|s| s.instances.len()).sum::<usize>()
        );
    }
    let scp = Scp::bind(config.dicom.clone())
        .await?
        .with_events(events.clone());
    log::info!(
        "DICOM SCP {} listening on {} (spool {})",
        config.dicom.ae_title,
        scp.local_addr()?,
        config.dicom.spool_dir.display()
    );

    let health = Health::with_fault_stall(config.service.stall_secs.clone(), hooks.stall);
    let (instance_tx, instance_rx) = mpsc::channel(INSTANCE_QUEUE);
    let (volume_tx, volume_rx) = mpsc::channel(VOLUME_QUEUE);
    let (result_tx, result_rx) = mpsc::channel(RESULT_QUEUE);
    let (committed_tx, committed_rx) = mpsc::channel(RESULT_QUEUE);
    let (release_tx, release_rx) = mpsc::channel(RESULT_QUEUE);
    // Unbounded: the janitor must never wait on the assembler, which may be waiting on
    // the stages downstream (a cycle of bounded channels could deadlock). One message per
    // result.
    let (feedback_tx, feedback_rx) = mpsc::unbounded_channel();
    events.set_figures(figures_source(
        &health,
        (
            instance_tx.downgrade(),
            volume_tx.downgrade(),
            result_tx.downgrade(),
        ),
        alerts.outbox().clone(),
        pacs_delivery.clone(),
        config.dicom.spool_dir.clone(),
    ));

    let mut stages: Vec<(&'static str, JoinHandle<Result<()>>)> = vec![
        (
            "alert",
            tokio::spawn(alerts.run(
                health.register("alert"),
                alert::StatusInfo::new(Some(model)),
                result_rx,
                Some(committed_tx),
            )),
        ),
        (
            "inference",
            tokio::spawn(crate::inference::run_inference(
                pipeline.clone(),
                health.register("inference"),
                volume_rx,
                result_tx,
                Some(feedback_tx.clone()),
            )),
        ),
        (
            "series",
            tokio::spawn(crate::series::run_assembler(
                config.series.clone(),
                health.register("series"),
                instance_rx,
                volume_tx,
                SpoolLinks {
                    // The full 512 x 512 volume of a long study alone is over the memory
                    // budget of an edge box (400 MB for 700 slices, BENCHMARKS.md).
                    window: Some(pipeline.volume_window()),
                    spool_dir: Some(config.dicom.spool_dir.clone()),
                    analysed,
                    releases: Some(release_tx),
                    feedback: Some(feedback_rx),
                    spool_short_of_space: Some(spool_short_of_space(
                        config.dicom.spool_dir.clone(),
                        config.dicom.min_free_space_mb,
                    )),
                    events: events.clone(),
                },
            )),
        ),
        (
            "janitor",
            tokio::spawn(spool::keep_spool(
                scp.spool(),
                committed_rx,
                release_rx,
                move |marked: spool::MarkRequest| {
                    let _ = feedback_tx.send(Feedback::Committed {
                        series: SeriesKey::new(
                            marked.study_instance_uid,
                            marked.series_instance_uid,
                        ),
                        sop_instance_uids: marked.sop_instance_uids,
                    });
                },
                events.clone(),
            )),
        ),
    ];
    // Recovered instances go first, from their own task: the queue may be smaller than
    // the spool.
    let recovered_tx = instance_tx.clone();
    tokio::spawn(async move {
        for instance in recovered {
            if recovered_tx.send(instance).await.is_err() {
                break;
            }
        }
    });
    if let Some(delivery) = &pacs_delivery {
        // Its own task: publishing a result never waits for DICOM delivery.
        stages.push((
            "pacs",
            tokio::spawn(delivery.clone().run(health.register("pacs"))),
        ));
    }
    stages.push(("dicom", tokio::spawn(scp.run(instance_tx))));

    if let Some(metrics) = metrics {
        let (addr, server) = super::metrics::bind(&config.metrics, metrics, events.clone()).await?;
        log::info!("metrics endpoint on http://{addr}/metrics");
        tokio::spawn(server);
    }
    notify::ready();
    log::info!("ready");
    events.emit(crate::events::Event::Ready);
    let watchdog = tokio::spawn(health::run_watchdog(health));

    let outcome = wait_for_stop_or_failure(&mut stages).await;
    notify::stopping();
    watchdog.abort();
    // Stop taking work first; the alert stage then drains its outbox for a few seconds
    // and marks the device offline. Whatever is unfinished stays in spool and outbox.
    for (name, task) in &stages {
        if *name != "alert" {
            task.abort();
        }
    }
    if let Some((_, alert_task)) = stages.into_iter().find(|(name, _)| *name == "alert") {
        match alert_task.await {
            Ok(Err(e)) => log::warn!("alert stage: {e:#}"),
            Err(e) if !e.is_cancelled() => log::warn!("alert stage: {e}"),
            _ => {}
        }
    }
    log::info!("stopped");
    outcome
}

/// Waits for SIGTERM/SIGINT (Ok) or for a stage to end, which is a failure: stages run
/// until shutdown.
async fn wait_for_stop_or_failure(
    stages: &mut [(&'static str, JoinHandle<Result<()>>)],
) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let first_to_end = first_to_finish(stages);
    tokio::select! {
        _ = term.recv() => { log::info!("SIGTERM: stopping"); Ok(()) }
        _ = int.recv() => { log::info!("SIGINT: stopping"); Ok(()) }
        (name, ended) = first_to_end => {
            let err = match ended {
                Ok(Ok(())) => anyhow::anyhow!("stage {name} ended unexpectedly"),
                Ok(Err(e)) => e.context(format!("stage {name} failed")),
                Err(e) => anyhow::anyhow!("stage {name} panicked: {e}"),
            };
            log::error!("{err:#}");
            Err(err)
        }
    }
}

/// The first stage task to finish, with its name.
async fn first_to_finish(
    stages: &mut [(&'static str, JoinHandle<Result<()>>)],
) -> (&'static str, Result<Result<()>, tokio::task::JoinError>) {
    std::future::poll_fn(|cx| {
        for (name, task) in stages.iter_mut() {
            if let std::task::Poll::Ready(r) = std::pin::Pin::new(task).poll(cx) {
                return std::task::Poll::Ready((*name, r));
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// The spool is short of space below twice the SCP's free-space floor: room for finished
/// studies to be released (oldest first) before new instances get A700. With a floor of 0,
/// only a full disk counts.
fn spool_short_of_space(
    spool_dir: std::path::PathBuf,
    min_free_space_mb: u64,
) -> crate::series::assembler::ShortOfSpace {
    let threshold = min_free_space_mb.saturating_mul(2 * 1024 * 1024).max(1);
    crate::series::assembler::ShortOfSpace(Arc::new(move || {
        match crate::durable::free_space(&spool_dir) {
            Ok(free) => free < threshold,
            Err(e) => {
                log::warn!("cannot read the spool's free space: {e:#}");
                false
            }
        }
    }))
}

/// The daemon's key figures ([`crate::events::Figures`]) for the metrics endpoint and the
/// retained MQTT status: what waits in the hand-over channels (`queues`: instances,
/// volumes, results), the outbox and the PACS queues, the spool's size and free space, stuck stages.
fn figures_source<A, B, C>(
    health: &Health,
    queues: (
        mpsc::WeakSender<A>,
        mpsc::WeakSender<B>,
        mpsc::WeakSender<C>,
    ),
    outbox: alert::Outbox,
    pacs: Option<crate::pacs::Delivery>,
    spool_dir: std::path::PathBuf,
) -> impl Fn() -> crate::events::Figures + Send + Sync + 'static
where
    A: Send + 'static,
    B: Send + 'static,
    C: Send + 'static,
{
    fn waiting<T>(tx: &mpsc::WeakSender<T>) -> usize {
        tx.upgrade()
            .map_or(0, |tx| tx.max_capacity() - tx.capacity())
    }
    let health = health.clone();
    move || crate::events::Figures {
        queues: crate::events::QueueDepths {
            instances: waiting(&queues.0),
            volumes: waiting(&queues.1),
            results: waiting(&queues.2),
            outbox: outbox.len(),
            pacs: pacs
                .as_ref()
                .map_or(0, |d| d.depth().iter().map(|q| q.entries).sum()),
        },
        outbox_oldest: outbox.oldest_committed(),
        spool_bytes: super::metrics::tree_bytes(&spool_dir),
        spool_free_bytes: crate::durable::free_space(&spool_dir).unwrap_or(0),
        stuck_stages: health.stuck().iter().map(|s| s.name.to_string()).collect(),
        last_result: None,
    }
}
