//! The JWT-SVID signing keys of the trust domain: the JWT lane of the [`CaManager`].
//!
//! Keys live in the KeyManager (an HSM with `[key_manager.pkcs11]`), like the X.509 CA
//! keys, and rotate the same way: a *prepared* key is published in the bundle before it
//! signs anything, an *active* key signs, *old* keys stay in the bundle until the last
//! token they signed has expired. The rotator prepares the next key at the active key's
//! half-life and activates it at five sixths of its life (the X.509 ratios and caps), and
//! never before the prepared key has been in the bundle for three bundle refresh periods,
//! so every agent and federated peer holds it before a token it signed reaches them.
//!
//! The published set stays bounded (SPIRE's grew by a key per restart, spire#4429, and
//! broke JWKS consumers at 100 keys, spire#4699): a restart finds the active key again
//! by its journal entry; at most one old key is ever kept (the rotator waits for it to
//! leave before activating the next, an operator's `activate` is refused while one is
//! still trusted), so the bundle holds at most the previous, current and next key.
//!
//! A token's `exp` never passes its key's `not_after` (SPIRE minted already-expired
//! tokens when its key lapsed, spire#1542), and an old key leaves the bundle at the
//! latest `exp` it signed, or its `not_after` when that is unknown (after a restart).
//!
//! `kid` is the RFC 7638 thumbprint of the public key: stable and unique per key.
//!
//! [`CaManager`]: crate::ca::CaManager

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use carapace_core::plugin::{KeyManager, KeySigner};
use carapace_core::{JwtKey, KeyType, SpiffeId, jose};

use crate::ca::{AuthorityStatus, BACKDATE};
use crate::{Error, Result};

/// Default JWT-SVID lifetime.
pub const DEFAULT_JWT_SVID_TTL: Duration = Duration::from_secs(300);

/// How JWT-SVIDs are made: what the node and admin APIs sign with.
#[derive(Debug, Clone)]
pub struct JwtSettings {
    /// Lifetime of JWT-SVIDs whose entry asks for none.
    pub default_ttl: Duration,
    /// The `iss` claim, when configured (`jwt_issuer`).
    pub issuer: Option<String>,
}

impl Default for JwtSettings {
    fn default() -> Self {
        JwtSettings {
            default_ttl: DEFAULT_JWT_SVID_TTL,
            issuer: None,
        }
    }
}

/// The most audiences one JWT-SVID names.
pub const MAX_AUDIENCES: usize = 32;
/// The longest audience, in bytes.
pub const MAX_AUDIENCE_LEN: usize = 1024;
/// How many bundle refresh periods a prepared key is published before it signs.
pub const PUBLISH_PERIODS: i64 = 3;

/// Checks the audience list of a JWT-SVID request: 1 to [`MAX_AUDIENCES`] values, each
/// 1 to [`MAX_AUDIENCE_LEN`] bytes without control characters.
pub fn check_audiences(audiences: &[String]) -> Result<()> {
    if audiences.is_empty() {
        return Err(Error::InvalidArgument(
            "audience is required: at least one".into(),
        ));
    }
    if audiences.len() > MAX_AUDIENCES {
        return Err(Error::InvalidArgument(format!(
            "audience: {} values, at most {MAX_AUDIENCES} are allowed",
            audiences.len()
        )));
    }
    for (i, a) in audiences.iter().enumerate() {
        if a.is_empty() {
            return Err(Error::InvalidArgument(format!("audience[{i}] is empty")));
        }
        if a.len() > MAX_AUDIENCE_LEN {
            return Err(Error::InvalidArgument(format!(
                "audience[{i}] is {} bytes long, at most {MAX_AUDIENCE_LEN} are allowed",
                a.len()
            )));
        }
        if a.chars().any(char::is_control) {
            return Err(Error::InvalidArgument(format!(
                "audience[{i}] contains a control character"
            )));
        }
    }
    Ok(())
}

