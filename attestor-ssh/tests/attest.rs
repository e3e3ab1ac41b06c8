//! Both halves of `sshpop` in-process, with CAs, host keys and certificates made by
//! `ssh-keygen` at test time.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;

use carapace_attestor_ssh::wire::{self, Answer, Challenge};
use carapace_attestor_ssh::{SSHSIG_NAMESPACE, signed_message};
use std::sync::Arc;
use std::time::Duration;

use carapace_core::clock::{Clock as _, ManualClock, rfc3339};
use carapace_core::plugin::{AttestationStep, NodeAttestor, NodeAttestorClient};
use carapace_core::{SpiffeId, TrustDomain};
use common::{Kind, Lab, attest, ctx, payload_of, refused_at_begin, url_safe};
use ssh_key::{HashAlg, LineEnding, PrivateKey, SshSig};

/// A full attestation with a `host` key certified by a `ca` key; checks the agent path
/// and every selector against what ssh-keygen itself prints.
async fn attests_with(host: Kind, ca: Kind) {
    let lab = Lab::new();
    let ca_key = lab.keygen("ca", ca);
    let host_key = lab.keygen("host", host);
    let cert = lab.host_cert(&ca_key, &host_key, "host-cert.pub");
    let server = lab.server(&[&ca_key]);
    let agent = lab.agent(&host_key, &cert).unwrap();
    let result = attest(&server, &agent, &ctx(7)).await.unwrap();

    assert_eq!(result.agent_path, url_safe(&lab.fingerprint(&host_key)));
    let id = SpiffeId::new(
        &TrustDomain::new("example.org").unwrap(),
        &format!("/spire/agent/sshpop/{}", result.agent_path),
    )
    .unwrap();
    assert!(
        id.to_string()
            .starts_with("spiffe://example.org/spire/agent/sshpop/")
    );
    let mut got: Vec<String> = result.selectors.iter().map(ToString::to_string).collect();
    got.sort();
    let mut want = vec![
        format!("sshpop:ca_fingerprint:{}", lab.fingerprint(&ca_key)),
        "sshpop:key_id:keyid".to_owned(),
        "sshpop:principal:host1".to_owned(),
        "sshpop:principal:host1.example.com".to_owned(),
    ];
    want.sort();
    assert_eq!(got, want);
    assert!(result.can_reattest);
}

#[tokio::test]
async fn ed25519_host_key_under_ed25519_ca_attests_with_key_fingerprint_id_and_selectors() {
    attests_with(Kind::Ed25519, Kind::Ed25519).await;
}

#[tokio::test]
async fn ecdsa_p256_host_key_under_rsa_ca_attests() {
    attests_with(Kind::P256, Kind::Rsa).await;
}

#[tokio::test]
async fn ecdsa_p384_host_key_under_ed25519_ca_attests() {
    attests_with(Kind::P384, Kind::Ed25519).await;
}

#[tokio::test]
async fn rsa_host_key_under_ecdsa_p384_ca_attests() {
    attests_with(Kind::Rsa, Kind::P384).await;
}

#[tokio::test]
async fn renewed_certificate_is_reread_and_keeps_the_agent_id() {
    let lab = Lab::new();
    let ca = lab.keygen("ca", Kind::Ed25519);
    let host = lab.keygen("host", Kind::Ed25519);
    let cert = lab.host_cert(&ca, &host, "host-cert.pub");
    let server = lab.server(&[&ca]);
    let agent = lab.agent(&host, &cert).unwrap();
    let first = attest(&server, &agent, &ctx(7)).await.unwrap();

    // Renewed in place while the agent runs: another key id, serial and window.
    lab.sign(
        &ca,
        &host,
        "host-cert.pub",
        &[
            "-h", "-I", "renewed", "-z", "42", "-n", "host1", "-V", "-1m:+2h",
        ],
    );
    let second = attest(&server, &agent, &ctx(8)).await.unwrap();
    assert_eq!(second.agent_path, first.agent_path);
    let got: Vec<String> = second.selectors.iter().map(ToString::to_string).collect();
    assert!(got.contains(&"sshpop:key_id:renewed".to_owned()), "{got:?}");
    assert!(!got.contains(&"sshpop:key_id:keyid".to_owned()), "{got:?}");

    // A "renewal" for another key is refused by the agent before anything is sent.
    let other = lab.keygen("other", Kind::Ed25519);
    lab.host_cert(&ca, &other, "host-cert.pub");
    let err = agent.payload(&ctx(9)).await.unwrap_err().to_string();
    assert!(err.contains("certifies key"), "{err}");
}

