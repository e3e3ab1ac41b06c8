use std::sync::Arc;

use serde::Deserialize;

use carapace_core::plugin::NodeAttestor;

use super::{PluginContext, parse, unknown};
use crate::datastore::Datastore;
use crate::node_attestor::JoinTokenAttestor;
use crate::{Error, Result};

const KNOWN: &[&str] = &["join_token"];

/// `[node_attestor.join_token]`: no settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct JoinTokenConfig {}

pub(super) fn check(name: &str, table: &toml::Table) -> std::result::Result<(), String> {
    match name {
        "join_token" => parse::<JoinTokenConfig>(table).map(|_| ()),
        other => Err(unknown("node_attestor", other, KNOWN)),
    }
}

/// Builds a configured node attestor.
pub fn build_node_attestor(
    name: &str,
    table: &toml::Table,
    _ctx: &PluginContext,
    ds: &Datastore,
) -> Result<Arc<dyn NodeAttestor>> {
    match name {
        "join_token" => {
            parse::<JoinTokenConfig>(table)
                .map_err(|e| Error::Config(format!("node_attestor.{name}: {e}")))?;
            Ok(Arc::new(JoinTokenAttestor::new(ds.clone())))
        }
        other => Err(Error::Config(unknown("node_attestor", other, KNOWN))),
    }
}