/// A JWT `kid` as typed by an operator: base64url characters, 1 to 128 of them.
pub fn normalize_kid(id: &str) -> Result<String> {
    let id = id.trim();
    if id.is_empty() {
        return Err(Error::InvalidArgument("authority_id is required".into()));
    }
    if id.len() > 128
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(Error::InvalidArgument(
            "authority_id: not a JWT key id (base64url, as `localauthority jwt show` prints it)"
                .into(),
        ));
    }
    Ok(id.to_owned())
}

/// One JWT signing key that is active or prepared: its handle in the key manager.
pub struct JwtSlot {
    journal: JwtJournalKey,
    signer: Arc<dyn KeySigner>,
    /// The latest `exp` this process signed with the key (its `not_after` when restored:
    /// what an earlier process signed is unknown).
    max_exp: AtomicI64,
}

impl std::fmt::Debug for JwtSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtSlot")
            .field("kid", &self.journal.kid)
            .field("key_id", &self.journal.key_id)
            .field("not_after", &self.journal.not_after)
            .finish_non_exhaustive()
    }
}

impl JwtSlot {
    /// The key's `kid`.
    pub fn kid(&self) -> &str {
        &self.journal.kid
    }
    /// The key's id in the key manager.
    pub fn key_id(&self) -> &str {
        &self.journal.key_id
    }
    /// Unix seconds after which the key signs nothing.
    pub fn not_after(&self) -> i64 {
        self.journal.not_after
    }
    /// Whether signing may block (an HSM): async callers use a blocking thread.
    pub fn may_block(&self) -> bool {
        self.signer.may_block()
    }
    fn prepare_at(&self) -> i64 {
        let j = &self.journal;
        let life = j.not_after - j.not_before;
        j.not_after - (life / 2).min(30 * 86_400)
    }
    fn activate_at(&self) -> i64 {
        let j = &self.journal;
        let life = j.not_after - j.not_before;
        j.not_after - (life / 6).min(7 * 86_400)
    }
    /// The same key with `journal` (a changed publication time, say).
    fn with_journal(&self, journal: JwtJournalKey) -> Arc<JwtSlot> {
        Arc::new(JwtSlot {
            journal,
            signer: self.signer.clone(),
            max_exp: AtomicI64::new(self.max_exp.load(Ordering::Relaxed)),
        })
    }
    /// The key as a bundle publishes it.
    fn bundle_key(&self) -> Result<JwtKey> {
        Ok(JwtKey {
            kid: self.journal.kid.clone(),
            public_key_der: self.journal.public_key_der()?,
            expires_at: Some(self.journal.leaves_at()),
        })
    }
    /// The journal entry of this key as an old key from `now`: it stays in the bundle
    /// until the latest `exp` it signed.
    fn retired(&self, now: i64) -> JwtJournalKey {
        let mut j = self.journal.clone();
        j.keep_until = Some(
            self.max_exp
                .load(Ordering::Relaxed)
                .max(now)
                .min(j.not_after),
        );
        j
    }
}

/// What the journal keeps of each JWT key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct JwtJournalKey {
    key_id: String,
    kid: String,
    /// SubjectPublicKeyInfo, DER hex: an old key is published without its handle.
    public_key_hex: String,
    not_before: i64,
    not_after: i64,
    /// When the key entered the bundle.
    published_at: i64,
    /// Under an upstream authority: when it accepted the key into the bundle of every
    /// tier (the key's own `published_at` when the authority keeps no bundle); `None`:
    /// not yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    published_upstream_at: Option<i64>,
    /// For an old key: when it leaves the bundle (no token it signed is valid after).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    keep_until: Option<i64>,
    /// Tainted by the operator; only ever set on an old key.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    tainted: bool,
}

