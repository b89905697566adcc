//! cspine-triage: DICOM in, cervical-spine fracture triage, MQTT out.
//!
//! Data flows one way, one module per stage:
//! scanner → [`dicom`] (SCP + durable spool) → [`series`] (assembly + volume)
//! → [`inference`] (preprocessing + tract) → [`alert`] (outbox + MQTT) → broker.
//! [`service`] wires the stages together with bounded channels and talks to systemd;
//! [`heartbeat`] (below every stage) is how a stage tells the watchdog it is alive;
//! [`report`] holds the DICOM result objects and [`pacs`] delivers them to PACS by C-STORE;
//! [`synth`] generates the synthetic CT phantoms used for training, tests and the demo.
//! [`test_hooks`] are the switches only tests set, read once by `serve` and handed down.
//! [`cli`] holds the command-line tools beside the daemon (`infer`, `send`, `watch`,
//! `echo`); no stage imports it.

pub mod alert;
pub mod cli;
pub mod config;
pub mod dicom;
pub mod durable;
pub mod events;
pub mod heartbeat;
pub mod inference;
pub mod pacs;
pub mod report;
pub mod result;
pub mod series;
pub mod service;
pub mod synth;
pub mod test_hooks;
