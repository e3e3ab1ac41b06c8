//! Selectors: `type:value` facts about a node or a workload, and sets of them.
//!
//! The type names the attestor that produces the selector (`unix`, `join_token`, ...);
//! the value may itself contain `:` (`unix:uid:1000` has type `unix`, value `uid:1000`).
//! An entry matches a workload when every selector of the entry is among the
//! workload's selectors (subset match).

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, truncate_input};

/// The longest selector value accepted, in bytes.
pub const MAX_SELECTOR_VALUE_LEN: usize = 1024;

/// One selector, `type:value`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    kind: String,
    value: String,
}

impl Selector {
    /// Builds a selector from its type and value, checking both: the general syntax, and
    /// for the selector types Carapace's own attestors produce (`unix`, `tpm`,
    /// `kerberos`), that the value is one those attestors can produce, in the exact form
    /// they write it. A value that could never match (`unix:uuid:0`, `unix:uid:01`) is
    /// refused here, at registration, instead of silently never matching.
    pub fn new(kind: &str, value: &str) -> Result<Self, Error> {
        Self::check_syntax(kind, value)?;
        check_vocabulary(kind, value).map_err(|reason| Error::InvalidSelector {
            input: truncate_input(&format!("{kind}:{value}")),
            reason,
        })?;
        Ok(Selector {
            kind: kind.to_owned(),
            value: value.to_owned(),
        })
    }

    /// Rebuilds a selector the datastore stored, checking only the general syntax: an
    /// older version may have accepted a value [`Selector::new`] now refuses (such as
    /// `unix:uid:01`), and such a row must still load (it never matched anything, and
    /// an operator must be able to list and delete it). Never use this for input.
    pub fn stored(kind: &str, value: &str) -> Result<Self, Error> {
        Self::check_syntax(kind, value)?;
        Ok(Selector {
            kind: kind.to_owned(),
            value: value.to_owned(),
        })
    }

    fn check_syntax(kind: &str, value: &str) -> Result<(), Error> {
        let err = |reason: &str| Error::InvalidSelector {
            input: truncate_input(&format!("{kind}:{value}")),
            reason: reason.to_owned(),
        };
        if kind.is_empty() {
            return Err(err("type is empty (expected type:value)"));
        }
        if !kind
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(err("type may only contain letters, digits, '_' and '-'"));
        }
        if value.is_empty() {
            return Err(err("value is empty (expected type:value)"));
        }
        if value.len() > MAX_SELECTOR_VALUE_LEN {
            return Err(err("value is longer than 1024 bytes"));
        }
        if value.chars().any(char::is_control) {
            return Err(err("value contains control characters"));
        }
        Ok(())
    }

    /// The selector type, such as `unix`.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The selector value, such as `uid:1000`.
    pub fn value(&self) -> &str {
        &self.value
    }
}

/// The rules of the selector types Carapace's attestors produce; other types (from
/// elsewhere, or free-form) only get the general syntax check.
fn check_vocabulary(kind: &str, value: &str) -> Result<(), String> {
    match kind {
        "unix" => validate_unix(value),
        "tpm" => validate_tpm(value),
        "kerberos" => validate_kerberos(value),
        _ => Ok(()),
    }
}

/// Checks that `arg` is a decimal number from 0 to `max` written the one way an attestor
/// writes it (no sign, spaces or leading zeros), so that an entry's selector compares
/// equal to the attestor's. `what` names the selector (`unix:uid`) in the message, which
/// gives the canonical form when there is one.
fn canonical_number(what: &str, arg: &str, max: u64) -> Result<(), String> {
    let canonical = arg.bytes().all(|b| b.is_ascii_digit())
        && !arg.is_empty()
        && (arg == "0" || !arg.starts_with('0'))
        && arg.parse::<u64>().is_ok_and(|n| n <= max);
    if canonical {
        return Ok(());
    }
    let rule = format!(
        "{what} takes a decimal number from 0 to {max}, written without sign, spaces or \
         leading zeros (the one form the attestor produces)"
    );
    let t = arg.trim();
    let t = t.strip_prefix('+').unwrap_or(t);
    let digits = t.trim_start_matches('0');
    let digits = if digits.is_empty() && !t.is_empty() {
        "0"
    } else {
        digits
    };
    match digits.parse::<u64>() {
        Ok(n) if n <= max && digits.bytes().all(|b| b.is_ascii_digit()) => Err(format!(
            "{rule}: {arg:?} would never match; write {what}:{n}"
        )),
        _ => Err(format!("{rule}: {arg:?} is not one")),
    }
}