impl JwtJournalKey {
    pub(crate) fn is_tainted(&self) -> bool {
        self.tainted
    }
    pub(crate) fn taint(&mut self) {
        self.tainted = true;
    }
    pub(crate) fn key_id(&self) -> &str {
        &self.key_id
    }
    fn public_key_der(&self) -> Result<Vec<u8>> {
        hex::decode(&self.public_key_hex)
            .map_err(|e| Error::Ca(format!("CA journal is corrupt: JWT key {}: {e}", self.kid)))
    }
    /// When the key leaves the bundle.
    fn leaves_at(&self) -> i64 {
        self.keep_until.unwrap_or(self.not_after)
    }
}

/// The JWT keys in the CA journal.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct JwtJournal {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    active: Option<JwtJournalKey>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prepared: Option<JwtJournalKey>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    retired: Vec<JwtJournalKey>,
}

impl JwtJournal {
    pub(crate) fn is_empty(&self) -> bool {
        self.active.is_none() && self.prepared.is_none() && self.retired.is_empty()
    }
}

/// The JWT keys in memory: the handles of the active and prepared keys, the old ones.
#[derive(Debug, Clone, Default)]
pub(crate) struct JwtKeys {
    pub(crate) active: Option<Arc<JwtSlot>>,
    pub(crate) prepared: Option<Arc<JwtSlot>>,
    pub(crate) retired: Vec<JwtJournalKey>,
}

/// One JWT authority as the operator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtAuthorityInfo {
    /// The key's `kid`.
    pub id: String,
    /// Active, prepared or old.
    pub status: AuthorityStatus,
    /// When the key stops signing (active, prepared) or leaves the bundle (old).
    pub expires_at: i64,
    /// Tainted by the operator.
    pub tainted: bool,
    /// SubjectPublicKeyInfo, DER.
    pub public_key_der: Vec<u8>,
}

impl JwtAuthorityInfo {
    fn of(j: &JwtJournalKey, status: AuthorityStatus) -> Self {
        JwtAuthorityInfo {
            id: j.kid.clone(),
            status,
            expires_at: if status == AuthorityStatus::Old {
                j.leaves_at()
            } else {
                j.not_after
            },
            tainted: j.tainted,
            public_key_der: j.public_key_der().unwrap_or_default(),
        }
    }
}

/// What the rotator and the operator's steps mint JWT keys with.
pub(crate) struct Minter<'a> {
    pub(crate) km: &'a Arc<dyn KeyManager>,
    pub(crate) key_type: KeyType,
    pub(crate) ttl: Duration,
}

impl Minter<'_> {
    /// A new key `jwt-key-{seq}`, published from `now`.
    pub(crate) async fn mint(&self, seq: u64, now: i64) -> Result<Arc<JwtSlot>> {
        let key_id = format!("jwt-key-{seq}");
        let not_after = carapace_core::limits::unix_plus(now, self.ttl)
            .filter(|t| *t <= carapace_core::limits::MAX_UNIX_TIME)
            .ok_or_else(|| Error::Config("ca_ttl from now is out of range".into()))?;
        // A key left over from a crash between key creation and journal write.
        if self.km.get_key(&key_id).await.is_ok() {
            self.km.delete_key(&key_id).await?;
        }
        let signer = self.km.generate_key(&key_id, self.key_type).await?;
        let kid = jose::PublicKey::from_spki_der(signer.public_key_der())?.thumbprint();
        tracing::info!(key_id, kid, not_after, "minted a new JWT signing key");
        Ok(Arc::new(JwtSlot {
            journal: JwtJournalKey {
                key_id,
                kid,
                public_key_hex: hex::encode(signer.public_key_der()),
                not_before: now - BACKDATE,
                not_after,
                published_at: now,
                published_upstream_at: None,
                keep_until: None,
                tainted: false,
            },
            signer,
            max_exp: AtomicI64::new(0),
        }))
    }

    /// Finds the key of a journal entry again in the key manager.
    async fn restore(&self, j: &JwtJournalKey) -> Result<Arc<JwtSlot>> {
        let signer = self.km.get_key(&j.key_id).await.map_err(|e| {
            Error::Ca(format!(
                "JWT key {} named in the journal is not in the {} key manager: {e}",
                j.key_id,
                self.km.name()
            ))
        })?;
        if signer.public_key_der() != j.public_key_der()? {
            return Err(Error::Ca(format!(
                "JWT key {} does not match its public key in the journal",
                j.key_id
            )));
        }
        Ok(Arc::new(JwtSlot {
            journal: j.clone(),
            signer,
            max_exp: AtomicI64::new(j.not_after),
        }))
    }
}

