//! Series assembly: which stored instances form a complete series, and which series of a
//! study goes on to volume building.
//!
//! [`Assembler`] is a pure state machine driven by explicit [`Instant`]s (tests move time
//! by hand); [`run_assembler`] is the tokio task around it.
//!
//! Rules, in order of time:
//! 1. Instances are grouped by Study and Series Instance UID (a re-sent SOP Instance UID
//!    counts once).
//! 2. A series is complete after `quiet_period_secs` without a new instance, when its
//!    expected count is reached (a matching `expected_count` rule, else
//!    Images in Acquisition), or `max_wait_secs` after its first instance.
//! 3. A study is decided once all its series are complete and it has been quiet for
//!    `study_quiet_period_secs` (or `max_wait_secs` after its first instance): every series
//!    is filtered by [`selection::filter_series`] and the best candidate
//!    ([`selection::rank_key`]) is built; the others are skipped with their reason.
//!    Waiting for the whole study is what lets a bone-kernel series sent after a
//!    soft-tissue one still be the one analysed.
//! 4. After the decision, a series that completes later (a late recon, or late instances
//!    re-opening a complete series) is compared with the series already chosen: it is built
//!    if it is the chosen series itself (now with more instances) or a better candidate,
//!    otherwise skipped ("study already analysed with a better series"). A series whose
//!    instances are exactly the ones a committed result already analysed is not built
//!    again.
//! 5. A decided study is forgotten `completed_retention_secs` after its last instance, once
//!    every result of it is committed downstream (see [`Feedback`]).
//!
//! The spool follows the assembler ([`Release`]): instances that can never be analysed
//! (a localizer, a reformat, ...) are released as soon as they are filtered out; every
//! other instance (the analysed series, its fallbacks, series skipped for a better one)
//! is kept while the study is remembered, so that late instances are analysed with the
//! earlier ones, and released when the study is forgotten. A restart restores what the
//! spool marks as analysed ([`Assembler::restore`]): remembered, not analysed again.
//!
//! Where things are:
//! - [`machine`]: the state machine, [`Assembler`]: rules 1-5 and the spool releases.
//! - [`rules`]: rules 2-5, one function each, applied by [`Assembler::poll`].
//! - [`state`]: what is held per study and per series between polls.
//! - [`early`]: the anatomy-coverage trigger (an early job for a series still arriving).
//! - [`job`]: what the state machine hands on ([`SeriesJob`]) and hears back ([`Feedback`]).
//! - [`build`]: building a job's volume, each attempt counted in the spool.
//! - [`links`]: what connects the stage to the spool and inference ([`SpoolLinks`]).
//! - [`task`]: the tokio task around it all, [`run_assembler`], which emits the events.

mod build;
mod early;
mod job;
mod links;
mod machine;
mod rules;
mod state;
mod task;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_events;

pub use build::build_job;
pub use job::{Completion, DropReason, Feedback, Release, SeriesJob};
pub use links::{ShortOfSpace, SpoolLinks, SPACE_CHECK};
pub use machine::Assembler;
pub use task::run_assembler;