/// The `unix` workload attestor's selectors are known here so that a typo in an entry
/// (`unix:uuid:0`) or a number in another form (`unix:uid:01`) is rejected at
/// registration instead of silently never matching.
fn validate_unix(value: &str) -> Result<(), String> {
    let Some((name, arg)) = value.split_once(':') else {
        return Err(
            "unix selectors are unix:<uid|user|gid|group|supplementary_gid|path|sha256>:<value>"
                .into(),
        );
    };
    if arg.is_empty() {
        return Err("unix selector value is empty".into());
    }
    match name {
        "uid" | "gid" | "supplementary_gid" => {
            canonical_number(&format!("unix:{name}"), arg, u32::MAX.into())
        }
        "user" | "group" => Ok(()),
        "path" => {
            if arg.starts_with('/') {
                Ok(())
            } else {
                Err("unix:path takes an absolute path".into())
            }
        }
        "sha256" => {
            if arg.len() == 64 && is_lower_hex(arg) {
                Ok(())
            } else {
                Err("unix:sha256 takes 64 lowercase hex digits".into())
            }
        }
        _ => Err(
            "unknown unix selector (known: uid, user, gid, group, supplementary_gid, path, sha256)"
                .into(),
        ),
    }
}

fn is_lower_hex(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `tpm:pcr:<bank>:<index>:<hex>`, as the `tpm` node attestor writes it: a decimal PCR
/// index and the value in lowercase hex; `tpm:boot_app:<bank>:<hex>` with the digest in
/// lowercase hex; `tpm:secure_boot:on|off`. The other `tpm` selectors are left free.
fn validate_tpm(value: &str) -> Result<(), String> {
    if let Some(rest) = value.strip_prefix("boot_app:") {
        let shape = "tpm:boot_app selectors are tpm:boot_app:<bank>:<lowercase hex digest> \
                     (e.g. tpm:boot_app:sha256:<64 hex>)";
        let Some((bank, hex)) = rest.split_once(':') else {
            return Err(shape.into());
        };
        if bank.is_empty() || hex.len() % 2 != 0 || !is_lower_hex(hex) {
            return Err(shape.into());
        }
        return Ok(());
    }
    if let Some(state) = value.strip_prefix("secure_boot:") {
        if state != "on" && state != "off" {
            return Err(format!(
                "tpm:secure_boot selectors are tpm:secure_boot:on or tpm:secure_boot:off, not {state:?}"
            ));
        }
        return Ok(());
    }
    let Some(rest) = value.strip_prefix("pcr:") else {
        return Ok(());
    };
    let shape = "tpm:pcr selectors are tpm:pcr:<bank>:<index>:<lowercase hex value> \
                 (e.g. tpm:pcr:sha256:7:<64 hex>)";
    let mut parts = rest.splitn(3, ':');
    let (Some(bank), Some(index), Some(hex)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(shape.into());
    };
    if bank.is_empty() {
        return Err(shape.into());
    }
    canonical_number(&format!("tpm:pcr:{bank}"), index, u8::MAX.into())?;
    if hex.len() % 2 != 0 || !is_lower_hex(hex) {
        return Err(format!("{shape}: the value must be lowercase hex digits"));
    }
    Ok(())
}

/// `kerberos:group_sid:<SID>` as the `kerberos` attestor writes it ([MS-DTYP] 2.4.2.1):
/// `S-1-<authority>-<sub>...`, each number in canonical decimal (an authority of 2^32 or
/// more as `0x` and 12 uppercase hex digits). The other `kerberos` selectors are left free.
fn validate_kerberos(value: &str) -> Result<(), String> {
    let Some(sid) = value.strip_prefix("group_sid:") else {
        return Ok(());
    };
    let shape = "kerberos:group_sid takes a SID, S-1-<authority>-<sub-authority>... \
                 (e.g. S-1-5-21-1004336348-1177238915-682003330-513)";
    let Some(rest) = sid.strip_prefix("S-1-") else {
        return Err(shape.into());
    };
    let mut parts = rest.split('-');
    let authority = parts.next().unwrap_or_default();
    let hex_authority = authority.strip_prefix("0x").is_some_and(|h| {
        h.len() == 12
            && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'A'..=b'F'))
            && u64::from_str_radix(h, 16).is_ok_and(|n| n >= 1 << 32)
    });
    if !hex_authority {
        canonical_number("kerberos:group_sid authority", authority, u32::MAX.into())
            .map_err(|e| format!("{shape}: {e}"))?;
    }
    let mut count = 0;
    for sub in parts {
        count += 1;
        canonical_number("kerberos:group_sid sub-authority", sub, u32::MAX.into())
            .map_err(|e| format!("{shape}: {e}"))?;
    }
    if count > 15 {
        return Err(format!("{shape}: a SID has at most 15 sub-authorities"));
    }
    Ok(())
}

