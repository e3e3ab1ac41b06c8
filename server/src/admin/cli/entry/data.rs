//! `entry create --data FILE`: reading entries from JSON in the format of SPIRE's
//! `spire-server entry create -data`, every field checked before anything is sent.
//!
//! The format is `{"entries": [ {...}, ... ]}`; each entry has the fields of SPIRE's
//! registration entry as that command reads them:
//!
//! | field | type | |
//! |---|---|---|
//! | `spiffe_id`, `parent_id` | string, or `{"trust_domain": .., "path": ..}` | required |
//! | `selectors` | `[{"type": .., "value": ..}]` | at least one |
//! | `x509_svid_ttl` (old name `ttl`), `jwt_svid_ttl` | integer seconds; 0: the server's default | |
//! | `dns_names` | array of strings | |
//! | `hint` | string | |
//! | `admin`, `downstream` | boolean | |
//! | `entryExpiry` (or `expires_at`) | unix seconds; 0: never | |
//! | `entry_id` (or `id`) | the entry's id; empty: assigned by the server | |
//! | `jwt_svid_include_jti` | boolean (Carapace's own) | |
//!
//! As SPIRE reads it (Go's `encoding/json`), field names match case-insensitively and
//! `null` counts as absent. The differences, each refused with a message rather than
//! silently ignored: an unknown field (SPIRE ignores it, so a typo such as `selector`
//! would create an entry without what was meant) and `store_svid: true` (Carapace has
//! none). `federates_with` takes trust domain names or `spiffe://` IDs, as SPIRE's. Accepted beyond SPIRE: the object form of
//! the SPIFFE IDs (what `spire-server entry show -output json` prints), integers written
//! as strings (the same output's `"expires_at": "0"`), and `revision_number`,
//! `created_at` and `type`, which are ignored (the server sets the first two).
//!
//! A bad input is refused naming the entry (`entries[12]`), the field and why; a JSON
//! syntax error names the line and column.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use carapace_core::entry::validate_dns_name;
use carapace_core::{EntryId, Selector, SpiffeId, TrustDomain};
use carapace_proto::types;

use crate::{Error, Result};

/// The fields an entry may have, lowercase (keys match case-insensitively).
const FIELDS: &[&str] = &[
    "spiffe_id",
    "parent_id",
    "selectors",
    "x509_svid_ttl",
    "ttl",
    "jwt_svid_ttl",
    "jwt_svid_include_jti",
    "dns_names",
    "hint",
    "admin",
    "downstream",
    "entryexpiry",
    "expires_at",
    "entry_id",
    "id",
    "federates_with",
    "store_svid",
    "revision_number",
    "created_at",
    "type",
];

/// The error for a bad input at `path` (`entries[3].selectors[0].type`).
fn bad(path: &str, why: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("{path}: {why}"))
}

/// The JSON type of `v`, for messages.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The entries of a `--data` document, each checked, in file order, in wire form.
///
/// The document is read as a stream: one entry's JSON tree at a time is built, checked
/// and turned into its wire form, so memory holds the text and the wire entries, not a
/// tree of the whole file.
pub(super) fn parse_entries(text: &str) -> Result<Vec<types::Entry>> {
    let mut failure: Option<Error> = None;
    let mut de = serde_json::Deserializer::from_str(text);
    let parsed = DocumentSeed {
        failure: &mut failure,
    }
    .deserialize(&mut de)
    .and_then(|entries| de.end().map(|()| entries));
    match (parsed, failure) {
        // A refusal of ours, raised through serde to stop reading.
        (_, Some(e)) => Err(e),
        (Ok(entries), None) => Ok(entries),
        // serde_json's message names the line and column.
        (Err(e), None) => Err(Error::InvalidArgument(format!("not valid JSON: {e}"))),
    }
}

/// Reads `{"entries": [...]}`; a refusal is kept in `failure` (and reading stops).
struct DocumentSeed<'f> {
    failure: &'f mut Option<Error>,
}

impl<'de> DeserializeSeed<'de> for DocumentSeed<'_> {
    type Value = Vec<types::Entry>;

    fn deserialize<D: Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> std::result::Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for DocumentSeed<'_> {
    type Value = Vec<types::Entry>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the document to be an object {\"entries\": [...]}")
    }

    fn visit_map<A: MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<Self::Value, A::Error> {
        let mut entries: Option<Vec<types::Entry>> = None;
        while let Some(key) = map.next_key::<String>()? {
            let refusal = if !key.eq_ignore_ascii_case("entries") {
                bad(
                    &key,
                    "unknown top-level field (the document is {\"entries\": [...]})",
                )
            } else if entries.is_some() {
                bad(&key, "given twice")
            } else {
                entries = map.next_value_seed(EntriesSeed {
                    failure: &mut *self.failure,
                })?;
                continue;
            };
            return Err(refuse(self.failure, refusal));
        }
        entries.ok_or_else(|| {
            refuse(
                self.failure,
                bad("entries", "missing: the document is {\"entries\": [...]}"),
            )
        })
    }
}

