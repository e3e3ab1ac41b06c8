//! Kerberos principal names: parsing the display form, normalising a host's principal
//! to its DNS name, and the agent ID and selectors derived from it.

use carapace_core::{Error, Selector, SelectorSet};

use crate::{PLUGIN_NAME, rejected};

/// A principal as `gss_display_name` prints it: components and realm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// `["host", "node1.lab.test"]` for `host/node1.lab.test@LAB.TEST`.
    pub components: Vec<String>,
    /// `LAB.TEST`.
    pub realm: String,
}

impl Principal {
    /// Parses `primary[/instance]@REALM`. Names with escaped characters (`\/`, `\@`) or
    /// without a realm are refused: no host principal has them, and refusing them keeps
    /// one principal from reading as another.
    pub fn parse(text: &str) -> Result<Principal, Error> {
        Principal::parse_setting(text).map_err(rejected)
    }

    /// [`Principal::parse`] for a setting: the problem, without the attestation prefix.
    pub fn parse_setting(text: &str) -> Result<Principal, String> {
        if text.contains('\\') {
            return Err(format!(
                "principal {text:?} has escaped characters, which no host principal has"
            ));
        }
        let (name, realm) = text
            .rsplit_once('@')
            .ok_or_else(|| format!("principal {text:?} has no realm"))?;
        if name.contains('@') {
            return Err(format!("principal {text:?} has two '@'"));
        }
        check_realm(realm)?;
        let components: Vec<String> = name.split('/').map(str::to_owned).collect();
        if components.iter().any(String::is_empty) {
            return Err(format!("principal {text:?} has an empty component"));
        }
        Ok(Principal {
            components,
            realm: realm.to_owned(),
        })
    }

    /// The DNS name of the host this principal belongs to, in lowercase:
    /// - `host/<fqdn>@REALM` (MIT and AD service principal) → `<fqdn>`;
    /// - `host/<NAME>@REALM` (AD's short form) and `<NAME>$@REALM` (AD machine account)
    ///   → `<name>.<domain>`, where `domain` is the realm in lowercase unless
    ///   `machine_domain` gives the AD DNS domain.
    ///
    /// Anything else (user principals, other services) is not a host and is refused.
    pub fn host(&self, machine_domain: Option<&str>) -> Result<String, Error> {
        let domain = || {
            machine_domain
                .map(str::to_ascii_lowercase)
                .unwrap_or_else(|| self.realm.to_ascii_lowercase())
        };
        let host = match self.components.as_slice() {
            [service, host] if service.eq_ignore_ascii_case("host") => {
                let host = host.to_ascii_lowercase();
                if host.contains('.') {
                    host
                } else {
                    format!("{host}.{}", domain())
                }
            }
            [account] if account.len() > 1 && account.ends_with('$') => {
                let name = &account[..account.len() - 1];
                if name.contains('.') {
                    return Err(rejected(format!(
                        "machine account {self} is not a NetBIOS name"
                    )));
                }
                format!("{}.{}", name.to_ascii_lowercase(), domain())
            }
            _ => {
                return Err(rejected(format!(
                    "{self} is not a host principal: use host/<fqdn>@REALM or the AD machine \
                     account <NAME>$@REALM in the agent's keytab"
                )));
            }
        };
        check_dns_name(&host).map_err(|e| rejected(format!("host of {self}: {e}")))?;
        Ok(host)
    }
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.components.join("/"), self.realm)
    }
}

/// A `service_principal` setting: `service/host@REALM`, as both halves need it.
pub fn check_service_principal(text: &str) -> Result<(), String> {
    match Principal::parse_setting(text) {
        Ok(p) if p.components.len() == 2 => Ok(()),
        Ok(_) => Err(format!(
            "service_principal {text:?}: expected service/host@REALM"
        )),
        Err(e) => Err(format!("service_principal: {e}")),
    }
}

/// A realm usable as one SPIFFE path segment: letters, digits, `.`, `-`, `_`, not `.`
/// or `..`.
pub fn check_realm(realm: &str) -> Result<(), String> {
    let ok = !realm.is_empty()
        && realm != "."
        && realm != ".."
        && realm.len() <= 255
        && realm
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "realm {realm:?}: expected letters, digits, '.', '-' and '_' (e.g. EXAMPLE.COM)"
        ))
    }
}

