//! The alert stage opened ([`Alerts`]): outbox indexed, keys loaded, broker chosen or
//! started, and the settings (`[report]`, PACS delivery, events) it runs with.

use anyhow::Result;

use super::broker::EmbeddedBroker;
use super::broker_url::BrokerUrl;
use super::config::AlertConfig;
use super::identifiers::Identifiers;
use super::mqtt::{self, StatusInfo};
use super::outbox::Outbox;
use super::patient_ref::PatientRefs;
use crate::pacs::Delivery;
use crate::report::ReportConfig;

/// The alert stage, opened: outbox indexed, patient_ref key loaded, embedded broker (if
/// any) listening. Everything that can fail at start-up fails in [`Alerts::open`].
#[derive(Debug)]
pub struct Alerts {
    pub(super) config: AlertConfig,
    pub(super) outbox: Outbox,
    pub(super) refs: PatientRefs,
    pub(super) identifiers: Identifiers,
    pub(super) url: BrokerUrl,
    pub(super) broker: Option<EmbeddedBroker>,
    /// Which results get DICOM result objects (`[report]`); the default unless
    /// [`Alerts::with_report`] says otherwise.
    pub(super) report: ReportConfig,
    /// Where DICOM result objects go ([`Alerts::with_pacs`]); none are built without it.
    pub(super) pacs: Option<Delivery>,
    pub(super) events: crate::events::Events,
}

impl Alerts {
    pub fn open(config: &AlertConfig) -> Result<Alerts> {
        config.validate()?;
        let outbox = Outbox::open(&config.outbox_dir, config.outbox_limits())?;
        let refs = PatientRefs::load(
            config.patient_ref,
            config.patient_ref_key_file.as_deref(),
            &config.default_patient_ref_key_file(),
        )?;
        let identifiers = Identifiers::load(
            config.identifiers,
            config.patient_ref_key_file.as_deref(),
            &config.default_patient_ref_key_file(),
        )?;
        // Read credentials and certificates now so a typo fails the start, not the first
        // connection attempt.
        config.password()?;
        let (url, broker) = match &config.mqtt_url {
            Some(url) => (BrokerUrl::parse(url)?, None),
            None => {
                let login = match &config.username {
                    Some(user) => config.password()?.map(|pass| (user.clone(), pass)),
                    None => None,
                };
                let broker = EmbeddedBroker::start_with_login(config.embedded_broker_port, login)?;
                (BrokerUrl::parse(&broker.url())?, Some(broker))
            }
        };
        mqtt::wire_options(config, &url, &StatusInfo::new(None))?;
        Ok(Alerts {
            config: config.clone(),
            outbox,
            refs,
            identifiers,
            url,
            broker,
            report: ReportConfig::default(),
            pacs: None,
            events: Default::default(),
        })
    }

    /// Uses `report` (`[report]`) to decide which results get DICOM result objects.
    pub fn with_report(mut self, report: ReportConfig) -> Alerts {
        self.report = report;
        self
    }

    /// Queues the DICOM result objects of every result `[report]` selects for `delivery`
    /// (the PACS destinations). Without it no objects are built.
    pub fn with_pacs(mut self, delivery: Option<Delivery>) -> Alerts {
        self.pacs = delivery;
        self
    }

    /// Records analyses, commits, deliveries and the outbox depth in `events`, and puts
    /// its key figures in the retained status.
    pub fn with_events(mut self, events: crate::events::Events) -> Alerts {
        self.events = events;
        self
    }

    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// The broker in use (the embedded one when `mqtt_url` is unset).
    pub fn broker_url(&self) -> &BrokerUrl {
        &self.url
    }

    pub fn embedded_broker(&self) -> Option<&EmbeddedBroker> {
        self.broker.as_ref()
    }
}