impl JwtKeys {
    /// The keys of `journal`, found again in the key manager. A prepared key that is gone
    /// is dropped (a new one is prepared); an active one that is gone is an error.
    pub(crate) async fn restore(journal: &JwtJournal, minter: &Minter<'_>) -> Result<Self> {
        let mut keys = JwtKeys {
            retired: journal.retired.clone(),
            ..JwtKeys::default()
        };
        if let Some(j) = &journal.active {
            keys.active = Some(minter.restore(j).await?);
        }
        if let Some(j) = &journal.prepared {
            match minter.restore(j).await {
                Ok(slot) => keys.prepared = Some(slot),
                Err(e) => {
                    tracing::warn!(error = %e, "prepared JWT key could not be restored; a new one will be prepared")
                }
            }
        }
        Ok(keys)
    }

    /// The journal of these keys.
    pub(crate) fn journal(&self) -> JwtJournal {
        JwtJournal {
            active: self.active.as_ref().map(|s| s.journal.clone()),
            prepared: self.prepared.as_ref().map(|s| s.journal.clone()),
            retired: self.retired.clone(),
        }
    }

    /// The active and prepared keys the upstream authority has not accepted yet.
    pub(crate) fn unpublished_upstream(&self) -> Vec<JwtKey> {
        self.active
            .iter()
            .chain(self.prepared.iter())
            .filter(|s| s.journal.published_upstream_at.is_none())
            .filter_map(|s| s.bundle_key().ok())
            .collect()
    }

    /// Records that the upstream authority accepted key `kid` at `at`. Returns whether a
    /// key changed.
    pub(crate) fn mark_published_upstream(&mut self, kid: &str, at: i64) -> bool {
        let mut changed = false;
        for slot in [&mut self.active, &mut self.prepared].into_iter().flatten() {
            if slot.journal.kid == kid && slot.journal.published_upstream_at.is_none() {
                let mut j = slot.journal.clone();
                j.published_upstream_at = Some(at);
                *slot = slot.with_journal(j);
                changed = true;
            }
        }
        changed
    }

    /// When the key `kid` entered this server's own bundle.
    pub(crate) fn published_at(&self, kid: &str) -> Option<i64> {
        self.active
            .iter()
            .chain(self.prepared.iter())
            .find(|s| s.journal.kid == kid)
            .map(|s| s.journal.published_at)
    }

    /// The keys the bundle publishes (old, active, prepared) and the tainted kids.
    pub(crate) fn bundle_keys(&self) -> (Vec<JwtKey>, Vec<String>) {
        let mut keys = Vec::new();
        let mut tainted = Vec::new();
        for j in self
            .retired
            .iter()
            .chain(self.active.iter().map(|s| &s.journal))
            .chain(self.prepared.iter().map(|s| &s.journal))
        {
            let Ok(public_key_der) = j.public_key_der() else {
                continue;
            };
            if keys.iter().any(|k: &JwtKey| k.kid == j.kid) {
                continue;
            }
            keys.push(JwtKey {
                kid: j.kid.clone(),
                public_key_der,
                expires_at: Some(j.leaves_at()),
            });
            if j.tainted {
                tainted.push(j.kid.clone());
            }
        }
        (keys, tainted)
    }