#[tokio::test]
async fn user_certificate_is_refused_naming_the_type() {
    let lab = Lab::new();
    let ca = lab.keygen("ca", Kind::Ed25519);
    let host = lab.keygen("host", Kind::Ed25519);
    let cert = lab.sign(
        &ca,
        &host,
        "user-cert.pub",
        &["-I", "keyid", "-n", "host1", "-V", "-5m:+1h"],
    );
    let err = refused_at_begin(&lab.server(&[&ca]), &payload_of(&cert)).await;
    assert!(
        err.contains("user certificate, not a host certificate"),
        "{err}"
    );
}

#[tokio::test]
async fn certificate_from_a_ca_not_on_the_list_is_refused() {
    let lab = Lab::new();
    let trusted = lab.keygen("trusted", Kind::Ed25519);
    let rogue = lab.keygen("rogue", Kind::Ed25519);
    let host = lab.keygen("host", Kind::Ed25519);
    let cert = lab.host_cert(&rogue, &host, "host-cert.pub");
    let err = refused_at_begin(&lab.server(&[&trusted]), &payload_of(&cert)).await;
    assert!(
        err.contains(&format!(
            "signed by CA {}, which is not in cert_authorities",
            lab.fingerprint(&rogue)
        )),
        "{err}"
    );
}

#[tokio::test]
async fn expired_and_not_yet_valid_certificates_are_refused_with_their_times() {
    let lab = Lab::new();
    let ca = lab.keygen("ca", Kind::Ed25519);
    let host = lab.keygen("host", Kind::Ed25519);
    let server = lab.server(&[&ca]);

    let expired = lab.sign(
        &ca,
        &host,
        "expired-cert.pub",
        &["-h", "-I", "k", "-n", "host1", "-V", "20200101:20200102"],
    );
    let err = refused_at_begin(&server, &payload_of(&expired)).await;
    assert!(err.contains("expired at 2020-01-02T00:00:00Z"), "{err}");

    let future = lab.sign(
        &ca,
        &host,
        "future-cert.pub",
        &["-h", "-I", "k", "-n", "host1", "-V", "+1d:+2d"],
    );
    let err = refused_at_begin(&server, &payload_of(&future)).await;
    assert!(err.contains("is not valid before"), "{err}");
}

/// The validity window is checked at the server's clock (its context's): the same
/// certificate (valid from 5 minutes ago for an hour) attests now, is refused as expired
/// two hours on and as not yet valid an hour back, each message naming the clock's time.
#[tokio::test]
async fn the_validity_window_is_checked_at_the_servers_clock() {
    let lab = Lab::new();
    let ca = lab.keygen("ca", Kind::Ed25519);
    let host = lab.keygen("host", Kind::Ed25519);
    let cert = lab.host_cert(&ca, &host, "host-cert.pub");
    let clock = Arc::new(ManualClock::starting_now());
    let server = lab.server_on(&[&ca], None, clock.clone());
    let agent = lab.agent(&host, &cert).unwrap();
    attest(&server, &agent, &ctx(1)).await.unwrap();

    clock.advance(Duration::from_secs(2 * 3_600));
    let err = refused_at_begin(&server, &payload_of(&cert)).await;
    assert!(err.contains("the host certificate expired at"), "{err}");
    assert!(
        err.contains(&format!("(it is now {})", rfc3339(clock.unix_now()))),
        "{err}"
    );

    clock.rewind(Duration::from_secs(3 * 3_600));
    let err = refused_at_begin(&server, &payload_of(&cert)).await;
    assert!(err.contains("is not valid before"), "{err}");
    assert!(
        err.contains(&format!("(it is now {})", rfc3339(clock.unix_now()))),
        "{err}"
    );
}