impl FromStr for Selector {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.split_once(':') {
            Some((kind, value)) => Selector::new(kind, value),
            None => Err(Error::InvalidSelector {
                input: truncate_input(s),
                reason: "expected type:value".into(),
            }),
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

impl fmt::Debug for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Selector({}:{})", self.kind, self.value)
    }
}

/// A sorted set of selectors without duplicates.
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SelectorSet(Vec<Selector>);

impl SelectorSet {
    /// An empty set.
    pub fn new() -> Self {
        SelectorSet(Vec::new())
    }

    /// Inserts a selector, keeping the set sorted.
    pub fn insert(&mut self, s: Selector) {
        if let Err(pos) = self.0.binary_search(&s) {
            self.0.insert(pos, s);
        }
    }

    /// Whether `s` is in the set.
    pub fn contains(&self, s: &Selector) -> bool {
        self.0.binary_search(s).is_ok()
    }

    /// Whether every selector of `self` is in `other`: the entry-matching rule.
    pub fn is_subset_of(&self, other: &SelectorSet) -> bool {
        // Both are sorted: one merge pass.
        let mut theirs = other.0.iter();
        'outer: for mine in &self.0 {
            for t in theirs.by_ref() {
                match t.cmp(mine) {
                    std::cmp::Ordering::Less => continue,
                    std::cmp::Ordering::Equal => continue 'outer,
                    std::cmp::Ordering::Greater => return false,
                }
            }
            return false;
        }
        true
    }

    /// The selectors, sorted.
    pub fn iter(&self) -> std::slice::Iter<'_, Selector> {
        self.0.iter()
    }

    /// Number of selectors.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Adds every selector of `other`.
    pub fn extend(&mut self, other: impl IntoIterator<Item = Selector>) {
        for s in other {
            self.insert(s);
        }
    }
}

impl FromIterator<Selector> for SelectorSet {
    fn from_iter<I: IntoIterator<Item = Selector>>(iter: I) -> Self {
        let mut v: Vec<Selector> = iter.into_iter().collect();
        v.sort();
        v.dedup();
        SelectorSet(v)
    }
}

