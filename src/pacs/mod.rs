//! Durable delivery of DICOM result objects ([`crate::report::ResultObject`]: SR, KOS,
//! Secondary Capture) to PACS destinations by C-STORE.
//!
//! ```text
//! enqueue ──fsync──▶ queue_dir/<destination>/<SOP Instance UID>.entry ──sender──▶ PACS
//!                                   │ refused for good                   C-STORE
//!                                   ▼
//!                   queue_dir/<destination>/rejected/
//! ```
//!
//! - [`config`]: `[pacs]` and `[[pacs.destinations]]`.
//! - [`Delivery`] ([`delivery`]): `enqueue` (durable, idempotent per destination and SOP
//!   Instance UID), `depth`, and `run` (the stage).
//! - `queue`: one destination's durable queue; `sender`: its sender task; `link`: the
//!   association (and where DICOM TLS plugs in); `status`: what a C-STORE status means;
//!   `part10`: checking and encoding the objects; `backoff`: the retry waits.
//!
//! An object is removed from a queue only after the destination answered Success or
//! Warning; nothing queued is lost at a crash, a restart or a PACS outage.

pub mod backoff;
pub mod config;
pub mod delivery;
pub mod error;
mod link;
mod part10;
pub mod queue;
mod sender;
pub mod status;

pub use config::{DestinationConfig, PacsConfig};
pub use delivery::{Delivery, DestinationDepth};
pub use error::{ObjectProblem, PacsError};
pub use queue::{CORRUPT_DIR, REJECTED_DIR};