#[tokio::test]
async fn certificate_with_altered_ca_signature_is_refused() {
    let lab = Lab::new();
    let ca = lab.keygen("ca", Kind::Ed25519);
    let host = lab.keygen("host", Kind::Ed25519);
    let cert = lab.host_cert(&ca, &host, "host-cert.pub");
    // The CA's ed25519 signature is the last 64 bytes of the blob: change one base64
    // digit inside it (away from the final, possibly padded, quantum).
    let text = std::fs::read_to_string(&cert).unwrap();
    let mut fields: Vec<String> = text.split_whitespace().map(str::to_owned).collect();
    let blob = &mut fields[1];
    let i = blob.trim_end_matches('=').len() - 12;
    let c = blob.as_bytes()[i];
    let forged = if c == b'A' { "B" } else { "A" };
    blob.replace_range(i..=i, forged);
    std::fs::write(&cert, fields.join(" ")).unwrap();

    let err = refused_at_begin(&lab.server(&[&ca]), &payload_of(&cert)).await;
    assert!(
        err.contains("the CA signature on the host certificate does not verify"),
        "{err}"
    );
}

#[tokio::test]
async fn proof_signed_by_another_key_than_the_certificates_is_refused() {
    let lab = Lab::new();
    let ca = lab.keygen("ca", Kind::Ed25519);
    let host = lab.keygen("host", Kind::Ed25519);
    let intruder = lab.keygen("intruder", Kind::Ed25519);
    let cert = lab.host_cert(&ca, &host, "host-cert.pub");
    let server = lab.server(&[&ca]);
    let agent = lab.agent(&host, &cert).unwrap();
    let intruder_key = PrivateKey::read_openssh_file(&intruder).unwrap();
    let c = ctx(7);

    // An honest SSHSIG by the intruder's key, over the right message.
    let payload = agent.payload(&c).await.unwrap();
    let AttestationStep::Challenge { challenge, session } =
        server.begin(&payload, &c).await.unwrap()
    else {
        panic!("expected a challenge");
    };
    let ch: Challenge = wire::decode("challenge", &challenge).unwrap();
    let server_nonce = wire::unb64("nonce", &ch.nonce).unwrap();
    let agent_nonce = [5u8; 32];
    let msg = signed_message(&server_nonce, &agent_nonce, &c.tls_exporter).unwrap();
    let sig = intruder_key
        .sign(SSHSIG_NAMESPACE, HashAlg::Sha512, &msg)
        .unwrap();
    let answer = |sig: &SshSig| {
        wire::encode(&Answer {
            version: wire::VERSION,
            nonce: wire::b64(&agent_nonce),
            signature: sig.to_pem(LineEnding::LF).unwrap(),
        })
        .unwrap()
    };
    let err = session
        .respond(&answer(&sig))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("signature does not verify"), "{err}");
    assert!(err.contains("not by the host certificate's key"), "{err}");

    // The same signature relabelled as made by the host key.
    let AttestationStep::Challenge { challenge, session } =
        server.begin(&payload, &c).await.unwrap()
    else {
        panic!("expected a challenge");
    };
    let ch: Challenge = wire::decode("challenge", &challenge).unwrap();
    let server_nonce = wire::unb64("nonce", &ch.nonce).unwrap();
    let msg = signed_message(&server_nonce, &agent_nonce, &c.tls_exporter).unwrap();
    let by_intruder = intruder_key
        .sign(SSHSIG_NAMESPACE, HashAlg::Sha512, &msg)
        .unwrap();
    let host_public = PrivateKey::read_openssh_file(&host)
        .unwrap()
        .public_key()
        .key_data()
        .clone();
    let relabelled = SshSig::new(
        host_public,
        SSHSIG_NAMESPACE,
        HashAlg::Sha512,
        by_intruder.signature().clone(),
    )
    .unwrap();
    let err = session
        .respond(&answer(&relabelled))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("signature does not verify"), "{err}");
}

