//! Test hooks: switches that only integration tests set, in the environment of `serve`.
//! `serve` reads them once at start-up ([`TestHooks::from_env`]), logs a warning when any
//! is set, and hands them to the stages that use them (the inference pipeline, the stage
//! heartbeats); no stage reads the environment for them. Production units never set them.
//!
//! - `CSPINE_TEST_EARLY_ACCEPT=1` ([`TestHooks::early_accept`]): every early analysis of
//!   the anatomy-coverage trigger is published, whatever the coverage check says, so that
//!   tests can exercise the trigger's plumbing whatever the model finds in a partial slab.
//! - `CSPINE_FAULT_STALL=inference` ([`TestHooks::stall`], comma-separated stage names):
//!   those stages block forever, without beating, the first time they reach
//!   [`crate::heartbeat::Heartbeat::fault_stall_point`] (a hung stage, for the watchdog
//!   test).

use std::collections::BTreeSet;

/// The test hooks in effect; [`Default`]: none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TestHooks {
    /// `CSPINE_TEST_EARLY_ACCEPT=1`: early analyses are published, coverage check or not.
    pub early_accept: bool,
    /// `CSPINE_FAULT_STALL`: the stages that stall on purpose.
    pub stall: StageSet,
}

impl TestHooks {
    /// The variable that sets [`TestHooks::early_accept`] (to `1`).
    pub const EARLY_ACCEPT_VAR: &'static str = "CSPINE_TEST_EARLY_ACCEPT";
    /// The variable that sets [`TestHooks::stall`] (comma-separated stage names).
    pub const STALL_VAR: &'static str = "CSPINE_FAULT_STALL";

    /// The hooks the process environment sets: for `serve`, once, at start-up.
    pub fn from_env() -> TestHooks {
        TestHooks::from_vars(|name| std::env::var(name).ok())
    }

    /// The hooks that `var` (a variable's value by name, `None` when unset) sets.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> TestHooks {
        TestHooks {
            early_accept: var(Self::EARLY_ACCEPT_VAR).is_some_and(|v| v == "1"),
            stall: StageSet::parse(&var(Self::STALL_VAR).unwrap_or_default()),
        }
    }

    /// Whether any hook is set.
    pub fn any(&self) -> bool {
        self.early_accept || !self.stall.is_empty()
    }

    /// One warning line naming the hooks that are set (nothing when none is).
    pub fn warn_if_set(&self) {
        if let Some(line) = self.warning() {
            log::warn!("{line}");
        }
    }

    fn warning(&self) -> Option<String> {
        if !self.any() {
            return None;
        }
        let mut set = Vec::new();
        if self.early_accept {
            set.push(format!(
                "{}=1 (every early analysis is published, coverage check or not)",
                Self::EARLY_ACCEPT_VAR
            ));
        }
        if !self.stall.is_empty() {
            set.push(format!(
                "{}={} (these stages stall forever at the top of their loop)",
                Self::STALL_VAR,
                self.stall
            ));
        }
        Some(format!(
            "test hooks set, never in production: {}",
            set.join("; ")
        ))
    }
}

/// A set of stage names (as stages register with the watchdog: `inference`, `pacs`, ...).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StageSet(BTreeSet<String>);

impl StageSet {
    /// Comma-separated names; blanks around them and empty names are ignored.
    pub fn parse(value: &str) -> StageSet {
        StageSet(
            value
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
        )
    }

    pub fn contains(&self, stage: &str) -> bool {
        self.0.contains(stage)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The names, comma-separated, in order.
impl std::fmt::Display for StageSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.0.iter().map(String::as_str).collect();
        f.write_str(&names.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hooks(vars: &[(&str, &str)]) -> TestHooks {
        TestHooks::from_vars(|name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn stage_list_parsing() {
        assert!(StageSet::parse("").is_empty());
        let set = StageSet::parse(" inference, series ,");
        assert!(set.contains("inference") && set.contains("series"));
        assert!(!set.contains("alert") && !set.contains(""));
        assert_eq!(set.to_string(), "inference,series");
    }

    #[test]
    fn hooks_come_from_their_variables_only() {
        assert_eq!(hooks(&[]), TestHooks::default());
        assert!(!hooks(&[]).any());
        assert_eq!(hooks(&[]).warning(), None);
        // Only `1` turns early acceptance on.
        assert!(!hooks(&[("CSPINE_TEST_EARLY_ACCEPT", "true")]).early_accept);
        let set = hooks(&[
            ("CSPINE_TEST_EARLY_ACCEPT", "1"),
            ("CSPINE_FAULT_STALL", "pacs,inference"),
        ]);
        assert!(set.early_accept && set.stall.contains("pacs") && set.any());
        assert_eq!(
            set.warning().unwrap(),
            "test hooks set, never in production: CSPINE_TEST_EARLY_ACCEPT=1 (every early \
             analysis is published, coverage check or not); CSPINE_FAULT_STALL=inference,pacs \
             (these stages stall forever at the top of their loop)"
        );
    }
}
