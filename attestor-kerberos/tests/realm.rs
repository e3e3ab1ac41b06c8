//! `kerberos` node attestation against a real MIT KDC (hsm-sim), both halves in one
//! process: success, and every refusal the design promises, each with its message.
//!
//! Each test runs in a child process whose environment names its own realm
//! (`hsm_sim::kdc::kdc_test`). The TLS exporter of a real connection is stood in for by
//! 32 random bytes per simulated connection: what matters here is whether the two halves
//! agree on it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use carapace_attestor_kerberos::agent::{KerberosAgentConfig, KerberosAttestorClient};
use carapace_attestor_kerberos::server::{KerberosAttestor, KerberosServerConfig};
use carapace_attestor_kerberos::wire::{self, Answer};
use carapace_core::Error;
use carapace_core::clock::ManualClock;
use carapace_core::plugin::{
    AttestationContext, AttestationResult, AttestationSession, AttestationStep, NodeAttestor,
    NodeAttestorClient, PluginContext,
};
use hsm_sim::kdc::{ChildRealm, kdc_test};

const REALM: &str = "LAB.TEST";

fn server_cfg(r: &ChildRealm) -> KerberosServerConfig {
    KerberosServerConfig {
        keytab: r.principals.service_keytab.clone(),
        service_principal: r.principals.service.clone(),
        allowed_realms: vec![REALM.into()],
        machine_account_domains: Default::default(),
        replay_cache: None,
    }
}

fn agent_cfg(r: &ChildRealm) -> KerberosAgentConfig {
    KerberosAgentConfig {
        service_principal: r.principals.service.clone(),
        keytab: Some(r.principals.host_keytab.clone()),
        principal: Some(r.principals.host.clone()),
        mutual_auth: true,
    }
}

fn server(cfg: &KerberosServerConfig, data_dir: &Path) -> KerberosAttestor {
    KerberosAttestor::new(cfg, &PluginContext::for_tests(data_dir)).unwrap()
}

fn agent(cfg: &KerberosAgentConfig) -> KerberosAttestorClient {
    KerberosAttestorClient::new(cfg).unwrap()
}

/// One simulated TLS connection: both ends see the same exporter.
fn connection() -> AttestationContext {
    AttestationContext {
        agent_public_key: Vec::new(),
        tls_exporter: rand::random::<[u8; 32]>().to_vec(),
    }
}

fn done(step: AttestationStep) -> AttestationResult {
    match step {
        AttestationStep::Done(r) => r,
        AttestationStep::Challenge { .. } => panic!("expected the result, got a challenge"),
    }
}

fn challenge(step: AttestationStep) -> (Vec<u8>, Box<dyn AttestationSession>) {
    match step {
        AttestationStep::Challenge { challenge, session } => (challenge, session),
        AttestationStep::Done(_) => panic!("expected a challenge"),
    }
}

/// A whole attestation on one connection.
async fn attest(
    s: &KerberosAttestor,
    a: &KerberosAttestorClient,
) -> Result<AttestationResult, Error> {
    let ctx = connection();
    let mut step = s.begin(&a.payload(&ctx).await?, &ctx).await?;
    loop {
        match step {
            AttestationStep::Done(r) => return Ok(r),
            AttestationStep::Challenge { challenge, session } => {
                step = session.respond(&a.answer(&challenge, &ctx).await?).await?;
            }
        }
    }
}

/// A new attestation of `a` by `s` on connection `ctx`: the server's challenge and the
/// session waiting for the answer.
async fn begin(
    s: &KerberosAttestor,
    a: &KerberosAttestorClient,
    ctx: &AttestationContext,
) -> (Vec<u8>, Box<dyn AttestationSession>) {
    challenge(s.begin(&a.payload(ctx).await.unwrap(), ctx).await.unwrap())
}

/// The agent's token answer for a session of `s` on connection `ctx`, and the session.
async fn token_for(
    s: &KerberosAttestor,
    a: &KerberosAttestorClient,
    ctx: &AttestationContext,
) -> (Vec<u8>, Box<dyn AttestationSession>) {
    let (c, session) = begin(s, a, ctx).await;
    (a.answer(&c, ctx).await.unwrap(), session)
}