#[tokio::test]
async fn proof_in_another_sshsig_namespace_is_refused() {
    let lab = Lab::new();
    let ca = lab.keygen("ca", Kind::Ed25519);
    let host = lab.keygen("host", Kind::Ed25519);
    let cert = lab.host_cert(&ca, &host, "host-cert.pub");
    let server = lab.server(&[&ca]);
    let host_key = PrivateKey::read_openssh_file(&host).unwrap();
    let c = ctx(7);
    let AttestationStep::Challenge { challenge, session } =
        server.begin(&payload_of(&cert), &c).await.unwrap()
    else {
        panic!("expected a challenge");
    };
    let ch: Challenge = wire::decode("challenge", &challenge).unwrap();
    let server_nonce = wire::unb64("nonce", &ch.nonce).unwrap();
    let agent_nonce = [5u8; 32];
    let msg = signed_message(&server_nonce, &agent_nonce, &c.tls_exporter).unwrap();
    // What `ssh-keygen -Y sign -n file` would make over the same message.
    let sig = host_key.sign("file", HashAlg::Sha512, &msg).unwrap();
    let answer = wire::encode(&Answer {
        version: wire::VERSION,
        nonce: wire::b64(&agent_nonce),
        signature: sig.to_pem(LineEnding::LF).unwrap(),
    })
    .unwrap();
    let err = session.respond(&answer).await.unwrap_err().to_string();
    assert!(err.contains("signature does not verify"), "{err}");
    assert!(err.contains("namespace \"file\""), "{err}");
}

#[tokio::test]
async fn answer_bound_to_another_tls_connection_is_refused() {
    let lab = Lab::new();
    let ca = lab.keygen("ca", Kind::Ed25519);
    let host = lab.keygen("host", Kind::Ed25519);
    let cert = lab.host_cert(&ca, &host, "host-cert.pub");
    let server = lab.server(&[&ca]);
    let agent = lab.agent(&host, &cert).unwrap();
    // A relay: the server's connection has exporter 7, the agent's (to the relay) 8.
    let payload = agent.payload(&ctx(8)).await.unwrap();
    let AttestationStep::Challenge { challenge, session } =
        server.begin(&payload, &ctx(7)).await.unwrap()
    else {
        panic!("expected a challenge");
    };
    let answer = agent.answer(&challenge, &ctx(8)).await.unwrap();
    let err = session.respond(&answer).await.unwrap_err().to_string();
    assert!(
        err.contains("signature does not verify") && err.contains("this TLS connection"),
        "{err}"
    );
}

#[tokio::test]
async fn answer_replayed_to_a_new_challenge_is_refused() {
    let lab = Lab::new();
    let ca = lab.keygen("ca", Kind::Ed25519);
    let host = lab.keygen("host", Kind::Ed25519);
    let cert = lab.host_cert(&ca, &host, "host-cert.pub");
    let server = lab.server(&[&ca]);
    let agent = lab.agent(&host, &cert).unwrap();
    let c = ctx(7);
    let payload = agent.payload(&c).await.unwrap();
    let AttestationStep::Challenge { challenge, session } =
        server.begin(&payload, &c).await.unwrap()
    else {
        panic!("expected a challenge");
    };
    let answer = agent.answer(&challenge, &c).await.unwrap();
    assert!(matches!(
        session.respond(&answer).await.unwrap(),
        AttestationStep::Done(_)
    ));

    // Same connection, same certificate, a fresh challenge: the old answer fails.
    let AttestationStep::Challenge { session, .. } = server.begin(&payload, &c).await.unwrap()
    else {
        panic!("expected a challenge");
    };
    let err = session.respond(&answer).await.unwrap_err().to_string();
    assert!(err.contains("signature does not verify"), "{err}");
}

#[tokio::test]
async fn valid_forever_certificate_is_refused_with_the_deliberate_message() {
    let lab = Lab::new();
    let ca = lab.keygen("ca", Kind::Ed25519);
    let host = lab.keygen("host", Kind::Ed25519);
    let cert = lab.sign(
        &ca,
        &host,
        "forever-cert.pub",
        &["-h", "-I", "k", "-n", "host1"],
    );
    let listing = common::ssh_keygen(&["-L", "-f", cert.to_str().unwrap()]);
    assert!(listing.contains("Valid: forever"), "{listing}");
    let err = refused_at_begin(&lab.server(&[&ca]), &payload_of(&cert)).await;
    assert!(err.contains("valid forever (no expiry)"), "{err}");
    assert!(err.contains("-V +52w"), "{err}");
}

