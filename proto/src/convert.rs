//! Conversions between the wire types and the core types, in one place for the server,
//! the agent and the CLI. Wire → core conversions re-check every rule (a peer's bytes are
//! untrusted); core → wire conversions cannot fail.

use std::time::Duration;

use carapace_core::{
    EntryId, Error, JwtKey, RegistrationEntry, Selector, SelectorSet, SpiffeId, TrustBundle,
    TrustDomain,
};

use crate::types;

impl From<&Selector> for types::Selector {
    fn from(s: &Selector) -> Self {
        types::Selector {
            r#type: s.kind().to_owned(),
            value: s.value().to_owned(),
        }
    }
}

impl TryFrom<&types::Selector> for Selector {
    type Error = Error;
    fn try_from(s: &types::Selector) -> Result<Self, Error> {
        Selector::new(&s.r#type, &s.value)
    }
}

/// Selectors from the wire, each checked.
pub fn selectors_from_wire(v: &[types::Selector]) -> Result<SelectorSet, Error> {
    v.iter().map(Selector::try_from).collect()
}

/// Selectors to the wire.
pub fn selectors_to_wire(s: &SelectorSet) -> Vec<types::Selector> {
    s.iter().map(types::Selector::from).collect()
}

impl From<&RegistrationEntry> for types::Entry {
    fn from(e: &RegistrationEntry) -> Self {
        types::Entry {
            id: e.id.to_string(),
            spiffe_id: e.spiffe_id.to_string(),
            parent_id: e.parent_id.to_string(),
            selectors: selectors_to_wire(&e.selectors),
            x509_svid_ttl: e.x509_svid_ttl.map(|d| d.as_secs() as i64).unwrap_or(0),
            dns_names: e.dns_names.clone(),
            hint: e.hint.clone(),
            admin: e.admin,
            downstream: e.downstream,
            expires_at: e.expires_at.unwrap_or(0),
            revision: e.revision,
            created_at: e.created_at,
            jwt_svid_ttl: e.jwt_svid_ttl.map(|d| d.as_secs() as i64).unwrap_or(0),
            jwt_svid_include_jti: e.jwt_svid_include_jti,
            federates_with: e
                .federates_with
                .iter()
                .map(|td| td.name().to_owned())
                .collect(),
        }
    }
}

/// An entry from the wire. `id` may be empty only when `allow_empty_id` (create).
pub fn entry_from_wire(
    e: &types::Entry,
    fallback_id: Option<EntryId>,
) -> Result<RegistrationEntry, Error> {
    let id = if e.id.is_empty() {
        fallback_id.ok_or_else(|| Error::InvalidEntry {
            field: "id",
            reason: "is required".into(),
        })?
    } else {
        EntryId::new(&e.id)?
    };
    let field = |name: &'static str, v: &str| -> Result<SpiffeId, Error> {
        if v.is_empty() {
            return Err(Error::InvalidEntry {
                field: name,
                reason: "is required".into(),
            });
        }
        v.parse()
    };
    if e.x509_svid_ttl < 0 {
        return Err(Error::InvalidEntry {
            field: "x509_svid_ttl",
            reason: "cannot be negative".into(),
        });
    }
    if e.jwt_svid_ttl < 0 {
        return Err(Error::InvalidEntry {
            field: "jwt_svid_ttl",
            reason: "cannot be negative".into(),
        });
    }
    if e.expires_at < 0 {
        return Err(Error::InvalidEntry {
            field: "expires_at",
            reason: "cannot be negative".into(),
        });
    }
    Ok(RegistrationEntry {
        id,
        spiffe_id: field("spiffe_id", &e.spiffe_id)?,
        parent_id: field("parent_id", &e.parent_id)?,
        selectors: selectors_from_wire(&e.selectors)?,
        x509_svid_ttl: (e.x509_svid_ttl > 0).then(|| Duration::from_secs(e.x509_svid_ttl as u64)),
        jwt_svid_ttl: (e.jwt_svid_ttl > 0).then(|| Duration::from_secs(e.jwt_svid_ttl as u64)),
        jwt_svid_include_jti: e.jwt_svid_include_jti,
        dns_names: e.dns_names.clone(),
        hint: e.hint.clone(),
        admin: e.admin,
        downstream: e.downstream,
        expires_at: (e.expires_at > 0).then_some(e.expires_at),
        revision: e.revision,
        created_at: e.created_at,
        federates_with: e
            .federates_with
            .iter()
            .map(|td| {
                TrustDomain::new(td).map_err(|err| Error::InvalidEntry {
                    field: "federates_with",
                    reason: err.to_string(),
                })
            })
            .collect::<Result<_, _>>()?,
    })
}