    /// Every JWT authority: active, prepared, then the old ones newest first.
    pub(crate) fn authorities(&self) -> Vec<JwtAuthorityInfo> {
        let mut out = Vec::new();
        if let Some(a) = &self.active {
            out.push(JwtAuthorityInfo::of(&a.journal, AuthorityStatus::Active));
        }
        if let Some(p) = &self.prepared {
            out.push(JwtAuthorityInfo::of(&p.journal, AuthorityStatus::Prepared));
        }
        out.extend(
            self.retired
                .iter()
                .rev()
                .map(|j| JwtAuthorityInfo::of(j, AuthorityStatus::Old)),
        );
        out
    }

    /// One rotator step at `now`: a first key, the next one prepared, activated, old ones
    /// pruned. Returns the new keys and the key ids to delete, or None when nothing
    /// changed. `refresh` is the bundle refresh period in seconds. With `upstream`, the
    /// prepared key must also have been accepted by the upstream authority three refresh
    /// periods ago before it is activated (so that every tier validates what it signs);
    /// a key the active one's lapse forces in is activated regardless.
    pub(crate) async fn step(
        &self,
        minter: &Minter<'_>,
        next_seq: &mut u64,
        now: i64,
        refresh: i64,
        upstream: bool,
    ) -> Result<Option<(JwtKeys, Vec<String>)>> {
        let mut next = self.clone();
        let mut changed = false;
        let usable = |s: &JwtSlot| s.journal.not_after > now + BACKDATE;
        let new_key = |seq: &mut u64| {
            let s = *seq;
            *seq += 1;
            s
        };
        match self.active.clone() {
            Some(a) if usable(&a) => {
                if next.prepared.is_none() && now >= a.prepare_at() {
                    next.prepared = Some(minter.mint(new_key(next_seq), now).await?);
                    tracing::info!(
                        "prepared the next JWT signing key; it is in the bundle from now on"
                    );
                    changed = true;
                }
                let long_enough = |t: i64| now >= t + PUBLISH_PERIODS * refresh;
                let published_long_enough = next.prepared.as_ref().is_some_and(|p| {
                    long_enough(p.journal.published_at)
                        && (!upstream || p.journal.published_upstream_at.is_some_and(long_enough))
                });
                let old_still_trusted = next.retired.iter().any(|r| r.leaves_at() > now);
                if now >= a.activate_at() && published_long_enough && !old_still_trusted {
                    if let Some(p) = next.prepared.take() {
                        tracing::info!(kid = p.kid(), "activated the prepared JWT signing key");
                        next.retired.push(a.retired(now));
                        next.active = Some(p);
                        changed = true;
                    }
                }
            }
            old => {
                // No key, or the active one has lapsed: nothing could sign a JWT-SVID.
                if let Some(old) = old {
                    next.retired.push(old.retired(now));
                }
                next.active = Some(match next.prepared.take().filter(|p| usable(p)) {
                    Some(p) => p,
                    None => minter.mint(new_key(next_seq), now).await?,
                });
                changed = true;
            }
        }
        let mut delete = Vec::new();
        next.retired.retain(|r| {
            let keep = r.leaves_at() > now;
            if !keep {
                delete.push(r.key_id.clone());
            }
            keep
        });
        changed |= !delete.is_empty();
        Ok(changed.then_some((next, delete)))
    }

