use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use carapace_attestor_cloud::aws::{AwsIidAttestor, AwsServerConfig};
use carapace_attestor_cloud::azure::{AzureMsiAttestor, AzureServerConfig};
use carapace_attestor_cloud::gcp::{GcpIitAttestor, GcpServerConfig};
#[cfg(feature = "kerberos")]
use carapace_attestor_kerberos::server::{KerberosAttestor, KerberosServerConfig};
use carapace_attestor_ssh::server::{SshAttestor, SshServerConfig};
#[cfg(feature = "tpm")]
use carapace_attestor_tpm::server::{TpmAttestor, TpmServerConfig};
use carapace_core::files::NamedFile;
use carapace_core::plugin::{NodeAttestor, NodeStateStore};

use super::{PluginContext, parse, unknown};
use crate::datastore::Datastore;
use crate::node_attestor::JoinTokenAttestor;
use crate::{Error, Result};

const KNOWN: &[&str] = &[
    "aws_iid",
    "azure_msi",
    "gcp_iit",
    "join_token",
    "kerberos",
    "sshpop",
    "tpm",
];

/// `[node_attestor.join_token]`: no settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct JoinTokenConfig {}

pub(super) fn check(name: &str, table: &toml::Table) -> std::result::Result<(), String> {
    use carapace_common::check_plugin_settings as check;
    match name {
        "join_token" => check::<JoinTokenConfig>(table, |_| Ok(())),
        #[cfg(feature = "tpm")]
        "tpm" => check(table, TpmServerConfig::validate),
        #[cfg(not(feature = "tpm"))]
        "tpm" => Err(super::not_built("node_attestor", name, "tpm")),
        #[cfg(feature = "kerberos")]
        "kerberos" => check(table, KerberosServerConfig::validate),
        #[cfg(not(feature = "kerberos"))]
        "kerberos" => Err(super::not_built("node_attestor", name, "kerberos")),
        "sshpop" => check(table, SshServerConfig::validate),
        "aws_iid" => check(table, AwsServerConfig::validate),
        "gcp_iit" => check(table, GcpServerConfig::validate),
        "azure_msi" => check(table, AzureServerConfig::validate),
        other => Err(unknown("node_attestor", other, KNOWN)),
    }
}

/// The files a node attestor's settings name (none when they do not parse: that is
/// [`check`]'s to report).
pub(super) fn files(name: &str, table: &toml::Table, data_dir: &Path) -> Vec<NamedFile> {
    let files = match name {
        #[cfg(feature = "tpm")]
        "tpm" => parse::<TpmServerConfig>(table).map(|c| c.files(data_dir)),
        #[cfg(feature = "kerberos")]
        "kerberos" => parse::<KerberosServerConfig>(table).map(|c| c.files()),
        "sshpop" => parse::<SshServerConfig>(table).map(|c| c.files(data_dir)),
        "aws_iid" => parse::<AwsServerConfig>(table).map(|c| c.files(data_dir)),
        "gcp_iit" => parse::<GcpServerConfig>(table).map(|c| c.files(data_dir)),
        "azure_msi" => parse::<AzureServerConfig>(table).map(|c| c.files(data_dir)),
        _ => Ok(Vec::new()),
    };
    files.unwrap_or_default()
}

