//! `cph`: thin shell over the control-plane library.

use std::path::PathBuf;

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
    /// Run the platform on this machine until Ctrl-C.
    Up {
        /// Where phones, images and state are kept.
        #[arg(long, default_value = "/var/lib/cph")]
        data_dir: PathBuf,
        /// Phone image (rootfs tar or tar.gz).
        #[arg(long, default_value = "target/images/cph-test-image.tar.gz")]
        image: PathBuf,
        /// Phones of the development flavor.
        #[arg(long, default_value_t = 1)]
        phones: u32,
        /// Memory per phone in MiB.
        #[arg(long, default_value_t = 512)]
        memory_mb: u64,
    },
    /// Phones on this machine.
    Phone {
        #[command(subcommand)]
        command: PhoneCommand,
    },
}

#[derive(Subcommand)]
enum PhoneCommand {
    /// List phones and their states.
    List {
        #[arg(long, default_value = "/var/lib/cph")]
        data_dir: PathBuf,
    },
    /// Run a command inside a running phone.
    Exec {
        #[arg(long, default_value = "/var/lib/cph")]
        data_dir: PathBuf,
        /// Seconds before the command's processes are killed.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        name: String,
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
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
        Command::Up {
            data_dir,
            image,
            phones,
            memory_mb,
        } => Ok(cph::up::up(&cph::up::UpOptions {
            data_dir,
            image,
            phones,
            memory_mb,
        })?),
        Command::Phone {
            command: PhoneCommand::List { data_dir },
        } => {
            for st in cph::up::runtime(&data_dir)?.list()? {
                println!("{}	{:?}	pid {}", st.name, st.status, st.pid);
            }
            Ok(())
        }
        Command::Phone {
            command:
                PhoneCommand::Exec {
                    data_dir,
                    timeout,
                    name,
                    argv,
                },
        } => {
            use std::io::Write;
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            let out = cph::up::runtime(&data_dir)?.exec(
                &name,
                &argv,
                std::time::Duration::from_secs(timeout),
                1 << 20,
            )?;
            std::io::stdout().write_all(&out.stdout)?;
            std::io::stderr().write_all(&out.stderr)?;
            if out.timed_out {
                anyhow::bail!("timed out after {timeout} s");
            }
            match out.exit_code {
                Some(0) => Ok(()),
                code => anyhow::bail!("exit status {code:?}"),
            }
        }
    }
}
