//! The agent's plugin catalogs: one per kind, name → constructor, chosen by the config
//! envelopes `[key_manager.<name>]`, `[node_attestor.<name>]` and
//! `[workload_attestor.<name>]`, plus the maker of workload keys
//! ([`build_workload_keys`]). This is the only agent code that names concrete plugin
//! types. Each plugin owns its config struct (`deny_unknown_fields`); [`check_plugins`]
//! parses them all without building anything, for config validation, and
//! [`check_files`] checks the files their settings name (each plugin lists them beside
//! its settings, `files()`).
//!
//! `[key_manager.tpm]` and `[node_attestor.tpm]` with the same `tcti` share one TPM
//! context (`SharedTpm::for_tcti`): the TPM has no resource manager to arbitrate two,
//! and the attestor finds the agent key there to certify it with TPM2_Certify.

use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use zeroize::Zeroizing;

use carapace_attestor_cloud::aws::{AwsAgentConfig, AwsIidAttestorClient};
use carapace_attestor_cloud::azure::{AzureAgentConfig, AzureMsiAttestorClient};
use carapace_attestor_cloud::gcp::{GcpAgentConfig, GcpIitAttestorClient};
#[cfg(feature = "kerberos")]
use carapace_attestor_kerberos::agent::{KerberosAgentConfig, KerberosAttestorClient};
use carapace_attestor_ssh::agent::{SshAgentConfig, SshAttestorClient};
#[cfg(feature = "tpm")]
use carapace_attestor_tpm::agent::{TpmAgentConfig, TpmAttestorClient};
#[cfg(feature = "tpm")]
use carapace_attestor_tpm::keys::{TpmKeyManager, TpmKeyManagerConfig};
use carapace_core::files::NamedFile;
use carapace_core::plugin::{KeyManager, NodeAttestorClient, WorkloadAttestor};
use carapace_keymanager_soft::{DiskConfig, DiskKeyManager, MemoryKeyManager};

use crate::manager::WorkloadKeys;
use crate::node_attestor::JoinTokenClient;
use crate::node_client::NodeAttestors;
use crate::workload_attestor::blocking::{BlockingAttestor, BlockingGroup};
use crate::workload_attestor::cgroups::{CgroupAttestorConfig, CgroupWorkloadAttestor};
use crate::workload_attestor::unix::{UnixAttestorConfig, UnixWorkloadAttestor};
use crate::{Error, Result};

const KEY_MANAGERS: &[&str] = &["disk", "memory", "tpm"];
const NODE_ATTESTORS: &[&str] = &[
    "aws_iid",
    "azure_msi",
    "gcp_iit",
    "join_token",
    "kerberos",
    "sshpop",
    "tpm",
];
const WORKLOAD_ATTESTORS: &[&str] = &["cgroups", "systemd", "unix"];

/// `[key_manager.memory]` and `[node_attestor.join_token]`: no settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoConfig {}

fn parse<T: DeserializeOwned>(table: &toml::Table) -> std::result::Result<T, String> {
    carapace_common::plugin_settings(table)
}

fn unknown(kind: &str, name: &str, known: &[&str]) -> String {
    format!(
        "unknown {kind} plugin {name:?} (known: {})",
        known.join(", ")
    )
}

/// The refusal for a plugin whose Cargo feature this agent was built without (`tpm` and
/// `kerberos`, on by default, link tss-esapi and libgssapi).
#[cfg(not(all(feature = "tpm", feature = "kerberos")))]
fn not_built(kind: &str, name: &str, feature: &str) -> String {
    format!(
        "{kind} \"{name}\" is not in this build of carapace-agent: it was built without \
         the `{feature}` feature (rebuild with `cargo build --features {feature}`)"
    )
}