impl<'a> IntoIterator for &'a SelectorSet {
    type Item = &'a Selector;
    type IntoIter = std::slice::Iter<'a, Selector>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl fmt::Debug for SelectorSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set()
            .entries(self.0.iter().map(|s| s.to_string()))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: &[&str]) -> SelectorSet {
        items
            .iter()
            .map(|s| s.parse::<Selector>().unwrap())
            .collect()
    }

    #[test]
    fn parses_type_and_value_at_the_first_colon() {
        let s: Selector = "unix:uid:1000".parse().unwrap();
        assert_eq!(s.kind(), "unix");
        assert_eq!(s.value(), "uid:1000");
        assert_eq!(s.to_string(), "unix:uid:1000");
        let s: Selector = "k8s:ns:default".parse().unwrap();
        assert_eq!(s.kind(), "k8s");
    }

    #[test]
    fn rejects_malformed_selectors() {
        for bad in [
            "",
            "nocolon",
            ":value",
            "type:",
            "ty pe:v",
            "unix:uid",
            "unix:uid:",
            "unix:uid:abc",
            "unix:uuid:0",
            "unix:path:relative",
            "unix:sha256:ABC",
            "t:a\u{0}b",
        ] {
            let e = bad.parse::<Selector>().unwrap_err();
            assert!(matches!(e, Error::InvalidSelector { .. }), "{bad}: {e}");
        }
        let e = "unix:uuid:0".parse::<Selector>().unwrap_err().to_string();
        assert!(e.contains("unknown unix selector"), "{e}");
    }

    #[test]
    fn accepts_every_unix_selector() {
        for ok in [
            "unix:uid:0",
            "unix:gid:10",
            "unix:user:root",
            "unix:group:wheel",
            "unix:supplementary_gid:27",
            "unix:path:/usr/bin/python3",
            &format!("unix:sha256:{}", "a".repeat(64)),
        ] {
            ok.parse::<Selector>().unwrap();
        }
    }

    #[test]
    fn numeric_selectors_accept_only_the_form_attestors_write() {
        for ok in [
            "unix:uid:1",
            "unix:uid:0",
            "unix:uid:4294967295",
            "unix:gid:10",
            "unix:supplementary_gid:27",
            "tpm:pcr:sha256:7:00ff",
            "tpm:pcr:sha256:0:00",
            "tpm:ek_pubhash:anything",
            "tpm:boot_app:sha256:00ff",
            "tpm:secure_boot:on",
            "tpm:secure_boot:off",
            "kerberos:group_sid:S-1-5-21-1004336348-1177238915-682003330-513",
            "kerberos:group_sid:S-1-0x000100000000-1",
            "kerberos:realm:EXAMPLE.COM",
        ] {
            ok.parse::<Selector>()
                .unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for (bad, hint) in [
            ("unix:uid:01", "write unix:uid:1"),
            ("unix:uid:+1", "write unix:uid:1"),
            ("unix:uid: 1", "write unix:uid:1"),
            ("unix:uid:1 ", "write unix:uid:1"),
            ("unix:uid:00", "write unix:uid:0"),
            ("unix:gid:007", "write unix:gid:7"),
            (
                "unix:supplementary_gid:+27",
                "write unix:supplementary_gid:27",
            ),
            ("unix:uid:-1", "is not one"),
            ("unix:uid:4294967296", "is not one"),
            ("unix:uid:1e3", "is not one"),
            ("tpm:pcr:sha256:07:00", "write tpm:pcr:sha256:7"),
            ("tpm:pcr:sha256:256:00", "is not one"),
            ("tpm:pcr:sha256:7:00FF", "lowercase hex"),
            ("tpm:pcr:7:00", "tpm:pcr:<bank>:<index>"),
            ("tpm:boot_app:sha256:00FF", "lowercase hex digest"),
            ("tpm:boot_app:00ff", "tpm:boot_app:<bank>"),
            (
                "tpm:secure_boot:true",
                "tpm:secure_boot:on or tpm:secure_boot:off",
            ),
            (
                "kerberos:group_sid:S-1-5-021-513",
                "write kerberos:group_sid sub-authority:21",
            ),
            ("kerberos:group_sid:S-1-05-21", "authority"),
            ("kerberos:group_sid:s-1-5-21", "S-1-<authority>"),
        ] {
            let e = bad.parse::<Selector>().unwrap_err().to_string();
            assert!(e.contains(hint), "{bad}: {e}");
            assert!(
                e.contains("decimal")
                    || e.contains("hex")
                    || e.contains("S-1-")
                    || e.contains("<bank>")
                    || e.contains("secure_boot:off"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn stored_rows_of_older_versions_still_load() {
        let s = Selector::stored("unix", "uid:01").unwrap();
        assert_eq!(s.to_string(), "unix:uid:01");
        assert!(Selector::new("unix", "uid:01").is_err());
        assert!(Selector::stored("unix", "").is_err());
        assert!(Selector::stored("bad type", "x").is_err());
    }

    #[test]
    fn subset_matching() {
        let workload = set(&["unix:uid:1000", "unix:gid:1000", "unix:user:alice"]);
        assert!(set(&[]).is_subset_of(&workload));
        assert!(set(&["unix:uid:1000"]).is_subset_of(&workload));
        assert!(set(&["unix:uid:1000", "unix:user:alice"]).is_subset_of(&workload));
        assert!(!set(&["unix:uid:0"]).is_subset_of(&workload));
        assert!(!set(&["unix:uid:1000", "unix:gid:0"]).is_subset_of(&workload));
        assert!(!set(&["unix:uid:1000"]).is_subset_of(&set(&[])));
        assert!(!set(&["zzz:a"]).is_subset_of(&workload));
    }

    #[test]
    fn set_is_sorted_and_deduplicated() {
        let s = set(&["b:1", "a:1", "b:1"]);
        assert_eq!(s.len(), 2);
        assert_eq!(s.iter().next().unwrap().to_string(), "a:1");
    }
}
