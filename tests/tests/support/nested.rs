//! The pieces of a nested-servers lab: a root server that serves downstream servers, the
//! registration entry that makes a server process a downstream server, and a downstream
//! server's options. Included by `#[path]` from the nested test files.
#![allow(dead_code, reason = "each test file uses a part")]

use std::path::{Path, PathBuf};

use carapace_e2e::{Lab, Server, ServerOptions, bin, uid_selector};

/// The trust domain of every tier.
pub(crate) const TD: &str = "example.org";

pub(crate) fn write_config(lab: &Lab, name: &str, text: &str) -> PathBuf {
    let path = lab.path().join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

pub(crate) fn with_config(name: &str, config: &Path) -> ServerOptions {
    ServerOptions {
        name: Some(name.into()),
        extra: vec!["--config".into(), config.display().to_string()],
        ..ServerOptions::default()
    }
}

/// The selectors of a downstream server process: its executable and its uid.
pub(crate) fn server_selectors() -> Vec<String> {
    let exe = std::fs::canonicalize(bin("carapace-server")).unwrap();
    vec![format!("unix:path:{}", exe.display()), uid_selector()]
}

/// Registers `spiffe_id` on `root` for the server process beside the root-tier agent
/// `agent_id`, marked `--downstream`, with `flags` besides.
pub(crate) fn downstream_entry(root: &Server, agent_id: &str, spiffe_id: &str, flags: &[&str]) {
    let selectors = server_selectors();
    let selectors: Vec<&str> = selectors.iter().map(String::as_str).collect();
    let mut all = vec!["--downstream"];
    all.extend_from_slice(flags);
    root.create_entry(agent_id, spiffe_id, &selectors, &all);
}

/// A root server of `td` that serves downstream servers (its CA lives 6 h, so a
/// downstream CA gets at most 1 h).
pub(crate) fn root(lab: &Lab, name: &str, td: &str) -> Server {
    let config = write_config(
        lab,
        name,
        &format!("trust_domain = \"{td}\"\nca_ttl = \"6h\"\n[downstream]\n"),
    );
    Server::start_opts(lab, with_config(name, &config))
}

/// The options of a downstream server of [`TD`] under the server at `address`, through
/// the agent socket `socket`, with the top-level `settings` (TOML lines) and the
/// `tables` after the upstream authority's.
pub(crate) fn downstream_with(
    lab: &Lab,
    name: &str,
    address: &str,
    socket: &Path,
    settings: &str,
    tables: &str,
) -> ServerOptions {
    let config = write_config(
        lab,
        name,
        &format!(
            "trust_domain = \"{TD}\"\n{settings}\n\
             [upstream_authority.carapace]\nserver_address = \"{address}\"\n\
             workload_api_socket = \"{}\"\nmint_timeout = \"15s\"\n{tables}\n",
            socket.display()
        ),
    );
    with_config(name, &config)
}

/// [`downstream_with`] a 1 h CA (what the root grants) and 5 min SVIDs.
pub(crate) fn downstream(lab: &Lab, name: &str, address: &str, socket: &Path) -> ServerOptions {
    downstream_with(
        lab,
        name,
        address,
        socket,
        "ca_ttl = \"1h\"\ndefault_x509_svid_ttl = \"5m\"",
        "",
    )
}
