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
        /// Where the platform keeps its state, phones and objects.
        #[arg(long, default_value = "/var/lib/cph")]
        data_dir: PathBuf,
        /// Phone image (rootfs tar or tar.gz) of the catalog's test image.
        #[arg(long, default_value = "target/images/cph-test-image.tar.gz")]
        image: PathBuf,
        /// Address of the CPH API.
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: std::net::SocketAddr,
        /// Address of the local agent's protocol.
        #[arg(long, default_value = "127.0.0.1:8600")]
        agent_listen: std::net::SocketAddr,
        /// Address of the embedded object store.
        #[arg(long, default_value = "127.0.0.1:9000")]
        obs_listen: std::net::SocketAddr,
        /// Phones of the local server.
        #[arg(long, default_value_t = 2)]
        phones: u32,
        /// Run each phone in a user namespace of its own (root inside is an
        /// unprivileged host user). Phone volumes are then btrfs snapshots
        /// in a sparse file of the data dir, as idmapped mounts need.
        /// Choose it at the data dir's first start.
        #[arg(long)]
        user_namespaces: bool,
        /// With --user-namespaces: size of the sparse pool file in GiB when
        /// it is made (default 16 + 8 per phone; the agent refuses more than
        /// the free space).
        #[arg(long, requires = "user_namespaces")]
        pool_size_gb: Option<u64>,
        /// Serve the CPH API over HTTPS with a self-signed certificate
        /// made in the data dir (`tls/`); credentials.json names it as
        /// `ca_cert` for clients to trust.
        #[arg(long)]
        tls: bool,
        /// Hosts to run on this machine: one agent each, a server of its
        /// own to buy (a fleet in one machine, to try switching a server
        /// to another host or migrating a phone between servers).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=cph::up::MAX_HOSTS as i64))]
        hosts: u32,
    },
    /// Serve the CPH API (control plane) until Ctrl-C or SIGTERM.
    Serve {
        #[arg(long, default_value = "/var/lib/cph")]
        data_dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: String,
        /// Test phone image URL (`file:///...` or `obs://bucket/key`).
        #[arg(long, env = "CPH_TEST_IMAGE_URL")]
        test_image_url: Option<String>,
        /// Seconds between agent heartbeats.
        #[arg(long, default_value_t = 10)]
        heartbeat_secs: u64,
        /// Serve HTTPS with this certificate chain (PEM).
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The certificate's private key (PEM).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// A certificate (PEM) to trust for agents served over TLS, beside
        /// the system's roots.
        #[arg(long)]
        agent_ca: Option<PathBuf>,
        /// A TOML file whose `[object_store]` section, as in the agents'
        /// configuration, names the store custom images are written to:
        /// deleting an image then deletes its object.
        #[arg(long)]
        object_store: Option<PathBuf>,
    },
    /// Projects, credentials, users, keypairs, hosts, events and share file
    /// systems of a data dir.
    Admin {
        #[arg(long, default_value = "/var/lib/cph", global = true)]
        data_dir: PathBuf,
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Phones on this machine.
    Phone {
        #[command(subcommand)]
        command: PhoneCommand,
    },
    /// List the project's servers (client of a running platform).
    Servers {
        #[command(flatten)]
        creds: CredsArg,
    },
    /// List the project's phones (client of a running platform).
    Phones {
        #[command(flatten)]
        creds: CredsArg,
        /// Only the phones of this server.
        #[arg(long)]
        server: Option<String>,
    },
    /// Run a shell command in phones and print each one's output.
    Shell {
        #[command(flatten)]
        creds: CredsArg,
        /// Phone ids.
        #[arg(required = true)]
        phones: Vec<String>,
        /// The command (after `--`).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Push a tar into phones' root: a local file (uploaded to the
    /// platform's object store first) or an obs:// URL.
    Push {
        #[command(flatten)]
        creds: CredsArg,
        /// The tar: a local path or obs://bucket/key.tar.
        file: String,
        /// Phone ids.
        #[arg(required = true)]
        phones: Vec<String>,
    },
    /// Follow jobs to their end with a progress bar.
    Job {
        #[command(flatten)]
        creds: CredsArg,
        #[arg(required = true)]
        job_ids: Vec<String>,
    },
    /// Install an APK in phones: a local file (uploaded to the platform's
    /// object store first) or an obs:// URL.
    Install {
        #[command(flatten)]
        creds: CredsArg,
        /// The APK: a local path or obs://bucket/key.apk.
        file: String,
        /// Phone ids.
        #[arg(required = true)]
        phones: Vec<String>,
        /// `pm install` options (of -r -t -d -g -p -l -s).
        #[arg(long, default_value = "-r", allow_hyphen_values = true)]
        options: String,
    },
    /// Uninstall a package from phones.
    Uninstall {
        #[command(flatten)]
        creds: CredsArg,
        package: String,
        /// Phone ids.
        #[arg(required = true)]
        phones: Vec<String>,
    },
    /// Restart phones.
    Restart {
        #[command(flatten)]
        creds: CredsArg,
        #[arg(required = true)]
        phones: Vec<String>,
    },
    /// Stop phones.
    Stop {
        #[command(flatten)]
        creds: CredsArg,
        #[arg(required = true)]
        phones: Vec<String>,
    },
    /// Reset phones to a clean image: theirs, or --image.
    Reset {
        #[command(flatten)]
        creds: CredsArg,
        #[arg(required = true)]
        phones: Vec<String>,
        /// Image id to reset to.
        #[arg(long)]
        image: Option<String>,
    },
    /// Delete servers (their phones and data go; their hosts can be bought
    /// again) and follow the deletion to its end.
    DeleteServer {
        #[command(flatten)]
        creds: CredsArg,
        /// Server ids.
        #[arg(required = true)]
        server_ids: Vec<String>,
    },
    /// Switch a server to a free host of its model: its phones are made
    /// anew there of PHONE_MODEL from IMAGE (none of their data is kept);
    /// follows the switch to its end.
    SwitchServer {
        #[command(flatten)]
        creds: CredsArg,
        /// Server id.
        server_id: String,
        /// Phone model (flavor) of the new phones, of the server's model.
        #[arg(long)]
        phone_model: String,
        /// Image of the new phones.
        #[arg(long)]
        image: String,
        /// Keypair whose key the new phones and the host's SSH access take.
        #[arg(long)]
        keypair: Option<String>,
    },
    /// List the project's custom images and those shared with it.
    Images {
        #[command(flatten)]
        creds: CredsArg,
    },
    /// Make a custom image of a running or stopped phone (it is stopped
    /// while its root is written, then started again if it was running)
    /// and follow it until written; phones can then be bought, reset and
    /// restarted with its id.
    CreateImage {
        #[command(flatten)]
        creds: CredsArg,
        phone_id: String,
        /// The image's name (letters, digits, `-`, `_`, `.`, spaces).
        name: String,
    },
}

/// Where the client finds the project's endpoint and AK/SK.
#[derive(clap::Args)]
struct CredsArg {
    /// `credentials.json` as `cph up` writes it.
    #[arg(
        long = "credentials",
        env = "CPH_CREDENTIALS",
        default_value = "/var/lib/cph/credentials.json"
    )]
    path: PathBuf,
}

