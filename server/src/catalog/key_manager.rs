use std::path::Path;
use std::sync::Arc;

use carapace_core::files::NamedFile;
use carapace_core::plugin::KeyManager;
use carapace_keymanager_soft::{DiskConfig, DiskKeyManager, MemoryConfig, MemoryKeyManager};

use super::{PluginContext, parse, unknown};
use crate::{Error, Result};

const KNOWN: &[&str] = &["disk", "memory", "pkcs11"];

pub(super) fn check(name: &str, table: &toml::Table) -> std::result::Result<(), String> {
    match name {
        "disk" => carapace_common::check_plugin_settings::<DiskConfig>(table, |_| Ok(())),
        "memory" => carapace_common::check_plugin_settings::<MemoryConfig>(table, |_| Ok(())),
        #[cfg(feature = "pkcs11")]
        "pkcs11" => super::pkcs11::check_key_manager(table),
        #[cfg(not(feature = "pkcs11"))]
        "pkcs11" => Err(super::not_built("key_manager", name, "pkcs11")),
        other => Err(unknown("key_manager", other, KNOWN)),
    }
}

/// The files the key manager's settings name (none when they do not parse: that is
/// [`check`]'s to report).
pub(super) fn files(name: &str, table: &toml::Table, data_dir: &Path) -> Vec<NamedFile> {
    match name {
        "disk" => parse::<DiskConfig>(table)
            .map(|c| c.files(data_dir))
            .unwrap_or_default(),
        #[cfg(feature = "pkcs11")]
        "pkcs11" => super::pkcs11::parse_key_manager(table)
            .map(|c| super::pkcs11::files(c, data_dir))
            .unwrap_or_default(),
        _ => Vec::new(),
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
            Ok(Arc::new(DiskKeyManager::open(
                &cfg.directory_in(&ctx.data_dir),
            )?))
        }
        "memory" => {
            parse::<MemoryConfig>(table).map_err(cfg_err)?;
            Ok(Arc::new(MemoryKeyManager::new()))
        }
        #[cfg(feature = "pkcs11")]
        "pkcs11" => {
            let cfg = super::pkcs11::parse_key_manager(table).map_err(cfg_err)?;
            super::pkcs11::open_key_manager(cfg, ctx)
        }
        #[cfg(not(feature = "pkcs11"))]
        "pkcs11" => Err(cfg_err(super::not_built("key_manager", name, "pkcs11"))),
        other => Err(Error::Config(unknown("key_manager", other, KNOWN))),
    }
}
