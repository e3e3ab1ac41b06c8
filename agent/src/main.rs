//! `carapace-agent`: parse the command line, set up logging, load the config, run.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use zeroize::Zeroizing;

use carapace_agent::api_cli;

use carapace_agent::config::{self, DEFAULT_SOCKET_PATH, Overrides};

/// Exit code for a bad command line or configuration (EX_USAGE).
const EXIT_USAGE: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "carapace-agent",
    version,
    about = "The Carapace agent: attests this node and serves the SPIFFE Workload API",
    long_about = "The Carapace agent: attests this node to a carapace-server and serves the SPIFFE \
        Workload API on a Unix socket.\n\nFirst start: `carapace-agent run --join-token TOKEN \
        --trust-bundle bundle.pem` (token from `carapace-server token generate`, bundle from \
        `carapace-server bundle show`). Later starts reuse the identity kept in the data dir.\n\n\
        A server that requires several node attestors together (composite attestation): \
        configure each as [node_attestor.NAME] and their order with node_attestors = \
        [\"tpm\", \"kerberos\"] in the config file; the agent opens with the first and runs \
        the others when the server asks."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent.
    Run(RunArgs),
    /// Talk to the Workload API like a workload would.
    Api {
        #[command(subcommand)]
        command: ApiCommand,
    },
    /// Check a configuration without starting anything: every problem of the file, its
    /// plugins and the files they name (the trust bundle, host keys, keytabs, ...), one
    /// per line; exit 64 if any.
    Validate {
        /// TOML config file.
        #[arg(long, short = 'c')]
        config: PathBuf,
    },
    /// Check that the agent is ready: with --health-address, its /ready (a valid SVID of
    /// its own and a Workload API that answers; every failing reason is printed);
    /// without, that it answers on its Workload API socket. Exit 1 when not.
    Healthcheck {
        /// Workload API socket.
        #[arg(long, env = "CARAPACE_AGENT_SOCKET", default_value = DEFAULT_SOCKET_PATH)]
        socket_path: PathBuf,
        /// The agent's health endpoint, HOST:PORT (its [health] bind_address).
        #[arg(long, env = "CARAPACE_AGENT_HEALTH_ADDRESS", value_name = "HOST:PORT")]
        health_address: Option<std::net::SocketAddr>,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// TOML config file (see conf/agent.full.toml); optional.
    #[arg(long, short = 'c', env = "CARAPACE_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// Trust domain (default: example.org).
    #[arg(long)]
    trust_domain: Option<String>,
    /// Server node API address HOST:PORT (default: 127.0.0.1:8081). Repeat it for
    /// several servers of the trust domain: the agent uses one and fails over to the
    /// others (replaces the config file's list).
    #[arg(long, value_name = "HOST:PORT")]
    server_address: Vec<String>,
    /// Data directory (default: /var/lib/carapace/agent).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Workload API socket (default: /tmp/carapace-agent/public/api.sock).
    #[arg(long)]
    socket_path: Option<PathBuf>,
    /// Join token for the first attestation (or env CARAPACE_JOIN_TOKEN, which keeps it
    /// out of the process list).
    #[arg(long, env = "CARAPACE_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// PEM file with the server's CA certificates, trusted on first contact.
    #[arg(long, conflicts_with = "insecure_bootstrap")]
    trust_bundle: Option<PathBuf>,
    /// Trust the first server reached without verifying it (labs only).
    #[arg(long)]
    insecure_bootstrap: bool,
    /// Serve /live, /ready and /metrics on HOST:PORT (default: off; a [health] section
    /// without bind_address listens on 127.0.0.1:8082).
    #[arg(long, value_name = "HOST:PORT")]
    health_address: Option<String>,
}

