use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;

use carapace_core::plugin::KeyManager;
use carapace_keymanager_soft::{DiskKeyManager, MemoryKeyManager};

use super::{PluginContext, parse, unknown};
use crate::{Error, Result};

const KNOWN: &[&str] = &["disk", "memory"];

/// `[key_manager.disk]`: keys as 0600 PKCS#8 files.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DiskConfig {
    /// Key directory; relative paths are under the data dir. Default `<data_dir>/keys`.
    directory: Option<PathBuf>,
}

/// `[key_manager.memory]`: keys lost on exit (tests only).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MemoryConfig {}

pub(super) fn check(name: &str, table: &toml::Table) -> std::result::Result<(), String> {
    match name {
        "disk" => parse::<DiskConfig>(table).map(|_| ()),
        "memory" => parse::<MemoryConfig>(table).map(|_| ()),
        other => Err(unknown("key_manager", other, KNOWN)),
    }
}

/// Builds the configured key manager.
pub fn build_key_manager(
    name: &str,
    table: &toml::Table,
    ctx: &PluginContext,
) -> Result<Arc<dyn KeyManager>> {
    let cfg_err = |e: String| Error::Config(format!("key_manager.{name}: {e}"));
    match name {
        "disk" => {
            let cfg: DiskConfig = parse(table).map_err(cfg_err)?;
            let dir = match cfg.directory {
                Some(d) if d.is_absolute() => d,
                Some(d) => ctx.data_dir.join(d),
                None => ctx.data_dir.join("keys"),
            };
            Ok(Arc::new(DiskKeyManager::open(&dir)?))
        }
        "memory" => {
            parse::<MemoryConfig>(table).map_err(cfg_err)?;
            Ok(Arc::new(MemoryKeyManager::new()))
        }
        other => Err(Error::Config(unknown("key_manager", other, KNOWN))),
    }
}
