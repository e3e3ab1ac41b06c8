//! The `join_token` node attestor: an operator-issued, single-use, expiring secret.
//!
//! A token is `<id>.<secret>`: the id (8 random bytes, hex) names the token and becomes
//! the agent's ID (`spiffe://<td>/spire/agent/join_token/<id>`); the secret (24 random
//! bytes, hex) is stored only as its SHA-256. Attestation looks the token up by id,
//! compares the secret's hash in constant time and checks its expiry; it does not
//! consume it. The server consumes the token ([`presented_token`]) with a conditional
//! delete in the transaction that records the agent (`Datastore::attest_agent`), so of
//! two agents racing with one token exactly one wins, a wrong guess does not burn the
//! token, and a failed write (a full disk) leaves it usable for a retry. Neither the
//! token nor the secret is ever logged.

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use carapace_core::clock::unix_now;
use carapace_core::plugin::{AttestationContext, AttestationResult, AttestationStep, NodeAttestor};
use carapace_core::{Error, SelectorSet};

use crate::datastore::{Datastore, PresentedToken};

/// The attestor's name, the `<attestor>` segment of its agents' IDs.
pub const NAME: &str = "join_token";

/// The one message for unknown, wrong, expired and already used tokens: the caller
/// learns nothing.
pub(crate) const REJECTED: &str = "join token is unknown, expired or already used";

/// A freshly generated token.
#[derive(Debug)]
pub struct GeneratedToken {
    /// The public id.
    pub id: String,
    /// The whole token to give the agent, `<id>.<secret>`.
    pub token: Zeroizing<String>,
    /// SHA-256 of the secret, what the datastore keeps.
    pub secret_hash: [u8; 32],
}

/// Generates a new join token.
pub fn generate_join_token() -> GeneratedToken {
    let mut id = [0u8; 8];
    let mut secret = Zeroizing::new([0u8; 24]);
    rand::rng().fill_bytes(&mut id);
    rand::rng().fill_bytes(secret.as_mut());
    let secret_hex = Zeroizing::new(hex::encode(secret.as_ref()));
    let id = hex::encode(id);
    GeneratedToken {
        token: Zeroizing::new(format!("{id}.{}", secret_hex.as_str())),
        secret_hash: Sha256::digest(secret_hex.as_bytes()).into(),
        id,
    }
}

/// The server half of join token attestation.
#[derive(Debug)]
pub struct JoinTokenAttestor {
    ds: Datastore,
}

impl JoinTokenAttestor {
    /// An attestor over the datastore's join tokens.
    pub fn new(ds: Datastore) -> Self {
        JoinTokenAttestor { ds }
    }
}

fn rejected() -> Error {
    Error::AttestationRejected(REJECTED.into())
}

/// [`REJECTED`] as the server's error.
pub(crate) fn server_rejected() -> crate::Error {
    crate::Error::Core(rejected())
}

/// The token a `join_token` attestation payload presents (its id and the hash of its
/// secret), or `None` if the payload is not a well-formed token. The server consumes it
/// when it records the agent, after [`JoinTokenAttestor`] accepted the same payload.
pub fn presented_token(payload: &[u8]) -> Option<PresentedToken> {
    let token = std::str::from_utf8(payload).ok()?;
    let (id, secret) = token.split_once('.')?;
    if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) || secret.is_empty() {
        return None;
    }
    Some(PresentedToken {
        id: id.to_owned(),
        secret_hash: Sha256::digest(secret.as_bytes()).into(),
    })
}

#[async_trait::async_trait]
impl NodeAttestor for JoinTokenAttestor {
    fn name(&self) -> &str {
        NAME
    }

