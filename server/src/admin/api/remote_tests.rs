//! [`RemoteAdmin`]'s per-call decision, and the CLI's checks of the admin SVID files,
//! over a real CA and entry cache (the TLS path itself is in the e2e test
//! `tests/tests/admin_remote.rs`).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use carapace_core::clock::unix_now;
use carapace_core::plugin::KeySigner;
use carapace_core::{EntryId, KeyType, RegistrationEntry, SpiffeId};
use carapace_keymanager_soft::{SoftKey, generate_pkcs8};

use super::RemoteAdmin;
use super::test_support::{AGENT, new_admin_api, new_ca};
use crate::admin::cli::{RemoteFlags, check_address, remote_tls};
use crate::ca::{CaManager, SubjectKey};
use crate::entry_cache::EntryCache;
use crate::test_support::peer;

const OPS: &str = "spiffe://example.org/ops";

async fn remote_admin() -> (RemoteAdmin, Arc<EntryCache>, Arc<CaManager>) {
    let (api, cache, ca) = new_admin_api().await;
    (RemoteAdmin::new(api), cache, ca)
}

/// An SVID for `id` from `ca` (an hour), with its PKCS#8 key.
async fn svid(ca: &Arc<CaManager>, id: &str) -> (Vec<Vec<u8>>, Vec<u8>) {
    let pkcs8 = generate_pkcs8(KeyType::EcP256).unwrap();
    let key = SoftKey::from_pkcs8("k", &pkcs8).unwrap();
    let issued = ca
        .issue_x509_svid(
            id.parse().unwrap(),
            SubjectKey::from_spki(key.public_key_der()).unwrap(),
            Duration::from_secs(3600),
            vec![],
            unix_now(),
        )
        .await
        .unwrap();
    (issued.chain, pkcs8.to_vec())
}

/// An entry for `spiffe_id` under the agent; `id` also makes its selector, so entries
/// of one test differ.
fn entry(id: &str, spiffe_id: &str, admin: bool, expires_at: Option<i64>) -> RegistrationEntry {
    RegistrationEntry {
        federates_with: Vec::new(),
        id: EntryId::new(id).unwrap(),
        spiffe_id: spiffe_id.parse().unwrap(),
        parent_id: AGENT.parse().unwrap(),
        selectors: [format!("unix:user:{id}").parse().unwrap()]
            .into_iter()
            .collect(),
        x509_svid_ttl: None,
        jwt_svid_ttl: None,
        jwt_svid_include_jti: false,
        dns_names: vec![],
        hint: String::new(),
        admin,
        downstream: false,
        expires_at,
        revision: 0,
        created_at: 0,
    }
}

#[tokio::test]
async fn every_call_needs_an_unexpired_svid_under_the_bundle_of_an_unexpired_admin_entry() {
    let (remote, cache, ca) = remote_admin().await;
    let now = unix_now();
    let (chain, _) = svid(&ca, OPS).await;
    let p = peer(Some(&chain));
    let ops: SpiffeId = OPS.parse().unwrap();

    // No certificate.
    let err = remote.authorize(Some(&peer(None)), now).unwrap_err();
    assert!(err.contains("none was presented"), "{err}");
    assert!(remote.authorize(None, now).is_err());

    // No entry, then an entry without admin: refused.
    let not_admin = format!("{OPS} is not the SPIFFE ID of any registration entry marked admin");
    assert_eq!(remote.authorize(Some(&p), now).unwrap_err(), not_admin);
    cache
        .create_entry(entry("plain", OPS, false, None))
        .await
        .unwrap();
    assert_eq!(remote.authorize(Some(&p), now).unwrap_err(), not_admin);

    // An admin entry for the ID: served, whichever of its entries has the flag.
    cache
        .create_entry(entry("boss", OPS, true, Some(now + 600)))
        .await
        .unwrap();
    assert_eq!(remote.authorize(Some(&p), now).unwrap(), ops);
    // Past the admin entry's expiry (before the pruner removes it): refused.
    assert_eq!(
        remote.authorize(Some(&p), now + 600).unwrap_err(),
        not_admin
    );

    // The SVID past its notAfter, the entry still there: refused for the SVID.
    let not_after = p.svid.as_ref().unwrap().not_after;
    cache
        .update_entry(entry("boss", OPS, true, None))
        .await
        .unwrap();
    let err = remote.authorize(Some(&p), not_after).unwrap_err();
    assert!(
        err.contains(&format!("the client SVID {OPS} expired at")),
        "{err}"
    );

    // An SVID for the same ID from another CA: not under this server's bundle.
    let (other_ca, _) = new_ca("example.org").await;
    let (foreign, _) = svid(&other_ca, OPS).await;
    let err = remote
        .authorize(Some(&peer(Some(&foreign))), now)
        .unwrap_err();
    assert!(
        err.contains("is no longer valid under the trust bundle"),
        "{err}"
    );

    // The entry deleted: the same SVID is refused on its next call.
    cache
        .delete_entry(&EntryId::new("boss").unwrap())
        .await
        .unwrap();
    assert_eq!(remote.authorize(Some(&p), now).unwrap_err(), not_admin);
}

