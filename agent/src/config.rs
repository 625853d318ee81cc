//! Agent configuration: defaults, then a TOML file, then the command line.
//! Every field has a documented default so an empty file is a valid config.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::telemetry::LogFormat;

/// Errors loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
}

/// The agent's configuration file (`/etc/cph/agent.toml`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Control-plane base URL the agent registers with.
    pub control_plane_url: String,
    /// Shared secret the control plane and the agent present to each other.
    pub node_token: String,
    /// Address the agent protocol listens on.
    pub listen: String,
    /// Where phone, job and placement state is kept.
    pub state_dir: PathBuf,
    /// Log line format: `text` or `json`.
    pub log_format: LogFormat,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            control_plane_url: "http://127.0.0.1:8443".to_string(),
            node_token: String::new(),
            listen: "127.0.0.1:8600".to_string(),
            state_dir: PathBuf::from("/var/lib/cph-agent"),
            log_format: LogFormat::Text,
        }
    }
}

impl AgentConfig {
    /// Loads a TOML file over the defaults.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let cfg: AgentConfig = toml::from_str("").expect("empty config parses");
        assert_eq!(cfg, AgentConfig::default());
    }

    #[test]
    fn unknown_key_is_an_error() {
        let err = toml::from_str::<AgentConfig>("nonsense = 1").expect_err("unknown key");
        assert!(err.to_string().contains("nonsense"), "{err}");
    }

    #[test]
    fn file_overrides_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "state_dir = \"/srv/cph\"\nlog_format = \"json\"\n").expect("write");
        let cfg = AgentConfig::load(&path).expect("load");
        assert_eq!(cfg.state_dir, PathBuf::from("/srv/cph"));
        assert_eq!(cfg.log_format, LogFormat::Json);
        assert_eq!(cfg.listen, AgentConfig::default().listen);
    }
}
