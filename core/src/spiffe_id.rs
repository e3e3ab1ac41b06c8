//! SPIFFE IDs and trust domains, parsed strictly by the SPIFFE ID standard.
//!
//! Parsing never normalises: an ID either is in canonical form or is rejected with the
//! rule it broke. The standard says the scheme and the trust domain compare without
//! regard to case but that the trust domain MUST be lowercase; other implementations
//! (go-spiffe, rust-spiffe) reject uppercase outright, so accepting it here would mint
//! IDs that peers refuse. The error for an uppercase trust domain names the lowercase
//! form instead.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use crate::error::{Error, truncate_input};

/// The URI scheme prefix of every SPIFFE ID.
pub const SCHEME_PREFIX: &str = "spiffe://";
/// The longest SPIFFE ID the standard requires implementations to support, in bytes.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// The longest trust domain name (the RFC 3986 host limit), in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// The rule of the SPIFFE ID standard an input broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SpiffeIdRule {
    /// The input is empty.
    Empty,
    /// The scheme is missing or is not `spiffe`.
    WrongScheme,
    /// The trust domain (URI host) is empty.
    MissingTrustDomain,
    /// The trust domain contains uppercase letters; it must be lowercase.
    TrustDomainUppercase,
    /// The trust domain contains a character outside `[a-z0-9._-]`.
    BadTrustDomainChar,
    /// The authority has a userinfo part (`user@`).
    UserInfo,
    /// The authority has a port (`:port`).
    Port,
    /// The input contains percent-encoded characters.
    PercentEncoded,
    /// The input has a query component (`?`).
    Query,
    /// The input has a fragment component (`#`).
    Fragment,
    /// The path has an empty segment (`//`).
    EmptySegment,
    /// The path has a `.` or `..` segment.
    DotSegment,
    /// The path ends with `/`.
    TrailingSlash,
    /// The path contains a character outside `[a-zA-Z0-9._-]`.
    BadPathChar,
    /// The whole ID is longer than 2048 bytes.
    TooLong,
    /// The trust domain is longer than 255 bytes.
    TrustDomainTooLong,
    /// A path was given where only a trust domain is allowed.
    UnexpectedPath,
}

impl fmt::Display for SpiffeIdRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            SpiffeIdRule::Empty => "cannot be empty",
            SpiffeIdRule::WrongScheme => "scheme must be spiffe:// (spiffe://trust-domain/path)",
            SpiffeIdRule::MissingTrustDomain => "trust domain is missing",
            SpiffeIdRule::TrustDomainUppercase => "trust domain must be lowercase",
            SpiffeIdRule::BadTrustDomainChar => {
                "trust domain characters are limited to lowercase letters, digits, '.', '-' and '_'"
            }
            SpiffeIdRule::UserInfo => "trust domain cannot contain userinfo (user@)",
            SpiffeIdRule::Port => "trust domain cannot contain a port",
            SpiffeIdRule::PercentEncoded => "percent-encoded characters are not allowed",
            SpiffeIdRule::Query => "query components are not allowed",
            SpiffeIdRule::Fragment => "fragment components are not allowed",
            SpiffeIdRule::EmptySegment => "path cannot contain empty segments (//)",
            SpiffeIdRule::DotSegment => "path cannot contain '.' or '..' segments",
            SpiffeIdRule::TrailingSlash => "path cannot end with '/'",
            SpiffeIdRule::BadPathChar => {
                "path characters are limited to letters, digits, '.', '-' and '_'"
            }
            SpiffeIdRule::TooLong => "longer than 2048 bytes",
            SpiffeIdRule::TrustDomainTooLong => "trust domain longer than 255 bytes",
            SpiffeIdRule::UnexpectedPath => "a trust domain cannot have a path",
        };
        f.write_str(text)
    }
}

