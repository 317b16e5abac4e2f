//! `wpf-gateway` command line: parse, load config, call the library.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgGroup, Parser, Subcommand};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use wpf_gateway::config::{LogConfig, LogFormat};
use wpf_gateway::store::{self, UserQuery};

/// mimalloc instead of glibc malloc: see Cargo.toml. The binary only; tests keep the default.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "wpf-gateway",
    version,
    about = "Webhook gateway for WP Fusion sites"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve: listen, proxy the site, own its CRM webhooks.
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Validate the configuration and print it resolved (secrets masked).
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// A self-contained tour on loopback: demo site, CRM simulator and the gateway in direct
    /// mode; sends webhooks (a flood with repeats), prints what happened, runs until Ctrl-C.
    Demo,
    /// Print a user of the embedded store as JSON (read-only; safe while the gateway runs).
    #[command(group(ArgGroup::new("who").required(true).args(["contact_id", "email"])))]
    User {
        #[arg(long)]
        config: PathBuf,
        /// The site's `name` in the configuration.
        #[arg(long)]
        site: String,
        /// The CRM contact the user is linked to.
        #[arg(long)]
        contact_id: Option<String>,
        /// The user's email (compared case-insensitively).
        #[arg(long)]
        email: Option<String>,
    },
    /// Simulate one CRM account's API (real shapes, auth, errors, rate limit with 429).
    #[command(
        name = "crm-sim",
        after_help = "Credentials: API key `sim-key` and user `sim@example.com` unless the \
                      --data file sets \"api_key\" / \"user\". ActiveCampaign reads the key from \
                      the Api-Token header; FluentCRM takes Basic user:key (an application \
                      password); Agile CRM takes Basic user:key (account email and API key).\n\n\
                      Seed file: {\"api_key\":\"..\",\"user\":\"..\",\"contacts\":[{\"id\":\"7\",\
                      \"email\":\"a@example.com\",\"first_name\":\"Ann\",\"last_name\":\"Lee\",\
                      \"phone\":\"\",\"tags\":[\"VIP\"],\"fields\":{\"7\":\"value\"}}]}\n\n\
                      Control API under /_sim/ (contacts, fail, requests, stats) has no auth: \
                      it is a rehearsal tool, keep --listen on loopback."
    )]
    CrmSim {
        /// activecampaign, fluentcrm or agilecrm.
        #[arg(long, value_parser = wpf_gateway::crm::sim::parse_kind)]
        kind: wpf_gateway::config::CrmKind,
        /// Address to listen on, e.g. 127.0.0.1:7001 (port 0: any free port, printed).
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// Seed file (JSON): credentials and contacts.
        #[arg(long)]
        data: Option<PathBuf>,
        /// API requests allowed in any window, e.g. 5/s (ActiveCampaign's limit).
        #[arg(long, value_parser = wpf_gateway::crm::sim::SimRate::parse)]
        rate: Option<wpf_gateway::crm::sim::SimRate>,
        /// Milliseconds added before every API answer.
        #[arg(long, default_value_t = 0)]
        latency: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => run(config),
        Command::Check { config } => check(config),
        Command::Demo => demo(),
        Command::User {
            config,
            site,
            contact_id,
            email,
        } => {
            // clap's group makes exactly one of the two present.
            let query = match (contact_id, email) {
                (Some(id), _) => UserQuery::ContactId(id),
                (None, email) => UserQuery::Email(email.unwrap_or_default()),
            };
            user(config, &site, &query)
        }
        Command::CrmSim {
            kind,
            listen,
            data,
            rate,
            latency,
        } => {
            let options = wpf_gateway::crm::sim::SimOptions {
                kind,
                rate,
                latency: std::time::Duration::from_millis(latency),
            };
            crm_sim(options, listen, data)
        }
    }
}