/// Keeps `e` as the reason reading stopped, and returns the error that stops serde.
fn refuse<E: serde::de::Error>(failure: &mut Option<Error>, e: Error) -> E {
    let stop = E::custom(&e);
    *failure = Some(e);
    stop
}

/// Reads the `entries` array (`null`: none), one entry at a time.
struct EntriesSeed<'f> {
    failure: &'f mut Option<Error>,
}

impl<'de> DeserializeSeed<'de> for EntriesSeed<'_> {
    type Value = Option<Vec<types::Entry>>;

    fn deserialize<D: Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> std::result::Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for EntriesSeed<'_> {
    type Value = Option<Vec<types::Entry>>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"entries\" to be an array of entry objects")
    }

    fn visit_unit<E: serde::de::Error>(self) -> std::result::Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_seq<A: SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> std::result::Result<Self::Value, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(v) = seq.next_element::<Value>()? {
            let at = format!("entries[{}]", out.len());
            match parse_entry(&at, &v) {
                Ok(e) => out.push(e),
                Err(e) => return Err(refuse(self.failure, e)),
            }
        }
        Ok(Some(out))
    }
}

/// One entry of the document.
fn parse_entry(at: &str, v: &Value) -> Result<types::Entry> {
    let Value::Object(obj) = v else {
        return Err(bad(at, format!("expected an object, found {}", kind(v))));
    };
    let fields = fields_of(at, obj)?;
    let get = |name: &str| fields.get(name).copied();
    let path = |name: &str| format!("{at}.{name}");

    let spiffe_id = spiffe_id_field(&path("spiffe_id"), get("spiffe_id"))?;
    let parent_id = spiffe_id_field(&path("parent_id"), get("parent_id"))?;
    let selectors = selectors_field(&path("selectors"), get("selectors"))?;

    let x509 = ttl_field(
        &path("x509_svid_ttl"),
        get("x509_svid_ttl"),
        carapace_core::limits::MAX_X509_SVID_TTL,
    )?;
    let legacy = ttl_field(
        &path("ttl"),
        get("ttl"),
        carapace_core::limits::MAX_X509_SVID_TTL,
    )?;
    let x509_svid_ttl = match (x509, legacy) {
        (0, t) | (t, 0) => t,
        (a, b) if a == b => a,
        (a, b) => {
            return Err(bad(
                &path("ttl"),
                format!("{b} differs from x509_svid_ttl {a} (ttl is its old name)"),
            ));
        }
    };
    let jwt_svid_ttl = ttl_field(
        &path("jwt_svid_ttl"),
        get("jwt_svid_ttl"),
        carapace_core::limits::MAX_JWT_SVID_TTL,
    )?;

    let expiry = time_field(&path("entryExpiry"), get("entryexpiry"))?;
    let expires = time_field(&path("expires_at"), get("expires_at"))?;
    let expires_at = match (expiry, expires) {
        (0, t) | (t, 0) => t,
        (a, b) if a == b => a,
        (a, b) => {
            return Err(bad(
                &path("expires_at"),
                format!("{b} differs from entryExpiry {a}"),
            ));
        }
    };

    let entry_id = string_field(&path("entry_id"), get("entry_id"))?;
    let id = string_field(&path("id"), get("id"))?;
    let id = match (entry_id, id) {
        (a, b) if b.is_empty() || a == b => a,
        (a, b) if a.is_empty() => b,
        (a, b) => {
            return Err(bad(
                &path("id"),
                format!("{b:?} differs from entry_id {a:?}"),
            ));
        }
    };
    if !id.is_empty() {
        EntryId::new(&id).map_err(|e| bad(&path("entry_id"), e))?;
    }

    let dns_names = strings_field(&path("dns_names"), get("dns_names"))?;
    for (j, n) in dns_names.iter().enumerate() {
        validate_dns_name(n)
            .map_err(|why| bad(&format!("{at}.dns_names[{j}]"), format!("{n:?}: {why}")))?;
    }
    let federates_with = strings_field(&path("federates_with"), get("federates_with"))?
        .iter()
        .enumerate()
        .map(|(j, td)| {
            TrustDomain::new(td)
                .map(|td| td.name().to_owned())
                .map_err(|e| bad(&format!("{at}.federates_with[{j}]"), e))
        })
        .collect::<Result<Vec<_>>>()?;
    if bool_field(&path("store_svid"), get("store_svid"))? {
        return Err(bad(
            &path("store_svid"),
            "stored SVIDs are not supported: leave it false",
        ));
    }
    // Checked for type only: the server sets revision and creation time, and `type` is
    // an old field SPIRE itself no longer reads.
    int_field(&path("revision_number"), get("revision_number"))?;
    int_field(&path("created_at"), get("created_at"))?;

    Ok(types::Entry {
        federates_with,
        id,
        spiffe_id: spiffe_id.to_string(),
        parent_id: parent_id.to_string(),
        selectors,
        x509_svid_ttl,
        dns_names,
        hint: string_field(&path("hint"), get("hint"))?,
        admin: bool_field(&path("admin"), get("admin"))?,
        downstream: bool_field(&path("downstream"), get("downstream"))?,
        expires_at,
        revision: 0,
        created_at: 0,
        jwt_svid_ttl,
        jwt_svid_include_jti: bool_field(
            &path("jwt_svid_include_jti"),
            get("jwt_svid_include_jti"),
        )?,
    })
}