impl From<&TrustBundle> for types::Bundle {
    fn from(b: &TrustBundle) -> Self {
        types::Bundle {
            trust_domain: b.trust_domain().name().to_owned(),
            x509_authorities: b.x509_authorities.clone(),
            jwt_authorities: b
                .jwt_authorities
                .iter()
                .map(|k| types::JwtKey {
                    kid: k.kid.clone(),
                    public_key: k.public_key_der.clone(),
                    expires_at: k.expires_at.unwrap_or(0),
                })
                .collect(),
            sequence: b.sequence,
            refresh_hint: b.refresh_hint.unwrap_or(0),
            tainted_x509_authorities: b.tainted_x509_authorities.clone(),
            tainted_jwt_kids: b.tainted_jwt_kids.clone(),
        }
    }
}

/// A bundle from the wire; every authority must parse as a certificate.
pub fn bundle_from_wire(b: &types::Bundle) -> Result<TrustBundle, Error> {
    let td = TrustDomain::new(&b.trust_domain)?;
    let mut out = TrustBundle::new(td);
    for der in &b.x509_authorities {
        carapace_core::x509svid::validity_of(der)
            .map_err(|e| Error::InvalidBundle(format!("authority does not parse: {e}")))?;
        out.x509_authorities.push(der.clone());
    }
    for k in &b.jwt_authorities {
        if k.kid.is_empty() {
            return Err(Error::InvalidBundle("JWT key without kid".into()));
        }
        out.jwt_authorities.push(JwtKey {
            kid: k.kid.clone(),
            public_key_der: k.public_key.clone(),
            expires_at: (k.expires_at > 0).then_some(k.expires_at),
        });
    }
    for der in &b.tainted_x509_authorities {
        if !out.x509_authorities.contains(der) {
            return Err(Error::InvalidBundle(
                "a tainted authority is not one of the bundle's X.509 authorities".into(),
            ));
        }
        if !out.tainted_x509_authorities.contains(der) {
            out.tainted_x509_authorities.push(der.clone());
        }
    }
    for kid in &b.tainted_jwt_kids {
        if !out.jwt_authorities.iter().any(|k| k.kid == *kid) {
            return Err(Error::InvalidBundle(
                "a tainted kid is not one of the bundle's JWT keys".into(),
            ));
        }
        if !out.tainted_jwt_kids.contains(kid) {
            out.tainted_jwt_kids.push(kid.clone());
        }
    }
    out.sequence = b.sequence;
    out.refresh_hint = (b.refresh_hint > 0).then_some(b.refresh_hint);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_round_trip() {
        let e = RegistrationEntry {
            federates_with: vec![
                TrustDomain::new("b.org").unwrap(),
                TrustDomain::new("a.org").unwrap(),
            ],
            id: EntryId::new("e1").unwrap(),
            spiffe_id: "spiffe://example.org/w".parse().unwrap(),
            parent_id: "spiffe://example.org/spire/agent/x/y".parse().unwrap(),
            selectors: ["unix:uid:0".parse::<Selector>().unwrap()]
                .into_iter()
                .collect(),
            x509_svid_ttl: Some(Duration::from_secs(30)),
            jwt_svid_ttl: Some(Duration::from_secs(300)),
            jwt_svid_include_jti: true,
            dns_names: vec!["a.example".into()],
            hint: "h".into(),
            admin: true,
            downstream: false,
            expires_at: Some(5),
            revision: 3,
            created_at: 7,
        };
        let wire = types::Entry::from(&e);
        assert_eq!((wire.jwt_svid_ttl, wire.jwt_svid_include_jti), (300, true));
        assert_eq!(wire.federates_with, ["b.org", "a.org"]);
        // A trust domain that is not one is refused, naming the field.
        let mut bad = wire.clone();
        bad.federates_with.push("spiffe://x.org/path".into());
        assert!(matches!(
            entry_from_wire(&bad, None),
            Err(Error::InvalidEntry {
                field: "federates_with",
                ..
            })
        ));
        assert_eq!(entry_from_wire(&wire, None).unwrap(), e);
        // The defaults: no JWT TTL travels as 0, and 0 comes back as the default.
        let e = RegistrationEntry {
            jwt_svid_ttl: None,
            jwt_svid_include_jti: false,
            ..e
        };
        let wire = types::Entry::from(&e);
        assert_eq!((wire.jwt_svid_ttl, wire.jwt_svid_include_jti), (0, false));
        assert_eq!(entry_from_wire(&wire, None).unwrap(), e);
    }

    #[test]
    fn bad_wire_entries_are_rejected_with_the_field() {
        let mut wire = types::Entry {
            id: "e1".into(),
            spiffe_id: "spiffe://example.org/w".into(),
            ..Default::default()
        };
        let err = entry_from_wire(&wire, None).unwrap_err().to_string();
        assert!(err.contains("parent_id"), "{err}");
        wire.parent_id = "spiffe://example.org/a".into();
        wire.selectors.push(types::Selector {
            r#type: "unix".into(),
            value: "uuid:0".into(),
        });
        assert!(
            entry_from_wire(&wire, None)
                .unwrap_err()
                .to_string()
                .contains("selector")
        );
        wire.selectors.clear();
        wire.x509_svid_ttl = -1;
        assert!(
            entry_from_wire(&wire, None)
                .unwrap_err()
                .to_string()
                .contains("x509_svid_ttl")
        );
        wire.x509_svid_ttl = 0;
        wire.jwt_svid_ttl = -1;
        assert!(
            entry_from_wire(&wire, None)
                .unwrap_err()
                .to_string()
                .contains("jwt_svid_ttl")
        );
        let empty_id = types::Entry::default();
        assert!(
            entry_from_wire(&empty_id, None)
                .unwrap_err()
                .to_string()
                .contains("id")
        );
    }

    /// Self-signed certificates made once with `openssl req -x509` (P-256, CN a, b, c).
    const PEMS: [&str; 3] = [
        "-----BEGIN CERTIFICATE-----\nMIIBbzCCARWgAwIBAgIUL7qbICEd8gz4FtYQdH6GsfDqLFQwCgYIKoZIzj0EAwIw\nDDEKMAgGA1UEAwwBYTAgFw0yNjEyMDcwMDI1NDRaGA8yMTI2MTExMzAwMjU0NFow\nDDEKMAgGA1UEAwwBYTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABNuCgJMIXGEF\n0Bbznas+G/TBs4Q9W/uYcmRBkY1Lnj6GmqYqvM42jeAsdu6szKrsyVl59d4xylBb\nuYpLma/vnL6jUzBRMB0GA1UdDgQWBBQet9sdkTwCd4pUD+36ezDwRBlWfTAfBgNV\nHSMEGDAWgBQet9sdkTwCd4pUD+36ezDwRBlWfTAPBgNVHRMBAf8EBTADAQH/MAoG\nCCqGSM49BAMCA0gAMEUCIA8AnWbqC9hF4N8/B3TzQ36o5TtebaYXgkBugc+L8BmK\nAiEAxg+Tf4CEHgNfRLIweZNDSU5Is980KR+rgPY1LSEZsTQ=\n-----END CERTIFICATE-----\n",
        "-----BEGIN CERTIFICATE-----\nMIIBbzCCARWgAwIBAgIUJbNeVLVsVSl6HvZHhxYcC+axB/wwCgYIKoZIzj0EAwIw\nDDEKMAgGA1UEAwwBYjAgFw0yNjEyMDcwMDI1NDRaGA8yMTI2MTExMzAwMjU0NFow\nDDEKMAgGA1UEAwwBYjBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABCmF4+ZybArs\nZsjkfXaHSJhsd0InSNjlMe0sbq9c+FjhgYVyFIDKlx9LcvEmudIvY+NQvAuQ0EA3\nNMcZYaqwN4yjUzBRMB0GA1UdDgQWBBQxPCoVcOKxtjMKUtc6Bt9Pernq3DAfBgNV\nHSMEGDAWgBQxPCoVcOKxtjMKUtc6Bt9Pernq3DAPBgNVHRMBAf8EBTADAQH/MAoG\nCCqGSM49BAMCA0gAMEUCIDP6+qJe4G8eXSQZ0te10RKBzlTW2GyD3XhGmTeBQAGv\nAiEA8IDIKt6zAiRulVEonsoT+Xk0OS3X+8eEqfh/fhqV2ro=\n-----END CERTIFICATE-----\n",
        "-----BEGIN CERTIFICATE-----\nMIIBbjCCARWgAwIBAgIUc89Xi8bmjKjOgYNGGtD8sTv31wAwCgYIKoZIzj0EAwIw\nDDEKMAgGA1UEAwwBYzAgFw0yNjEyMDcwMDI1NDRaGA8yMTI2MTExMzAwMjU0NFow\nDDEKMAgGA1UEAwwBYzBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABNEFHux69Qky\nqPgRaIe0Y/OOauSCSHlyMl9HM5hAW/f9ErDVI0+eMQGadRhsmQ+jvupvjni8AV3R\npx1vrcnheYGjUzBRMB0GA1UdDgQWBBQw6zIIH8DgBrq/Kgn1m6mgxwnCszAfBgNV\nHSMEGDAWgBQw6zIIH8DgBrq/Kgn1m6mgxwnCszAPBgNVHRMBAf8EBTADAQH/MAoG\nCCqGSM49BAMCA0cAMEQCIDOAfQGq5YdjAuMlx4IVlL0/nqoDglM3xtNnLOzgI5hG\nAiBRsozeg+s4GIW4iY95Vd3hZewM3Z3GcGL40ZgBGLdpfQ==\n-----END CERTIFICATE-----\n",
    ];

    fn ca_der(i: usize) -> Vec<u8> {
        carapace_core::bundle::certs_from_pem(PEMS[i])
            .unwrap()
            .remove(0)
    }

    #[test]
    fn tainted_authorities_round_trip_and_must_be_in_the_bundle() {
        let (a, b) = (ca_der(0), ca_der(1));
        let mut bundle = TrustBundle::new(TrustDomain::new("example.org").unwrap());
        bundle.x509_authorities = vec![a.clone(), b.clone()];
        bundle.tainted_x509_authorities = vec![a.clone()];
        let wire = types::Bundle::from(&bundle);
        assert_eq!(wire.tainted_x509_authorities, vec![a.clone()]);
        assert_eq!(bundle_from_wire(&wire).unwrap(), bundle);
        // The SPIFFE formats workloads see carry no taint.
        assert_eq!(bundle.to_pem().matches("BEGIN CERTIFICATE").count(), 2);
        let mut stray = wire.clone();
        stray.tainted_x509_authorities = vec![ca_der(2)];
        let err = bundle_from_wire(&stray).unwrap_err().to_string();
        assert!(err.contains("tainted"), "{err}");
    }
}
