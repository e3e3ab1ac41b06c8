//! `carapace-server`: parse the command line, set up logging, load the config, run.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use carapace_server::admin_cli::{self, AdminCommand};
use carapace_server::config::{self, Overrides};

/// Exit code for a bad command line or configuration (EX_USAGE).
const EXIT_USAGE: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "carapace-server",
    version,
    about = "The Carapace server: the SPIFFE identity authority of a trust domain",
    long_about = "The Carapace server: the SPIFFE identity authority of a trust domain.\n\n\
        `carapace-server run` starts it (no config file needed: SQLite and a disk CA key in \
        the data dir, trust domain example.org). The other commands talk to a running server \
        over its admin socket."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server.
    Run {
        /// TOML config file (see conf/server.full.toml); optional.
        #[arg(long, short = 'c', env = "CARAPACE_SERVER_CONFIG")]
        config: Option<PathBuf>,
        /// Trust domain, e.g. example.org (default: example.org).
        #[arg(long)]
        trust_domain: Option<String>,
        /// Directory for the datastore and keys (default: /var/lib/carapace/server).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Node API listen address HOST:PORT (default: 127.0.0.1:8081).
        #[arg(long)]
        bind_address: Option<String>,
        /// Admin API socket (default: /tmp/carapace-server/private/admin.sock).
        #[arg(long)]
        admin_socket: Option<PathBuf>,
    },
    /// Check a config file and list every problem in it.
    Validate {
        /// TOML config file.
        #[arg(long, short = 'c')]
        config: PathBuf,
    },
    #[command(flatten)]
    Admin(AdminCommand),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            config,
            trust_domain,
            data_dir,
            bind_address,
            admin_socket,
        } => {
            let overrides = Overrides {
                trust_domain,
                data_dir,
                bind_address,
                admin_socket,
            };
            let cfg = match config::read_file(config.as_deref())
                .and_then(|file| config::validate(file, overrides))
            {
                Ok(c) => c,
                Err(problems) => {
                    for p in problems {
                        eprintln!("carapace-server: {p}");
                    }
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            carapace_common::init_tracing(&cfg.log_level, cfg.log_json);
            match carapace_server::run(cfg, carapace_common::shutdown_signal()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "carapace-server failed");
                    eprintln!("carapace-server: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Validate { config } => {
            match config::read_file(Some(&config))
                .and_then(|f| config::validate(f, Overrides::default()))
            {
                Ok(_) => {
                    println!("{}: ok", config.display());
                    ExitCode::SUCCESS
                }
                Err(problems) => {
                    for p in &problems {
                        println!("{p}");
                    }
                    eprintln!("{}: {} problem(s)", config.display(), problems.len());
                    ExitCode::from(EXIT_USAGE)
                }
            }
        }
        Command::Admin(cmd) => {
            carapace_common::init_tracing("warn", false);
            match admin_cli::execute(cmd).await {
                Ok(out) => {
                    print!("{out}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("carapace-server: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