fn check_one(kind: &str, name: &str, table: &toml::Table) -> std::result::Result<(), String> {
    use carapace_common::check_plugin_settings as check;
    fn none<T>(_: &T) -> std::result::Result<(), Vec<String>> {
        Ok(())
    }
    match (kind, name) {
        ("key_manager", "disk") => check::<DiskConfig>(table, none),
        #[cfg(feature = "tpm")]
        ("key_manager", "tpm") => check::<TpmKeyManagerConfig>(table, none),
        ("key_manager", "memory") | ("node_attestor", "join_token") => {
            check::<NoConfig>(table, none)
        }
        ("workload_attestor", "unix") => check::<UnixAttestorConfig>(table, none),
        ("workload_attestor", "cgroups" | "systemd") => check::<CgroupAttestorConfig>(table, none),
        #[cfg(feature = "tpm")]
        ("node_attestor", "tpm") => check::<TpmAgentConfig>(table, none),
        #[cfg(not(feature = "tpm"))]
        ("key_manager" | "node_attestor", "tpm") => Err(not_built(kind, name, "tpm")),
        #[cfg(feature = "kerberos")]
        ("node_attestor", "kerberos") => check(table, KerberosAgentConfig::validate),
        #[cfg(not(feature = "kerberos"))]
        ("node_attestor", "kerberos") => Err(not_built(kind, name, "kerberos")),
        ("node_attestor", "sshpop") => check(table, SshAgentConfig::validate),
        ("node_attestor", "aws_iid") => check(table, AwsAgentConfig::validate),
        ("node_attestor", "gcp_iit") => check(table, GcpAgentConfig::validate),
        ("node_attestor", "azure_msi") => check(table, AzureAgentConfig::validate),
        ("key_manager", n) => Err(unknown(kind, n, KEY_MANAGERS)),
        ("node_attestor", n) => Err(unknown(kind, n, NODE_ATTESTORS)),
        (_, n) => Err(unknown(kind, n, WORKLOAD_ATTESTORS)),
    }
}