#[derive(Debug, Subcommand)]
enum ApiCommand {
    /// Fetch something once.
    Fetch {
        #[command(subcommand)]
        what: FetchWhat,
    },
    /// Validate something through the Workload API.
    Validate {
        #[command(subcommand)]
        what: ValidateWhat,
    },
    /// Print a line for every X509-SVID update the Workload API streams.
    Watch {
        /// Workload API socket.
        #[arg(long, env = "CARAPACE_AGENT_SOCKET", default_value = DEFAULT_SOCKET_PATH)]
        socket_path: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum FetchWhat {
    /// Fetch this process's X509-SVIDs and bundle.
    X509 {
        /// Workload API socket.
        #[arg(long, env = "CARAPACE_AGENT_SOCKET", default_value = DEFAULT_SOCKET_PATH)]
        socket_path: PathBuf,
        /// Write svid.pem, svid.key (0600) and bundle.pem into this directory.
        #[arg(long)]
        write: Option<PathBuf>,
        /// `human` (default) or `json`.
        #[arg(long, default_value = "human", value_parser = ["human", "json"])]
        output: String,
    },
    /// Fetch this process's JWT-SVIDs for an audience (prints the tokens).
    Jwt {
        /// Workload API socket.
        #[arg(long, env = "CARAPACE_AGENT_SOCKET", default_value = DEFAULT_SOCKET_PATH)]
        socket_path: PathBuf,
        /// An audience of the token (repeat for several).
        #[arg(long, required = true)]
        audience: Vec<String>,
        /// Only the JWT-SVID of this SPIFFE ID.
        #[arg(long)]
        spiffe_id: Option<String>,
        /// `human` (default) or `json`.
        #[arg(long, default_value = "human", value_parser = ["human", "json"])]
        output: String,
    },
    /// Fetch the JWT bundles (JWKS per trust domain).
    JwtBundle {
        /// Workload API socket.
        #[arg(long, env = "CARAPACE_AGENT_SOCKET", default_value = DEFAULT_SOCKET_PATH)]
        socket_path: PathBuf,
        /// `human` (default) or `json`.
        #[arg(long, default_value = "human", value_parser = ["human", "json"])]
        output: String,
    },
}

#[derive(Debug, Subcommand)]
enum ValidateWhat {
    /// Validate a JWT-SVID for an audience; exit 1 with the agent's reason if refused.
    Jwt {
        /// Workload API socket.
        #[arg(long, env = "CARAPACE_AGENT_SOCKET", default_value = DEFAULT_SOCKET_PATH)]
        socket_path: PathBuf,
        /// The audience the token must be for.
        #[arg(long)]
        audience: String,
        /// The token (JWS compact serialization); `-` reads it from standard input, which
        /// keeps it out of the process list.
        #[arg(long)]
        token: String,
        /// `human` (default) or `json`.
        #[arg(long, default_value = "human", value_parser = ["human", "json"])]
        output: String,
    },
}

fn report<T>(r: carapace_agent::Result<T>, ok: impl FnOnce(T)) -> ExitCode {
    match r {
        Ok(v) => {
            ok(v);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("carapace-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    // Not #[tokio::main]: the runtime must not wait at exit for a stuck blocking call.
    carapace_common::run_main_with(async_main(), |rt| {
        // The blocking pool runs the workload attestors' /proc reads, one request at a
        // time each, and the key manager's calls. Tokio's default (512 threads, each kept
        // 10 s) let a burst of 2,000 Workload API connections start hundreds of threads,
        // whose stacks and allocator arenas the agent kept afterwards (BENCHMARKS.md B15).
        rt.max_blocking_threads(carapace_agent::MAX_BLOCKING_THREADS)
            .thread_keep_alive(std::time::Duration::from_secs(2));
    })
}

async fn async_main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(a) => {
            let overrides = Overrides {
                trust_domain: a.trust_domain,
                server_address: a.server_address,
                data_dir: a.data_dir,
                socket_path: a.socket_path,
                join_token: a.join_token.map(Zeroizing::new),
                trust_bundle_path: a.trust_bundle,
                insecure_bootstrap: a.insecure_bootstrap,
                health_address: a.health_address,
            };
            let cfg = match config::load(a.config.as_deref(), overrides) {
                Ok(c) => c,
                Err(problems) => {
                    for p in problems {
                        eprintln!("carapace-agent: {p}");
                    }
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            let problems = cfg.check_files();
            if !problems.is_empty() {
                for p in problems {
                    eprintln!("carapace-agent: {p}");
                }
                return ExitCode::from(EXIT_USAGE);
            }
            carapace_common::init_tracing(&cfg.log_level, cfg.log_json);
            let r = carapace_agent::run(cfg, carapace_common::shutdown_signal()).await;
            if let Err(e) = &r {
                tracing::error!(error = %e, "carapace-agent failed");
            }
            report(r, |_| {})
        }
        Command::Api {
            command:
                ApiCommand::Fetch {
                    what:
                        FetchWhat::X509 {
                            socket_path,
                            write,
                            output,
                        },
                },
        } => {
            carapace_common::init_tracing("warn", false);
            report(
                api_cli::fetch_x509(&socket_path, write.as_deref(), output == "json").await,
                |s| print!("{s}"),
            )
        }
        Command::Api {
            command:
                ApiCommand::Fetch {
                    what:
                        FetchWhat::Jwt {
                            socket_path,
                            audience,
                            spiffe_id,
                            output,
                        },
                },
        } => {
            carapace_common::init_tracing("warn", false);
            report(
                api_cli::fetch_jwt(
                    &socket_path,
                    &audience,
                    spiffe_id.as_deref(),
                    output == "json",
                )
                .await,
                |s| print!("{s}"),
            )
        }
        Command::Api {
            command:
                ApiCommand::Fetch {
                    what:
                        FetchWhat::JwtBundle {
                            socket_path,
                            output,
                        },
                },
        } => {
            carapace_common::init_tracing("warn", false);
            report(
                api_cli::fetch_jwt_bundle(&socket_path, output == "json").await,
                |s| print!("{s}"),
            )
        }
        Command::Api {
            command:
                ApiCommand::Validate {
                    what:
                        ValidateWhat::Jwt {
                            socket_path,
                            audience,
                            token,
                            output,
                        },
                },
        } => {
            carapace_common::init_tracing("warn", false);
            let token = if token == "-" {
                let mut t = String::new();
                if let Err(e) = std::io::Read::read_to_string(&mut std::io::stdin(), &mut t) {
                    eprintln!("carapace-agent: reading the token from standard input: {e}");
                    return ExitCode::FAILURE;
                }
                t.trim().to_owned()
            } else {
                token
            };
            report(
                api_cli::validate_jwt(&socket_path, &audience, &token, output == "json").await,
                |s| print!("{s}"),
            )
        }
        Command::Api {
            command: ApiCommand::Watch { socket_path },
        } => {
            carapace_common::init_tracing("warn", false);
            report(
                api_cli::watch_x509(&socket_path, |line| println!("{line}")).await,
                |_| {},
            )
        }
        Command::Validate { config } => {
            let problems = match config::load(Some(&config), Overrides::default()) {
                Ok(cfg) => cfg.check_all_files(),
                Err(problems) => problems,
            };
            if problems.is_empty() {
                println!("{}: ok", config.display());
                return ExitCode::SUCCESS;
            }
            for p in &problems {
                println!("{p}");
            }
            eprintln!("{}: {} problem(s)", config.display(), problems.len());
            ExitCode::from(EXIT_USAGE)
        }
        Command::Healthcheck {
            socket_path,
            health_address: Some(addr),
        } => {
            let _ = socket_path;
            carapace_common::init_tracing("warn", false);
            match carapace_common::health::get(addr, "/ready").await {
                Ok((200, _)) => {
                    println!("Agent is ready.");
                    ExitCode::SUCCESS
                }
                Ok((_, body)) => {
                    eprint!("carapace-agent: {body}");
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("carapace-agent: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Healthcheck {
            socket_path,
            health_address: None,
        } => {
            carapace_common::init_tracing("warn", false);
            report(api_cli::healthcheck(&socket_path).await, |_| {
                println!(
                    "Agent is healthy: its Workload API answers (pass --health-address to check its own SVID too)."
                )
            })
        }
    }
}
