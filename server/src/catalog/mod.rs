//! The plugin catalogs: one per kind, name → constructor, chosen by configuration.
//! This is the only code that names concrete plugin types.
//!
//! Each plugin owns its configuration struct (`deny_unknown_fields`); [`check_plugins`]
//! parses every configured plugin's table without starting anything, for `validate`,
//! [`check_files`] checks the files their settings name (each plugin lists them beside
//! its settings, `files()`), and the `build_*` functions construct them for `run`.

mod key_manager;
mod node_attestor;
#[cfg(feature = "pkcs11")]
pub(crate) mod pkcs11;
mod upstream_authority;

pub use key_manager::build_key_manager;
pub use node_attestor::build_node_attestor;
#[cfg(feature = "pkcs11")]
pub use pkcs11::Pkcs11UpstreamConfig;
pub use upstream_authority::{RootOptions, build_upstream_authority, init_upstream_root};

/// What every plugin constructor may use (trust domain, data dir, clock); defined in core
/// so that plugin crates take it too.
pub use carapace_core::plugin::PluginContext;

/// Checks every plugin name and configuration, adding one problem per fault.
pub fn check_plugins(
    key_managers: &[(String, toml::Table)],
    node_attestors: &[(String, toml::Table)],
    problems: &mut Vec<String>,
) {
    for (name, table) in key_managers {
        if let Err(e) = key_manager::check(name, table) {
            problems.push(format!("key_manager.{name}: {e}"));
        }
    }
    for (name, table) in node_attestors {
        if let Err(e) = node_attestor::check(name, table) {
            problems.push(format!("node_attestor.{name}: {e}"));
        }
    }
}

/// Checks the upstream authority's name and configuration.
pub fn check_upstream(upstreams: &[(String, toml::Table)], problems: &mut Vec<String>) {
    for (name, table) in upstreams {
        if let Err(e) = upstream_authority::check(name, table) {
            problems.push(format!("upstream_authority.{name}: {e}"));
        }
    }
}

/// Checks every file the configured plugins' settings name (PIN files, PKCS#11 modules,
/// keytabs, EK CA files, root keys and certificates, key directories, ...), each as its
/// plugin will use it, resolved against `data_dir` where the plugin resolves it there:
/// one problem per file, naming the plugin, the setting and the path
/// ([`carapace_common::check_named_file`]). Reads no secret, loads no module, opens no
/// token and contacts nothing. For `validate`, on settings [`check_plugins`] accepted.
pub fn check_files(
    key_manager: &(String, toml::Table),
    node_attestors: &[(String, toml::Table)],
    upstream: Option<&(String, toml::Table)>,
    data_dir: &std::path::Path,
) -> Vec<String> {
    let mut problems = Vec::new();
    let (name, table) = key_manager;
    problems.extend(carapace_common::check_named_files(
        &format!("key_manager.{name}"),
        &key_manager::files(name, table, data_dir),
    ));
    for (name, table) in node_attestors {
        problems.extend(carapace_common::check_named_files(
            &format!("node_attestor.{name}"),
            &node_attestor::files(name, table, data_dir),
        ));
    }
    if let Some((name, table)) = upstream {
        problems.extend(carapace_common::check_named_files(
            &format!("upstream_authority.{name}"),
            &upstream_authority::files(name, table, data_dir),
        ));
    }
    problems
}

/// The refusal for a plugin whose Cargo feature this binary was built without (the
/// `tpm`, `kerberos` and `pkcs11` features, on by default, link tss-esapi, libgssapi and
/// the PKCS#11 key manager).
#[cfg(not(all(feature = "tpm", feature = "kerberos", feature = "pkcs11")))]
fn not_built(kind: &str, name: &str, feature: &str) -> String {
    format!(
        "{kind} \"{name}\" is not in this build of carapace-server: it was built without \
         the `{feature}` feature (rebuild with `cargo build --features {feature}`)"
    )
}

/// Parses a plugin's table into its config struct.
fn parse<T: serde::de::DeserializeOwned>(table: &toml::Table) -> Result<T, String> {
    carapace_common::plugin_settings(table)
}

