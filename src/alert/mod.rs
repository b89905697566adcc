//! Alerts: the versioned result schema, the durable outbox and MQTT delivery.
//!
//! Inference sends a [`ResultMessage`](crate::result::ResultMessage) per series. [`Alerts::run`] fills in what only this
//! stage knows (`patient_ref`, `site`, `device`, `timings.published`), publishes each
//! identifier as `[alert.identifiers]` says ([`identifiers`]), commits the result to
//! the [`Outbox`] (fsynced), reports it on the `committed` channel (from then on the DICOM
//! spool of that series may be deleted) and publishes it; it leaves the outbox only after
//! the broker acknowledged it. See `docs/ALERTS.md` for topics and payloads.
//!
//! The map:
//! - [`config`]: the `[alert]` section ([`AlertConfig`]) and what is derived from it;
//! - [`stage`]: the stage opened ([`Alerts`]): outbox, keys and broker, everything that
//!   can fail at start-up;
//! - [`run`](mod@run): the stage's loop ([`Alerts::run`], [`run_alerts`]): each result
//!   completed, committed, queued for PACS, reported and published;
//! - [`committed`]: what the stage reports once a result is durable ([`Committed`]);
//! - [`stage_events`]: the events the stage records (analysis done, outbox depth);
//! - [`outbox`]: the durable outbox; [`mqtt`]: its delivery to the broker, over [`wire`]
//!   (MQTT 3.1.1 or 5) to the [`broker_url`]; [`broker`]: the embedded broker;
//! - [`identifiers`] and [`patient_ref`]: what a published result says about the study
//!   and the patient; [`secret`]: credentials that never print;
//!

//! Start-up order for the daemon:
//! ```no_run
//! # async fn demo(config: cspine_triage::alert::AlertConfig,
//! #   rx: tokio::sync::mpsc::Receiver<cspine_triage::result::ResultMessage>) -> anyhow::Result<()> {
//! use cspine_triage::alert::{Alerts, StatusInfo};
//! let alerts = Alerts::open(&config)?;          // outbox open, key loaded, broker up
//! // ... now READY=1 ...
//! let (committed_tx, _committed_rx) = tokio::sync::mpsc::channel(16);
//! // The daemon registers the stage with `service::health::Health`; a bare heartbeat also does.
//! let heartbeat = cspine_triage::heartbeat::Heartbeat::new(
//!     "alert", std::time::Duration::from_secs(120), std::time::Instant::now());
//! alerts.run(heartbeat, StatusInfo::new(None), rx, Some(committed_tx)).await?; // until rx closes
//! # Ok(()) }
//! ```

pub mod broker;
pub mod broker_url;
pub mod identifiers;
pub mod mqtt;
pub mod outbox;
pub mod patient_ref;
pub mod secret;
pub mod wire;

mod committed;
mod config;
mod run;
mod stage;
mod stage_events;
#[cfg(test)]
mod tests;

pub use broker::EmbeddedBroker;
pub use broker_url::BrokerUrl;
pub use identifiers::{IdentifierConfig, Identifiers, Publication};
pub use mqtt::{StatusInfo, Topics};
pub use outbox::{Outbox, OutboxLimits};
pub use patient_ref::{HmacKey, PatientRefMode, PatientRefs};
pub use secret::Secret;
pub use wire::MqttProtocol;

pub use committed::Committed;
pub use config::AlertConfig;
pub use run::run_alerts;
pub use stage::Alerts;
pub(crate) use stage_events::outbox_depth;
