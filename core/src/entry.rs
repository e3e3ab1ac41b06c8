//! Registration entries: which SPIFFE ID a workload (or node alias) receives, under which
//! parent, for which selectors.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, truncate_input};
use crate::limits;
use crate::selector::SelectorSet;
use crate::spiffe_id::{SpiffeId, TrustDomain};

/// The longest hint accepted, in bytes (as SPIRE).
pub const MAX_HINT_LEN: usize = 1024;

/// The most trust domains one entry may federate with.
pub const MAX_FEDERATES_WITH: usize = 1000;

/// An entry's opaque identifier (shared by its clones, which indexes hold).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryId(Arc<str>);

impl EntryId {
    /// Parses an entry id: 1 to 255 bytes of letters, digits, `-` and `_`.
    pub fn new(s: &str) -> Result<Self, Error> {
        if s.is_empty()
            || s.len() > 255
            || !s
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(Error::InvalidEntry {
                field: "id",
                reason: format!(
                    "{:?} is not an entry id (1-255 letters, digits, '-' or '_')",
                    truncate_input(s)
                ),
            });
        }
        Ok(EntryId(s.into()))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EntryId({})", self.0)
    }
}

impl std::str::FromStr for EntryId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        EntryId::new(s)
    }
}

/// A registration entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistrationEntry {
    /// Opaque id, assigned by the server.
    pub id: EntryId,
    /// The identity issued to matching workloads.
    pub spiffe_id: SpiffeId,
    /// An agent ID, the server ID (node alias), or another entry's SPIFFE ID.
    pub parent_id: SpiffeId,
    /// All of these must be among the workload's (or node's) selectors.
    pub selectors: SelectorSet,
    /// X509-SVID lifetime; `None` for the server default.
    pub x509_svid_ttl: Option<Duration>,
    /// JWT-SVID lifetime; `None` for the server default.
    pub jwt_svid_ttl: Option<Duration>,
    /// JWT-SVIDs of this entry carry a unique `jti` claim (for audiences that detect
    /// replays).
    pub jwt_svid_include_jti: bool,
    /// Extra DNS SANs; the first becomes the subject CN.
    pub dns_names: Vec<String>,
    /// A label passed to the workload with the SVID.
    pub hint: String,
    /// The SVID may call the admin API.
    pub admin: bool,
    /// The SVID may mint downstream CAs.
    pub downstream: bool,
    /// Unix seconds after which the datastore prunes the entry (not a security control).
    pub expires_at: Option<i64>,
    /// Bumped on every update.
    pub revision: u64,
    /// Unix seconds of creation.
    pub created_at: i64,
    /// Foreign trust domains whose bundles the entry's workloads receive (SPIFFE
    /// Federation): each a relationship or a static bundle on the server. No duplicates,
    /// never the entry's own trust domain.
    pub federates_with: Vec<TrustDomain>,
}

impl RegistrationEntry {
    /// Whether this is a node alias: parented to the server ID, matched against an
    /// agent's node selectors.
    pub fn is_node_alias(&self) -> bool {
        self.parent_id.is_server()
    }