fn rejected(r: Result<AttestationStep, Error>) -> String {
    match r {
        Err(e @ (Error::AttestationRejected(_) | Error::AttestationReplay(_))) => e.to_string(),
        Err(e) => panic!("expected a rejection, got {e:?}"),
        Ok(_) => panic!("expected a rejection, got success"),
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_host_attests_with_its_keytab_and_gets_realm_principal_and_host_selectors() {
    let Some(r) = kdc_test(
        "a_host_attests_with_its_keytab_and_gets_realm_principal_and_host_selectors",
        REALM,
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let s = server(&server_cfg(&r), dir.path());
    rt().block_on(async {
        for mutual in [true, false] {
            let a = agent(&KerberosAgentConfig {
                mutual_auth: mutual,
                ..agent_cfg(&r)
            });
            let result = attest(&s, &a).await.unwrap();
            assert_eq!(result.agent_path, "LAB.TEST/node1.lab.test");
            assert!(result.can_reattest);
            let mut got: Vec<String> = result.selectors.iter().map(|s| s.to_string()).collect();
            got.sort();
            // MIT issues no logon-info PAC buffer: no group SIDs.
            assert_eq!(
                got,
                [
                    "kerberos:host:node1.lab.test",
                    "kerberos:principal:host/node1.lab.test@LAB.TEST",
                    "kerberos:realm:LAB.TEST",
                ]
            );
        }
        // Again and again: every attestation gets a fresh ticket and a fresh nonce.
        let a = agent(&agent_cfg(&r));
        for _ in 0..3 {
            attest(&s, &a).await.unwrap();
        }
    });
    // The replay cache lives in the data dir, 0600.
    let rcache = dir.path().join("kerberos.rcache");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&rcache).unwrap().permissions());
    assert_eq!(mode & 0o077, 0, "{rcache:?} mode {mode:o}");
}

#[test]
fn a_ticket_for_another_service_principal_in_the_keytab_is_refused() {
    let Some(r) = kdc_test(
        "a_ticket_for_another_service_principal_in_the_keytab_is_refused",
        REALM,
    ) else {
        return;
    };
    let other = "other/server.lab.test@LAB.TEST";
    r.admin.add_principal(other).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The server's keytab holds both principals; only the configured one may be used.
    let both = r
        .admin
        .keytab(
            &[&r.principals.service, other],
            &dir.path().join("both.keytab"),
        )
        .unwrap();
    let s = server(
        &KerberosServerConfig {
            keytab: both,
            ..server_cfg(&r)
        },
        dir.path(),
    );
    let a = agent(&KerberosAgentConfig {
        service_principal: other.into(),
        ..agent_cfg(&r)
    });
    rt().block_on(async {
        let ctx = connection();
        let (answer, session) = token_for(&s, &a, &ctx).await;
        let err = rejected(session.respond(&answer).await);
        assert!(
            err.contains("is not for carapace/server.lab.test@LAB.TEST")
                || err.contains("the ticket is for other/server.lab.test@LAB.TEST"),
            "{err}"
        );
    });
}

#[test]
fn a_realm_not_on_the_allowlist_is_refused() {
    let Some(r) = kdc_test("a_realm_not_on_the_allowlist_is_refused", REALM) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let s = server(
        &KerberosServerConfig {
            allowed_realms: vec!["CORP.EXAMPLE".into()],
            ..server_cfg(&r)
        },
        dir.path(),
    );
    let a = agent(&agent_cfg(&r));
    rt().block_on(async {
        let err = attest(&s, &a).await.unwrap_err().to_string();
        assert!(
            err.contains("realm LAB.TEST of host/node1.lab.test@LAB.TEST is not in allowed_realms"),
            "{err}"
        );
    });
}

#[test]
fn a_replayed_token_is_refused_by_the_same_server() {
    let Some(r) = kdc_test("a_replayed_token_is_refused_by_the_same_server", REALM) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let s = server(&server_cfg(&r), dir.path());
    let a = agent(&KerberosAgentConfig {
        mutual_auth: false,
        ..agent_cfg(&r)
    });
    rt().block_on(async {
        let ctx = connection();
        let (answer, session) = token_for(&s, &a, &ctx).await;
        done(session.respond(&answer).await.unwrap());
        // The recorded answer, presented again on the same connection in a new
        // attestation: the authenticator is in the replay cache.
        let (_, session) = begin(&s, &a, &ctx).await;
        let err = rejected(session.respond(&answer).await);
        assert!(
            err.contains("Kerberos authenticator (replay cache) was already used"),
            "{err}"
        );
    });
    // The replay cache is a file: a restarted server still refuses it.
    let s = server(&server_cfg(&r), dir.path());
    rt().block_on(async {
        let ctx = connection();
        let (answer, session) = token_for(&s, &a, &ctx).await;
        done(session.respond(&answer).await.unwrap());
        let s2 = server(&server_cfg(&r), dir.path());
        let (_, session) = begin(&s2, &a, &ctx).await;
        let err = rejected(session.respond(&answer).await);
        assert!(err.contains("already used"), "{err}");
    });
}

#[test]
fn a_token_relayed_to_a_second_server_replica_is_refused() {
    let Some(r) = kdc_test(
        "a_token_relayed_to_a_second_server_replica_is_refused",
        REALM,
    ) else {
        return;
    };
    // Two replicas with the same keytab and separate data dirs (separate replay caches).
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (server_a, server_b) = (
        server(&server_cfg(&r), dir_a.path()),
        server(&server_cfg(&r), dir_b.path()),
    );
    let a = agent(&agent_cfg(&r));
    rt().block_on(async {
        // The agent talks to replica A (or to whoever posed as it)...
        let ctx_a = connection();
        let (answer, _session_a) = token_for(&server_a, &a, &ctx_a).await;
        // ...and the token is relayed to replica B on the relayer's own connection.
        let ctx_b = connection();
        let (_, session_b) = begin(&server_b, &a, &ctx_b).await;
        let err = rejected(session_b.respond(&answer).await);
        assert!(
            err.contains("channel bindings do not match this TLS connection and nonce"),
            "{err}"
        );
    });
}

#[test]
fn a_token_bound_to_another_connection_is_refused() {
    let Some(r) = kdc_test("a_token_bound_to_another_connection_is_refused", REALM) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let s = server(&server_cfg(&r), dir.path());
    let a = agent(&agent_cfg(&r));
    rt().block_on(async {
        // The right nonce, but the agent's TLS session is not the server's (a
        // man-in-the-middle terminating TLS on both sides).
        let server_side = connection();
        let agent_side = connection();
        let (c, session) = challenge(
            s.begin(&a.payload(&agent_side).await.unwrap(), &server_side)
                .await
                .unwrap(),
        );
        let answer = a.answer(&c, &agent_side).await.unwrap();
        let err = rejected(session.respond(&answer).await);
        assert!(err.contains("channel bindings do not match"), "{err}");
    });
}

#[test]
fn an_expired_ticket_is_refused() {
    let Some(r) = kdc_test("an_expired_ticket_is_refused", REALM) else {
        return;
    };
    let short = "host/short.lab.test@LAB.TEST";
    r.admin.add_principal(short).unwrap();
    r.admin.set_max_life(short, 2).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let keytab = r
        .admin
        .keytab(&[short], &dir.path().join("short.keytab"))
        .unwrap();
    let s = server(&server_cfg(&r), dir.path());
    let a = agent(&KerberosAgentConfig {
        principal: Some(short.into()),
        keytab: Some(keytab),
        mutual_auth: false,
        ..agent_cfg(&r)
    });
    rt().block_on(async {
        let ctx = connection();
        let (answer, session) = token_for(&s, &a, &ctx).await;
        // The ticket lives 2 s: present the token after it ended.
        tokio::time::sleep(Duration::from_secs(4)).await;
        let err = rejected(session.respond(&answer).await);
        assert!(err.contains("expired"), "{err}");
    });
}

/// The ticket's end is checked at the attestor's clock (the context's): a token whose
/// ticket is good now is refused once that clock has moved past the ticket's end, though
/// the KDC's and the system's time have not.
#[test]
fn a_ticket_past_its_end_at_the_attestors_clock_is_refused() {
    let Some(r) = kdc_test(
        "a_ticket_past_its_end_at_the_attestors_clock_is_refused",
        REALM,
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::starting_now());
    let s = KerberosAttestor::new(
        &server_cfg(&r),
        &PluginContext::for_tests(dir.path()).with_clock(clock.clone()),
    )
    .unwrap();
    let a = agent(&agent_cfg(&r));
    rt().block_on(async {
        attest(&s, &a).await.unwrap();
        let ctx = connection();
        let (answer, session) = token_for(&s, &a, &ctx).await;
        // The lab's tickets live at most 10 hours.
        clock.advance(Duration::from_secs(11 * 3_600));
        let err = rejected(session.respond(&answer).await);
        assert!(err.contains("the service ticket expired"), "{err}");
    });
}

#[test]
fn unknown_client_principals_get_no_ticket() {
    let Some(r) = kdc_test("unknown_client_principals_get_no_ticket", REALM) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let s = server(&server_cfg(&r), dir.path());
    // A host that left the realm: its keytab still exists, its principal does not.
    let gone = "host/gone.lab.test@LAB.TEST";
    r.admin.add_principal(gone).unwrap();
    let keytab = r
        .admin
        .keytab(&[gone], &dir.path().join("gone.keytab"))
        .unwrap();
    r.admin.delete_principal(gone).unwrap();
    let a = agent(&KerberosAgentConfig {
        principal: Some(gone.into()),
        keytab: Some(keytab),
        ..agent_cfg(&r)
    });
    // A keytab from another realm this one does not trust.
    let other = hsm_sim::kdc::Kdc::start("OTHER.TEST").unwrap();
    let stranger = "host/node1.other.test@OTHER.TEST";
    other.add_principal(stranger).unwrap();
    let other_keytab = other
        .keytab(&[stranger], &dir.path().join("other.keytab"))
        .unwrap();
    let b = agent(&KerberosAgentConfig {
        principal: Some(stranger.into()),
        keytab: Some(other_keytab),
        ..agent_cfg(&r)
    });
    rt().block_on(async {
        let err = attest(&s, &a).await.unwrap_err().to_string();
        assert!(err.contains("not found in Kerberos database"), "{err}");
        assert!(err.contains(gone), "{err}");
        let err = attest(&s, &b).await.unwrap_err().to_string();
        assert!(err.contains("OTHER.TEST"), "{err}");
    });
}

#[test]
fn corrupted_or_malformed_tokens_are_refused() {
    let Some(r) = kdc_test("corrupted_or_malformed_tokens_are_refused", REALM) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let s = server(&server_cfg(&r), dir.path());
    let a = agent(&agent_cfg(&r));
    rt().block_on(async {
        let ctx = connection();
        let (answer, _) = token_for(&s, &a, &ctx).await;
        let Answer::Token { token } = wire::decode::<Answer>("a", &answer).unwrap() else {
            panic!("expected a token");
        };
        let token = wire::unb64("t", &token).unwrap();
        // Flip one byte at several places: header, ticket, authenticator.
        for at in [2, token.len() / 3, token.len() / 2, token.len() - 3] {
            let mut bad = token.clone();
            bad[at] ^= 0x55;
            let (_, session) = begin(&s, &a, &ctx).await;
            let msg = wire::encode(&Answer::Token {
                token: wire::b64(&bad),
            })
            .unwrap();
            let err = rejected(session.respond(&msg).await);
            assert!(err.contains("kerberos:"), "{err}");
        }
        for (msg, why) in [
            (&b"{\"step\":\"token\",\"token\":\"%%%\"}"[..], "not base64"),
            (b"not json", "malformed answer"),
            (b"{\"step\":\"token\",\"token\":\"\"}", "refused"),
        ] {
            let (_, session) = begin(&s, &a, &ctx).await;
            let err = rejected(session.respond(msg).await);
            assert!(err.contains(why), "{why}: {err}");
        }
        // A payload from a future agent.
        let err = rejected(s.begin(b"{\"version\":2}", &ctx).await);
        assert!(err.contains("version 2"), "{err}");
    });
}

#[test]
fn server_settings_are_checked_at_start() {
    let Some(r) = kdc_test("server_settings_are_checked_at_start", REALM) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // A keytab without the service principal.
    let err = KerberosAttestor::new(
        &KerberosServerConfig {
            keytab: r.principals.host_keytab.clone(),
            ..server_cfg(&r)
        },
        &PluginContext::for_tests(dir.path()),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("cannot accept tickets for carapace/server.lab.test@LAB.TEST"),
        "{err}"
    );
    // A keytab others can read.
    let open = dir.path().join("open.keytab");
    std::fs::copy(&r.principals.service_keytab, &open).unwrap();
    std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let err = KerberosAttestor::new(
        &KerberosServerConfig {
            keytab: open,
            ..server_cfg(&r)
        },
        &PluginContext::for_tests(dir.path()),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("chmod 600"), "{err}");
    // Settings.
    let err = KerberosAttestor::new(
        &KerberosServerConfig {
            allowed_realms: vec![],
            service_principal: "carapace".into(),
            ..server_cfg(&r)
        },
        &PluginContext::for_tests(dir.path()),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("allowed_realms is empty"), "{err}");
    assert!(err.contains("service_principal"), "{err}");
}

#[test]
fn without_a_principal_the_agent_uses_this_hosts_host_principal() {
    let Some(r) = kdc_test(
        "without_a_principal_the_agent_uses_this_hosts_host_principal",
        REALM,
    ) else {
        return;
    };
    // MIT names the host-based service `host` after this machine's host name (the lab's
    // krb5.conf neither canonicalises it through DNS nor maps it to another realm).
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_ascii_lowercase();
    let mine = format!("host/{hostname}@{REALM}");
    r.admin.add_principal(&mine).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let keytab = r
        .admin
        .keytab(&[&mine], &dir.path().join("krb5.keytab"))
        .unwrap();
    let s = server(&server_cfg(&r), dir.path());
    let a = agent(&KerberosAgentConfig {
        principal: None,
        keytab: Some(keytab),
        ..agent_cfg(&r)
    });
    let fqdn = if hostname.contains('.') {
        hostname.clone()
    } else {
        format!("{hostname}.lab.test")
    };
    rt().block_on(async {
        let result = attest(&s, &a).await.unwrap();
        assert_eq!(result.agent_path, format!("{REALM}/{fqdn}"));
        let principal = format!("kerberos:principal:{mine}");
        assert!(
            result.selectors.iter().any(|s| s.to_string() == principal),
            "{:?}",
            result.selectors
        );
    });
}

#[test]
fn a_tampered_or_unasked_server_reply_is_refused_by_the_agent() {
    let Some(r) = kdc_test(
        "a_tampered_or_unasked_server_reply_is_refused_by_the_agent",
        REALM,
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let s = server(&server_cfg(&r), dir.path());
    let a = agent(&agent_cfg(&r));
    rt().block_on(async {
        let ctx = connection();
        let (answer, session) = token_for(&s, &a, &ctx).await;
        // With mutual authentication the server answers with its AP-REP.
        let (reply, _) = challenge(session.respond(&answer).await.unwrap());
        let wire::Challenge::Reply { token } = wire::decode("c", &reply).unwrap() else {
            panic!("expected the AP-REP");
        };
        let mut ap_rep = wire::unb64("t", &token).unwrap();
        let at = ap_rep.len() - 4;
        ap_rep[at] ^= 0x01;
        let tampered = wire::encode(&wire::Challenge::Reply {
            token: wire::b64(&ap_rep),
        })
        .unwrap();
        let err = a.answer(&tampered, &ctx).await.unwrap_err().to_string();
        assert!(err.contains("the server's AP-REP does not verify"), "{err}");
        // The attempt is over: a reply now was never asked for.
        let err = a.answer(&reply, &ctx).await.unwrap_err().to_string();
        assert!(err.contains("did not ask for"), "{err}");
    });
}
