//! Bounds on every time and duration that enters Carapace (config files, the admin API and
//! its CLI), in one place, and the checked arithmetic that uses them.
//!
//! An X.509 validity time is a `GeneralizedTime` of at most year 9999 (RFC 5280
//! 4.1.2.5), so no certificate can end later than [`MAX_UNIX_TIME`]; every bound here keeps
//! `now + ttl` far inside that and far inside `i64`. Values outside are refused where they
//! enter, with a message naming the key or flag and the allowed range, so nothing is
//! stored that would fail (or wrap) later.

use std::time::Duration;

const DAY: u64 = 86_400;

/// The last second an X.509 certificate can express: 9999-12-31T23:59:59Z.
pub const MAX_UNIX_TIME: i64 = 253_402_300_799;

/// The longest X509-SVID lifetime an entry, `x509 mint` or the server config may ask for:
/// 365 days. An SVID never outlives its CA anyway (its notAfter is capped at the CA's).
pub const MAX_X509_SVID_TTL: Duration = Duration::from_secs(365 * DAY);

/// The longest JWT-SVID lifetime an entry or `jwt mint` may ask for: 1 day. A JWT-SVID is
/// a bearer token nobody can revoke, so it should live minutes; a token never outlives
/// the key that signed it anyway (its `exp` is capped at the key's retirement).
pub const MAX_JWT_SVID_TTL: Duration = Duration::from_secs(DAY);

/// The longest X.509 CA lifetime (`ca_ttl`, `upstream init --ttl`): 36500 days (about 100
/// years), so a CA minted now still ends well before [`MAX_UNIX_TIME`].
pub const MAX_CA_TTL: Duration = Duration::from_secs(36_500 * DAY);

/// The longest join token lifetime (`token generate --ttl`): 365 days.
pub const MAX_JOIN_TOKEN_TTL: Duration = Duration::from_secs(365 * DAY);

/// A duration for messages: whole days as `N days`, otherwise seconds (`90s`).
pub fn describe(d: Duration) -> String {
    let s = d.as_secs();
    if s == DAY {
        "1 day".to_owned()
    } else if s >= DAY && s % DAY == 0 {
        format!("{} days", s / DAY)
    } else if d.subsec_nanos() == 0 {
        format!("{s}s")
    } else {
        format!("{}s", d.as_secs_f64())
    }
}

/// Checks that `d` lies in `min..=max`; the error says the allowed range.
pub fn check_duration(d: Duration, min: Duration, max: Duration) -> Result<(), String> {
    if d < min || d > max {
        return Err(format!(
            "{} is outside the allowed range {} to {}",
            describe(d),
            describe(min),
            describe(max)
        ));
    }
    Ok(())
}

/// Checks a unix time (seconds) that will end up in a certificate or be shown as a date:
/// `1..=MAX_UNIX_TIME` (1970-01-01T00:00:01Z to 9999-12-31T23:59:59Z).
pub fn check_unix_time(t: i64) -> Result<(), String> {
    if !(1..=MAX_UNIX_TIME).contains(&t) {
        return Err(format!(
            "{t} is outside the allowed range 1 (1970-01-01T00:00:01Z) to {MAX_UNIX_TIME} \
             (9999-12-31T23:59:59Z)"
        ));
    }
    Ok(())
}

/// `now + d` in unix seconds, or `None` if it does not fit in an `i64`.
pub fn unix_plus(now: i64, d: Duration) -> Option<i64> {
    i64::try_from(d.as_secs())
        .ok()
        .and_then(|s| now.checked_add(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_fit_certificates_from_any_plausible_now() {
        // A CA minted in year 2500 with the longest lifetime still fits GeneralizedTime.
        let year_2500 = 16_725_225_600;
        assert!(unix_plus(year_2500, MAX_CA_TTL).unwrap() < MAX_UNIX_TIME);
        assert!(MAX_X509_SVID_TTL < MAX_CA_TTL);
    }

    #[test]
    fn ranges_are_checked_and_named() {
        let min = Duration::from_secs(1);
        check_duration(Duration::from_secs(3600), min, MAX_X509_SVID_TTL).unwrap();
        check_duration(MAX_X509_SVID_TTL, min, MAX_X509_SVID_TTL).unwrap();
        let e = check_duration(Duration::from_secs(u64::MAX), min, MAX_X509_SVID_TTL).unwrap_err();
        assert!(e.contains("1s to 365 days"), "{e}");
        assert!(check_duration(Duration::ZERO, min, MAX_X509_SVID_TTL).is_err());
        let e = check_duration(Duration::from_secs(86_401), min, MAX_JWT_SVID_TTL).unwrap_err();
        assert_eq!(e, "86401s is outside the allowed range 1s to 1 day");
        check_unix_time(1).unwrap();
        check_unix_time(MAX_UNIX_TIME).unwrap();
        for bad in [
            0,
            -1,
            MAX_UNIX_TIME + 1,
            99_999_999_999_999,
            i64::MAX,
            i64::MIN,
        ] {
            let e = check_unix_time(bad).unwrap_err();
            assert!(e.contains("9999-12-31T23:59:59Z"), "{e}");
        }
    }

    #[test]
    fn addition_never_wraps() {
        assert_eq!(unix_plus(10, Duration::from_secs(5)), Some(15));
        assert_eq!(unix_plus(1, Duration::from_secs(i64::MAX as u64)), None);
        assert_eq!(unix_plus(0, Duration::from_secs(u64::MAX)), None);
        assert_eq!(
            unix_plus(0, Duration::from_secs(i64::MAX as u64)),
            Some(i64::MAX)
        );
    }
}