#[tokio::test]
async fn agent_and_server_ids_never_administer() {
    let (remote, _cache, ca) = remote_admin().await;
    let (chain, _) = svid(&ca, OPS).await;
    for (id, what) in [
        (AGENT, "an agent's SVID"),
        (
            "spiffe://example.org/spire/server",
            "under the reserved /spire path",
        ),
    ] {
        // The reserved check comes before anything else, so the chain does not matter.
        let mut p = peer(Some(&chain));
        if let Some(s) = p.svid.as_mut() {
            s.id = id.parse().unwrap();
        }
        let err = remote.authorize(Some(&p), unix_now()).unwrap_err();
        assert_eq!(
            err,
            format!("{id} is {what}; agent and server SVIDs never administer")
        );
    }
}

fn write(path: &Path, data: &[u8], mode: u32) {
    std::fs::write(path, data).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[tokio::test]
async fn the_cli_checks_the_admin_svid_files_before_connecting() {
    let (_remote, _cache, ca) = remote_admin().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (chain, pkcs8) = svid(&ca, OPS).await;
    let (_, other_pkcs8) = svid(&ca, OPS).await;
    let chain_pem: String = chain
        .iter()
        .map(|c| carapace_core::bundle::der_to_pem(c))
        .collect();
    write(&d.join("svid.pem"), chain_pem.as_bytes(), 0o644);
    let key_pem = carapace_core::bundle::pem_block("PRIVATE KEY", &pkcs8);
    write(&d.join("svid.key"), key_pem.as_bytes(), 0o600);
    let other_pem = carapace_core::bundle::pem_block("PRIVATE KEY", &other_pkcs8);
    write(&d.join("other.key"), other_pem.as_bytes(), 0o600);
    write(&d.join("loose.key"), key_pem.as_bytes(), 0o640);
    write(
        &d.join("bundle.pem"),
        ca.bundle().borrow().to_pem().as_bytes(),
        0o644,
    );
    write(&d.join("empty.pem"), b"", 0o644);
    let flags = |svid: &str, key: &str, bundle: &str| RemoteFlags {
        address: "127.0.0.1:1".into(),
        svid: d.join(svid),
        svid_key: d.join(key),
        bundle: d.join(bundle),
    };
    let now = unix_now();
    let err = |f: RemoteFlags, now: i64| remote_tls(&f, now).unwrap_err().to_string();

    remote_tls(&flags("svid.pem", "svid.key", "bundle.pem"), now).unwrap();

    let e = err(flags("missing.pem", "svid.key", "bundle.pem"), now);
    assert!(
        e.starts_with(&format!(
            "--svid {}: cannot read",
            d.join("missing.pem").display()
        )),
        "{e}"
    );
    let e = err(flags("empty.pem", "svid.key", "bundle.pem"), now);
    assert!(e.contains("holds no PEM certificate"), "{e}");
    let e = err(flags("svid.pem", "loose.key", "bundle.pem"), now);
    assert!(
        e.starts_with("--svid-key: ") && e.contains("has mode 640") && e.contains("chmod 600"),
        "{e}"
    );
    let e = err(flags("svid.pem", "other.key", "bundle.pem"), now);
    assert!(e.contains("is not the key of the SVID in --svid"), "{e}");
    write(&d.join("cert-as.key"), chain_pem.as_bytes(), 0o600);
    let e = err(flags("svid.pem", "cert-as.key", "bundle.pem"), now);
    assert!(e.contains("not a PKCS#8 PEM key"), "{e}");
    let e = err(flags("svid.pem", "svid.key", "empty.pem"), now);
    assert!(
        e.starts_with(&format!("--bundle {}: ", d.join("empty.pem").display()))
            && e.contains("no CERTIFICATE block found"),
        "{e}"
    );
    let e = err(flags("svid.pem", "svid.key", "missing.pem"), now);
    assert!(e.starts_with("--bundle "), "{e}");
    let e = err(flags("svid.pem", "svid.key", "bundle.pem"), now + 7200);
    assert!(e.contains(&format!("the SVID of {OPS} expired at")), "{e}");
}

#[test]
fn the_server_address_must_be_host_and_port() {
    for ok in ["server.example.org:8081", "127.0.0.1:8081", "[::1]:8081"] {
        check_address(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
    for (bad, why) in [
        ("server.example.org", "no port"),
        (":8081", "no host"),
        ("host:0", "the port must be a number from 1 to 65535"),
        ("host:http", "the port must be a number from 1 to 65535"),
        ("host:65536", "the port must be a number from 1 to 65535"),
        ("::1:8081", "not a host name or address"),
        ("https://host:8081", "not a host name or address"),
    ] {
        let e = check_address(bad).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "--server-address {bad:?}: {why}; expected HOST:PORT"
            )),
            "{bad}: {e}"
        );
    }
}
