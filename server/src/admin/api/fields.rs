//! Reading the fields of admin requests: the checks several nouns share. A bad field is
//! refused with `InvalidArgument`, naming the field.

use std::time::Duration;

use carapace_core::{EntryId, SpiffeId};

use crate::{Error, Result};

/// A new entry id (a random UUID), for an entry the server creates.
pub(super) fn new_entry_id() -> Result<EntryId> {
    Ok(EntryId::new(&uuid::Uuid::new_v4().to_string())?)
}

/// A SPIFFE ID field of a request, required.
pub(super) fn required_id(field: &str, value: &str) -> Result<SpiffeId> {
    if value.is_empty() {
        return Err(Error::InvalidArgument(format!("{field} is required")));
    }
    value
        .parse()
        .map_err(|e| Error::InvalidArgument(format!("{field}: {e}")))
}

/// A SPIFFE ID filter, optional.
pub(super) fn optional_id(field: &str, value: &str) -> Result<Option<SpiffeId>> {
    if value.is_empty() {
        return Ok(None);
    }
    required_id(field, value).map(Some)
}

/// A TTL in seconds from a request: 0 means `default`, negative or above `max` is refused.
pub(super) fn ttl_or_default(
    field: &str,
    secs: i64,
    default: Duration,
    max: Duration,
) -> Result<Duration> {
    match secs {
        0 => Ok(default),
        s if s < 0 => Err(Error::InvalidArgument(format!(
            "{field} cannot be negative"
        ))),
        s => {
            let ttl = Duration::from_secs(s.unsigned_abs());
            carapace_core::limits::check_duration(ttl, Duration::from_secs(1), max)
                .map_err(|e| Error::InvalidArgument(format!("{field}: {e}")))?;
            Ok(ttl)
        }
    }
}

/// `now + ttl` in unix seconds, refusing overflow.
pub(super) fn deadline(field: &str, now: i64, ttl: Duration) -> Result<i64> {
    i64::try_from(ttl.as_secs())
        .ok()
        .and_then(|t| now.checked_add(t))
        .ok_or_else(|| Error::InvalidArgument(format!("{field} is too large")))
}
