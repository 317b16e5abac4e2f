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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => run(config),
        Command::Check { config } => check(config),
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
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: anyhow::Result<()> = runtime.block_on(async move {
        let listeners = wpf_gateway::Listeners::bind(&config).await?;
        let shutdown = CancellationToken::new();
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        // Registered before serving: SIGHUP's default action would kill the process.
        let mut hangup = signal(SignalKind::hangup())?;
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let name = tokio::select! {
                _ = terminate.recv() => "SIGTERM",
                _ = interrupt.recv() => "SIGINT",
            };
            tracing::info!(signal = name, "stop requested");
            stop.cancel();
        });
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
    });
    // Spliced tunnels and other stragglers must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wpf-gateway: {e:#}");
            ExitCode::FAILURE
        }
    }
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