fn unknown(kind: &str, name: &str, known: &[&str]) -> String {
    format!(
        "unknown {kind} plugin {name:?} (known: {})",
        known.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> toml::Table {
        s.parse().unwrap()
    }

    /// Each plugin's files are resolved as the plugin resolves them: the cloud
    /// attestors', sshpop's and the TPM's against the data dir, the key directory's key
    /// files listed, a `keys_ca_file` only with a `keys_url`.
    #[test]
    fn every_plugin_names_its_files_resolved_as_at_run_time() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path();
        let keys = data.join("keys");
        std::fs::create_dir(&keys).unwrap();
        std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(keys.join("server-tls.key"), "k").unwrap();
        std::fs::set_permissions(
            keys.join("server-tls.key"),
            std::fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        // Not a key file DiskKeyManager loads: not checked.
        std::fs::write(keys.join("notes.txt"), "n").unwrap();
        let tenant = "72f988bf-86f1-41af-91ab-2d7cd011db47";
        let problems = check_files(
            &("disk".into(), toml::Table::new()),
            &[
                (
                    "aws_iid".into(),
                    t("region_certificates = { us-east-1 = \"aws/us-east-1.pem\" }"),
                ),
                (
                    "gcp_iit".into(),
                    t(
                        "keys_path = \"google.json\"\naudience = \"a\"\nprojectid_allowlist = [\"p\"]",
                    ),
                ),
                (
                    "azure_msi".into(),
                    t(&format!(
                        "audience = \"api://x\"\n[tenants.\"{tenant}\"]\n\
                         keys_url = \"https://login.example/keys\"\nkeys_ca_file = \"azure-ca.pem\"\n"
                    )),
                ),
                ("sshpop".into(), t("cert_authorities_path = \"ssh/cas\"")),
                #[cfg(feature = "tpm")]
                ("tpm".into(), t("ek_ca_files = [\"ek/root.pem\"]")),
            ],
            None,
            data,
        );
        let d = data.display();
        let mut expected = vec![
            format!(
                "key_manager.disk: directory {d}/keys/server-tls.key has mode 640: it must not \
                 be accessible to group or others (chmod 600 {d}/keys/server-tls.key)"
            ),
            format!(
                "node_attestor.aws_iid: region_certificates.us-east-1 {d}/aws/us-east-1.pem does \
                 not exist"
            ),
            format!("node_attestor.gcp_iit: keys_path {d}/google.json does not exist"),
            format!(
                "node_attestor.azure_msi: tenants.{tenant}.keys_ca_file {d}/azure-ca.pem does \
                 not exist"
            ),
            format!("node_attestor.sshpop: cert_authorities_path {d}/ssh/cas does not exist"),
        ];
        if cfg!(feature = "tpm") {
            expected.push(format!(
                "node_attestor.tpm: ek_ca_files {d}/ek/root.pem does not exist"
            ));
        }
        assert_eq!(problems, expected);
    }

    #[cfg(feature = "pkcs11")]
    #[test]
    fn a_relative_pin_file_is_checked_under_the_data_dir_like_the_token_opens_it() {
        let dir = tempfile::tempdir().unwrap();
        let table = t(
            "module = \"/nonexistent/libpkcs11.so\"\ntoken_label = \"ca\"\npin_file = \"hsm.pin\"",
        );
        let d = dir.path().display();
        for (kind, upstream) in [("key_manager", false), ("upstream_authority", true)] {
            let entry = ("pkcs11".to_owned(), table.clone());
            let problems = if upstream {
                check_files(
                    &("memory".into(), toml::Table::new()),
                    &[],
                    Some(&entry),
                    dir.path(),
                )
            } else {
                check_files(&entry, &[], None, dir.path())
            };
            assert_eq!(
                problems,
                [
                    format!("{kind}.pkcs11: module /nonexistent/libpkcs11.so does not exist"),
                    format!("{kind}.pkcs11: pin_file {d}/hsm.pin does not exist"),
                ]
            );
        }
    }

    /// Run in both builds: CI also runs it with `--no-default-features`.
    #[test]
    fn a_plugin_left_out_of_the_build_is_refused_naming_its_feature() {
        let empty = toml::Table::new;
        let mut problems = Vec::new();
        check_plugins(
            &[("pkcs11".into(), empty())],
            &[("tpm".into(), empty()), ("kerberos".into(), empty())],
            &mut problems,
        );
        check_upstream(&[("pkcs11".into(), empty())], &mut problems);
        for (plugin, feature, built) in [
            ("key_manager.pkcs11", "pkcs11", cfg!(feature = "pkcs11")),
            (
                "upstream_authority.pkcs11",
                "pkcs11",
                cfg!(feature = "pkcs11"),
            ),
            ("node_attestor.tpm", "tpm", cfg!(feature = "tpm")),
            (
                "node_attestor.kerberos",
                "kerberos",
                cfg!(feature = "kerberos"),
            ),
        ] {
            let refusal = format!("built without the `{feature}` feature");
            let refused = problems
                .iter()
                .any(|p| p.starts_with(&format!("{plugin}: ")) && p.contains(&refusal));
            assert_eq!(refused, !built, "{plugin}: {problems:#?}");
        }
    }
}