/// The non-null fields of an entry object by lowercase name; an unknown name, or one
/// given twice in different cases, is refused.
fn fields_of<'a>(at: &str, obj: &'a Map<String, Value>) -> Result<HashMap<String, &'a Value>> {
    let mut out: HashMap<String, &Value> = HashMap::new();
    for (k, v) in obj {
        let lower = k.to_ascii_lowercase();
        if !FIELDS.contains(&lower.as_str()) {
            return Err(bad(
                &format!("{at}.{k}"),
                "unknown field (known: spiffe_id, parent_id, selectors, x509_svid_ttl, \
                 jwt_svid_ttl, jwt_svid_include_jti, dns_names, hint, admin, downstream, \
                 entryExpiry, entry_id, federates_with, store_svid)",
            ));
        }
        if v.is_null() {
            continue;
        }
        if out.insert(lower, v).is_some() {
            return Err(bad(&format!("{at}.{k}"), "given twice"));
        }
    }
    Ok(out)
}

/// A required SPIFFE ID: a string, or SPIRE's `{"trust_domain": .., "path": ..}`.
fn spiffe_id_field(path: &str, v: Option<&Value>) -> Result<SpiffeId> {
    let text = match v {
        None => return Err(bad(path, "required")),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => {
            let mut td = None;
            let mut p = None;
            for (k, v) in o {
                let slot = match k.to_ascii_lowercase().as_str() {
                    "trust_domain" | "trustdomain" => &mut td,
                    "path" => &mut p,
                    _ => return Err(bad(&format!("{path}.{k}"), "unknown field")),
                };
                match v {
                    Value::String(s) => *slot = Some(s.as_str()),
                    Value::Null => {}
                    other => {
                        return Err(bad(
                            &format!("{path}.{k}"),
                            format!("expected a string, found {}", kind(other)),
                        ));
                    }
                }
            }
            let td = td.ok_or_else(|| bad(&format!("{path}.trust_domain"), "required"))?;
            format!("spiffe://{td}{}", p.unwrap_or(""))
        }
        Some(other) => {
            return Err(bad(
                path,
                format!(
                    "expected a string (spiffe://...) or {{\"trust_domain\", \"path\"}}, found {}",
                    kind(other)
                ),
            ));
        }
    };
    SpiffeId::from_str(&text).map_err(|e| bad(path, e))
}

/// The required selectors, in wire form.
fn selectors_field(path: &str, v: Option<&Value>) -> Result<Vec<types::Selector>> {
    let list = match v {
        None => return Err(bad(path, "at least one selector is required")),
        Some(Value::Array(list)) => list,
        Some(other) => {
            return Err(bad(
                path,
                format!("expected an array, found {}", kind(other)),
            ));
        }
    };
    if list.is_empty() {
        return Err(bad(path, "at least one selector is required"));
    }
    list.iter()
        .enumerate()
        .map(|(j, s)| {
            let at = format!("{path}[{j}]");
            let Value::Object(o) = s else {
                return Err(bad(
                    &at,
                    format!(
                        "expected an object {{\"type\": .., \"value\": ..}}, found {}",
                        kind(s)
                    ),
                ));
            };
            let mut kind_ = None;
            let mut value = None;
            for (k, v) in o {
                let slot = match k.to_ascii_lowercase().as_str() {
                    "type" => &mut kind_,
                    "value" => &mut value,
                    _ => return Err(bad(&format!("{at}.{k}"), "unknown field")),
                };
                match v {
                    Value::String(s) => *slot = Some(s.as_str()),
                    Value::Null => {}
                    other => {
                        return Err(bad(
                            &format!("{at}.{k}"),
                            format!("expected a string, found {}", kind(other)),
                        ));
                    }
                }
            }
            let kind_ = kind_.ok_or_else(|| bad(&format!("{at}.type"), "required"))?;
            let value = value.ok_or_else(|| bad(&format!("{at}.value"), "required"))?;
            Selector::new(kind_, value)
                .map(|s| types::Selector::from(&s))
                .map_err(|e| bad(&at, e))
        })
        .collect()
}

