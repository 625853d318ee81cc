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
    /// Run the node agent daemon (the agent protocol, phones and jobs).
    Run,
    /// Print the effective configuration as TOML.
    Config,
    /// Delete every phone of this agent (containers, volumes, networks) and
    /// take its phone network and pool mounts off the host. Stop the agent first.
    Purge,
    /// Print the placement plan of a phone flavor on a host: slot, CPUs,
    /// NUMA node and GPU per phone, with the plan's quality figures.
    Plan(PlanArgs),
    /// Serve a directory over the S3 protocol (the embedded object store)
    /// until SIGINT or SIGTERM.
    ObjectStore(ObjectStoreArgs),
}

#[derive(clap::Args)]
struct ObjectStoreArgs {
    /// Directory holding the buckets (one sub-directory each).
    #[arg(long)]
    root: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: std::net::SocketAddr,
    /// Access key id clients sign with.
    #[arg(long, env = "CPH_OBJSTORE_AK")]
    ak: String,
    /// Secret access key clients sign with.
    #[arg(long, env = "CPH_OBJSTORE_SK", hide_env_values = true)]
    sk: String,
    /// Bucket to create at start (repeatable).
    #[arg(long = "bucket")]
    buckets: Vec<String>,
}

fn object_store(args: ObjectStoreArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("start the tokio runtime")?;
    runtime.block_on(cph_agent::objstore::server::run_until_signal(
        args.root,
        args.listen,
        args.ak,
        args.sk,
        &args.buckets,
    ))?;
    Ok(())
}

#[derive(clap::Args)]
struct PlanArgs {
    /// Root of the host's sysfs (a snapshot works too).
    #[arg(long, default_value = "/sys")]
    sysfs_root: PathBuf,
    /// The flavor's core_bind_strategy (e.g. common_hosted_c60).
    #[arg(long)]
    strategy: String,
    /// The flavor's phone_capacity.
    #[arg(long)]
    capacity: u32,
    /// vCPUs per phone.
    #[arg(long, default_value_t = 2)]
    vcpus: u32,
    /// Memory per phone in MiB (0: not checked).
    #[arg(long, default_value_t = 0)]
    memory_mb: u64,
    /// CPUs reserved for the agent and encoding server, as a CPU list
    /// (default: the first CPU of each NUMA node).
    #[arg(long)]
    reserved: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn print_plan(args: &PlanArgs) -> anyhow::Result<()> {
    use cph_runtime::placement::{cpulist, figures, plan, report, PlanRequest, Topology};
    let topo = Topology::discover(&args.sysfs_root)?;
    let request = PlanRequest {
        strategy: args.strategy.clone(),
        capacity: args.capacity,
        vcpus: args.vcpus,
        memory_mb: args.memory_mb,
        reserved: args.reserved.as_deref().map(cpulist::parse).transpose()?,
    };
    let started = std::time::Instant::now();
    let plan = plan(&topo, &request)?;
    let mut fig = figures(&topo, &plan);
    fig.plan_time_us = Some(started.elapsed().as_secs_f64() * 1e6);
    if args.json {
        println!("{}", report::to_json(&plan, &fig));
    } else {
        print!("{}", report::to_table(&plan, &fig));
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cph-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let mut cfg = match &cli.config {
        Some(path) => AgentConfig::load(path)?,
        None => AgentConfig::default(),
    };
    if let Some(format) = cli.log_format {
        cfg.log_format = format;
    }
    telemetry::init(cfg.log_format);
    // Before the runtime's threads start; after logging, so a refusal shows.
    cph_agent::memory::keep_transfer_buffers();
    match cli.command {
        Some(Command::Plan(args)) => print_plan(&args),
        Some(Command::ObjectStore(args)) => object_store(args),
        Some(Command::Run) => Ok(cph_agent::daemon::run(cfg)?),
        Some(Command::Purge) => {
            for id in cph_agent::daemon::purge(cfg)? {
                println!("deleted phone {id}");
            }
            Ok(())
        }
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
