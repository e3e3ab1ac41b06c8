//! `carapace-server`: parse the command line, set up logging, load the config, run.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use carapace_server::admin::cli::{self as admin_cli, AdminCommand};
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
        over its admin socket, or, with --server-address, over its node API port as the \
        X509-SVID of an entry created with --admin."
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
        /// Admin API socket (default: /run/carapace/admin.sock as root,
        /// /tmp/carapace-server/private/admin.sock otherwise).
        #[arg(long)]
        admin_socket: Option<PathBuf>,
        /// Serve /live, /ready and /metrics on HOST:PORT (default: off; a [health]
        /// section without bind_address listens on 127.0.0.1:8080).
        #[arg(long, value_name = "HOST:PORT")]
        health_address: Option<String>,
    },
    /// Check a config file without starting anything: every problem of the file, its
    /// plugins and the files they name (PIN files, keytabs, EK CA files, ...), one per
    /// line; exit 64 if any.
    Validate {
        /// TOML config file.
        #[arg(long, short = 'c')]
        config: PathBuf,
    },
    /// Create or show the trust domain's root held by the configured upstream authority
    /// ([upstream_authority.disk] or [upstream_authority.pkcs11]).
    #[command(subcommand)]
    Upstream(UpstreamCommand),
    /// The OIDC discovery endpoint's TLS key in the key manager ([oidc_discovery] key_id).
    #[command(subcommand)]
    Oidc(OidcCommand),
    #[command(flatten)]
    Admin(Box<AdminCommand>),
}

