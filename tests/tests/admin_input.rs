//! End to end: values that pass a naive check but break later (times past what X.509
//! can write, TTLs that overflow `now + ttl`, numeric selectors in a spelling that never
//! matches) are refused by the real `carapace-server` CLI with a message naming the flag,
//! and nothing is stored.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use carapace_e2e::{Lab, Server};

const AGENT: &str = "spiffe://example.org/spire/agent/join_token/0011223344556677";

#[test]
fn out_of_range_times_ttls_and_non_canonical_selectors_are_refused_and_store_nothing() {
    let lab = Lab::new();
    let server = Server::start(&lab);
    let create = |extra: &[&'static str]| {
        let mut v = vec![
            "entry",
            "create",
            "--parent-id",
            AGENT,
            "--spiffe-id",
            "spiffe://example.org/w",
        ];
        v.extend_from_slice(extra);
        v
    };
    for (args, code, needle) in [
        // A clap value check: exit 2, naming the flag and the last date X.509 can write.
        (
            create(&["--selector", "unix:uid:1", "--expires-at", "99999999999999"]),
            2,
            "9999-12-31T23:59:59Z",
        ),
        (
            create(&[
                "--selector",
                "unix:uid:1",
                "--x509-svid-ttl",
                "9223372036854775807s",
            ]),
            1,
            "entry create: --x509-svid-ttl: 9223372036854775807s is outside the allowed range 1s to 365 days",
        ),
        (
            create(&["--selector", "unix:uid:01"]),
            1,
            "write unix:uid:1",
        ),
        (
            create(&["--selector", "unix:uid:+1"]),
            1,
            "write unix:uid:1",
        ),
        (
            create(&["--selector", "unix:gid: 1"]),
            1,
            "write unix:gid:1",
        ),
        (
            create(&["--selector", "unix:uid:-1"]),
            1,
            "unix:uid takes a decimal number from 0 to 4294967295",
        ),
        (
            vec!["token", "generate", "--ttl", "9223372036854775807"],
            1,
            "token generate: --ttl: ",
        ),
        (
            vec![
                "x509",
                "mint",
                "--spiffe-id",
                "spiffe://example.org/m",
                "--ttl",
                "9223372036854775807s",
            ],
            1,
            "x509 mint: --ttl: ",
        ),
    ] {
        let out = server.cli(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    assert_eq!(server.cli_json(&["entry", "count"])["count"], 0);
    assert_eq!(
        server.cli_json(&["entry", "show"])["entries"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    // The canonical spellings and the edges of the ranges are accepted, and `entry show`
    // prints them.
    server.cli_ok(&create(&[
        "--selector",
        "unix:uid:1",
        "--expires-at",
        "253402300799",
        "--x509-svid-ttl",
        "365days",
    ]));
    let shown = server.cli_ok(&["entry", "show"]);
    assert!(shown.contains("Selector         : unix:uid:1\n"), "{shown}");
    assert!(
        shown.contains("Expires at       : 9999-12-31T23:59:59Z"),
        "{shown}"
    );
    assert!(!shown.contains("X509-SVID TTL    : default"), "{shown}");
}
