//! The command-line tools beside the daemon, each a subcommand of `cspine-triage`: they use
//! the stages' libraries the way a peer or an operator would, and no stage imports them.
//!
//! - [`infer`]: `cspine-triage infer`, the daemon's pipeline offline on DICOM files.
//! - [`send`]: `cspine-triage send`, a C-STORE SCU that sends files as a scanner would.
//! - [`watch`]: `cspine-triage watch`, a subscriber that prints published results.
//! - [`echo`]: `cspine-triage echo`, a C-ECHO to a DICOM node, over TCP or TLS.
//!
//! `synth` (the phantom generator) is a tool too, but its own module: it is large and the
//! training recipe and the tests use it as a library.

pub mod echo;
pub mod infer;
pub mod send;
pub mod watch;