    /// Verifies the token; the server consumes it with the agent record (see the
    /// module).
    async fn begin(
        &self,
        payload: &[u8],
        _ctx: &AttestationContext,
    ) -> Result<AttestationStep, Error> {
        let presented = presented_token(payload).ok_or_else(rejected)?;
        let id = presented.id.as_str();
        let now = unix_now();
        let stored = self
            .ds
            .get_join_token(id)
            .await
            .map_err(|e| Error::KeyBackend(format!("datastore: {e}")))?
            .ok_or_else(rejected)?;
        if !bool::from(stored.secret_hash.ct_eq(&presented.secret_hash)) {
            tracing::warn!(token_id = id, "join token presented with a wrong secret");
            return Err(rejected());
        }
        if stored.expires_at <= now {
            tracing::warn!(token_id = id, "expired join token presented");
            return Err(rejected());
        }
        Ok(AttestationStep::Done(AttestationResult {
            agent_path: id.to_owned(),
            selectors: SelectorSet::new(),
            can_reattest: false,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn ctx() -> AttestationContext {
        AttestationContext {
            agent_public_key: Vec::new(),
            tls_exporter: vec![0; 32],
        }
    }

    async fn attestor_with_token(ttl: i64) -> (Arc<JoinTokenAttestor>, GeneratedToken, Datastore) {
        let ds = Datastore::open_in_memory().await.unwrap();
        let t = generate_join_token();
        let now = unix_now();
        ds.create_join_token(&t.id, &t.secret_hash, now + ttl, now, None)
            .await
            .unwrap();
        (Arc::new(JoinTokenAttestor::new(ds.clone())), t, ds)
    }

    fn done(step: AttestationStep) -> AttestationResult {
        match step {
            AttestationStep::Done(r) => r,
            other => panic!("expected Done, got {other:?}"),
        }
    }

    /// What the server does with a token: the attestor verifies it, then the agent
    /// record is written with the token consumed in the same transaction.
    async fn attest(a: &JoinTokenAttestor, ds: &Datastore, token: &str) -> crate::Result<()> {
        let r = done(a.begin(token.as_bytes(), &ctx()).await?);
        let presented = presented_token(token.as_bytes()).unwrap();
        assert_eq!(presented.id, r.agent_path);
        assert!(!r.can_reattest);
        let agent = admitted(&r.agent_path, unix_now(), r.selectors);
        ds.attest_agent(&agent, Some(&presented)).await
    }

    /// The record the server writes for the agent the token `id` admits at `now`.
    fn admitted(id: &str, now: i64, selectors: SelectorSet) -> crate::datastore::AttestedAgent {
        crate::datastore::AttestedAgent {
            spiffe_id: format!("spiffe://example.org/spire/agent/join_token/{id}")
                .parse()
                .unwrap(),
            attestor: NAME.into(),
            serial: "01".into(),
            new_serial: None,
            expires_at: now + 3600,
            banned: false,
            reattestable: false,
            attested_at: now,
            selectors,
            refused: None,
        }
    }

    fn is_refusal(e: &crate::Error) -> bool {
        matches!(e, crate::Error::Core(Error::AttestationRejected(m)) if m == REJECTED)
    }

    #[tokio::test]
    async fn a_token_works_once() {
        let (a, t, ds) = attestor_with_token(60).await;
        let r = done(a.begin(t.token.as_bytes(), &ctx()).await.unwrap());
        assert_eq!(r.agent_path, t.id);
        assert!(!r.can_reattest);
        attest(&a, &ds, &t.token).await.unwrap();
        let again = attest(&a, &ds, &t.token).await.unwrap_err();
        assert!(is_refusal(&again), "{again}");
    }

    #[tokio::test]
    async fn a_token_whose_agent_write_failed_can_be_used_again() {
        let disk = hsm_sim::tmpfs::Tmpfs::mount(1 << 20).unwrap();
        let ds = Datastore::open(&disk.path().join("ds.sqlite"))
            .await
            .unwrap();
        let t = generate_join_token();
        let now = unix_now();
        ds.create_join_token(&t.id, &t.secret_hash, now + 60, now, None)
            .await
            .unwrap();
        let a = JoinTokenAttestor::new(ds.clone());
        // The attestor accepts the token; then the disk fills up before the agent
        // record is written.
        let r = done(a.begin(t.token.as_bytes(), &ctx()).await.unwrap());
        disk.fill().unwrap();
        let agent = admitted(&r.agent_path, now, r.selectors);
        let presented = presented_token(t.token.as_bytes()).unwrap();
        let err = ds.attest_agent(&agent, Some(&presented)).await.unwrap_err();
        assert!(matches!(err, crate::Error::Datastore(_)), "{err}");
        assert!(ds.get_join_token(&t.id).await.unwrap().is_some());
        assert!(ds.list_attested_agents().await.unwrap().is_empty());
        // Space is freed: the agent's retry with the same token succeeds.
        disk.free().unwrap();
        attest(&a, &ds, &t.token).await.unwrap();
        assert_eq!(ds.list_attested_agents().await.unwrap().len(), 1);
        assert!(ds.get_join_token(&t.id).await.unwrap().is_none());
        ds.close().await;
    }

    #[tokio::test]
    async fn verifying_a_token_does_not_consume_it() {
        let (a, t, ds) = attestor_with_token(60).await;
        done(a.begin(t.token.as_bytes(), &ctx()).await.unwrap());
        done(a.begin(t.token.as_bytes(), &ctx()).await.unwrap());
        assert!(ds.get_join_token(&t.id).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_wrong_secret_is_rejected_and_does_not_burn_the_token() {
        let (a, t, ds) = attestor_with_token(60).await;
        let wrong = format!("{}.{}", t.id, "00".repeat(24));
        assert!(matches!(
            a.begin(wrong.as_bytes(), &ctx()).await,
            Err(Error::AttestationRejected(_))
        ));
        // Nor does a wrong secret that got past the attestor burn it at the write.
        let stolen_id = PresentedToken {
            id: t.id.clone(),
            secret_hash: [0; 32],
        };
        let agent = admitted(&t.id, unix_now(), SelectorSet::new());
        let err = ds.attest_agent(&agent, Some(&stolen_id)).await.unwrap_err();
        assert!(is_refusal(&err), "{err}");
        assert!(
            ds.get_attested_agent(&agent.spiffe_id)
                .await
                .unwrap()
                .is_none()
        );
        attest(&a, &ds, &t.token).await.unwrap();
    }

    #[tokio::test]
    async fn expired_and_malformed_tokens_are_rejected() {
        let (a, t, _) = attestor_with_token(-1).await;
        assert!(a.begin(t.token.as_bytes(), &ctx()).await.is_err());
        for bad in [&b""[..], b"nodot", b"zz.zz", &[0xff, 0xfe]] {
            assert!(a.begin(bad, &ctx()).await.is_err());
        }
    }

    #[tokio::test]
    async fn rejection_messages_never_contain_the_token() {
        let (a, t, _) = attestor_with_token(60).await;
        let wrong = format!("{}.{}", t.id, "ab".repeat(24));
        let msg = a
            .begin(wrong.as_bytes(), &ctx())
            .await
            .unwrap_err()
            .to_string();
        assert!(!msg.contains(&"ab".repeat(24)));
        assert!(!msg.contains(t.token.as_str()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_agents_racing_with_one_token_exactly_one_wins() {
        let dir = tempfile::tempdir().unwrap();
        let ds = Datastore::open(&dir.path().join("ds.sqlite"))
            .await
            .unwrap();
        let t = generate_join_token();
        let now = unix_now();
        ds.create_join_token(&t.id, &t.secret_hash, now + 60, now, None)
            .await
            .unwrap();
        let a = Arc::new(JoinTokenAttestor::new(ds.clone()));
        let barrier = Arc::new(tokio::sync::Barrier::new(16));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let a = a.clone();
            let ds = ds.clone();
            let barrier = barrier.clone();
            let token = t.token.to_string();
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                match attest(&a, &ds, &token).await {
                    Ok(()) => true,
                    Err(e) => {
                        assert!(is_refusal(&e), "{e}");
                        false
                    }
                }
            }));
        }
        let mut wins = 0;
        for task in tasks {
            if task.await.unwrap() {
                wins += 1;
            }
        }
        assert_eq!(wins, 1, "exactly one attestation may succeed");
        assert_eq!(ds.list_attested_agents().await.unwrap().len(), 1);
        assert!(ds.get_join_token(&t.id).await.unwrap().is_none());
    }
}
