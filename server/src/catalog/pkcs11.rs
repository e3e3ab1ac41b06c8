//! The `pkcs11` plugins' shared parts: the key manager's and the upstream authority's
//! settings and token access (carapace-keymanager-pkcs11 does the PKCS#11 work).

use std::path::Path;
use std::sync::Arc;

use carapace_core::files::NamedFile;
use carapace_core::plugin::{KeyManager, KeySigner};
use carapace_keymanager_pkcs11::{Pkcs11Config, Pkcs11KeyManager};

use super::PluginContext;
use crate::upstream::DEFAULT_ROOT_LABEL;
use crate::{Error, Result};

/// Settings of the `pkcs11` upstream authority: the token settings of the key manager
/// (`module`, `token_label`/`token_serial`, `pin_file`/`pin_env`) plus `key_label`, the
/// label of the root key and of its certificate object.
#[derive(Debug, Clone)]
pub struct Pkcs11UpstreamConfig {
    /// Token access.
    pub token: Pkcs11Config,
    /// CKA_LABEL of the root key and certificate.
    pub key_label: String,
}

fn check_token(cfg: &Pkcs11Config) -> std::result::Result<(), String> {
    cfg.validate().map_err(|problems| problems.join("; "))
}

/// Parses and checks the key manager's settings.
pub(super) fn parse_key_manager(table: &toml::Table) -> std::result::Result<Pkcs11Config, String> {
    let cfg: Pkcs11Config = super::parse(table)?;
    check_token(&cfg)?;
    Ok(cfg)
}

/// Checks the key manager's settings for `validate`: every bad key and every token
/// problem of the keys that parsed.
pub(super) fn check_key_manager(table: &toml::Table) -> std::result::Result<(), String> {
    carapace_common::check_plugin_settings(table, Pkcs11Config::validate)
}

/// Parses and checks the upstream authority's settings.
pub(super) fn parse_upstream(
    table: &toml::Table,
) -> std::result::Result<Pkcs11UpstreamConfig, String> {
    let mut table = table.clone();
    if table.contains_key("key_label_prefix") {
        return Err(
            "key_label_prefix is a key manager setting; the root is named by key_label".into(),
        );
    }
    let key_label = match table.remove("key_label") {
        None => DEFAULT_ROOT_LABEL.to_owned(),
        Some(toml::Value::String(s)) => s,
        Some(other) => {
            return Err(format!(
                "key_label: expected a string, found {}",
                other.type_str()
            ));
        }
    };
    carapace_core::plugin::validate_key_id(&key_label).map_err(|e| format!("key_label: {e}"))?;
    let mut token: Pkcs11Config = super::parse(&table)?;
    token.key_label_prefix = Some(String::new());
    check_token(&token)?;
    Ok(Pkcs11UpstreamConfig { token, key_label })
}

/// The settings as the token is opened with them: a relative `pin_file` is under the
/// data dir.
fn resolve(mut cfg: Pkcs11Config, data_dir: Option<&Path>) -> Pkcs11Config {
    if let (Some(data_dir), Some(p)) = (data_dir, cfg.pin_file.take()) {
        cfg.pin_file = Some(data_dir.join(p));
    }
    cfg
}

/// The files the token settings name (`module`, `pin_file`), resolved as [`open_token`]
/// and [`open_key_manager`] resolve them.
pub(super) fn files(cfg: Pkcs11Config, data_dir: &Path) -> Vec<NamedFile> {
    resolve(cfg, Some(data_dir)).files()
}

/// Opens the key manager's token (blocking: module load, login).
pub(super) fn open_key_manager(
    cfg: Pkcs11Config,
    ctx: &PluginContext,
) -> Result<Arc<dyn KeyManager>> {
    let cfg = resolve(cfg, Some(&ctx.data_dir));
    Ok(Arc::new(Pkcs11KeyManager::open(&cfg).map_err(|e| {
        Error::Config(format!("key_manager.pkcs11: {e}"))
    })?))
}

/// Opens the upstream token.
pub(crate) async fn open_token(
    cfg: &Pkcs11UpstreamConfig,
    ctx: Option<&PluginContext>,
) -> Result<Arc<Pkcs11KeyManager>> {
    let token = resolve(cfg.token.clone(), ctx.map(|c| c.data_dir.as_path()));
    tokio::task::spawn_blocking(move || Pkcs11KeyManager::open(&token))
        .await
        .map_err(|e| Error::Config(format!("upstream_authority.pkcs11: {e}")))?
        .map(Arc::new)
        .map_err(|e| Error::Config(format!("upstream_authority.pkcs11: {e}")))
}

/// Finds the root key and its certificate (None when the token has the key only).
pub(super) async fn open_root(
    cfg: &Pkcs11UpstreamConfig,
    ctx: &PluginContext,
) -> Result<(Option<Vec<u8>>, Arc<dyn KeySigner>)> {
    let token = open_token(cfg, Some(ctx)).await?;
    let key = token.get_key(&cfg.key_label).await.map_err(|e| {
        Error::Config(format!(
            "upstream_authority.pkcs11: root key {:?}: {e}; run `carapace-server upstream init` \
             to create the root in the token",
            cfg.key_label
        ))
    })?;
    let cert = token
        .find_certificate(&cfg.key_label)
        .map_err(|e| Error::Config(format!("upstream_authority.pkcs11: {e}")))?;
    Ok((cert, key))
}
