//! The crate map in ARCHITECTURE.md, checked: `cargo metadata` lists every workspace
//! crate's dependencies on the others, and each must be one its layer allows.
//!
//! - `carapace-core` depends on no workspace crate;
//! - a plugin crate (key managers, node attestors) depends on core only; its tests may
//!   also use the dev-only crates (`carapace-fuzzkit`, `carapace-hsm-sim`);
//! - the shared libraries (proto, tls, common) depend on core only (tests: also a plugin);
//! - no crate but the harnesses depends on the server or the agent, and the two binaries
//!   do not depend on each other: only their catalogs name concrete plugins;
//! - the dev-only crates are never a normal dependency of a shipped crate.
//!
//! A new crate fails this test until it is given a layer here and in ARCHITECTURE.md.
#![allow(clippy::expect_used, clippy::panic, reason = "tests")]

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layer {
    Core,
    Plugin,
    Library,
    Binary,
    /// Used by tests and the lab only.
    DevOnly,
    /// The end-to-end tests and the benchmarks: may depend on anything.
    Harness,
}

fn layer(name: &str) -> Option<Layer> {
    Some(match name {
        "carapace-core" => Layer::Core,
        "carapace-keymanager-soft"
        | "carapace-keymanager-pkcs11"
        | "carapace-attestor-tpm"
        | "carapace-attestor-kerberos"
        | "carapace-attestor-ssh"
        | "carapace-attestor-cloud" => Layer::Plugin,
        "carapace-proto" | "carapace-tls" | "carapace-common" => Layer::Library,
        "carapace-server" | "carapace-agent" => Layer::Binary,
        "carapace-fuzzkit" | "carapace-hsm-sim" => Layer::DevOnly,
        "carapace-e2e" | "carapace-bench" => Layer::Harness,
        _ => return None,
    })
}

/// Whether crate `from` (in `from_layer`) may depend on `to`; `dev` for a
/// dev-dependency. `None` when allowed, else why not.
fn refusal(from: &str, from_layer: Layer, to: &str, dev: bool) -> Option<String> {
    let to_layer = layer(to)?;
    let allowed = match (from_layer, to_layer) {
        (Layer::Harness, _) => true,
        (_, Layer::Harness) => false,
        (_, Layer::DevOnly) => dev || from_layer == Layer::DevOnly,
        (Layer::Core | Layer::DevOnly, _) => false,
        (Layer::Plugin, Layer::Core) => true,
        (Layer::Plugin, _) => false,
        (Layer::Library, Layer::Core) => true,
        (Layer::Library, Layer::Plugin) => dev,
        (Layer::Library, _) => false,
        (Layer::Binary, Layer::Binary) => false,
        (Layer::Binary, _) => true,
    };
    (!allowed).then(|| {
        format!(
            "{from} ({from_layer:?}) depends on {to} ({to_layer:?}){}",
            if dev { " as a dev-dependency" } else { "" }
        )
    })
}

/// Each workspace crate's dependencies on workspace crates: name → [(dep, is_dev)].
fn workspace_dependencies() -> BTreeMap<String, BTreeSet<(String, bool)>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
    let out = Command::new(&cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--manifest-path",
            manifest,
        ])
        .output()
        .unwrap_or_else(|e| panic!("running {cargo} metadata: {e}"));
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).expect("cargo metadata's JSON");
    let packages = meta["packages"].as_array().expect("packages");
    let members: BTreeSet<&str> = packages.iter().filter_map(|p| p["name"].as_str()).collect();
    packages
        .iter()
        .map(|p| {
            let deps = p["dependencies"]
                .as_array()
                .expect("dependencies")
                .iter()
                .filter(|d| d["name"].as_str().is_some_and(|n| members.contains(n)))
                .map(|d| {
                    (
                        d["name"].as_str().unwrap_or_default().to_owned(),
                        d["kind"].as_str() == Some("dev"),
                    )
                })
                .collect();
            (p["name"].as_str().unwrap_or_default().to_owned(), deps)
        })
        .collect()
}

#[test]
fn every_crate_depends_only_on_what_its_layer_allows() {
    let crates = workspace_dependencies();
    assert!(
        crates.len() >= 16,
        "cargo metadata listed only {} crates",
        crates.len()
    );
    let mut wrong = Vec::new();
    for (name, deps) in &crates {
        let Some(from_layer) = layer(name) else {
            wrong.push(format!(
                "{name} has no layer: add it to tests/tests/dependency_map.rs and to \
                 ARCHITECTURE.md's crate map"
            ));
            continue;
        };
        for (dep, dev) in deps {
            wrong.extend(refusal(name, from_layer, dep, *dev));
        }
    }
    assert!(
        wrong.is_empty(),
        "the crate map is broken (see ARCHITECTURE.md):\n  {}",
        wrong.join("\n  ")
    );
}

#[test]
fn the_rules_refuse_what_they_should() {
    let refused = |from: &str, to: &str, dev: bool| {
        refusal(from, layer(from).expect("a layer"), to, dev).is_some()
    };
    // A plugin naming the server, the agent, another plugin or a library.
    for to in [
        "carapace-server",
        "carapace-agent",
        "carapace-attestor-tpm",
        "carapace-tls",
    ] {
        assert!(refused("carapace-attestor-cloud", to, false), "{to}");
    }
    assert!(refused("carapace-core", "carapace-proto", false));
    assert!(refused("carapace-tls", "carapace-server", true));
    assert!(refused("carapace-server", "carapace-agent", false));
    assert!(refused("carapace-agent", "carapace-hsm-sim", false));
    assert!(refused("carapace-common", "carapace-attestor-ssh", false));
    // What the map allows.
    assert!(!refused("carapace-attestor-cloud", "carapace-core", false));
    assert!(!refused("carapace-attestor-tpm", "carapace-hsm-sim", true));
    assert!(!refused("carapace-server", "carapace-attestor-tpm", false));
    assert!(!refused("carapace-bench", "carapace-server", false));
}