    /// Checks every field against the rules for entries of trust domain `td`. Returns the
    /// first problem, naming the field.
    pub fn validate(&self, td: &TrustDomain) -> Result<(), Error> {
        let bad = |field, reason: String| Err(Error::InvalidEntry { field, reason });
        if !self.spiffe_id.is_member_of(td) {
            return bad(
                "spiffe_id",
                format!("{} is not in trust domain {td}", self.spiffe_id),
            );
        }
        if self.spiffe_id.path().is_empty() {
            return bad(
                "spiffe_id",
                format!("{} has no path; a workload ID needs one", self.spiffe_id),
            );
        }
        if self.spiffe_id.is_reserved() {
            return bad(
                "spiffe_id",
                format!(
                    "{} is under the reserved path /spire (agents and the server)",
                    self.spiffe_id
                ),
            );
        }
        if !self.parent_id.is_member_of(td) {
            return bad(
                "parent_id",
                format!("{} is not in trust domain {td}", self.parent_id),
            );
        }
        if self.parent_id == self.spiffe_id {
            return bad("parent_id", "an entry cannot be its own parent".into());
        }
        if self.selectors.is_empty() {
            return bad("selectors", "at least one selector is required".into());
        }
        if let Some(ttl) = self.x509_svid_ttl {
            if ttl.is_zero() {
                return bad("x509_svid_ttl", "must be greater than zero".into());
            }
            limits::check_duration(ttl, Duration::from_secs(1), limits::MAX_X509_SVID_TTL)
                .or_else(|reason| bad("x509_svid_ttl", reason))?;
        }
        if let Some(ttl) = self.jwt_svid_ttl {
            if ttl.is_zero() {
                return bad("jwt_svid_ttl", "must be greater than zero".into());
            }
            limits::check_duration(ttl, Duration::from_secs(1), limits::MAX_JWT_SVID_TTL)
                .or_else(|reason| bad("jwt_svid_ttl", reason))?;
        }
        if let Some(t) = self.expires_at {
            limits::check_unix_time(t).or_else(|reason| bad("expires_at", reason))?;
        }
        for name in &self.dns_names {
            validate_dns_name(name).map_err(|reason| Error::InvalidEntry {
                field: "dns_names",
                reason: format!("{:?}: {reason}", truncate_input(name)),
            })?;
        }
        if self.hint.len() > MAX_HINT_LEN {
            return bad("hint", format!("longer than {MAX_HINT_LEN} bytes"));
        }
        if self.hint.chars().any(char::is_control) {
            return bad("hint", "contains control characters".into());
        }
        if self.federates_with.len() > MAX_FEDERATES_WITH {
            return bad(
                "federates_with",
                format!("more than {MAX_FEDERATES_WITH} trust domains"),
            );
        }
        for (i, fed) in self.federates_with.iter().enumerate() {
            if fed == td {
                return bad(
                    "federates_with",
                    format!("{fed} is the entry's own trust domain; its bundle is always sent"),
                );
            }
            if self.federates_with[..i].contains(fed) {
                return bad("federates_with", format!("{fed} is named twice"));
            }
        }
        Ok(())
    }
}