/// A SPIFFE trust domain name, such as `example.org`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a trust domain from its name (`example.org`) or its SPIFFE ID form
    /// (`spiffe://example.org`, with no path).
    pub fn new(input: &str) -> Result<Self, Error> {
        let err = |rule| Error::InvalidTrustDomain {
            input: truncate_input(input),
            rule,
        };
        if input.is_empty() {
            return Err(err(SpiffeIdRule::Empty));
        }
        let name = if input.contains(":/") {
            let id = SpiffeId::from_str(input).map_err(|e| match e {
                Error::InvalidSpiffeId { rule, .. } => err(rule),
                other => other,
            })?;
            if !id.path().is_empty() {
                return Err(err(SpiffeIdRule::UnexpectedPath));
            }
            return Ok(id.trust_domain());
        } else {
            input
        };
        validate_trust_domain(name).map_err(err)?;
        Ok(TrustDomain(name.to_owned()))
    }

    /// The trust domain name, such as `example.org`.
    pub fn name(&self) -> &str {
        &self.0
    }

    /// The trust domain's own SPIFFE ID, `spiffe://example.org`.
    pub fn id_string(&self) -> String {
        format!("{SCHEME_PREFIX}{}", self.0)
    }

    /// The SPIFFE ID of the server of this trust domain, `spiffe://<td>/spire/server`.
    pub fn server_id(&self) -> SpiffeId {
        SpiffeId::from_parts(self, "/spire/server")
    }

    /// The SPIFFE ID of an agent attested by `attestor` with the node id `id`:
    /// `spiffe://<td>/spire/agent/<attestor>/<id>`. Each of `attestor` and `id` must be
    /// made of valid path segments.
    pub fn agent_id(&self, attestor: &str, id: &str) -> Result<SpiffeId, Error> {
        SpiffeId::new(self, &format!("/spire/agent/{attestor}/{id}"))
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        TrustDomain::new(s)
    }
}

impl TryFrom<String> for TrustDomain {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        TrustDomain::new(&s)
    }
}

impl<'de> serde::Deserialize<'de> for TrustDomain {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        TrustDomain::new(&s).map_err(serde::de::Error::custom)
    }
}

/// A SPIFFE ID, `spiffe://<trust domain><path>`, in canonical form.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    /// The whole ID, shared by its clones: an entry index holds each ID several times
    /// (in the entry, and as a key of the maps that lead to it), and many entries name
    /// one parent.
    id: Arc<str>,
    /// Byte offset where the path starts (the end of the trust domain).
    path_start: usize,
}

impl SpiffeId {
    /// Builds an ID from a trust domain and a path (`""` or starting with `/`), checking
    /// the path's rules.
    pub fn new(td: &TrustDomain, path: &str) -> Result<Self, Error> {
        let id = format!("{SCHEME_PREFIX}{}{path}", td.name());
        let err = |rule| Error::InvalidSpiffeId {
            input: truncate_input(&id),
            rule,
        };
        if !path.is_empty() && !path.starts_with('/') {
            return Err(err(SpiffeIdRule::BadPathChar));
        }
        validate_path(path).map_err(err)?;
        if id.len() > MAX_SPIFFE_ID_LEN {
            return Err(err(SpiffeIdRule::TooLong));
        }
        Ok(Self::from_parts(td, path))
    }

    /// Builds an ID from parts already known to be valid.
    fn from_parts(td: &TrustDomain, path: &str) -> Self {
        let path_start = SCHEME_PREFIX.len() + td.name().len();
        SpiffeId {
            id: format!("{SCHEME_PREFIX}{}{path}", td.name()).into(),
            path_start,
        }
    }

    /// The trust domain of this ID.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_name().to_owned())
    }

    /// The trust domain name of this ID, without allocating.
    pub fn trust_domain_name(&self) -> &str {
        &self.id[SCHEME_PREFIX.len()..self.path_start]
    }

    /// The path, `""` for a trust domain's own ID, otherwise starting with `/`.
    pub fn path(&self) -> &str {
        &self.id[self.path_start..]
    }

    /// The whole ID as a string.
    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// Whether the ID is a member of `td`.
    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        self.trust_domain_name() == td.name()
    }

    /// Whether the path is under the reserved `/spire` prefix (agents and the server),
    /// which registration entries may not claim.
    pub fn is_reserved(&self) -> bool {
        let p = self.path();
        p == "/spire" || p.starts_with("/spire/")
    }

    /// Whether this is an agent ID, `spiffe://<td>/spire/agent/...`.
    pub fn is_agent(&self) -> bool {
        self.path().starts_with("/spire/agent/")
    }

    /// The node attestor name and agent path of an agent ID
    /// `spiffe://<td>/spire/agent/<attestor>/<agent path>`; `None` for other IDs.
    pub fn agent_parts(&self) -> Option<(&str, &str)> {
        self.path()
            .strip_prefix("/spire/agent/")?
            .split_once('/')
            .filter(|(attestor, path)| !attestor.is_empty() && !path.is_empty())
    }

    /// Whether this is the server ID, `spiffe://<td>/spire/server`.
    pub fn is_server(&self) -> bool {
        self.path() == "/spire/server"
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.id)
    }
}

impl FromStr for SpiffeId {
    type Err = Error;