#[tokio::test]
async fn certificate_with_a_critical_option_is_refused_naming_it() {
    let lab = Lab::new();
    let ca = lab.keygen("ca", Kind::Ed25519);
    let host = lab.keygen("host", Kind::Ed25519);
    let cert = lab.sign(
        &ca,
        &host,
        "crit-cert.pub",
        &[
            "-h",
            "-I",
            "k",
            "-n",
            "host1",
            "-V",
            "-5m:+1h",
            "-O",
            "critical:restrict-to@example.com=x",
        ],
    );
    let listing = common::ssh_keygen(&["-L", "-f", cert.to_str().unwrap()]);
    assert!(listing.contains("restrict-to@example.com"), "{listing}");
    let err = refused_at_begin(&lab.server(&[&ca]), &payload_of(&cert)).await;
    assert!(
        err.contains("critical option(s) [\"restrict-to@example.com\"]"),
        "{err}"
    );
}

#[tokio::test]
async fn certificate_without_principals_is_refused() {
    let lab = Lab::new();
    let ca = lab.keygen("ca", Kind::Ed25519);
    let host = lab.keygen("host", Kind::Ed25519);
    let cert = lab.sign(
        &ca,
        &host,
        "any-cert.pub",
        &["-h", "-I", "k", "-V", "-5m:+1h"],
    );
    let err = refused_at_begin(&lab.server(&[&ca]), &payload_of(&cert)).await;
    assert!(err.contains("names no principals"), "{err}");
}

#[tokio::test]
async fn canonical_domain_match_is_accepted_and_mismatch_refused() {
    let lab = Lab::new();
    let ca = lab.keygen("ca", Kind::Ed25519);
    let host = lab.keygen("host", Kind::Ed25519);
    let cert = lab.host_cert(&ca, &host, "host-cert.pub");
    let agent = lab.agent(&host, &cert).unwrap();

    // host1.example.com is in example.com (case does not matter); every principal,
    // even the short name, is still a selector.
    for domain in ["example.com", "EXAMPLE.com"] {
        let server = lab.server_with(&[&ca], Some(domain));
        let result = attest(&server, &agent, &ctx(7)).await.unwrap();
        let got: Vec<String> = result.selectors.iter().map(ToString::to_string).collect();
        assert!(
            got.contains(&"sshpop:principal:host1".to_owned()),
            "{got:?}"
        );
    }

    let err = refused_at_begin(
        &lab.server_with(&[&ca], Some("example.org")),
        &payload_of(&cert),
    )
    .await;
    assert!(
        err.contains("no principal of the host certificate (host1.example.com, host1) is in canonical_domain example.org"),
        "{err}"
    );

    // A suffix match is on a label boundary: notexample.com is not in example.com.
    let lookalike = lab.sign(
        &ca,
        &host,
        "lookalike-cert.pub",
        &["-h", "-I", "k", "-n", "notexample.com", "-V", "-5m:+1h"],
    );
    let err = refused_at_begin(
        &lab.server_with(&[&ca], Some("example.com")),
        &payload_of(&lookalike),
    )
    .await;
    assert!(err.contains("is in canonical_domain"), "{err}");
}

