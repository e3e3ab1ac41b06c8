#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "integration tests"
)]
//! Property tests of the `kerberos` attestor's parsers of peer bytes that are public:
//! principal names (from the verified GSS context and from settings) and the JSON
//! messages. The PAC's NDR parser has its own in `pac.rs` (it is private).

use carapace_attestor_kerberos::names::{
    Principal, check_realm, check_service_principal, identity,
};
use carapace_attestor_kerberos::wire::{self, Answer, Challenge, Payload};
use carapace_fuzzkit::proptest;
use carapace_fuzzkit::proptest::prelude::*;
use carapace_fuzzkit::{bounded, config, mutated_text};

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn principals_never_panic_and_print_as_parsed(text in prop_oneof![
        "(host|HOST|[a-z$]{1,6})(/[a-zA-Z0-9.$_-]{0,20}){0,2}(@[A-Za-z0-9./_-]{0,12}){0,2}",
        "\\PC{0,30}",
        mutated_text(vec!["host/node1.lab.test@LAB.TEST".into(), "NODE1$@AD.EXAMPLE.COM".into()]),
    ], domain in proptest::option::of("[A-Za-z0-9.-]{0,12}")) {
        let parsed = bounded("principal", text.len(), || Principal::parse_setting(&text));
        if let Ok(p) = parsed {
            prop_assert_eq!(p.to_string(), text.clone());
            prop_assert_eq!(&Principal::parse_setting(&p.to_string()).unwrap(), &p);
            prop_assert!(check_realm(&p.realm).is_ok());
            if let Ok((path, selectors)) = identity(&p, domain.as_deref(), &["S-1-5-32-544".into()]) {
                // The agent path is exactly two segments: realm and a lowercase DNS name.
                let (realm, host) = path.split_once('/').unwrap();
                prop_assert_eq!(realm, p.realm.as_str());
                prop_assert!(!host.contains('/') && host == host.to_ascii_lowercase());
                prop_assert_eq!(selectors.len(), 4);
            }
        }
        let _ = check_service_principal(&text);
    }

    #[test]
    fn messages_never_panic_and_round_trip(text in mutated_text(vec![
        r#"{"version":1}"#.into(),
        r#"{"step":"nonce","nonce":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="}"#.into(),
        r#"{"step":"reply","token":"YIIBAAYJKoZIhvcSAQICAQBuggEAMIH9oAMCAQU="}"#.into(),
        r#"{"step":"token","token":"YIIBAAYJKoZIhvcSAQICAQBuggEAMIH9oAMCAQU="}"#.into(),
        r#"{"step":"reply_verified"}"#.into(),
    ])) {
        let b = text.as_bytes();
        if let Ok(m) = bounded("Payload", b.len(), || wire::decode::<Payload>("payload", b)) {
            prop_assert_eq!(wire::decode::<Payload>("payload", &wire::encode(&m).unwrap()).unwrap(), m);
        }
        if let Ok(m) = bounded("Challenge", b.len(), || wire::decode::<Challenge>("challenge", b)) {
            prop_assert_eq!(wire::decode::<Challenge>("challenge", &wire::encode(&m).unwrap()).unwrap(), m.clone());
            let (Challenge::Nonce { nonce: t } | Challenge::Reply { token: t }) = &m;
            if let Ok(raw) = wire::unb64("token", t) {
                prop_assert_eq!(wire::unb64("token", &wire::b64(&raw)).unwrap(), raw);
            }
        }
        if let Ok(m) = bounded("Answer", b.len(), || wire::decode::<Answer>("answer", b)) {
            prop_assert_eq!(wire::decode::<Answer>("answer", &wire::encode(&m).unwrap()).unwrap(), m);
        }
    }
}
