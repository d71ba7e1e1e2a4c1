//! `lifeboat-coordinator`: one per replication group. `main` owns exit codes: 0 success,
//! 1 runtime failure, 2 bad usage or configuration.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};
use lifeboat_coordinator::config::Config;
use lifeboat_coordinator::{pki, server, tokens};
use lifeboat_store::VmId;

/// Where the config is looked for when neither `--config` nor the environment names one: the
/// package's location, or on Windows the machine-wide application data directory.
#[cfg(not(windows))]
const DEFAULT_CONFIG: &str = "/etc/lifeboat/coordinator.toml";
#[cfg(windows)]
const DEFAULT_CONFIG: &str = r"C:\ProgramData\Lifeboat\coordinator.toml";

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Lifeboat's per-group coordinator (gRPC on port 20004)"
)]
struct Cli {
    #[arg(
        long,
        short,
        env = "LIFEBOAT_COORDINATOR_CONFIG",
        default_value = DEFAULT_CONFIG
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Creates the group's CA, the coordinator's certificate and the admin credential (in
    /// <state_dir>/admin) and prints the CA fingerprint.
    Init {
        /// Extra names or addresses for the server certificate (for clients that verify the
        /// dialled name instead of `coordinator.lifeboat`, such as grpcurl).
        #[arg(long = "san")]
        sans: Vec<String>,
    },
    /// Mints a one-time join token for `lifeboat-agent enroll`.
    JoinToken {
        /// Bind the token to this VM id; any VM may use it otherwise.
        #[arg(long)]
        vm: Option<VmId>,
        /// How long the token stays valid (e.g. 10m, 1h, 7days); at most 1 year.
        #[arg(long, default_value = "1h", value_parser = parse_ttl)]
        ttl: Duration,
    },
    /// Serves the group until SIGTERM / SIGINT.
    Serve,
    /// Parses and validates the configuration.
    CheckConfig,
}

/// A token lifetime: a humantime duration no longer than `tokens::MAX_TTL`.
fn parse_ttl(s: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    tokens::check_ttl(ttl).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LIFEBOAT_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, config: Config) -> Result<()> {
    match command {
        Command::CheckConfig => {
            println!(
                "config ok: group {}, listening on {}, max {} members",
                config.group, config.listen, config.max_members
            );
            Ok(())
        }
        Command::Init { sans } => {
            let fp = pki::init(&config.state_dir, config.group.as_str(), &sans)?;
            println!("created the CA of group {} (sha256 {fp})", config.group);
            println!(
                "admin credentials for `lifeboat --credentials`: {}",
                pki::admin_dir(&config.state_dir).display()
            );
            Ok(())
        }
        Command::JoinToken { vm, ttl } => {
            let ca = pki::Ca::load(&config.state_dir)?;
            let t = tokens::mint(&config.state_dir, &ca.fingerprint, vm, ttl)?;
            // The one place a token is shown: to the admin who asked for it.
            println!("{}", t.expose());
            Ok(())
        }
        Command::Serve => {
            let stop = async {
                #[cfg(unix)]
                {
                    let mut term =
                        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                            .expect("signal handler");
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = tokio::signal::ctrl_c() => {}
                    }
                }
                // No SIGTERM on Windows: a console's Ctrl-C (or Ctrl-Break) is the stop request.
                #[cfg(not(unix))]
                let _ = tokio::signal::ctrl_c().await;
                tracing::info!("stopping");
                lifeboat_store::service::stopping();
            };
            // Ready (Type=notify) once listening with the group loaded, not merely started. The
            // address it listens on goes to `<state_dir>/address`: with `listen` at port 0 the
            // system picks a free port, and that file is how a caller learns it (no
            // bind-then-release race for a port picked beforehand).
            let (ready, listening) = tokio::sync::oneshot::channel();
            let address = config.state_dir.join(server::ADDRESS_FILE);
            tokio::spawn(async move {
                if let Ok(addr) = listening.await {
                    tracing::info!(%addr, "listening");
                    let text = format!("{addr}\n");
                    let wrote = tokio::task::spawn_blocking(move || {
                        lifeboat_store::durable::replace(&address, text.as_bytes())
                    })
                    .await;
                    if let Ok(Err(e)) = wrote {
                        tracing::warn!(error = %e, "cannot record the listening address");
                    }
                    lifeboat_store::service::ready();
                    lifeboat_store::service::spawn_watchdog();
                }
            });
            server::serve(config, Some(ready), stop).await
        }
    }
}
