//! Upstream authorities: `disk` (root key and certificate in PEM files), `pkcs11` (root
//! key and certificate in an HSM token) and `carapace` (a Carapace server of the trust
//! domain above this one, nested servers).

use std::path::Path;
use std::sync::Arc;

use carapace_core::files::{FileUse, NamedFile};
#[cfg(feature = "pkcs11")]
use carapace_core::plugin::KeyManager as _;
use carapace_core::plugin::{KeySigner, UpstreamAuthority};
use carapace_keymanager_soft::SoftKey;

use super::{PluginContext, parse, unknown};
use crate::upstream::carapace::{CarapaceUpstream, CarapaceUpstreamConfig};
use crate::upstream::{DiskUpstreamConfig, LocalRoot};
use crate::{Error, Result};

const KNOWN: &[&str] = &["disk", "pkcs11", "carapace"];

pub(super) fn check(name: &str, table: &toml::Table) -> std::result::Result<(), String> {
    match name {
        "disk" => parse::<DiskUpstreamConfig>(table).map(|_| ()),
        "carapace" => carapace_common::check_plugin_settings(table, CarapaceUpstreamConfig::check),
        #[cfg(feature = "pkcs11")]
        "pkcs11" => super::pkcs11::parse_upstream(table).map(|_| ()),
        #[cfg(not(feature = "pkcs11"))]
        "pkcs11" => Err(pkcs11_not_built(name)),
        other => Err(unknown("upstream_authority", other, KNOWN)),
    }
}

/// The files the upstream authority's settings name (none when they do not parse: that
/// is [`check`]'s to report): `disk`'s root certificate and key (a secret), resolved
/// against `data_dir` as [`build_upstream_authority`] does; `pkcs11`'s module and PIN
/// file. `carapace` names none: its Workload API socket is no file the server reads
/// (its existence is checked when the plugin is built).
pub(super) fn files(name: &str, table: &toml::Table, data_dir: &Path) -> Vec<NamedFile> {
    match name {
        "disk" => parse::<DiskUpstreamConfig>(table)
            .map(|cfg| {
                let (cert_file, key_file) = cfg.paths_in(data_dir);
                vec![
                    NamedFile::new("cert_file", cert_file, FileUse::Read),
                    NamedFile::new("key_file", key_file, FileUse::Secret),
                ]
            })
            .unwrap_or_default(),
        #[cfg(feature = "pkcs11")]
        "pkcs11" => super::pkcs11::parse_upstream(table)
            .map(|cfg| super::pkcs11::files(cfg.token, data_dir))
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

#[cfg(not(feature = "pkcs11"))]
fn pkcs11_not_built(name: &str) -> String {
    super::not_built("upstream_authority", name, "pkcs11")
}

fn cfg_err(name: &str) -> impl Fn(String) -> Error + '_ {
    move |e| Error::Config(format!("upstream_authority.{name}: {e}"))
}

/// Reads the root certificate (the first PEM certificate of `path`).
pub(crate) fn read_cert_pem(name: &str, path: &std::path::Path) -> Result<Vec<u8>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| cfg_err(name)(format!("cannot read cert_file {}: {e}", path.display())))?;
    carapace_core::bundle::certs_from_pem(&text)
        .map_err(|e| cfg_err(name)(format!("cert_file {}: {e}", path.display())))?
        .into_iter()
        .next()
        .ok_or_else(|| cfg_err(name)(format!("cert_file {} holds no certificate", path.display())))
}

/// Reads the root's PKCS#8 PEM key file, refusing one that others can read.
pub(crate) fn read_key_pem(name: &str, path: &std::path::Path) -> Result<Arc<dyn KeySigner>> {
    let key = carapace_keymanager_soft::load_key_file(path, "upstream-root")
        .map_err(|e| cfg_err(name)(format!("key_file: {e}")))?;
    Ok(Arc::new(key))
}

/// Builds the configured upstream authority, checking that its root certificate and key
/// belong together and have not expired at `now` (`carapace`: that its settings fit this
/// trust domain and the Workload API socket exists; it starts following that socket,
/// and contacts the upstream server only when the CA manager mints).
pub async fn build_upstream_authority(
    name: &str,
    table: &toml::Table,
    ctx: &PluginContext,
    now: i64,
) -> Result<Arc<dyn UpstreamAuthority>> {
    match name {
        "disk" => {
            let cfg: DiskUpstreamConfig = parse(table).map_err(cfg_err(name))?;
            let (cert_file, key_file) = cfg.paths_in(&ctx.data_dir);
            let root = read_cert_pem(name, &cert_file)?;
            let key = read_key_pem(name, &key_file)?;
            Ok(Arc::new(LocalRoot::new("disk", root, key, now)?))
        }
        "carapace" => {
            let cfg: CarapaceUpstreamConfig = parse(table).map_err(cfg_err(name))?;
            Ok(Arc::new(CarapaceUpstream::start(
                &cfg,
                &ctx.trust_domain,
                &ctx.data_dir,
                ctx.clock.clone(),
            )?))
        }
        #[cfg(not(feature = "pkcs11"))]
        "pkcs11" => Err(cfg_err(name)(pkcs11_not_built(name))),
        #[cfg(feature = "pkcs11")]
        "pkcs11" => {
            let cfg = super::pkcs11::parse_upstream(table).map_err(cfg_err(name))?;
            let (root, key) = super::pkcs11::open_root(&cfg, ctx).await?;
            let root = root.ok_or_else(|| {
                cfg_err(name)(format!(
                    "the token holds the root key {:?} but no certificate with that label; \
                     run `carapace-server upstream init` to create the root",
                    cfg.key_label
                ))
            })?;
            Ok(Arc::new(LocalRoot::new("pkcs11", root, key, now)?))
        }
        other => Err(Error::Config(unknown("upstream_authority", other, KNOWN))),
    }
}