    /// The index of the old key `kid`, refusing the active and prepared keys by name.
    pub(crate) fn find_old(&self, verb: &str, kid: &str) -> Result<usize> {
        if self.active.as_ref().is_some_and(|a| a.kid() == kid) {
            return Err(Error::FailedPrecondition(format!(
                "cannot {verb} {kid}: it is the active JWT authority (prepare and activate another first)"
            )));
        }
        if self.prepared.as_ref().is_some_and(|p| p.kid() == kid) {
            return Err(Error::FailedPrecondition(format!(
                "cannot {verb} {kid}: it is the prepared JWT authority, which has signed nothing"
            )));
        }
        self.retired
            .iter()
            .position(|r| r.kid == kid)
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "no JWT authority {kid} (see `localauthority jwt show`)"
                ))
            })
    }

    /// The operator's `activate`: the prepared key becomes active, the active one old.
    /// Refused while another old key is still trusted (the set would grow past three).
    pub(crate) fn activate(&self, id: Option<&str>, now: i64) -> Result<JwtKeys> {
        let Some(p) = self.prepared.clone() else {
            return Err(Error::FailedPrecondition(
                "no prepared JWT authority: run `localauthority jwt prepare` first".into(),
            ));
        };
        if let Some(id) = id {
            if id != p.kid() {
                return Err(Error::InvalidArgument(format!(
                    "authority_id {id} is not the prepared JWT authority ({})",
                    p.kid()
                )));
            }
        }
        if p.journal.not_after <= now + BACKDATE {
            return Err(Error::FailedPrecondition(format!(
                "the prepared JWT authority {} has expired; prepare another",
                p.kid()
            )));
        }
        if let Some(old) = self.retired.iter().find(|r| r.leaves_at() > now) {
            return Err(Error::FailedPrecondition(format!(
                "the old JWT authority {} still verifies tokens until {} (unix); activate after \
                 it has left the bundle, or taint and revoke it first: the bundle keeps at most \
                 the previous, current and next key",
                old.kid,
                old.leaves_at()
            )));
        }
        let mut next = self.clone();
        if let Some(a) = next.active.take() {
            next.retired.push(a.retired(now));
        }
        next.active = Some(p);
        next.prepared = None;
        Ok(next)
    }
}

/// A signed JWT-SVID.
#[derive(Debug, Clone)]
pub struct IssuedJwt {
    /// The token, JWS compact serialization.
    pub token: String,
    /// Its `sub`.
    pub spiffe_id: SpiffeId,
    /// `exp`, unix seconds.
    pub expires_at: i64,
    /// `iat`, unix seconds.
    pub issued_at: i64,
}

/// What one JWT-SVID says.
#[derive(Debug, Clone)]
pub struct JwtRequest {
    /// `sub`.
    pub spiffe_id: SpiffeId,
    /// `aud`, checked with [`check_audiences`].
    pub audiences: Vec<String>,
    /// Lifetime wanted; `exp` is cut to the key's `not_after`.
    pub ttl: Duration,
    /// `iss`, when configured.
    pub issuer: Option<String>,
    /// Whether to add a random `jti`.
    pub include_jti: bool,
}

/// Signs `req` with `slot` at `now`. Runs on the calling thread (the key may block).
pub fn sign(slot: &JwtSlot, req: &JwtRequest, now: i64) -> Result<IssuedJwt> {
    check_audiences(&req.audiences)?;
    let exp = carapace_core::limits::unix_plus(now, req.ttl)
        .unwrap_or(i64::MAX)
        .min(slot.journal.not_after);
    if exp <= now {
        return Err(Error::Ca(format!(
            "the active JWT key {} has expired",
            slot.kid()
        )));
    }
    let mut claims = Map::new();
    claims.insert("sub".into(), json!(req.spiffe_id.as_str()));
    claims.insert("aud".into(), json!(req.audiences));
    claims.insert("exp".into(), json!(exp));
    claims.insert("iat".into(), json!(now));
    if let Some(iss) = &req.issuer {
        claims.insert("iss".into(), json!(iss));
    }
    if req.include_jti {
        use rand::RngCore;
        let mut bytes = [0u8; 16];
        rand::rng().fill_bytes(&mut bytes);
        claims.insert("jti".into(), Value::String(hex::encode(bytes)));
    }
    let token = jose::sign(Some(slot.kid()), &claims, slot.signer.as_ref())?;
    slot.max_exp.fetch_max(exp, Ordering::Relaxed);
    Ok(IssuedJwt {
        token,
        spiffe_id: req.spiffe_id.clone(),
        expires_at: exp,
        issued_at: now,
    })
}

#[cfg(test)]
#[path = "jwt_keys_tests.rs"]
mod tests;
