//! The plugin catalogs: one per kind, name → constructor, chosen by configuration.
//! This is the only code that names concrete plugin types.
//!
//! Each plugin owns its configuration struct (`deny_unknown_fields`); [`check_plugins`]
//! parses every configured plugin's table without starting anything, for `validate`,
//! and the `build_*` functions construct them for `run`.

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