/// `user`: print the stored user as JSON; exit 1 with a message when there is none.
fn user(path: PathBuf, site: &str, query: &UserQuery) -> ExitCode {
    let config = match wpf_gateway::config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(store::lookup_user(&config, site, query)) {
        Ok(user) => {
            println!("{}", store::render_user_json(&user));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("wpf-gateway: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `crm-sim`: load the seed, bind, print the address, serve until SIGINT/SIGTERM.
fn crm_sim(
    options: wpf_gateway::crm::sim::SimOptions,
    listen: std::net::SocketAddr,
    data: Option<PathBuf>,
) -> ExitCode {
    use std::io::Write;
    use wpf_gateway::crm::sim::{kind_name, SeedData, Sim};
    let seed = match &data {
        Some(path) => match Sim::load_seed(path) {
            Ok(seed) => seed,
            Err(e) => {
                eprintln!("wpf-gateway crm-sim: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => SeedData::default(),
    };
    let kind = options.kind;
    let sim = match Sim::new(options, seed) {
        Ok(sim) => sim,
        Err(e) => {
            eprintln!("wpf-gateway crm-sim: {e}");
            return ExitCode::FAILURE;
        }
    };
    on_runtime("crm-sim", async move {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let shutdown = stop_on_signals()?;
        // Scripts and tests read this line for the real port (`--listen 127.0.0.1:0`).
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "crm-sim {} listening on http://{addr} (control API: http://{addr}/_sim/)",
            kind_name(kind)
        );
        let _ = out.flush();
        drop(out);
        sim.serve(listener, shutdown).await;
        Ok(())
    })
}

/// `demo`: run the tour until SIGINT/SIGTERM.
fn demo() -> ExitCode {
    on_runtime("demo", async {
        wpf_gateway::demo::run(stop_on_signals()?).await?;
        Ok(())
    })
}

/// `check`: validate, then print the resolved configuration (secrets masked).
fn check(path: PathBuf) -> ExitCode {
    use std::io::Write;
    match wpf_gateway::config::load(&path) {
        Ok(config) => {
            // A closed pipe (`check | head`) is not an error of the configuration.
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(wpf_gateway::config::render_resolved(&config).as_bytes());
            let _ = out.flush();
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn run(path: PathBuf) -> ExitCode {
    let config = match wpf_gateway::config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = init_logging(&config.log) {
        eprintln!("wpf-gateway: logging: {e}");
        return ExitCode::FAILURE;
    }
    on_runtime("run", async move {
        let listeners = wpf_gateway::Listeners::bind(&config).await?;
        let shutdown = stop_on_signals()?;
        // Registered before serving: SIGHUP's default action would kill the process.
        let mut hangup = signal(SignalKind::hangup())?;
        let (reloader, reloads) = wpf_gateway::reload_channel();
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                tracing::info!(signal = "SIGHUP", "reload requested");
                // The gateway logs the outcome, naming each file that failed.
                let _ = reloader.reload().await;
            }
        });
        let options = wpf_gateway::RunOptions {
            reload: Some(reloads),
            ..Default::default()
        };
        wpf_gateway::run_with(config, listeners, shutdown, options).await?;
        Ok(())
    })
}

/// Run `job` on a multi-threaded runtime; exit 1 with `wpf-gateway COMMAND: error` when it
/// fails (or no runtime starts).
fn on_runtime(
    command: &str,
    job: impl std::future::Future<Output = anyhow::Result<()>>,
) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wpf-gateway {command}: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(job);
    // Spliced tunnels and other stragglers must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wpf-gateway {command}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A token cancelled on SIGTERM or SIGINT. Registered at once, so a signal that arrives early
/// is not lost (and does not kill the process with its default action).
fn stop_on_signals() -> std::io::Result<CancellationToken> {
    let shutdown = CancellationToken::new();
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "stop requested");
        stop.cancel();
    });
    Ok(shutdown)
}

/// Logs from `[log]`: text or JSON on stdout; `RUST_LOG`, when set, overrides `log.level`.
/// Access lines use target `access` (filter them with e.g. `info,access=off`).
fn init_logging(log: &LogConfig) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => EnvFilter::try_new(directives)?,
        _ => EnvFilter::try_new(&log.level)?,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout);
    match log.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::stdout().is_terminal())
            .try_init(),
    }
    .map_err(|e| anyhow::anyhow!(e))
}
