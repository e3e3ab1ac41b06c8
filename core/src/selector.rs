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
    /// Builds a selector from its type and value, checking both.
    pub fn new(kind: &str, value: &str) -> Result<Self, Error> {
        let input = format!("{kind}:{value}");
        let err = |reason| Error::InvalidSelector {
            input: truncate_input(&input),
            reason,
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
        if kind == "unix" {
            validate_unix(value).map_err(err)?;
        }
        Ok(Selector {
            kind: kind.to_owned(),
            value: value.to_owned(),
        })
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

/// The `unix` workload attestor's selectors are known here so that a typo in an entry
/// (`unix:uuid:0`) is rejected at registration instead of silently never matching.
fn validate_unix(value: &str) -> Result<(), &'static str> {
    let Some((name, arg)) = value.split_once(':') else {
        return Err(
            "unix selectors are unix:<uid|user|gid|group|supplementary_gid|path|sha256>:<value>",
        );
    };
    if arg.is_empty() {
        return Err("unix selector value is empty");
    }
    match name {
        "uid" | "gid" | "supplementary_gid" => arg
            .parse::<u32>()
            .map(|_| ())
            .map_err(|_| "unix uid, gid and supplementary_gid take a decimal number"),
        "user" | "group" => Ok(()),
        "path" => {
            if arg.starts_with('/') {
                Ok(())
            } else {
                Err("unix:path takes an absolute path")
            }
        }
        "sha256" => {
            if arg.len() == 64 && arg.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                Ok(())
            } else {
                Err("unix:sha256 takes 64 lowercase hex digits")
            }
        }
        _ => Err(
            "unknown unix selector (known: uid, user, gid, group, supplementary_gid, path, sha256)",
        ),
    }
}

impl FromStr for Selector {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.split_once(':') {
            Some((kind, value)) => Selector::new(kind, value),
            None => Err(Error::InvalidSelector {
                input: truncate_input(s),
                reason: "expected type:value",
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