/// Runs a client action; a failed job makes the command fail.
fn client(creds: &CredsArg, action: cph::client::Action) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let ok = rt.block_on(cph::client::run(&creds.path, action))?;
    if ok {
        Ok(())
    } else {
        anyhow::bail!("a job failed")
    }
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Projects.
    Project {
        #[command(subcommand)]
        command: AdminProject,
    },
    /// AK/SK credentials.
    Credential {
        #[command(subcommand)]
        command: AdminCredential,
    },
    /// IAM password users.
    User {
        #[command(subcommand)]
        command: AdminUser,
    },
    /// The fleet's hosts (agents).
    Host {
        #[command(subcommand)]
        command: AdminHost,
    },
    /// Scheduled events: maintenance of a server's host, announced to its
    /// project, which authorizes a time for it.
    Event {
        #[command(subcommand)]
        command: AdminEvent,
    },
    /// Keypairs of a project: public keys a purchase, or a server's
    /// keypair change, names for the host's SSH access and the phones' ADB.
    Keypair {
        #[command(subcommand)]
        command: AdminKeypair,
    },
    /// Share file systems offered to projects (attached to servers through
    /// the SDK's AttachShareFilesystem).
    Sharefs {
        #[command(subcommand)]
        command: AdminSharefs,
    },
    /// Write a consistent copy of the control plane's database to FILE,
    /// while it runs. Restore: stop `cph serve`, put the copy in place of
    /// `<data-dir>/cph.db`, remove `cph.db-wal` and `cph.db-shm`, start it.
    Backup {
        /// The copy (must not exist).
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum AdminEvent {
    /// Announce an event on a server; prints its id. It starts (the
    /// server's running phones are stopped) at the time the project
    /// authorizes, or at the deadline if the project does not answer.
    Create {
        #[arg(long)]
        server: String,
        /// `system-maintenance` or `localdisk-recovery`.
        #[arg(long = "type", default_value = "system-maintenance")]
        kind: String,
        #[arg(long, default_value = "")]
        description: String,
        /// Hours until the event starts without the project's answer.
        #[arg(long, default_value_t = 72)]
        deadline_hours: u32,
    },
    /// List every project's events: id, project, server, type, state, start.
    List,
    /// End an executing event: the phones it stopped start again.
    Complete { event_id: String },
    /// Cancel an event that has not started.
    Cancel { event_id: String },
}

#[derive(Subcommand)]
enum AdminKeypair {
    /// Add (or replace) the keypair NAME of a project from an OpenSSH
    /// public key file (`-` for standard input).
    Create {
        #[arg(long)]
        project: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        public_key_file: PathBuf,
    },
    /// List them: project, name.
    List,
}

#[derive(Subcommand)]
enum AdminSharefs {
    /// Offer a project a file system mounted at SOURCE on every host;
    /// prints its id.
    Create {
        #[arg(long)]
        project: String,
        #[arg(long)]
        source: PathBuf,
        /// Its id (default: a new one).
        #[arg(long)]
        id: Option<String>,
    },
    /// List them: id, project, type, source.
    List,
}

#[derive(Subcommand)]
enum AdminHost {
    /// List hosts: id, hostname, model, address, alive or silent, server,
    /// a server switched away whose phones the host still holds, and
    /// whether it is cordoned.
    List,
    /// Keep a host out of sale (for maintenance, or before it leaves);
    /// a server on it stays and runs.
    Cordon { node_id: String },
    /// Put a cordoned host back on sale.
    Uncordon { node_id: String },
    /// Take a host that is gone for good (its agent silent) out of the
    /// fleet: the server on it is released with its phones and its
    /// unfinished jobs fail. Purge its agent before it joins again.
    Forget { node_id: String },
}

#[derive(Subcommand)]
enum AdminProject {
    /// Create a project; prints its id.
    Create { name: String },
    /// List projects.
    List,
}

#[derive(Subcommand)]
enum AdminCredential {
    /// Create an AK/SK pair; prints `project_id ak sk`.
    Create {
        #[arg(long)]
        project: String,
    },
}

#[derive(Subcommand)]
enum AdminUser {
    /// Create a user (or reset its password).
    Create {
        name: String,
        #[arg(long)]
        project: String,
        #[arg(long, env = "CPH_USER_PASSWORD")]
        password: String,
    },
}

#[derive(Subcommand)]
enum PhoneCommand {
    /// Stop and delete every phone container of a `cph up` data dir.
    Purge {
        #[arg(long, default_value = "/var/lib/cph")]
        data_dir: PathBuf,
    },
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
            listen,
            agent_listen,
            obs_listen,
            phones,
            user_namespaces,
            pool_size_gb,
            tls,
            hosts,
        } => Ok(cph::up::up(&cph::up::UpOptions {
            data_dir,
            image,
            listen,
            agent_listen,
            obs_listen,
            phones,
            user_namespaces,
            pool_size_gb,
            tls,
            hosts,
        })?),
        Command::Serve {
            data_dir,
            listen,
            test_image_url,
            heartbeat_secs,
            tls_cert,
            tls_key,
            agent_ca,
            object_store,
        } => {
            let mut cfg = cph::serve::ServeConfig::new(data_dir);
            cfg.heartbeat_secs = heartbeat_secs;
            cfg.agent_ca = agent_ca;
            if let Some(path) = object_store {
                cfg.object_store = Some(cph::serve::object_store_config(&path)?);
            }
            if let (Some(cert), Some(key)) = (tls_cert, tls_key) {
                cfg.tls = Some(cph::serve::TlsFiles { cert, key });
            }
            if let Some(u) = test_image_url {
                cfg.test_image_url = u;
            }
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(&listen).await?;
                let shutdown = async {
                    let mut term = match tokio::signal::unix::signal(
                        tokio::signal::unix::SignalKind::terminate(),
                    ) {
                        Ok(t) => t,
                        Err(_) => return,
                    };
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                };
                cph::serve::serve(cfg, listener, shutdown).await?;
                anyhow::Ok(())
            })
        }
        Command::Admin { data_dir, command } => match command {
            AdminCommand::Project {
                command: AdminProject::Create { name },
            } => {
                println!("{}", cph::admin::project_create(&data_dir, &name)?);
                Ok(())
            }
            AdminCommand::Project {
                command: AdminProject::List,
            } => {
                for l in cph::admin::project_list(&data_dir)? {
                    println!("{l}");
                }
                Ok(())
            }
            AdminCommand::Event {
                command:
                    AdminEvent::Create {
                        server,
                        kind,
                        description,
                        deadline_hours,
                    },
            } => {
                if !cph::api::events::EVENT_TYPES.contains(&kind.as_str()) {
                    anyhow::bail!(
                        "event type {kind:?} is not one of {}",
                        cph::api::events::EVENT_TYPES.join(", ")
                    );
                }
                let id = cph::admin::event_create(
                    &data_dir,
                    &server,
                    &kind,
                    &description,
                    deadline_hours,
                )?;
                println!("{id}");
                Ok(())
            }
            AdminCommand::Event {
                command: AdminEvent::List,
            } => {
                for l in cph::admin::event_list(&data_dir)? {
                    println!("{l}");
                }
                Ok(())
            }
            AdminCommand::Event {
                command: AdminEvent::Complete { event_id },
            } => {
                let n = cph::admin::event_complete(&data_dir, &event_id)?;
                println!("event {event_id} completed; {n} phones starting");
                Ok(())
            }
            AdminCommand::Event {
                command: AdminEvent::Cancel { event_id },
            } => {
                cph::admin::event_cancel(&data_dir, &event_id)?;
                println!("event {event_id} canceled");
                Ok(())
            }
            AdminCommand::Sharefs {
                command:
                    AdminSharefs::Create {
                        project,
                        source,
                        id,
                    },
            } => {
                let id = cph::admin::sharefs_create(&data_dir, &project, &source, id.as_deref())?;
                println!("{id}");
                Ok(())
            }
            AdminCommand::Keypair {
                command:
                    AdminKeypair::Create {
                        project,
                        name,
                        public_key_file,
                    },
            } => {
                let key = if public_key_file.as_os_str() == "-" {
                    std::io::read_to_string(std::io::stdin())?
                } else {
                    std::fs::read_to_string(&public_key_file)
                        .map_err(|e| anyhow::anyhow!("read {}: {e}", public_key_file.display()))?
                };
                cph::admin::keypair_add(&data_dir, &project, &name, &key)?;
                println!("keypair {name} stored");
                Ok(())
            }
            AdminCommand::Keypair {
                command: AdminKeypair::List,
            } => {
                for l in cph::admin::keypair_list(&data_dir)? {
                    println!("{l}");
                }
                Ok(())
            }
            AdminCommand::Sharefs {
                command: AdminSharefs::List,
            } => {
                for l in cph::admin::sharefs_list(&data_dir)? {
                    println!("{l}");
                }
                Ok(())
            }
            AdminCommand::Backup { file } => {
                cph::admin::backup(&data_dir, &file)?;
                println!("database copied to {}", file.display());
                Ok(())
            }
            AdminCommand::Host {
                command: AdminHost::List,
            } => {
                for l in cph::admin::host_list(&data_dir)? {
                    println!("{l}");
                }
                Ok(())
            }
            AdminCommand::Host {
                command: AdminHost::Cordon { node_id },
            } => {
                cph::admin::host_cordon(&data_dir, &node_id, true)?;
                println!("host {node_id} out of sale");
                Ok(())
            }
            AdminCommand::Host {
                command: AdminHost::Uncordon { node_id },
            } => {
                cph::admin::host_cordon(&data_dir, &node_id, false)?;
                println!("host {node_id} on sale");
                Ok(())
            }
            AdminCommand::Host {
                command: AdminHost::Forget { node_id },
            } => {
                match cph::admin::host_forget(&data_dir, &node_id)? {
                    Some(server) => println!("host {node_id} forgotten; server {server} released"),
                    None => println!("host {node_id} forgotten"),
                }
                Ok(())
            }
            AdminCommand::Credential {
                command: AdminCredential::Create { project },
            } => {
                let (p, ak, sk) = cph::admin::credential_create(&data_dir, &project)?;
                println!("project_id {p}\nak {ak}\nsk {sk}");
                Ok(())
            }
            AdminCommand::User {
                command:
                    AdminUser::Create {
                        name,
                        project,
                        password,
                    },
            } => {
                let p = cph::admin::user_create(&data_dir, &name, &password, &project)?;
                println!("user {name} in project {p}");
                Ok(())
            }
        },
        Command::Servers { creds } => client(&creds, cph::client::Action::Servers),
        Command::Phones { creds, server } => {
            client(&creds, cph::client::Action::Phones { server_id: server })
        }
        Command::Shell {
            creds,
            phones,
            command,
        } => client(
            &creds,
            cph::client::Action::Shell {
                phones,
                command: command.join(" "),
            },
        ),
        Command::Push {
            creds,
            file,
            phones,
        } => client(&creds, cph::client::Action::Push { phones, file }),
        Command::Job { creds, job_ids } => client(&creds, cph::client::Action::Jobs { job_ids }),
        Command::DeleteServer { creds, server_ids } => {
            client(&creds, cph::client::Action::DeleteServers { server_ids })
        }
        Command::SwitchServer {
            creds,
            server_id,
            phone_model,
            image,
            keypair,
        } => client(
            &creds,
            cph::client::Action::SwitchServer {
                server_id,
                phone_model,
                image_id: image,
                keypair,
            },
        ),
        Command::Images { creds } => client(&creds, cph::client::Action::Images),
        Command::CreateImage {
            creds,
            phone_id,
            name,
        } => client(
            &creds,
            cph::client::Action::CreateImage {
                phone: phone_id,
                name,
            },
        ),
        Command::Install {
            creds,
            file,
            phones,
            options,
        } => client(
            &creds,
            cph::client::Action::Install {
                phones,
                file,
                options,
            },
        ),
        Command::Uninstall {
            creds,
            package,
            phones,
        } => client(&creds, cph::client::Action::Uninstall { phones, package }),
        Command::Restart { creds, phones } => {
            client(&creds, cph::client::Action::Restart { phones })
        }
        Command::Stop { creds, phones } => client(&creds, cph::client::Action::Stop { phones }),
        Command::Reset {
            creds,
            phones,
            image,
        } => client(
            &creds,
            cph::client::Action::Reset {
                phones,
                image_id: image,
            },
        ),
        Command::Phone {
            command: PhoneCommand::Purge { data_dir },
        } => cph::up::purge(&data_dir).map_err(Into::into),
        Command::Phone {
            command: PhoneCommand::List { data_dir },
        } => {
            for rt in cph::up::runtimes(&data_dir)? {
                for st in rt.list()? {
                    println!("{}	{:?}	pid {}", st.name, st.status, st.pid);
                }
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
            let runtimes = cph::up::runtimes(&data_dir)?;
            let mut found = None;
            for rt in runtimes {
                if rt.list()?.iter().any(|st| st.name == name) {
                    found = Some(rt);
                    break;
                }
            }
            let rt = found.ok_or_else(|| anyhow::anyhow!("no local phone named {name}"))?;
            let out = rt.exec(
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