/// Checks every configured plugin's name and settings, one problem per fault, plus the
/// kind constraints: exactly one key manager, exactly one node attestor, at least one
/// workload attestor.
pub fn check_plugins(
    key_managers: &[(String, toml::Table)],
    node_attestors: &[(String, toml::Table)],
    workload_attestors: &[(String, toml::Table)],
    problems: &mut Vec<String>,
) {
    for (kind, list, exactly_one) in [
        ("key_manager", key_managers, true),
        // Several for a composite (ordered and checked by the config).
        ("node_attestor", node_attestors, false),
        ("workload_attestor", workload_attestors, false),
    ] {
        if exactly_one && list.len() != 1 {
            problems.push(format!(
                "{kind}: exactly one is required, found {} ({})",
                list.len(),
                list.iter()
                    .map(|p| p.0.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if list.is_empty() {
            problems.push(format!("{kind}: at least one is required"));
        }
        for (name, table) in list {
            if let Err(e) = check_one(kind, name, table) {
                problems.push(format!("{kind}.{name}: {e}"));
            }
        }
    }
    #[cfg(feature = "tpm")]
    check_same_tpm(key_managers, node_attestors, problems);
}

/// The files a plugin's settings name (none when they do not parse: that is
/// [`check_plugins`]'s to report).
fn files(kind: &str, name: &str, table: &toml::Table, data_dir: &Path) -> Vec<NamedFile> {
    let files = match (kind, name) {
        ("key_manager", "disk") => parse::<DiskConfig>(table).map(|c| c.files(data_dir)),
        #[cfg(feature = "tpm")]
        ("key_manager", "tpm") => parse::<TpmKeyManagerConfig>(table).map(|c| c.files(data_dir)),
        #[cfg(feature = "tpm")]
        ("node_attestor", "tpm") => parse::<TpmAgentConfig>(table).map(|c| c.files()),
        #[cfg(feature = "kerberos")]
        ("node_attestor", "kerberos") => parse::<KerberosAgentConfig>(table).map(|c| c.files()),
        ("node_attestor", "sshpop") => parse::<SshAgentConfig>(table).map(|c| c.files()),
        _ => Ok(Vec::new()),
    };
    files.unwrap_or_default()
}

/// Checks the files the key manager's and the node attestor's settings name (host keys
/// and certificates, keytabs, key directories, a TPM device), each as its plugin will use
/// it, relative paths under `data_dir` where the plugin puts them there: one problem per
/// file, naming the plugin, the setting and the path
/// ([`carapace_common::check_named_file`]). Reads no secret, opens no device and contacts
/// nothing. `at_start_only` leaves out the files a plugin reads only when first used
/// (the keytab, read at each attestation; the TPM device). On settings
/// [`check_plugins`] accepted.
pub fn check_files(
    key_manager: &(String, toml::Table),
    node_attestors: &[(String, toml::Table)],
    data_dir: &Path,
    at_start_only: bool,
) -> Vec<String> {
    let mut problems = Vec::new();
    let plugins = std::iter::once(("key_manager", key_manager))
        .chain(node_attestors.iter().map(|n| ("node_attestor", n)));
    for (kind, (name, table)) in plugins {
        let named: Vec<NamedFile> = files(kind, name, table, data_dir)
            .into_iter()
            .filter(|f| f.at_start || !at_start_only)
            .collect();
        problems.extend(carapace_common::check_named_files(
            &format!("{kind}.{name}"),
            &named,
        ));
    }
    problems
}

/// A `tpm` key manager and a `tpm` node attestor must use the same TPM.
#[cfg(feature = "tpm")]
fn check_same_tpm(
    key_managers: &[(String, toml::Table)],
    node_attestors: &[(String, toml::Table)],
    problems: &mut Vec<String>,
) {
    let km_tcti = key_managers
        .iter()
        .filter(|(n, _)| n == "tpm")
        .filter_map(|(_, t)| parse::<TpmKeyManagerConfig>(t).ok())
        .map(|c| c.tcti().trim().to_owned());
    let na_tcti: Vec<String> = node_attestors
        .iter()
        .filter(|(n, _)| n == "tpm")
        .filter_map(|(_, t)| parse::<TpmAgentConfig>(t).ok())
        .map(|c| c.tcti().trim().to_owned())
        .collect();
    for km in km_tcti {
        if let Some(na) = na_tcti.iter().find(|na| **na != km) {
            problems.push(format!(
                "key_manager.tpm uses tcti {km:?} but node_attestor.tpm uses {na:?}: use the \
                 same TPM for both, so the attestation can certify the agent key"
            ));
        }
    }
}

/// Builds the configured key manager for the agent's own key.
pub fn build_key_manager(
    name: &str,
    table: &toml::Table,
    data_dir: &Path,
) -> Result<Arc<dyn KeyManager>> {
    let cfg_err = |e: String| Error::Config(format!("key_manager.{name}: {e}"));
    match name {
        "disk" => {
            let cfg: DiskConfig = parse(table).map_err(cfg_err)?;
            Ok(Arc::new(DiskKeyManager::open(&cfg.directory_in(data_dir))?))
        }
        "memory" => {
            parse::<NoConfig>(table).map_err(cfg_err)?;
            Ok(Arc::new(MemoryKeyManager::new()))
        }
        // The agent key in the TPM; the TPM context is shared with a `tpm` node attestor
        // of the same TCTI (process-wide, by TCTI).
        #[cfg(feature = "tpm")]
        "tpm" => {
            let cfg: TpmKeyManagerConfig = parse(table).map_err(cfg_err)?;
            Ok(Arc::new(TpmKeyManager::open(&cfg, data_dir)?))
        }
        #[cfg(not(feature = "tpm"))]
        "tpm" => Err(cfg_err(not_built("key_manager", name, "tpm"))),
        other => Err(Error::Config(unknown("key_manager", other, KEY_MANAGERS))),
    }
}

/// How workload private keys are made: in software, whatever the key manager of the
/// agent's own key, since each key is handed to its workload with the SVID.
pub fn build_workload_keys() -> WorkloadKeys {
    WorkloadKeys::new(carapace_keymanager_soft::generate_pkcs8)
}

/// Builds the node attestor client; `None` when it has nothing to attest with (no join
/// token), in which case the agent can only restore a kept identity.
pub fn build_node_attestor(
    name: &str,
    table: &toml::Table,
    join_token: Option<Zeroizing<String>>,
) -> Result<Option<Arc<dyn NodeAttestorClient>>> {
    match name {
        "join_token" => {
            parse::<NoConfig>(table)
                .map_err(|e| Error::Config(format!("node_attestor.{name}: {e}")))?;
            Ok(
                join_token
                    .map(|t| Arc::new(JoinTokenClient::new(t)) as Arc<dyn NodeAttestorClient>),
            )
        }
        // Shares the process-wide TPM context of its TCTI with a `tpm` key manager.
        #[cfg(feature = "tpm")]
        "tpm" => {
            let cfg: TpmAgentConfig =
                parse(table).map_err(|e| Error::Config(format!("node_attestor.{name}: {e}")))?;
            Ok(Some(Arc::new(TpmAttestorClient::new(&cfg))))
        }
        #[cfg(not(feature = "tpm"))]
        "tpm" => Err(Error::Config(format!(
            "node_attestor.{name}: {}",
            not_built("node_attestor", name, "tpm")
        ))),
        #[cfg(not(feature = "kerberos"))]
        "kerberos" => Err(Error::Config(format!(
            "node_attestor.{name}: {}",
            not_built("node_attestor", name, "kerberos")
        ))),
        #[cfg(feature = "kerberos")]
        "kerberos" => {
            let cfg: KerberosAgentConfig =
                parse(table).map_err(|e| Error::Config(format!("node_attestor.{name}: {e}")))?;
            Ok(Some(Arc::new(KerberosAttestorClient::new(&cfg)?)))
        }
        "sshpop" => {
            let cfg: SshAgentConfig =
                parse(table).map_err(|e| Error::Config(format!("node_attestor.{name}: {e}")))?;
            Ok(Some(Arc::new(SshAttestorClient::new(&cfg)?)))
        }
        "aws_iid" => {
            let cfg: AwsAgentConfig =
                parse(table).map_err(|e| Error::Config(format!("node_attestor.{name}: {e}")))?;
            Ok(Some(Arc::new(AwsIidAttestorClient::new(&cfg)?)))
        }
        "gcp_iit" => {
            let cfg: GcpAgentConfig =
                parse(table).map_err(|e| Error::Config(format!("node_attestor.{name}: {e}")))?;
            Ok(Some(Arc::new(GcpIitAttestorClient::new(&cfg)?)))
        }
        "azure_msi" => {
            let cfg: AzureAgentConfig =
                parse(table).map_err(|e| Error::Config(format!("node_attestor.{name}: {e}")))?;
            Ok(Some(Arc::new(AzureMsiAttestorClient::new(&cfg)?)))
        }
        other => Err(Error::Config(unknown(
            "node_attestor",
            other,
            NODE_ATTESTORS,
        ))),
    }
}

/// Builds the configured node attestor clients, in order ([`NodeAttestors`]); `None` when
/// the agent has nothing to attest with (a `join_token` attestor without a token).
pub fn build_node_attestors(
    list: &[(String, toml::Table)],
    join_token: Option<Zeroizing<String>>,
) -> Result<Option<NodeAttestors>> {
    let mut members = Vec::with_capacity(list.len());
    for (name, table) in list {
        match build_node_attestor(name, table, join_token.clone())? {
            Some(a) => members.push(a),
            None => return Ok(None),
        }
    }
    Ok(NodeAttestors::new(members))
}

/// Builds every configured workload attestor.
pub fn build_workload_attestors(
    list: &[(String, toml::Table)],
) -> Result<Vec<Arc<dyn WorkloadAttestor>>> {
    // `cgroups` and `systemd` both read /proc/<pid>/cgroup: with both configured, one
    // attestor makes both kinds of selectors from one read.
    let both = list.iter().any(|(n, _)| n == "cgroups") && list.iter().any(|(n, _)| n == "systemd");
    let members = list
        .iter()
        .filter(|(name, _)| !(both && name == "cgroups"))
        .map(|(name, table)| match name.as_str() {
            "unix" => {
                let cfg: UnixAttestorConfig = parse(table)
                    .map_err(|e| Error::Config(format!("workload_attestor.unix: {e}")))?;
                Ok(Arc::new(UnixWorkloadAttestor::new(cfg)) as Arc<dyn BlockingAttestor>)
            }
            "cgroups" | "systemd" => {
                let cfg: CgroupAttestorConfig = parse(table)
                    .map_err(|e| Error::Config(format!("workload_attestor.{name}: {e}")))?;
                let a = match (name.as_str(), both) {
                    ("cgroups", _) => CgroupWorkloadAttestor::cgroups(&cfg),
                    (_, true) => CgroupWorkloadAttestor::both(&cfg),
                    _ => CgroupWorkloadAttestor::systemd(&cfg),
                };
                Ok(Arc::new(a) as Arc<dyn BlockingAttestor>)
            }
            other => Err(Error::Config(unknown(
                "workload_attestor",
                other,
                WORKLOAD_ATTESTORS,
            ))),
        })
        .collect::<Result<Vec<_>>>()?;
    // The built-in attestors all read /proc and cgroupfs: one blocking hand-off per
    // request for all of them.
    Ok(vec![Arc::new(BlockingGroup::new(members))])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> toml::Table {
        s.parse().unwrap()
    }

    #[test]
    fn cgroups_and_systemd_together_share_one_attestor() {
        let list = |names: &[&str]| -> Vec<(String, toml::Table)> {
            names
                .iter()
                .map(|n| ((*n).to_owned(), toml::Table::new()))
                .collect()
        };
        let built = build_workload_attestors(&list(&["unix", "cgroups", "systemd"])).unwrap();
        assert_eq!(built.len(), 1);
        assert_eq!(built[0].name(), "unix+cgroups+systemd");
        let alone = build_workload_attestors(&list(&["cgroups", "unix"])).unwrap();
        assert_eq!(alone[0].name(), "cgroups+unix");
    }

    #[test]
    fn defaults_check_clean_and_build() {
        let mut p = Vec::new();
        let km = vec![("disk".to_owned(), toml::Table::new())];
        let na = vec![("join_token".to_owned(), toml::Table::new())];
        let wa = vec![("unix".to_owned(), t("workload_sha256 = true"))];
        check_plugins(&km, &na, &wa, &mut p);
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(build_workload_attestors(&wa).unwrap()[0].name(), "unix");
        assert!(
            build_node_attestor("join_token", &toml::Table::new(), None)
                .unwrap()
                .is_none()
        );
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            build_key_manager("disk", &toml::Table::new(), dir.path())
                .unwrap()
                .name(),
            "disk"
        );
    }

    /// Run in both builds: CI also runs it with `--no-default-features`.
    #[test]
    fn a_plugin_left_out_of_the_build_is_refused_naming_its_feature() {
        let empty = toml::Table::new;
        for (kind, name, feature, built) in [
            ("key_manager", "tpm", "tpm", cfg!(feature = "tpm")),
            ("node_attestor", "tpm", "tpm", cfg!(feature = "tpm")),
            (
                "node_attestor",
                "kerberos",
                "kerberos",
                cfg!(feature = "kerberos"),
            ),
        ] {
            let mut problems = Vec::new();
            let one = |k: &str| {
                if k == kind {
                    vec![(name.to_owned(), empty())]
                } else if k == "key_manager" {
                    vec![("memory".to_owned(), empty())]
                } else {
                    vec![("join_token".to_owned(), empty())]
                }
            };
            check_plugins(
                &one("key_manager"),
                &one("node_attestor"),
                &[("unix".to_owned(), empty())],
                &mut problems,
            );
            let refusal = format!("built without the `{feature}` feature");
            let refused = problems
                .iter()
                .any(|p| p.starts_with(&format!("{kind}.{name}: ")) && p.contains(&refusal));
            assert_eq!(refused, !built, "{kind}.{name}: {problems:?}");
            if !built {
                let err = match kind {
                    "key_manager" => build_key_manager(name, &empty(), Path::new("/nonexistent"))
                        .map(|_| ())
                        .unwrap_err(),
                    _ => build_node_attestor(name, &empty(), None)
                        .map(|_| ())
                        .unwrap_err(),
                };
                assert!(err.to_string().contains(&refusal), "{err}");
            }
        }
    }

    #[cfg(feature = "tpm")]
    #[test]
    fn the_tpm_key_manager_checks_builds_and_shares_the_attestors_tpm() {
        let mut p = Vec::new();
        let km = vec![(
            "tpm".to_owned(),
            t("tcti = \"swtpm:host=127.0.0.1,port=1\"\ndirectory = \"k\""),
        )];
        let na = vec![(
            "tpm".to_owned(),
            t("tcti = \"swtpm:host=127.0.0.1,port=1\""),
        )];
        let wa = vec![("unix".to_owned(), toml::Table::new())];
        check_plugins(&km, &na, &wa, &mut p);
        assert!(p.is_empty(), "{p:?}");
        // Building opens nothing: the TPM is contacted at the first key or attestation.
        let dir = tempfile::tempdir().unwrap();
        let built = build_key_manager("tpm", &km[0].1, dir.path()).unwrap();
        assert_eq!(built.name(), "tpm");
        assert!(dir.path().join("k").is_dir());

        let mut p = Vec::new();
        let other = vec![(
            "tpm".to_owned(),
            t("tcti = \"swtpm:host=127.0.0.1,port=2\""),
        )];
        check_plugins(&km, &other, &wa, &mut p);
        assert!(
            p.iter().any(|e| e.contains("use the same TPM for both")),
            "{p:?}"
        );
        let mut p = Vec::new();
        check_plugins(&[("tpm".to_owned(), t("dir = \"x\""))], &na, &wa, &mut p);
        assert!(p.iter().any(|e| e.starts_with("key_manager.tpm:")), "{p:?}");
    }

    /// The files read at start are checked before `run` starts anything; those read only
    /// at first use (a `device:` TPM, the keytab) only by `validate`.
    #[cfg(all(feature = "tpm", feature = "kerberos"))]
    #[test]
    fn files_read_at_first_use_are_left_to_validate() {
        let dir = tempfile::tempdir().unwrap();
        let device = dir.path().join("tpmrm0");
        let keytab = dir.path().join("krb5.keytab");
        let tpm = (
            "tpm".to_owned(),
            t(&format!("tcti = \"device:{}\"", device.display())),
        );
        let kerberos = (
            "kerberos".to_owned(),
            t(&format!(
                "service_principal = \"carapace/s.lab.test@LAB.TEST\"\nkeytab = {keytab:?}"
            )),
        );
        let disk = ("disk".to_owned(), toml::Table::new());
        for (key_manager, node_attestor, later) in [
            (
                &disk,
                &tpm,
                format!(
                    "node_attestor.tpm: tcti {} does not exist",
                    device.display()
                ),
            ),
            (
                &disk,
                &kerberos,
                format!(
                    "node_attestor.kerberos: keytab {} does not exist",
                    keytab.display()
                ),
            ),
            (
                &tpm,
                &kerberos,
                format!("key_manager.tpm: tcti {} does not exist", device.display()),
            ),
        ] {
            assert_eq!(
                check_files(
                    key_manager,
                    std::slice::from_ref(node_attestor),
                    dir.path(),
                    true
                ),
                Vec::<String>::new()
            );
            let all = check_files(
                key_manager,
                std::slice::from_ref(node_attestor),
                dir.path(),
                false,
            );
            assert_eq!(all.first(), Some(&later), "{all:?}");
        }
        // A TCTI that is not a device names no file.
        let swtpm = (
            "tpm".to_owned(),
            t("tcti = \"swtpm:host=127.0.0.1,port=2321\""),
        );
        assert!(check_files(&disk, std::slice::from_ref(&swtpm), dir.path(), false).is_empty());
    }

    #[test]
    fn every_problem_is_named() {
        let mut p = Vec::new();
        check_plugins(
            &[
                ("hsm".into(), toml::Table::new()),
                ("disk".into(), t("dir = \"x\"")),
            ],
            &[],
            &[
                ("unix".into(), t("workload_sha265 = true")),
                ("k8s".into(), toml::Table::new()),
            ],
            &mut p,
        );
        for needle in [
            "key_manager: exactly one",
            "key_manager.hsm: unknown key_manager plugin \"hsm\" (known: disk, memory, tpm)",
            "key_manager.disk",
            "node_attestor: at least one is required",
            "workload_attestor.unix",
            "workload_attestor.k8s: unknown",
        ] {
            assert!(
                p.iter().any(|e| e.contains(needle)),
                "{needle} missing from {p:?}"
            );
        }
    }
}
