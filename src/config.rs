//! The daemon's configuration: one TOML file, one section per stage.
//!
//! Each stage owns the struct of its own section (next to the code that reads it);
//! this module only composes them, loads the file and validates the whole.

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::{alert, dicom, inference, series, service};

/// Effective configuration of `cspine-triage serve`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub dicom: dicom::ScpConfig,
    pub series: series::AssemblyConfig,
    pub inference: inference::InferenceConfig,
    pub alert: alert::AlertConfig,
    pub service: service::ServiceConfig,
}

impl Config {
    /// Reads and validates a TOML file. Unknown keys are errors: a typo must not
    /// silently fall back to a default on a hospital box.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let config: Config = toml::from_str(&text)
            .with_context(|| format!("invalid config file {}", path.display()))?;
        config
            .validate()
            .with_context(|| format!("invalid config file {}", path.display()))?;
        Ok(config)
    }

    /// Checks every section; the error names the offending key.
    pub fn validate(&self) -> Result<()> {
        self.dicom.validate()?;
        self.series.validate()?;
        self.inference.validate()?;
        self.alert.validate()?;
        self.service.validate()?;
        Ok(())
    }

    /// The effective configuration as TOML, as `check-config` prints it.
    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }
}