/// A DNS name for a SAN: labels of letters, digits and `-`, a leading `*.` allowed.
pub fn validate_dns_name(name: &str) -> Result<(), &'static str> {
    let body = name.strip_prefix("*.").unwrap_or(name);
    if body.is_empty() || name.len() > 253 {
        return Err("must be 1 to 253 bytes");
    }
    for label in body.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("each label must be 1 to 63 bytes");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("labels cannot start or end with '-'");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err("labels may only contain letters, digits and '-'");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::selector::Selector;

    fn entry() -> RegistrationEntry {
        RegistrationEntry {
            federates_with: Vec::new(),
            id: EntryId::new("e1").unwrap(),
            spiffe_id: "spiffe://example.org/web".parse().unwrap(),
            parent_id: "spiffe://example.org/spire/agent/join_token/abc"
                .parse()
                .unwrap(),
            selectors: ["unix:uid:1000".parse::<Selector>().unwrap()]
                .into_iter()
                .collect(),
            x509_svid_ttl: None,
            jwt_svid_ttl: None,
            jwt_svid_include_jti: false,
            dns_names: vec!["web.example.org".into()],
            hint: "web".into(),
            admin: false,
            downstream: false,
            expires_at: None,
            revision: 0,
            created_at: 0,
        }
    }

    fn field_of(e: RegistrationEntry) -> &'static str {
        let td = TrustDomain::new("example.org").unwrap();
        match e.validate(&td) {
            Err(Error::InvalidEntry { field, .. }) => field,
            other => panic!("expected invalid entry, got {other:?}"),
        }
    }

    #[test]
    fn a_good_entry_validates() {
        entry()
            .validate(&TrustDomain::new("example.org").unwrap())
            .unwrap();
    }

    #[test]
    fn rejects_each_bad_field() {
        let mut e = entry();
        e.spiffe_id = "spiffe://other.org/web".parse().unwrap();
        assert_eq!(field_of(e), "spiffe_id");
        let mut e = entry();
        e.spiffe_id = "spiffe://example.org".parse().unwrap();
        assert_eq!(field_of(e), "spiffe_id");
        let mut e = entry();
        e.spiffe_id = "spiffe://example.org/spire/agent/x".parse().unwrap();
        assert_eq!(field_of(e), "spiffe_id");
        let mut e = entry();
        e.parent_id = "spiffe://other.org/agent".parse().unwrap();
        assert_eq!(field_of(e), "parent_id");
        let mut e = entry();
        e.parent_id = e.spiffe_id.clone();
        assert_eq!(field_of(e), "parent_id");
        let mut e = entry();
        e.selectors = SelectorSet::new();
        assert_eq!(field_of(e), "selectors");
        let mut e = entry();
        e.x509_svid_ttl = Some(Duration::ZERO);
        assert_eq!(field_of(e), "x509_svid_ttl");
        let mut e = entry();
        e.x509_svid_ttl = Some(Duration::from_secs(i64::MAX as u64));
        assert_eq!(field_of(e), "x509_svid_ttl");
        let mut e = entry();
        e.x509_svid_ttl = Some(limits::MAX_X509_SVID_TTL + Duration::from_secs(1));
        assert_eq!(field_of(e), "x509_svid_ttl");
        let mut e = entry();
        e.jwt_svid_ttl = Some(Duration::ZERO);
        assert_eq!(field_of(e), "jwt_svid_ttl");
        let mut e = entry();
        e.jwt_svid_ttl = Some(Duration::from_millis(500));
        assert_eq!(field_of(e), "jwt_svid_ttl");
        let mut e = entry();
        e.jwt_svid_ttl = Some(Duration::from_secs(i64::MAX as u64));
        assert_eq!(field_of(e), "jwt_svid_ttl");
        let mut e = entry();
        e.jwt_svid_ttl = Some(limits::MAX_JWT_SVID_TTL + Duration::from_secs(1));
        assert_eq!(field_of(e), "jwt_svid_ttl");
        for t in [99_999_999_999_999, limits::MAX_UNIX_TIME + 1, 0, -1] {
            let mut e = entry();
            e.expires_at = Some(t);
            assert_eq!(field_of(e), "expires_at");
        }
        let mut e = entry();
        e.dns_names = vec!["bad name".into()];
        assert_eq!(field_of(e), "dns_names");
        let mut e = entry();
        e.hint = "x".repeat(1025);
        assert_eq!(field_of(e), "hint");
        let td = |n: &str| TrustDomain::new(n).unwrap();
        let mut e = entry();
        e.federates_with = vec![td("example.org")];
        assert_eq!(field_of(e), "federates_with");
        let mut e = entry();
        e.federates_with = vec![td("a.org"), td("b.org"), td("a.org")];
        assert_eq!(field_of(e), "federates_with");
        let mut e = entry();
        e.federates_with = (0..=MAX_FEDERATES_WITH)
            .map(|i| td(&format!("t{i}.org")))
            .collect();
        assert_eq!(field_of(e), "federates_with");
        let mut e = entry();
        e.federates_with = vec![td("b.org"), td("a.org")];
        e.validate(&td("example.org")).unwrap();
    }

    #[test]
    fn extreme_but_valid_times_validate() {
        let td = TrustDomain::new("example.org").unwrap();
        let mut e = entry();
        e.x509_svid_ttl = Some(limits::MAX_X509_SVID_TTL);
        e.jwt_svid_ttl = Some(limits::MAX_JWT_SVID_TTL);
        e.jwt_svid_include_jti = true;
        e.expires_at = Some(limits::MAX_UNIX_TIME);
        e.validate(&td).unwrap();
        e.jwt_svid_ttl = Some(Duration::from_secs(1));
        e.expires_at = Some(1);
        e.validate(&td).unwrap();
    }

    #[test]
    fn dns_names() {
        for ok in ["a", "a.b", "*.example.org", "x-1.example.org"] {
            validate_dns_name(ok).unwrap();
        }
        for bad in ["", "*.", "a..b", "-a.b", "a_b.c", "a b"] {
            assert!(validate_dns_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn entry_ids() {
        EntryId::new("0b1c-22_x").unwrap();
        assert!(EntryId::new("").is_err());
        assert!(EntryId::new("a/b").is_err());
    }
}
