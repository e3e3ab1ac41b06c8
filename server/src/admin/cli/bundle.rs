//! `bundle show`: the trust domain's bundle, as PEM or in the SPIFFE format.

use clap::{Args, Subcommand, ValueEnum};

use carapace_proto::admin::GetBundleRequest;
use carapace_proto::convert::bundle_from_wire;

use super::client::{connect, status_error};
use super::flags::Common;
use super::view::OutputFormat;
use crate::{Error, Result};

/// `bundle ...`
#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Print the trust domain's bundle.
    Show(BundleShowArgs),
}

/// Bundle formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BundleFormat {
    /// Concatenated PEM CERTIFICATE blocks of the X.509 authorities.
    Pem,
    /// SPIFFE bundle format (a JWK Set).
    Spiffe,
}

/// `bundle show`
#[derive(Debug, Clone, Args)]
pub struct BundleShowArgs {
    /// Bundle format (`--output json` prints the SPIFFE format).
    #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
    pub format: BundleFormat,
    #[command(flatten)]
    pub common: Common,
}

/// Runs a `bundle` subcommand; returns what to print.
pub(super) async fn run(cmd: BundleCommand) -> Result<String> {
    match cmd {
        BundleCommand::Show(a) => bundle_show(a).await,
    }
}

async fn bundle_show(a: BundleShowArgs) -> Result<String> {
    const CMD: &str = "bundle show";
    let mut client = connect(&a.common.admin_socket, a.common.server_uid).await?;
    let wire = client
        .get_bundle(GetBundleRequest {})
        .await
        .map_err(|s| status_error(CMD, &s))?
        .into_inner();
    let bundle = bundle_from_wire(&wire)
        .map_err(|e| Error::InvalidArgument(format!("{CMD}: the server sent {e}")))?;
    let format = if a.common.output == OutputFormat::Json {
        BundleFormat::Spiffe
    } else {
        a.format
    };
    match format {
        BundleFormat::Pem => Ok(bundle.to_pem()),
        BundleFormat::Spiffe => Ok(bundle.to_spiffe_json()? + "\n"),
    }
}
