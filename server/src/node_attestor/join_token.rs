//! The `join_token` node attestor: an operator-issued, single-use, expiring secret.
//!
//! A token is `<id>.<secret>`: the id (8 random bytes, hex) names the token and becomes
//! the agent's ID (`spiffe://<td>/spire/agent/join_token/<id>`); the secret (24 random
//! bytes, hex) is stored only as its SHA-256. Attestation looks the token up by id,
//! compares the secret's hash in constant time, and consumes it with a conditional
//! delete, so of two agents racing with one token exactly one wins, and a wrong guess
//! does not burn the token. Neither the token nor the secret is ever logged.

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use carapace_core::plugin::{AttestationContext, AttestationResult, AttestationStep, NodeAttestor};
use carapace_core::{Error, SelectorSet};

use crate::datastore::Datastore;

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
    // One message for unknown, wrong and expired tokens: the caller learns nothing.
    Error::AttestationRejected("join token is unknown, expired or already used".into())
}

#[async_trait::async_trait]
impl NodeAttestor for JoinTokenAttestor {
    fn name(&self) -> &str {
        "join_token"
    }

    async fn begin(
        &self,
        payload: &[u8],
        _ctx: &AttestationContext,
    ) -> Result<AttestationStep, Error> {
        let token = std::str::from_utf8(payload).map_err(|_| rejected())?;
        let (id, secret) = token.split_once('.').ok_or_else(rejected)?;
        if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) || secret.is_empty() {
            return Err(rejected());
        }
        let presented: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        let now = crate::unix_now();
        let stored = self
            .ds
            .get_join_token(id)
            .await
            .map_err(|e| Error::KeyBackend(format!("datastore: {e}")))?
            .ok_or_else(rejected)?;
        if !bool::from(stored.secret_hash.ct_eq(&presented)) {
            tracing::warn!(token_id = id, "join token presented with a wrong secret");
            return Err(rejected());
        }
        if stored.expires_at <= now {
            tracing::warn!(token_id = id, "expired join token presented");
            return Err(rejected());
        }
        let consumed = self
            .ds
            .consume_join_token(id, &stored.secret_hash, now)
            .await
            .map_err(|e| Error::KeyBackend(format!("datastore: {e}")))?;
        if !consumed {
            return Err(Error::AttestationReplay("join token"));
        }
        tracing::info!(token_id = id, "join token consumed");
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
        let now = crate::unix_now();
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

    #[tokio::test]
    async fn a_token_works_once() {
        let (a, t, _) = attestor_with_token(60).await;
        let r = done(a.begin(t.token.as_bytes(), &ctx()).await.unwrap());
        assert_eq!(r.agent_path, t.id);
        assert!(!r.can_reattest);
        let again = a.begin(t.token.as_bytes(), &ctx()).await.unwrap_err();
        assert!(
            matches!(
                again,
                Error::AttestationRejected(_) | Error::AttestationReplay(_)
            ),
            "{again}"
        );
    }

    #[tokio::test]
    async fn a_wrong_secret_is_rejected_and_does_not_burn_the_token() {
        let (a, t, _) = attestor_with_token(60).await;
        let wrong = format!("{}.{}", t.id, "00".repeat(24));
        assert!(matches!(
            a.begin(wrong.as_bytes(), &ctx()).await,
            Err(Error::AttestationRejected(_))
        ));
        done(a.begin(t.token.as_bytes(), &ctx()).await.unwrap());
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
        let now = crate::unix_now();
        ds.create_join_token(&t.id, &t.secret_hash, now + 60, now, None)
            .await
            .unwrap();
        let a = Arc::new(JoinTokenAttestor::new(ds));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let a = a.clone();
            let token = t.token.to_string();
            tasks.push(tokio::spawn(async move {
                a.begin(token.as_bytes(), &ctx()).await.is_ok()
            }));
        }
        let mut wins = 0;
        for task in tasks {
            if task.await.unwrap() {
                wins += 1;
            }
        }
        assert_eq!(wins, 1, "exactly one attestation may succeed");
    }
}