    fn from_str(input: &str) -> Result<Self, Error> {
        let err = |rule| Error::InvalidSpiffeId {
            input: truncate_input(input),
            rule,
        };
        if input.is_empty() {
            return Err(err(SpiffeIdRule::Empty));
        }
        if input.len() > MAX_SPIFFE_ID_LEN {
            return Err(err(SpiffeIdRule::TooLong));
        }
        let rest = input
            .strip_prefix(SCHEME_PREFIX)
            .ok_or_else(|| err(SpiffeIdRule::WrongScheme))?;
        // Query and fragment are checked before anything else so that the error names
        // them, not the character they start with.
        if rest.contains('?') {
            return Err(err(SpiffeIdRule::Query));
        }
        if rest.contains('#') {
            return Err(err(SpiffeIdRule::Fragment));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        validate_trust_domain(authority).map_err(err)?;
        validate_path(path).map_err(err)?;
        Ok(SpiffeId {
            id: input.into(),
            path_start: SCHEME_PREFIX.len() + authority.len(),
        })
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        s.parse()
    }
}

impl TryFrom<&str> for SpiffeId {
    type Error = Error;
    fn try_from(s: &str) -> Result<Self, Error> {
        s.parse()
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn validate_trust_domain(authority: &str) -> Result<(), SpiffeIdRule> {
    if authority.is_empty() {
        return Err(SpiffeIdRule::MissingTrustDomain);
    }
    if authority.contains('@') {
        return Err(SpiffeIdRule::UserInfo);
    }
    if authority.contains(':') {
        return Err(SpiffeIdRule::Port);
    }
    if authority.contains('%') {
        return Err(SpiffeIdRule::PercentEncoded);
    }
    if authority.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdRule::TrustDomainTooLong);
    }
    for b in authority.bytes() {
        match b {
            b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_' => {}
            b'A'..=b'Z' => return Err(SpiffeIdRule::TrustDomainUppercase),
            _ => return Err(SpiffeIdRule::BadTrustDomainChar),
        }
    }
    Ok(())
}

fn validate_path(path: &str) -> Result<(), SpiffeIdRule> {
    if path.is_empty() {
        return Ok(());
    }
    if path.contains('%') {
        return Err(SpiffeIdRule::PercentEncoded);
    }
    if path.ends_with('/') {
        // "spiffe://td/" is a trailing slash too, not an empty segment.
        return Err(SpiffeIdRule::TrailingSlash);
    }
    // The path starts with '/', so the first split element is empty.
    for segment in path.split('/').skip(1) {
        if segment.is_empty() {
            return Err(SpiffeIdRule::EmptySegment);
        }
        if segment == "." || segment == ".." {
            return Err(SpiffeIdRule::DotSegment);
        }
        if !segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        {
            return Err(SpiffeIdRule::BadPathChar);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule_of(input: &str) -> SpiffeIdRule {
        match input.parse::<SpiffeId>() {
            Err(Error::InvalidSpiffeId { rule, .. }) => rule,
            other => panic!("{input:?} should be rejected, got {other:?}"),
        }
    }

    #[test]
    fn accepts_the_examples_of_the_standard() {
        for id in [
            "spiffe://trust-domain-name/path",
            "spiffe://staging.example.com/payments/mysql",
            "spiffe://staging.example.com/payments/web-fe",
            "spiffe://k8s-west.example.com/ns/staging/sa/default",
            "spiffe://example.com/9eebccd2-12bf-40a6-b262-65fe0487d453",
        ] {
            let parsed: SpiffeId = id.parse().unwrap();
            assert_eq!(parsed.as_str(), id);
            assert_eq!(parsed.to_string(), id);
        }
        let id: SpiffeId = "spiffe://k8s-west.example.com/ns/staging/sa/default"
            .parse()
            .unwrap();
        assert_eq!(id.trust_domain_name(), "k8s-west.example.com");
        assert_eq!(id.path(), "/ns/staging/sa/default");
    }

    #[test]
    fn accepts_a_trust_domain_id_without_path() {
        let id: SpiffeId = "spiffe://example.org".parse().unwrap();
        assert_eq!(id.path(), "");
        assert_eq!(id.trust_domain().name(), "example.org");
    }

    #[test]
    fn every_allowed_character_is_accepted() {
        let td = "abcdefghijklmnopqrstuvwxyz0123456789.-_";
        let path = "/abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_";
        let id: SpiffeId = format!("spiffe://{td}{path}").parse().unwrap();
        assert_eq!(id.trust_domain_name(), td);
        assert_eq!(id.path(), path);
        // IP-looking names are not treated specially.
        "spiffe://192.168.1.1/x".parse::<SpiffeId>().unwrap();
    }

    #[test]
    fn rejects_empty() {
        assert_eq!(rule_of(""), SpiffeIdRule::Empty);
    }

    #[test]
    fn rejects_wrong_or_missing_scheme() {
        assert_eq!(rule_of("http://example.org/a"), SpiffeIdRule::WrongScheme);
        assert_eq!(rule_of("example.org/a"), SpiffeIdRule::WrongScheme);
        assert_eq!(rule_of("spiffe:/example.org/a"), SpiffeIdRule::WrongScheme);
        assert_eq!(rule_of("spiffe:example.org"), SpiffeIdRule::WrongScheme);
        assert_eq!(rule_of("SPIFFE://example.org/a"), SpiffeIdRule::WrongScheme);
    }

    #[test]
    fn rejects_missing_trust_domain() {
        assert_eq!(rule_of("spiffe://"), SpiffeIdRule::MissingTrustDomain);
        assert_eq!(rule_of("spiffe:///path"), SpiffeIdRule::MissingTrustDomain);
    }

    #[test]
    fn rejects_uppercase_trust_domain() {
        assert_eq!(
            rule_of("spiffe://Example.org/a"),
            SpiffeIdRule::TrustDomainUppercase
        );
    }

    #[test]
    fn rejects_bad_trust_domain_characters() {
        for id in [
            "spiffe://exa mple.org/a",
            "spiffe://example.org!/a",
            "spiffe://[fe80]/a",
            "spiffe://exämple.org/a",
        ] {
            assert_eq!(rule_of(id), SpiffeIdRule::BadTrustDomainChar, "{id}");
        }
    }

    #[test]
    fn rejects_userinfo_and_port() {
        assert_eq!(
            rule_of("spiffe://user@example.org/a"),
            SpiffeIdRule::UserInfo
        );
        assert_eq!(
            rule_of("spiffe://user:pw@example.org/a"),
            SpiffeIdRule::UserInfo
        );
        assert_eq!(rule_of("spiffe://example.org:8080/a"), SpiffeIdRule::Port);
        assert_eq!(rule_of("spiffe://example.org:/a"), SpiffeIdRule::Port);
    }

    #[test]
    fn rejects_percent_encoding() {
        assert_eq!(
            rule_of("spiffe://exa%41mple.org/a"),
            SpiffeIdRule::PercentEncoded
        );
        assert_eq!(
            rule_of("spiffe://example.org/p%41th"),
            SpiffeIdRule::PercentEncoded
        );
    }

    #[test]
    fn rejects_query_and_fragment() {
        assert_eq!(rule_of("spiffe://example.org/a?x=1"), SpiffeIdRule::Query);
        assert_eq!(rule_of("spiffe://example.org?x=1"), SpiffeIdRule::Query);
        assert_eq!(
            rule_of("spiffe://example.org/a#frag"),
            SpiffeIdRule::Fragment
        );
        assert_eq!(rule_of("spiffe://example.org#frag"), SpiffeIdRule::Fragment);
    }

    #[test]
    fn rejects_empty_segments() {
        assert_eq!(
            rule_of("spiffe://example.org//a"),
            SpiffeIdRule::EmptySegment
        );
        assert_eq!(
            rule_of("spiffe://example.org/a//b"),
            SpiffeIdRule::EmptySegment
        );
    }

    #[test]
    fn rejects_dot_segments() {
        assert_eq!(rule_of("spiffe://example.org/."), SpiffeIdRule::DotSegment);
        assert_eq!(rule_of("spiffe://example.org/.."), SpiffeIdRule::DotSegment);
        assert_eq!(
            rule_of("spiffe://example.org/a/../b"),
            SpiffeIdRule::DotSegment
        );
        assert_eq!(
            rule_of("spiffe://example.org/a/./b"),
            SpiffeIdRule::DotSegment
        );
        // Dots inside a segment are fine.
        "spiffe://example.org/a.b/..c/d.."
            .parse::<SpiffeId>()
            .unwrap();
    }

    #[test]
    fn rejects_trailing_slash() {
        assert_eq!(
            rule_of("spiffe://example.org/"),
            SpiffeIdRule::TrailingSlash
        );
        assert_eq!(
            rule_of("spiffe://example.org/a/"),
            SpiffeIdRule::TrailingSlash
        );
    }

    #[test]
    fn rejects_bad_path_characters() {
        for id in [
            "spiffe://example.org/a b",
            "spiffe://example.org/a:b",
            "spiffe://example.org/a@b",
            "spiffe://example.org/ä",
            "spiffe://example.org/a+b",
            "spiffe://example.org/a*b",
        ] {
            assert_eq!(rule_of(id), SpiffeIdRule::BadPathChar, "{id}");
        }
    }

    #[test]
    fn enforces_lengths() {
        // Exactly 2048 bytes is supported.
        let prefix = "spiffe://example.org/";
        let ok = format!("{prefix}{}", "a".repeat(2048 - prefix.len()));
        assert_eq!(ok.len(), 2048);
        ok.parse::<SpiffeId>().unwrap();
        let too_long = format!("{ok}b");
        assert_eq!(rule_of(&too_long), SpiffeIdRule::TooLong);

        let td_ok = "a".repeat(255);
        format!("spiffe://{td_ok}/x").parse::<SpiffeId>().unwrap();
        let td_long = "a".repeat(256);
        assert_eq!(
            rule_of(&format!("spiffe://{td_long}/x")),
            SpiffeIdRule::TrustDomainTooLong
        );
    }

    #[test]
    fn path_is_case_sensitive() {
        let a: SpiffeId = "spiffe://example.org/Path".parse().unwrap();
        let b: SpiffeId = "spiffe://example.org/path".parse().unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn trust_domain_accepts_name_or_id_form() {
        assert_eq!(
            TrustDomain::new("example.org").unwrap().name(),
            "example.org"
        );
        assert_eq!(
            TrustDomain::new("spiffe://example.org").unwrap().name(),
            "example.org"
        );
        assert!(matches!(
            TrustDomain::new("spiffe://example.org/path"),
            Err(Error::InvalidTrustDomain {
                rule: SpiffeIdRule::UnexpectedPath,
                ..
            })
        ));
        assert!(matches!(
            TrustDomain::new("Example.org"),
            Err(Error::InvalidTrustDomain {
                rule: SpiffeIdRule::TrustDomainUppercase,
                ..
            })
        ));
        assert!(matches!(
            TrustDomain::new(""),
            Err(Error::InvalidTrustDomain {
                rule: SpiffeIdRule::Empty,
                ..
            })
        ));
        assert!(matches!(
            TrustDomain::new("example.org:443"),
            Err(Error::InvalidTrustDomain {
                rule: SpiffeIdRule::Port,
                ..
            })
        ));
    }

    #[test]
    fn builds_reserved_ids() {
        let td = TrustDomain::new("example.org").unwrap();
        let server = td.server_id();
        assert_eq!(server.as_str(), "spiffe://example.org/spire/server");
        assert!(server.is_server() && server.is_reserved() && !server.is_agent());
        let agent = td.agent_id("join_token", "abc123").unwrap();
        assert_eq!(
            agent.as_str(),
            "spiffe://example.org/spire/agent/join_token/abc123"
        );
        assert!(agent.is_agent() && agent.is_reserved());
        assert_eq!(agent.agent_parts(), Some(("join_token", "abc123")));
        let deep = td.agent_id("aws_iid", "1234/us-east-1/i-1").unwrap();
        assert_eq!(deep.agent_parts(), Some(("aws_iid", "1234/us-east-1/i-1")));
        for other in [
            "spiffe://example.org/spire/agent/x",
            "spiffe://example.org/spire/server",
            "spiffe://example.org/spire/agentx/a/b",
            "spiffe://example.org/w/spire/agent/a/b",
        ] {
            assert_eq!(
                other.parse::<SpiffeId>().unwrap().agent_parts(),
                None,
                "{other}"
            );
        }
        assert!(td.agent_id("join_token", "a/../b").is_err());
        let wl: SpiffeId = "spiffe://example.org/spirex".parse().unwrap();
        assert!(!wl.is_reserved());
    }

    #[test]
    fn new_checks_the_path() {
        let td = TrustDomain::new("example.org").unwrap();
        assert_eq!(
            SpiffeId::new(&td, "/a/b").unwrap().as_str(),
            "spiffe://example.org/a/b"
        );
        assert_eq!(
            SpiffeId::new(&td, "").unwrap().as_str(),
            "spiffe://example.org"
        );
        assert!(SpiffeId::new(&td, "a").is_err());
        assert!(SpiffeId::new(&td, "/a/").is_err());
    }

    #[test]
    fn error_messages_name_the_input_and_the_rule() {
        let e = "spiffe://example.org/a/".parse::<SpiffeId>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid SPIFFE ID \"spiffe://example.org/a/\": path cannot end with '/'"
        );
    }
}