/// A lowercase DNS name: labels of letters, digits and `-` (not at either end), at most
/// 63 bytes each and 253 in all.
fn check_dns_name(name: &str) -> Result<(), String> {
    let labels_ok = name.split('.').all(|l| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    });
    if labels_ok && name.len() <= 253 {
        Ok(())
    } else {
        Err(format!("{name:?} is not a DNS name"))
    }
}

/// What a verified principal proves: the agent path `<realm>/<host>` and the selectors.
pub fn identity(
    principal: &Principal,
    machine_domain: Option<&str>,
    group_sids: &[String],
) -> Result<(String, SelectorSet), Error> {
    let host = principal.host(machine_domain)?;
    let mut selectors = SelectorSet::new();
    selectors.insert(Selector::new(
        PLUGIN_NAME,
        &format!("realm:{}", principal.realm),
    )?);
    selectors.insert(Selector::new(
        PLUGIN_NAME,
        &format!("principal:{principal}"),
    )?);
    selectors.insert(Selector::new(PLUGIN_NAME, &format!("host:{host}"))?);
    for sid in group_sids {
        selectors.insert(Selector::new(PLUGIN_NAME, &format!("group_sid:{sid}"))?);
    }
    Ok((format!("{}/{host}", principal.realm), selectors))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(p: &str) -> Result<String, Error> {
        Principal::parse(p)?.host(None)
    }

    #[test]
    fn host_principals_of_mit_and_ad_normalise_to_one_dns_name() {
        for p in [
            "host/node1.lab.test@LAB.TEST",
            "HOST/Node1.Lab.Test@LAB.TEST",
            "host/NODE1@LAB.TEST",
            "NODE1$@LAB.TEST",
            "node1$@LAB.TEST",
        ] {
            assert_eq!(host(p).unwrap(), "node1.lab.test", "{p}");
        }
        let p = Principal::parse("WEB7$@AD.EXAMPLE.COM").unwrap();
        assert_eq!(
            p.host(Some("Corp.Example.com")).unwrap(),
            "web7.corp.example.com"
        );
    }

    #[test]
    fn the_agent_path_has_exactly_two_segments() {
        let p = Principal::parse("host/node1.lab.test@LAB.TEST").unwrap();
        let (path, sel) = identity(&p, None, &["S-1-5-21-1-2-3-513".into()]).unwrap();
        assert_eq!(path, "LAB.TEST/node1.lab.test");
        let mut got: Vec<String> = sel.iter().map(|s| s.to_string()).collect();
        got.sort();
        assert_eq!(
            got,
            [
                "kerberos:group_sid:S-1-5-21-1-2-3-513",
                "kerberos:host:node1.lab.test",
                "kerberos:principal:host/node1.lab.test@LAB.TEST",
                "kerberos:realm:LAB.TEST",
            ]
        );
    }

    #[test]
    fn principals_that_are_not_hosts_or_could_smuggle_segments_are_refused() {
        for (p, why) in [
            ("alice@LAB.TEST", "not a host principal"),
            ("carapace/server.lab.test@LAB.TEST", "not a host principal"),
            ("host/a/b@LAB.TEST", "not a host principal"),
            ("host/node1.lab.test", "no realm"),
            ("host/node1.lab.test@LAB.TEST@X", "two '@'"),
            ("host\\/x@LAB.TEST", "escaped"),
            ("host/node_1.lab.test@LAB.TEST", "not a DNS name"),
            ("host/node1..lab.test@LAB.TEST", "not a DNS name"),
            ("host/-x.lab.test@LAB.TEST", "not a DNS name"),
            ("host/node1.lab.test@LAB/TEST", "realm"),
            ("host/node1.lab.test@..", "realm"),
            ("A.B$@LAB.TEST", "NetBIOS"),
            ("$@LAB.TEST", "not a host principal"),
            ("host//x@LAB.TEST", "empty component"),
        ] {
            let err = host(p).unwrap_err().to_string();
            assert!(err.contains(why), "{p}: {err}");
        }
    }
}