/// What `carapace-server upstream init` creates.
#[derive(Debug, Clone)]
pub struct RootOptions {
    /// Root key type.
    pub key_type: carapace_core::KeyType,
    /// Root lifetime.
    pub ttl: std::time::Duration,
    /// Subject common name.
    pub common_name: String,
    /// Subject organization.
    pub organization: String,
}

/// Creates the trust domain's root for the configured upstream authority: the key where
/// it lives (a new token object, or a new 0600 PKCS#8 file) and a self-signed certificate
/// beside it. Refuses to replace an existing root. Returns the root certificate (DER).
pub async fn init_upstream_root(
    name: &str,
    table: &toml::Table,
    ctx: &PluginContext,
    opts: &RootOptions,
    now: i64,
) -> Result<Vec<u8>> {
    use crate::upstream::make_root_certificate;
    match name {
        "disk" => {
            let cfg: DiskUpstreamConfig = parse(table).map_err(cfg_err(name))?;
            let (cert_file, key_file) = cfg.paths_in(&ctx.data_dir);
            for f in [&cert_file, &key_file] {
                if f.exists() {
                    return Err(cfg_err(name)(format!(
                        "{} exists; refusing to replace the trust domain's root \
                         (move it away first if you really mean to)",
                        f.display()
                    )));
                }
            }
            let pkcs8 = carapace_keymanager_soft::generate_pkcs8(opts.key_type)?;
            let key: Arc<dyn KeySigner> = Arc::new(SoftKey::from_pkcs8("upstream-root", &pkcs8)?);
            let der = make_root_certificate(
                &ctx.trust_domain,
                key,
                &opts.common_name,
                &opts.organization,
                opts.ttl,
                now,
            )?;
            let key_pem =
                zeroize::Zeroizing::new(carapace_core::bundle::pem_block("PRIVATE KEY", &pkcs8));
            write_new(&key_file, key_pem.as_bytes(), 0o600)?;
            write_new(
                &cert_file,
                carapace_core::bundle::der_to_pem(&der).as_bytes(),
                0o644,
            )?;
            Ok(der)
        }
        #[cfg(not(feature = "pkcs11"))]
        "pkcs11" => Err(cfg_err(name)(pkcs11_not_built(name))),
        #[cfg(feature = "pkcs11")]
        "pkcs11" => {
            let cfg = super::pkcs11::parse_upstream(table).map_err(cfg_err(name))?;
            let token = super::pkcs11::open_token(&cfg, Some(ctx)).await?;
            if token.get_key(&cfg.key_label).await.is_ok() {
                return Err(cfg_err(name)(format!(
                    "the token already holds a key labelled {:?}; refusing to replace the \
                     trust domain's root (delete it with pkcs11-tool --delete-object if you \
                     really mean to)",
                    cfg.key_label
                )));
            }
            let key = token
                .generate_key(&cfg.key_label, opts.key_type)
                .await
                .map_err(|e| cfg_err(name)(format!("generating the root key: {e}")))?;
            let der = {
                let (td, opts) = (ctx.trust_domain.clone(), opts.clone());
                tokio::task::spawn_blocking(move || {
                    make_root_certificate(
                        &td,
                        key,
                        &opts.common_name,
                        &opts.organization,
                        opts.ttl,
                        now,
                    )
                })
                .await
                .map_err(|e| Error::Ca(format!("signing task: {e}")))??
            };
            token
                .store_certificate(&cfg.key_label, &der)
                .map_err(|e| cfg_err(name)(format!("storing the root certificate: {e}")))?;
            Ok(der)
        }
        "carapace" => Err(cfg_err(name)(
            "has no root to create here: the upstream servers hold the trust domain's root \
             (run `upstream init` where it lives)"
                .into(),
        )),
        other => Err(Error::Config(unknown("upstream_authority", other, KNOWN))),
    }
}

/// Writes a new file with `mode`, refusing to overwrite.
fn write_new(path: &std::path::Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(Error::io(format!("cannot create {}", parent.display())))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(Error::io(format!("cannot create {}", path.display())))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(Error::io(format!("cannot write {}", path.display())))
}