#[derive(Debug, Subcommand)]
enum UpstreamCommand {
    /// Create the root: its key where the plugin keeps it (generated inside the PKCS#11
    /// token, or a new 0600 PKCS#8 file for `disk`) and a self-signed certificate beside it.
    /// Refuses to replace an existing root. Every server of the trust domain then uses the
    /// same [upstream_authority.*] section.
    Init {
        /// TOML config file with an [upstream_authority.*] section.
        #[arg(long, short = 'c', env = "CARAPACE_SERVER_CONFIG")]
        config: PathBuf,
        /// Root key type: ec-p256, ec-p384 or rsa-2048.
        #[arg(long, default_value = "ec-p256")]
        key_type: String,
        /// Root lifetime: seconds or with units (10y, 5y, 8760h), at most 36500 days.
        #[arg(long, default_value = "10y", value_parser = carapace_common::parse_duration_flag)]
        ttl: std::time::Duration,
        /// Subject common name (default: "<trust domain> root CA").
        #[arg(long)]
        common_name: Option<String>,
        /// Subject organization.
        #[arg(long, default_value = "Carapace")]
        organization: String,
    },
    /// Print the root certificate (PEM) of the configured upstream authority, after
    /// checking that its key is present and matches.
    Show {
        /// TOML config file with an [upstream_authority.*] section.
        #[arg(long, short = 'c', env = "CARAPACE_SERVER_CONFIG")]
        config: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum OidcCommand {
    /// Create the endpoint's TLS key in the server's key manager (generated inside the
    /// token with pkcs11; an existing key is reused) and print a PKCS#10 CSR (PEM) for it.
    /// Get the CSR certified by a CA the relying parties trust, write the chain to
    /// [oidc_discovery] cert_file, set key_id, and (re)start the server.
    Csr {
        /// The server's TOML config file (its key manager and issuer are used).
        #[arg(long, short = 'c', env = "CARAPACE_SERVER_CONFIG")]
        config: PathBuf,
        /// The key's id (default: [oidc_discovery] key_id, else oidc-tls); must start with
        /// "oidc-".
        #[arg(long)]
        key_id: Option<String>,
        /// A DNS name for the certificate; repeat for more (default: the host of the
        /// issuer, [oidc_discovery] issuer or jwt_issuer).
        #[arg(long = "dns-name", value_name = "NAME")]
        dns_names: Vec<String>,
        /// Type of a new key: ec-p256, ec-p384 or rsa-2048.
        #[arg(long, default_value = "ec-p256")]
        key_type: String,
    },
}

/// The host of an `https://host[:port]/path` issuer.
fn issuer_host(issuer: &str) -> Option<String> {
    let rest = issuer.strip_prefix("https://")?;
    let authority = rest.split('/').next()?;
    let host = match authority.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    };
    (!host.is_empty()).then(|| host.to_owned())
}

/// Runs `oidc csr`: returns the CSR to print.
async fn oidc(cmd: OidcCommand) -> Result<String, String> {
    use carapace_server::catalog::{self, PluginContext};
    let OidcCommand::Csr {
        config: path,
        key_id,
        mut dns_names,
        key_type,
    } = cmd;
    let key_type = key_type.parse().map_err(|e| format!("--key-type: {e}"))?;
    let cfg =
        config::load(Some(&path), Overrides::default()).map_err(|problems| problems.join("\n"))?;
    let configured = cfg.oidc_discovery.as_ref();
    let key_id = key_id
        .or_else(|| match configured.map(|o| &o.key) {
            Some(config::OidcKey::KeyManager(id)) => Some(id.clone()),
            _ => None,
        })
        .unwrap_or_else(|| "oidc-tls".to_owned());
    if dns_names.is_empty() {
        let issuer = configured
            .map(|o| o.issuer.clone())
            .or(cfg.jwt_issuer.clone())
            .ok_or_else(|| {
                format!(
                    "--dns-name is needed: {} sets no [oidc_discovery] issuer or jwt_issuer",
                    path.display()
                )
            })?;
        dns_names
            .push(issuer_host(&issuer).ok_or_else(|| {
                format!("--dns-name is needed: no host in the issuer {issuer:?}")
            })?);
    }
    if cfg.key_manager.0 == "memory" {
        return Err(
            "the memory key manager forgets the key when this command exits: configure disk or pkcs11"
                .into(),
        );
    }
    let ctx = PluginContext::new(
        cfg.trust_domain.clone(),
        cfg.data_dir.clone(),
        std::sync::Arc::new(carapace_core::clock::SystemClock),
    );
    let km = catalog::build_key_manager(&cfg.key_manager.0, &cfg.key_manager.1, &ctx)
        .map_err(|e| e.to_string())?;
    let (pem, created) = carapace_server::oidc::csr(&km, &key_id, key_type, &dns_names)
        .await
        .map_err(|e| e.to_string())?;
    eprintln!(
        "{} key {key_id} in the {} key manager; a CSR for {} follows. Set [oidc_discovery] \
         key_id = {key_id:?} and cert_file to the certified chain.",
        if created { "created" } else { "reused" },
        km.name(),
        dns_names.join(", ")
    );
    Ok(pem)
}

/// Runs an `upstream` subcommand; returns what to print.
async fn upstream(cmd: UpstreamCommand) -> Result<String, String> {
    use carapace_server::catalog::{self, PluginContext, RootOptions};
    let path = match &cmd {
        UpstreamCommand::Init { config, .. } | UpstreamCommand::Show { config } => config.clone(),
    };
    let cfg =
        config::load(Some(&path), Overrides::default()).map_err(|problems| problems.join("\n"))?;
    let Some((name, table)) = cfg.upstream_authority.clone() else {
        return Err(format!(
            "{} has no [upstream_authority.disk] or [upstream_authority.pkcs11] section",
            path.display()
        ));
    };
    let ctx = PluginContext::new(
        cfg.trust_domain.clone(),
        cfg.data_dir.clone(),
        std::sync::Arc::new(carapace_core::clock::SystemClock),
    );
    let now = ctx.clock.unix_now();
    match cmd {
        UpstreamCommand::Init {
            key_type,
            ttl,
            common_name,
            organization,
            ..
        } => {
            carapace_core::limits::check_duration(
                ttl,
                config::MIN_TTL,
                carapace_core::limits::MAX_CA_TTL,
            )
            .map_err(|e| format!("--ttl: {e}"))?;
            let opts = RootOptions {
                key_type: key_type.parse().map_err(|e| format!("--key-type: {e}"))?,
                ttl,
                common_name: common_name.unwrap_or_else(|| format!("{} root CA", cfg.trust_domain)),
                organization,
            };
            let der = catalog::init_upstream_root(&name, &table, &ctx, &opts, now)
                .await
                .map_err(|e| e.to_string())?;
            let (_, not_after) =
                carapace_core::x509svid::validity_of(&der).map_err(|e| e.to_string())?;
            eprintln!(
                "created the root of {} in upstream_authority.{name} (valid until unix {not_after}); \
                 its certificate follows",
                cfg.trust_domain
            );
            Ok(carapace_core::bundle::der_to_pem(&der))
        }
        UpstreamCommand::Show { .. } => {
            let up = catalog::build_upstream_authority(&name, &table, &ctx, now)
                .await
                .map_err(|e| e.to_string())?;
            let roots = up.x509_roots().await.map_err(|e| e.to_string())?;
            Ok(roots
                .iter()
                .map(|d| carapace_core::bundle::der_to_pem(d))
                .collect())
        }
    }
}

/// A command's output on stdout and success, or its error on stderr and failure.
fn printed(r: Result<String, String>) -> ExitCode {
    match r {
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

fn main() -> ExitCode {
    // Not #[tokio::main]: the runtime must not wait at exit for a stuck blocking call.
    carapace_common::run_main(async_main())
}

async fn async_main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            config,
            trust_domain,
            data_dir,
            bind_address,
            admin_socket,
            health_address,
        } => {
            let overrides = Overrides {
                trust_domain,
                data_dir,
                bind_address,
                admin_socket,
                health_address,
            };
            let cfg = match config::load(config.as_deref(), overrides) {
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
            let problems = match config::load(Some(&config), Overrides::default()) {
                Ok(cfg) => {
                    let mut problems = carapace_server::catalog::check_files(
                        &cfg.key_manager,
                        &cfg.node_attestors,
                        cfg.upstream_authority.as_ref(),
                        &cfg.data_dir,
                    );
                    if let Some(oidc) = &cfg.oidc_discovery {
                        problems.extend(carapace_server::oidc::check_files(oidc));
                    }
                    problems.extend(carapace_common::check_named_files(
                        "datastore",
                        &cfg.datastore_files(),
                    ));
                    problems
                }
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
        Command::Upstream(cmd) => {
            carapace_common::init_tracing("warn", false);
            printed(upstream(cmd).await)
        }
        Command::Oidc(cmd) => {
            carapace_common::init_tracing("warn", false);
            printed(oidc(cmd).await)
        }
        Command::Admin(cmd) => {
            carapace_common::init_tracing("warn", false);
            printed(admin_cli::execute(*cmd).await.map_err(|e| e.to_string()))
        }
    }
}