#[tokio::test]
async fn malformed_payloads_and_answers_are_refused_by_name() {
    let lab = Lab::new();
    let ca = lab.keygen("ca", Kind::Ed25519);
    let host = lab.keygen("host", Kind::Ed25519);
    let cert = lab.host_cert(&ca, &host, "host-cert.pub");
    let server = lab.server(&[&ca]);

    for (payload, want) in [
        (b"not json".to_vec(), "malformed payload"),
        (br#"{"version":1}"#.to_vec(), "malformed payload"),
        (
            br#"{"version":1,"certificate":"","extra":1}"#.to_vec(),
            "malformed payload",
        ),
        (br#"{"version":2,"certificate":""}"#.to_vec(), "version 2"),
        (
            br#"{"version":1,"certificate":"!!"}"#.to_vec(),
            "certificate is not base64",
        ),
        (
            br#"{"version":1,"certificate":"AAAA"}"#.to_vec(),
            "cannot be decoded",
        ),
        (vec![b' '; 64 * 1024 + 1], "more than 65536"),
    ] {
        let err = refused_at_begin(&server, &payload).await;
        assert!(err.contains(want), "{want}: {err}");
    }

    // A TLS exporter of the wrong size is refused before any work.
    let mut short = ctx(7);
    short.tls_exporter.truncate(16);
    let err = server
        .begin(&payload_of(&cert), &short)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("TLS exporter is 16 bytes"), "{err}");

    let good_nonce = wire::b64(&[1u8; 32]);
    for (answer, want) in [
        (b"{".to_vec(), "malformed answer".to_owned()),
        (
            br#"{"version":1,"nonce":"AAAA"}"#.to_vec(),
            "malformed answer".to_owned(),
        ),
        (
            format!(
                r#"{{"version":1,"nonce":"{}","signature":"x"}}"#,
                wire::b64(&[1, 2, 3])
            )
            .into_bytes(),
            "agent nonce is 3 bytes, not 32".to_owned(),
        ),
        (
            format!(r#"{{"version":1,"nonce":"{good_nonce}","signature":"x"}}"#).into_bytes(),
            "not an SSH signature".to_owned(),
        ),
        (
            format!(r#"{{"version":9,"nonce":"{good_nonce}","signature":"x"}}"#).into_bytes(),
            "version 9".to_owned(),
        ),
    ] {
        let AttestationStep::Challenge { session, .. } =
            server.begin(&payload_of(&cert), &ctx(7)).await.unwrap()
        else {
            panic!("expected a challenge");
        };
        let err = session.respond(&answer).await.unwrap_err().to_string();
        assert!(err.contains(&want), "{want}: {err}");
    }
}

/// The agent's proof is a standard SSHSIG: OpenSSH's own `ssh-keygen -Y
/// check-novalidate` accepts it over the message both halves compute, in the
/// documented namespace (for the RSA path, which does not go through ssh-key's signer,
/// and an ECDSA one).
#[tokio::test]
async fn agent_proof_is_an_sshsig_that_ssh_keygen_itself_verifies() {
    let lab = Lab::new();
    let ca = lab.keygen("ca", Kind::Ed25519);
    for (name, kind) in [("rsa", Kind::Rsa), ("p384", Kind::P384)] {
        let host = lab.keygen(name, kind);
        let cert = lab.host_cert(&ca, &host, &format!("{name}-cert.pub"));
        let agent = lab.agent(&host, &cert).unwrap();
        let c = ctx(3);
        let server_nonce = [9u8; 32];
        let challenge = wire::encode(&Challenge {
            version: wire::VERSION,
            nonce: wire::b64(&server_nonce),
        })
        .unwrap();
        let answer: Answer =
            wire::decode("answer", &agent.answer(&challenge, &c).await.unwrap()).unwrap();
        let agent_nonce = wire::unb64("nonce", &answer.nonce).unwrap();
        let msg = signed_message(&server_nonce, &agent_nonce, &c.tls_exporter).unwrap();
        let sig_path = lab.path(&format!("{name}.sig"));
        std::fs::write(&sig_path, &answer.signature).unwrap();
        let out = std::process::Command::new("ssh-keygen")
            .args(["-Y", "check-novalidate", "-n", SSHSIG_NAMESPACE, "-s"])
            .arg(&sig_path)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write as _;
                child.stdin.take().unwrap().write_all(&msg)?;
                child.wait_with_output()
            })
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test]
async fn certificate_with_a_sha1_ca_signature_is_refused() {
    let lab = Lab::new();
    let ca = lab.keygen("ca", Kind::Rsa);
    let host = lab.keygen("host", Kind::Ed25519);
    // `-t ssh-rsa` makes ssh-keygen sign the certificate with RSA/SHA-1. ssh-key 0.6.7
    // cannot even decode such a certificate; either way it must not attest.
    let cert = lab.sign(
        &ca,
        &host,
        "host-cert.pub",
        &[
            "-t", "ssh-rsa", "-h", "-I", "keyid", "-n", "host1", "-V", "-5m:+1h",
        ],
    );
    let err = refused_at_begin(&lab.server(&[&ca]), &payload_of(&cert)).await;
    assert!(
        err.contains("with SHA-1 (ssh-rsa), which sshpop refuses")
            || err.contains("the host certificate cannot be decoded"),
        "{err}"
    );
}