/// An optional integer, written as a JSON integer or as a string of digits; 0 if absent.
fn int_field(path: &str, v: Option<&Value>) -> Result<i64> {
    match v {
        None => Ok(0),
        Some(Value::Number(n)) => n
            .as_i64()
            .ok_or_else(|| bad(path, format!("{n} is not a whole number in range"))),
        Some(Value::String(s)) => s
            .parse::<i64>()
            .map_err(|_| bad(path, format!("{s:?} is not a whole number"))),
        Some(other) => Err(bad(
            path,
            format!("expected an integer, found {}", kind(other)),
        )),
    }
}

/// An optional TTL in seconds: 0 (or absent) for the server's default, else `1..=max`.
fn ttl_field(path: &str, v: Option<&Value>, max: Duration) -> Result<i64> {
    let secs = int_field(path, v)?;
    if secs < 0 {
        return Err(bad(path, "cannot be negative (0 is the server's default)"));
    }
    if secs > 0 {
        carapace_core::limits::check_duration(
            Duration::from_secs(secs.unsigned_abs()),
            Duration::from_secs(1),
            max,
        )
        .map_err(|e| bad(path, e))?;
    }
    Ok(secs)
}

/// An optional unix time: 0 (or absent) for never.
fn time_field(path: &str, v: Option<&Value>) -> Result<i64> {
    let t = int_field(path, v)?;
    if t != 0 {
        carapace_core::limits::check_unix_time(t).map_err(|e| bad(path, e))?;
    }
    Ok(t)
}

fn string_field(path: &str, v: Option<&Value>) -> Result<String> {
    match v {
        None => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(bad(
            path,
            format!("expected a string, found {}", kind(other)),
        )),
    }
}

fn bool_field(path: &str, v: Option<&Value>) -> Result<bool> {
    match v {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(bad(
            path,
            format!("expected true or false, found {}", kind(other)),
        )),
    }
}

fn strings_field(path: &str, v: Option<&Value>) -> Result<Vec<String>> {
    match v {
        None => Ok(Vec::new()),
        Some(Value::Array(list)) => list
            .iter()
            .enumerate()
            .map(|(j, s)| match s {
                Value::String(s) => Ok(s.clone()),
                other => Err(bad(
                    &format!("{path}[{j}]"),
                    format!("expected a string, found {}", kind(other)),
                )),
            })
            .collect(),
        Some(other) => Err(bad(
            path,
            format!("expected an array of strings, found {}", kind(other)),
        )),
    }
}

/// SPIFFE ID, parent ID and the sorted selectors (type, value): what makes two entries
/// similar.
type SimilarKey<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>);

/// The first entry (by position) that repeats an earlier one: the same `id`, or the same
/// SPIFFE ID, parent ID and selector set. The server refuses these too, but only within
/// one batch; checked here over the whole file, before anything is sent.
pub(super) fn first_duplicate(entries: &[types::Entry]) -> Result<()> {
    let mut ids: HashMap<&str, usize> = HashMap::new();
    let mut similar: HashMap<SimilarKey<'_>, usize> = HashMap::new();
    for (i, e) in entries.iter().enumerate() {
        if !e.id.is_empty() {
            if let Some(first) = ids.insert(e.id.as_str(), i) {
                return Err(bad(
                    &format!("entries[{i}].entry_id"),
                    format!("{:?} is also the id of entries[{first}]", e.id),
                ));
            }
        }
        let mut sels: Vec<(&str, &str)> = e
            .selectors
            .iter()
            .map(|s| (s.r#type.as_str(), s.value.as_str()))
            .collect();
        sels.sort_unstable();
        sels.dedup();
        if let Some(first) = similar.insert((e.spiffe_id.as_str(), e.parent_id.as_str(), sels), i) {
            return Err(bad(
                &format!("entries[{i}]"),
                format!(
                    "same SPIFFE ID {}, parent ID {} and selectors as entries[{first}]",
                    e.spiffe_id, e.parent_id
                ),
            ));
        }
    }
    Ok(())
}
