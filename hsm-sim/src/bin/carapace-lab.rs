//! `carapace-lab`: a SoftHSM2 token, a swtpm with EK certificates, an MIT KDC and an SSH
//! CA for a person to try Carapace with, plus server and agent configs that use them.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use hsm_sim::lab::{self, DEFAULT_DIR, DEFAULT_REALM, DEFAULT_TRUST_DOMAIN, UpOptions};

#[derive(Debug, Parser)]
#[command(
    name = "carapace-lab",
    version,
    about = "A hardware-trust lab on loopback: SoftHSM2 token, swtpm TPM, MIT KDC, SSH CA",
    long_about = "A hardware-trust lab on loopback for trying Carapace: a SoftHSM2 token for the \
        server's CA keys, a software TPM (swtpm) with EK certificates from a lab EK CA, an MIT \
        Kerberos realm with a host and a service keytab, and an SSH CA with a host key and its host \
        certificate, all in one directory with no root, no /etc changes and only free 127.0.0.1 \
        ports.\n\n\
        `up` starts them and writes server.toml, agent.toml and an env file, then prints what \
        runs and how to use it; `down` stops exactly the processes `up` started (checked by pid, \
        start time and executable, so a recycled pid is never signalled); `status` shows them.\n\n\
        Needs: apt-get install -y softhsm2 swtpm swtpm-tools tpm2-tools krb5-kdc \
        krb5-admin-server krb5-user openssh-client"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a lab and write configs for a server and an agent that use it.
    Up {
        /// Lab directory: created if missing; must be empty or hold a stopped lab (whose
        /// files are then replaced).
        #[arg(long, default_value = DEFAULT_DIR)]
        dir: PathBuf,
        /// Trust domain of the server and agent configs.
        #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Node API port of the server config, on 127.0.0.1 (default: a free port).
        #[arg(long)]
        server_port: Option<u16>,
        /// Kerberos realm.
        #[arg(long, default_value = DEFAULT_REALM)]
        realm: String,
    },
    /// Stop the processes `up` started in DIR; keep its files unless --purge.
    Down {
        /// Lab directory.
        #[arg(long, default_value = DEFAULT_DIR)]
        dir: PathBuf,
        /// Also remove the lab directory.
        #[arg(long)]
        purge: bool,
    },
    /// Show which of the lab's processes run (exit status 1 unless all do).
    Status {
        /// Lab directory.
        #[arg(long, default_value = DEFAULT_DIR)]
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Up {
            dir,
            trust_domain,
            server_port,
            realm,
        } => lab::up(&UpOptions {
            dir,
            trust_domain,
            server_port,
            realm,
        })
        .map(|report| {
            print!("{report}");
            ExitCode::SUCCESS
        }),
        Command::Down { dir, purge } => lab::down(&dir, purge).map(|report| {
            print!("{report}");
            ExitCode::SUCCESS
        }),
        Command::Status { dir } => lab::status(&dir).map(|report| {
            print!("{report}");
            if report.all_running() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }),
    };
    result.unwrap_or_else(|e| {
        eprintln!("carapace-lab: {e}");
        ExitCode::FAILURE
    })
}
