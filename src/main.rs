//! `cph`: thin shell over the control-plane library.

use clap::{Parser, Subcommand};
use cph_agent::telemetry::{self, LogFormat};

#[derive(Parser)]
#[command(name = "cph", version, about = "Self-hosted cloud phone platform")]
struct Cli {
    /// Log format: text or json.
    #[arg(long, default_value = "text", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the version of every part.
    Version,
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cph: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    telemetry::init(cli.log_format);
    match cli.command {
        Command::Version => {
            println!("cph {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    }
}