/// Builds a configured node attestor.
pub fn build_node_attestor(
    name: &str,
    table: &toml::Table,
    ctx: &PluginContext,
    ds: &Datastore,
) -> Result<Arc<dyn NodeAttestor>> {
    match name {
        "join_token" => {
            parse::<JoinTokenConfig>(table)
                .map_err(|e| Error::Config(format!("node_attestor.{name}: {e}")))?;
            Ok(Arc::new(JoinTokenAttestor::new(ds.clone())))
        }
        #[cfg(not(feature = "tpm"))]
        "tpm" => Err(Error::Config(format!(
            "node_attestor.{name}: {}",
            super::not_built("node_attestor", name, "tpm")
        ))),
        #[cfg(feature = "tpm")]
        "tpm" => {
            let cfg: TpmServerConfig =
                parse(table).map_err(|e| Error::Config(format!("node_attestor.{name}: {e}")))?;
            Ok(Arc::new(
                TpmAttestor::new(&cfg, ctx, state(ds, "tpm"))
                    .map_err(|e| Error::Config(e.to_string()))?,
            ))
        }
        #[cfg(not(feature = "kerberos"))]
        "kerberos" => Err(Error::Config(format!(
            "node_attestor.{name}: {}",
            super::not_built("node_attestor", name, "kerberos")
        ))),
        #[cfg(feature = "kerberos")]
        "kerberos" => {
            let cfg: KerberosServerConfig =
                parse(table).map_err(|e| Error::Config(format!("node_attestor.{name}: {e}")))?;
            Ok(Arc::new(
                KerberosAttestor::new(&cfg, ctx).map_err(|e| Error::Config(e.to_string()))?,
            ))
        }
        "sshpop" => {
            let cfg: SshServerConfig =
                parse(table).map_err(|e| Error::Config(format!("node_attestor.{name}: {e}")))?;
            Ok(Arc::new(
                SshAttestor::new(&cfg, ctx).map_err(|e| Error::Config(e.to_string()))?,
            ))
        }
        "aws_iid" => {
            let cfg: AwsServerConfig =
                parse(table).map_err(|e| Error::Config(format!("node_attestor.{name}: {e}")))?;
            Ok(Arc::new(
                AwsIidAttestor::new(&cfg, ctx, state(ds, "aws_iid"))
                    .map_err(|e| Error::Config(e.to_string()))?,
            ))
        }
        "gcp_iit" => {
            let cfg: GcpServerConfig =
                parse(table).map_err(|e| Error::Config(format!("node_attestor.{name}: {e}")))?;
            Ok(Arc::new(
                GcpIitAttestor::new(&cfg, ctx, state(ds, "gcp_iit"))
                    .map_err(|e| Error::Config(e.to_string()))?,
            ))
        }
        "azure_msi" => {
            let cfg: AzureServerConfig =
                parse(table).map_err(|e| Error::Config(format!("node_attestor.{name}: {e}")))?;
            Ok(Arc::new(
                AzureMsiAttestor::new(&cfg, ctx, state(ds, "azure_msi"))
                    .map_err(|e| Error::Config(e.to_string()))?,
            ))
        }
        other => Err(Error::Config(unknown("node_attestor", other, KNOWN))),
    }
}

/// The datastore namespace of `attestor`'s per-node state.
fn state(ds: &Datastore, attestor: &'static str) -> Arc<DatastoreState> {
    Arc::new(DatastoreState {
        ds: ds.clone(),
        attestor,
    })
}

/// A node attestor's per-node state in the datastore (`attestation_state`).
#[derive(Debug)]
struct DatastoreState {
    ds: Datastore,
    attestor: &'static str,
}

/// A datastore failure under a node attestor: the detail goes to the log, the agent
/// (whose attestation it fails) gets a generic message.
fn store_err(e: Error) -> carapace_core::Error {
    tracing::error!(error = %e, "reading or writing a node attestor's state failed");
    carapace_core::Error::Unavailable(STORE_UNAVAILABLE.into())
}

/// What an agent is told when a node attestor's state cannot be read or written.
const STORE_UNAVAILABLE: &str = "the attestation state is unavailable; see the server log";

#[async_trait::async_trait]
impl NodeStateStore for DatastoreState {
    async fn load(&self, key: &str) -> std::result::Result<Option<Vec<u8>>, carapace_core::Error> {
        self.ds
            .load_attestation_state(self.attestor, key)
            .await
            .map_err(store_err)
    }

    async fn save(&self, key: &str, data: &[u8]) -> std::result::Result<(), carapace_core::Error> {
        self.ds
            .save_attestation_state(self.attestor, key, data)
            .await
            .map_err(store_err)
    }

    async fn save_new(
        &self,
        key: &str,
        data: &[u8],
    ) -> std::result::Result<bool, carapace_core::Error> {
        self.ds
            .save_new_attestation_state(self.attestor, key, data)
            .await
            .map_err(store_err)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[tokio::test]
    async fn a_datastore_failure_reaches_the_attestor_without_its_detail() {
        let ds = Datastore::open_in_memory().await.unwrap();
        let store = state(&ds, "tpm");
        store.save("ek1", b"x").await.unwrap();
        assert_eq!(store.load("ek1").await.unwrap().as_deref(), Some(&b"x"[..]));
        ds.close().await;
        for err in [
            store.load("ek1").await.unwrap_err(),
            store.save("ek1", b"y").await.unwrap_err(),
            store.save_new("ek2", b"y").await.unwrap_err(),
        ] {
            assert!(
                matches!(&err, carapace_core::Error::Unavailable(m) if m == STORE_UNAVAILABLE),
                "{err:?}"
            );
        }
    }
}
