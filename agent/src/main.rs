//! `cph-agent`: thin shell over the agent library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use cph_agent::config::AgentConfig;
use cph_agent::telemetry::{self, LogFormat};

#[derive(Parser)]
#[command(name = "cph-agent", version, about = "Cloud phone host node agent")]
struct Cli {
    /// Configuration file (TOML); defaults apply when absent.
    #[arg(long, short, env = "CPH_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// Log format: text or json (overrides the file).
    #[arg(long)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Print the effective configuration as TOML.
    Config,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut cfg = match &cli.config {
        Some(path) => AgentConfig::load(path)?,
        None => AgentConfig::default(),
    };
    if let Some(format) = cli.log_format {
        cfg.log_format = format;
    }
    telemetry::init(cfg.log_format);
    match cli.command {
        Some(Command::Config) => {
            print!("{}", toml::to_string(&cfg).context("render config")?);
            Ok(())
        }
        None => {
            tracing::info!(state_dir = %cfg.state_dir.display(), "cph-agent configured");
            Ok(())
        }
    }
}
