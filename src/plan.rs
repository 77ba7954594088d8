//! The compiled configuration: everything decided once at configure time (parsed schedules,
//! lookup tables) so that requests only compare and look up.

use crate::config::{self, Config, ConfigError};
use crate::maintenance;

#[derive(Debug, Default)]
pub struct Plan {
    pub maintenance: Option<maintenance::Policy>,
}

impl Plan {
    pub fn compile(cfg: &Config) -> Result<Plan, ConfigError> {
        Ok(Plan {
            maintenance: cfg
                .maintenance
                .as_ref()
                .map(|m| maintenance::Policy::compile(m, "maintenance"))
                .transpose()?,
        })
    }

    /// True when no capability is configured: requests pass without rollsafe looking at them.
    pub fn is_pass_through(&self) -> bool {
        self.maintenance.is_none()
    }
}

/// Parses, validates and compiles configuration bytes, exactly as `on_configure` does.
pub fn load(bytes: &[u8]) -> Result<Plan, ConfigError> {
    Plan::compile(&config::parse(bytes)?)
}
