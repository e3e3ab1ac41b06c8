//! The admin CLI without a server: the command line's shape, the client-side checks
//! and the output formats.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use carapace_proto::types;

use super::flags::parse_expires_at;
use super::view::json;
use super::*;

#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: AdminCommand,
}

fn parse(args: &[&str]) -> std::result::Result<AdminCommand, clap::Error> {
    Cli::try_parse_from(std::iter::once("carapace-server").chain(args.iter().copied()))
        .map(|c| c.cmd)
}

fn entry() -> EntryView {
    EntryView {
        id: "0b5e".into(),
        spiffe_id: "spiffe://example.org/web".into(),
        parent_id: "spiffe://example.org/spire/agent/join_token/aa".into(),
        selectors: vec!["unix:uid:1000".into(), "unix:user:www".into()],
        x509_svid_ttl: None,
        jwt_svid_ttl: None,
        jwt_svid_include_jti: false,
        dns_names: vec![],
        federates_with: vec![],
        hint: String::new(),
        admin: false,
        downstream: false,
        expires_at: None,
        revision: 0,
        created_at: 1,
    }
}

#[test]
fn entry_human_format_is_spire_like() {
    assert_eq!(
        format_entry_human(&entry()),
        "Entry ID         : 0b5e\n\
         SPIFFE ID        : spiffe://example.org/web\n\
         Parent ID        : spiffe://example.org/spire/agent/join_token/aa\n\
         Revision         : 0\n\
         X509-SVID TTL    : default\n\
         JWT-SVID TTL     : default\n\
         Selector         : unix:uid:1000\n\
         Selector         : unix:user:www\n"
    );
    let full = EntryView {
        x509_svid_ttl: Some(5400),
        jwt_svid_ttl: Some(300),
        jwt_svid_include_jti: true,
        dns_names: vec!["web.example.org".into()],
        hint: "web".into(),
        admin: true,
        downstream: true,
        expires_at: Some(1_893_456_000),
        revision: 3,
        ..entry()
    };
    let out = format_entry_human(&full);
    for line in [
        "Revision         : 3\n",
        "X509-SVID TTL    : 1h 30m\n",
        "JWT-SVID TTL     : 5m\n",
        "JWT-SVID jti     : true\n",
        "DNS name         : web.example.org\n",
        "Hint             : web\n",
        "Admin            : true\n",
        "Downstream       : true\n",
        "Expires at       : 2030-01-01T00:00:00Z\n",
    ] {
        assert!(out.contains(line), "{line:?} missing from\n{out}");
    }
}

#[test]
fn entry_lists_and_counts() {
    assert_eq!(format_entries_human(&[]), "Found 0 entries\n");
    let one = format_entries_human(&[entry()]);
    assert!(
        one.starts_with("Found 1 entry\nEntry ID         : 0b5e\n"),
        "{one}"
    );
    assert!(one.ends_with("unix:user:www\n\n"), "{one}");
    let two = format_entries_human(&[entry(), entry()]);
    assert!(two.starts_with("Found 2 entries\n"));
    assert_eq!(two.matches("Entry ID").count(), 2);
    assert!(
        two.contains("unix:user:www\n\nEntry ID"),
        "entries are separated by a blank line"
    );
    assert_eq!(format_count_human(1), "1 registration entry\n");
    assert_eq!(format_count_human(3), "3 registration entries\n");
}

#[test]
fn entry_json_round_trips_with_nulls_for_defaults() {
    let v: serde_json::Value = serde_json::from_str(&json(&entry()).unwrap()).unwrap();
    assert_eq!(v["x509_svid_ttl"], serde_json::Value::Null);
    assert_eq!(v["jwt_svid_ttl"], serde_json::Value::Null);
    assert_eq!(v["jwt_svid_include_jti"], false);
    assert_eq!(v["expires_at"], serde_json::Value::Null);
    assert_eq!(v["selectors"][0], "unix:uid:1000");
    let back: EntryView = serde_json::from_value(v).unwrap();
    assert_eq!(back, entry());
    // From the wire: 0 means "default" / "never".
    let wire = types::Entry {
        x509_svid_ttl: 0,
        expires_at: 0,
        ..Default::default()
    };
    let view = EntryView::from(&wire);
    assert_eq!((view.x509_svid_ttl, view.expires_at), (None, None));
    assert_eq!(
        (view.jwt_svid_ttl, view.jwt_svid_include_jti),
        (None, false)
    );
    let wire = types::Entry {
        jwt_svid_ttl: 600,
        jwt_svid_include_jti: true,
        ..Default::default()
    };
    let view = EntryView::from(&wire);
    assert_eq!(
        (view.jwt_svid_ttl, view.jwt_svid_include_jti),
        (Some(600), true)
    );
    let v: serde_json::Value = serde_json::from_str(&json(&view).unwrap()).unwrap();
    assert_eq!(
        (&v["jwt_svid_ttl"], &v["jwt_svid_include_jti"]),
        (&600.into(), &true.into())
    );
    // JSON an older CLI printed (without the JWT fields) still reads, as the defaults.
    let mut old = serde_json::to_value(entry()).unwrap();
    let obj = old.as_object_mut().unwrap();
    obj.remove("jwt_svid_ttl");
    obj.remove("jwt_svid_include_jti");
    assert_eq!(serde_json::from_value::<EntryView>(old).unwrap(), entry());
}

#[test]
fn agent_token_and_mint_formats() {
    let a = AgentView {
        spiffe_id: "spiffe://example.org/spire/agent/join_token/aa".into(),
        attestor: "join_token".into(),
        serial: "0a1b".into(),
        expires_at: 0,
        attested_at: 0,
        banned: true,
        reattestable: false,
        refused_at: None,
        refused_reason: None,
        selectors: vec!["region:eu".into()],
    };
    let out = format_agents_human(std::slice::from_ref(&a));
    assert!(!out.contains("Attestation lost"), "{out}");
    let lost = AgentView {
        refused_at: Some(60),
        refused_reason: Some("PCR 7 has value 00".into()),
        ..a.clone()
    };
    assert!(
        format_agent_human(&lost)
            .contains("Attestation lost : 1970-01-01T00:01:00Z (PCR 7 has value 00)\n"),
        "{}",
        format_agent_human(&lost)
    );
    assert!(
        out.starts_with("Found 1 attested agent\n\nSPIFFE ID        : spiffe://"),
        "{out}"
    );
    for line in [
        "Attestation type : join_token\n",
        "Serial number    : 0a1b\n",
        "Expires at       : 1970-01-01T00:00:00Z\n",
        "Banned           : true\n",
        "Selector         : region:eu\n",
    ] {
        assert!(out.contains(line), "{line:?} missing from\n{out}");
    }
    let t = TokenView {
        token: "ab.cd".into(),
        agent_id: "spiffe://x/y".into(),
        expires_at: 0,
    };
    assert_eq!(
        format_token_human(&t),
        "Token: ab.cd\nAgent ID: spiffe://x/y\nExpires: 1970-01-01T00:00:00Z\n"
    );
    let mut m = MintView {
        spiffe_id: "spiffe://example.org/w".into(),
        expires_at: 0,
        svid_pem: Some("S\n".into()),
        key_pem: Some("K\n".into()),
        bundle_pem: Some("B\n".into()),
        svid_path: None,
        key_path: None,
        bundle_path: None,
    };
    assert_eq!(
        format_mint_human(&m),
        "X509-SVID:\nS\n\nPrivate key:\nK\n\nRoot CAs:\nB\n"
    );
    m.svid_pem = None;
    m.key_path = Some("/d/svid.key".into());
    assert_eq!(
        format_mint_human(&m),
        "Private key written to /d/svid.key\n"
    );
    // Paths only in JSON when written: no empty PEM fields.
    let v: serde_json::Value = serde_json::from_str(&json(&m).unwrap()).unwrap();
    assert!(v.get("svid_pem").is_none());
    assert_eq!(v["key_path"], "/d/svid.key");
}

#[test]
fn human_output_never_panics_on_any_stored_time() {
    for t in [
        i64::MIN,
        -1,
        0,
        1,
        carapace_core::limits::MAX_UNIX_TIME,
        carapace_core::limits::MAX_UNIX_TIME + 1,
        99_999_999_999_999,
        i64::MAX,
    ] {
        let s = rfc3339(t);
        assert!(!s.is_empty());
    }
    assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    assert_eq!(
        rfc3339(carapace_core::limits::MAX_UNIX_TIME),
        "9999-12-31T23:59:59Z"
    );
    assert_eq!(
        rfc3339(99_999_999_999_999),
        "unix 99999999999999 (outside 1970-01-01..9999-12-31)"
    );
    let e = EntryView {
        x509_svid_ttl: Some(u64::MAX),
        expires_at: Some(i64::MAX),
        ..entry()
    };
    let out = format_entry_human(&e);
    assert!(out.contains("unix 9223372036854775807"), "{out}");
    let a = AgentView {
        spiffe_id: "spiffe://example.org/spire/agent/x".into(),
        attestor: "join_token".into(),
        serial: "01".into(),
        expires_at: i64::MIN,
        banned: false,
        selectors: vec![],
        attested_at: i64::MAX,
        reattestable: false,
        refused_at: Some(i64::MIN),
        refused_reason: Some(String::new()),
    };
    assert!(format_agent_human(&a).contains("unix -9223372036854775808"));
    let t = TokenView {
        token: "t".into(),
        agent_id: "spiffe://example.org/spire/agent/x".into(),
        expires_at: i64::MAX,
    };
    assert!(format_token_human(&t).contains("unix 9223372036854775807"));
}

#[test]
fn expires_at_is_bounded_by_what_x509_can_write() {
    assert_eq!(
        parse_expires_at("253402300799"),
        Ok(carapace_core::limits::MAX_UNIX_TIME)
    );
    for bad in ["253402300800", "99999999999999", "9223372036854775807"] {
        let e = parse_expires_at(bad).unwrap_err();
        assert!(e.contains("9999-12-31T23:59:59Z"), "{bad}: {e}");
    }
}

#[test]
fn expires_at_accepts_unix_seconds_and_rfc3339() {
    assert_eq!(parse_expires_at("1893456000"), Ok(1_893_456_000));
    assert_eq!(parse_expires_at("2030-01-01T00:00:00Z"), Ok(1_893_456_000));
    assert!(parse_expires_at("0").is_err());
    assert!(
        parse_expires_at("tomorrow")
            .unwrap_err()
            .contains("RFC 3339")
    );
}

/// `entry create`'s single-entry form, unwrapped.
struct CreateParsed {
    fields: EntryFields,
    common: Common,
}

#[test]
fn command_line_shape() {
    let cmd = parse(&[
        "entry",
        "create",
        "--parent-id",
        "spiffe://example.org/a",
        "--spiffe-id",
        "spiffe://example.org/b",
        "--selector",
        "unix:uid:1",
        "--selector",
        "unix:gid:2",
        "--x509-svid-ttl",
        "1h",
        "--jwt-svid-ttl",
        "10m",
        "--jwt-svid-include-jti",
        "--dns-name",
        "b.example",
        "--admin",
        "--expires-at",
        "2030-01-01T00:00:00Z",
        "--admin-socket",
        "/s",
        "--output",
        "json",
    ])
    .unwrap();
    let AdminCommand::Entry(EntryCommand::Create(a)) = cmd else {
        panic!("{cmd:?}")
    };
    assert_eq!(a.data, None);
    let EntryCreateArgs {
        fields: Some(fields),
        common,
        ..
    } = a
    else {
        panic!("no entry fields")
    };
    let a = CreateParsed { fields, common };
    assert_eq!(a.fields.selectors, ["unix:uid:1", "unix:gid:2"]);
    assert_eq!(a.fields.x509_svid_ttl, Some(Duration::from_secs(3600)));
    assert_eq!(a.fields.expires_at, Some(1_893_456_000));
    assert!(a.fields.admin && !a.fields.downstream);
    assert_eq!(a.common.admin_socket, PathBuf::from("/s"));
    assert_eq!(a.common.output, OutputFormat::Json);
    let wire = a.fields.to_wire("entry create", String::new()).unwrap();
    assert_eq!(wire.x509_svid_ttl, 3600);
    assert_eq!((wire.jwt_svid_ttl, wire.jwt_svid_include_jti), (600, true));
    assert_eq!(a.fields.jwt_svid_ttl, Some(Duration::from_secs(600)));
    assert_eq!(
        wire.selectors[1],
        types::Selector {
            r#type: "unix".into(),
            value: "gid:2".into()
        }
    );

    // --selector is required on create; a bad duration names its flag.
    let err = parse(&[
        "entry",
        "create",
        "--parent-id",
        "spiffe://example.org/a",
        "--spiffe-id",
        "spiffe://example.org/b",
    ])
    .unwrap_err()
    .to_string();
    assert!(err.contains("--selector"), "{err}");
    let err = parse(&[
        "entry",
        "create",
        "--parent-id",
        "spiffe://example.org/a",
        "--spiffe-id",
        "spiffe://example.org/b",
        "--selector",
        "unix:uid:1",
        "--x509-svid-ttl",
        "soon",
    ])
    .unwrap_err()
    .to_string();
    assert!(err.contains("--x509-svid-ttl"), "{err}");

    for args in [
        &["entry", "show", "--selector", "unix:uid:1"][..],
        &[
            "entry",
            "update",
            "--id",
            "x",
            "--parent-id",
            "spiffe://e/a",
            "--spiffe-id",
            "spiffe://e/b",
            "--selector",
            "a:b",
        ],
        &["entry", "delete", "--id", "x"],
        &["entry", "count"],
        &["agent", "list"],
        &["agent", "show", "--spiffe-id", "spiffe://e/a"],
        &["agent", "ban", "--spiffe-id", "spiffe://e/a"],
        &["agent", "evict", "--spiffe-id", "spiffe://e/a"],
        &["bundle", "show", "--format", "spiffe"],
        &[
            "token",
            "generate",
            "--spiffe-id",
            "spiffe://e/a",
            "--ttl",
            "60",
        ],
        &[
            "x509",
            "mint",
            "--spiffe-id",
            "spiffe://e/a",
            "--ttl",
            "5m",
            "--write",
            "/tmp/x",
        ],
        &["healthcheck", "--output", "json"],
    ] {
        parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    }
    assert!(parse(&["token", "generate", "--ttl", "-5"]).is_err());
}

#[test]
fn client_side_checks_name_the_flag() {
    let fields = |parent: &str, spiffe: &str, sel: &[&str]| EntryFields {
        parent_id: parent.into(),
        spiffe_id: spiffe.into(),
        selectors: sel.iter().map(|s| s.to_string()).collect(),
        x509_svid_ttl: None,
        jwt_svid_ttl: None,
        jwt_svid_include_jti: false,
        dns_names: vec![],
        federates_with: vec![],
        hint: None,
        admin: false,
        downstream: false,
        expires_at: None,
    };
    let err = |f: EntryFields| {
        f.to_wire("entry create", String::new())
            .unwrap_err()
            .to_string()
    };
    let e = err(fields(
        "spiffe://example.org/a",
        "not-an-id",
        &["unix:uid:1"],
    ));
    assert!(
        e.starts_with("entry create: --spiffe-id: invalid SPIFFE ID"),
        "{e}"
    );
    let e = err(fields(
        "spiffe://Example.org/a",
        "spiffe://example.org/b",
        &["unix:uid:1"],
    ));
    assert!(e.contains("--parent-id"), "{e}");
    let e = err(fields(
        "spiffe://example.org/a",
        "spiffe://example.org/b",
        &["unix:uuid:0"],
    ));
    assert!(
        e.contains("--selector") && e.contains("unknown unix selector"),
        "{e}"
    );
    let e = err(fields(
        "spiffe://example.org/a",
        "spiffe://example.org/b",
        &[],
    ));
    assert!(e.contains("--selector") && e.contains("required"), "{e}");
    let mut f = fields(
        "spiffe://example.org/a",
        "spiffe://example.org/b",
        &["unix:uid:1"],
    );
    f.dns_names = vec!["bad name".into()];
    assert!(err(f.clone()).contains("--dns-name"));
    f.dns_names.clear();
    f.federates_with = vec!["spiffe://partner.org/not-a-trust-domain".into()];
    assert!(err(f.clone()).contains("--federates-with"));
    f.federates_with = vec!["spiffe://partner.org".into(), "b.example".into()];
    assert_eq!(
        f.to_wire("entry create", String::new())
            .unwrap()
            .federates_with,
        ["partner.org", "b.example"]
    );
    f.federates_with.clear();
    f.x509_svid_ttl = Some(Duration::from_millis(500));
    assert!(err(f.clone()).contains("--x509-svid-ttl"));
    f.x509_svid_ttl = None;
    f.jwt_svid_ttl = Some(Duration::from_millis(500));
    assert_eq!(
        err(f.clone()),
        "entry create: --jwt-svid-ttl: must be at least one second"
    );
    f.jwt_svid_ttl = Some(Duration::from_secs(86_401));
    assert_eq!(
        err(f.clone()),
        "entry create: --jwt-svid-ttl: 86401s is outside the allowed range 1s to 1 day"
    );
    f.jwt_svid_ttl = Some(Duration::from_secs(86_400));
    assert_eq!(
        f.to_wire("entry create", String::new())
            .unwrap()
            .jwt_svid_ttl,
        86_400,
        "the edge of the range is accepted"
    );
}

#[test]
fn every_duration_flag_takes_bare_seconds_and_units() {
    let base = |cmd: &[&'static str], flag: &'static str, value: &'static str| {
        let mut args = cmd.to_vec();
        args.extend([flag, value]);
        parse(&args)
    };
    let entry: &[&str] = &[
        "entry",
        "create",
        "--parent-id",
        "spiffe://example.org/a",
        "--spiffe-id",
        "spiffe://example.org/b",
        "--selector",
        "unix:uid:1",
    ];
    let token: &[&str] = &["token", "generate"];
    let mint: &[&str] = &["x509", "mint", "--spiffe-id", "spiffe://example.org/m"];
    let ttl_of = |cmd: AdminCommand| match cmd {
        AdminCommand::Entry(EntryCommand::Create(a)) => a.fields.and_then(|f| f.x509_svid_ttl),
        AdminCommand::Token(TokenCommand::Generate(a)) => a.ttl,
        AdminCommand::X509(X509Command::Mint(a)) => a.ttl,
        other => panic!("{other:?}"),
    };
    for (cmd, flag) in [
        (entry, "--x509-svid-ttl"),
        (token, "--ttl"),
        (mint, "--ttl"),
    ] {
        for (value, secs) in [("3600", 3600), ("3600s", 3600), ("1h", 3600), ("90m", 5400)] {
            let parsed = base(cmd, flag, value).unwrap_or_else(|e| panic!("{flag} {value}: {e}"));
            assert_eq!(
                ttl_of(parsed),
                Some(Duration::from_secs(secs)),
                "{flag} {value}"
            );
        }
        let err = base(cmd, flag, "an hour").unwrap_err().to_string();
        assert!(
            err.contains(flag) && err.contains("expected seconds (60) or a duration with units"),
            "{err}"
        );
    }
}

#[test]
fn localauthority_parses_spire_shapes_and_checks_ids_locally() {
    let cmd = parse(&["localauthority", "x509", "taint", "--authority-id", "0A:bc"]).unwrap();
    assert!(matches!(
        cmd,
        AdminCommand::Localauthority(LocalAuthorityCommand::X509(X509AuthorityCommand::Taint(ref a)))
            if a.authority_id == "0A:bc"
    ));
    assert!(
        parse(&["localauthority", "x509", "revoke"]).is_err(),
        "--authority-id is required"
    );
    assert!(
        parse(&["localauthority", "x509", "activate"]).is_ok(),
        "its id is optional"
    );
    assert!(parse(&["localauthority", "x509", "show", "--output", "json"]).is_ok());
}

#[tokio::test]
async fn localauthority_bad_ids_are_refused_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nothing-here.sock");
    for (verb, id) in [("taint", "not-hex"), ("revoke", ""), ("activate", "x")] {
        let cmd = parse(&[
            "localauthority",
            "x509",
            verb,
            "--authority-id",
            id,
            "--admin-socket",
            socket.to_str().unwrap(),
        ])
        .unwrap();
        let err = execute(cmd).await.unwrap_err().to_string();
        assert!(err.contains("--authority-id"), "{verb}: {err}");
        assert!(
            !err.contains("nothing-here"),
            "{verb} tried to connect: {err}"
        );
    }
}

#[test]
fn localauthority_human_and_json_formats() {
    let a = AuthorityView {
        authority_id: "0a1b".into(),
        status: "old".into(),
        expires_at: 1_893_456_000,
        tainted: true,
        upstream: None,
    };
    assert_eq!(
        format_one_human("Tainted X.509 authority", &a),
        "Tainted X.509 authority:\n  \
         Authority ID   : 0a1b\n  \
         Status         : old\n  \
         Expires at     : 2030-01-01T00:00:00Z\n  \
         Tainted        : true\n  \
         Upstream       : none (self-signed)\n"
    );
    let state = AuthorityStateView {
        active: Some(AuthorityView {
            authority_id: "ff".into(),
            status: "active".into(),
            tainted: false,
            upstream: Some("ab".repeat(32)),
            ..a.clone()
        }),
        prepared: None,
        old: vec![a.clone(), a],
    };
    let out = format_state_human(&state);
    assert!(
        out.starts_with("Active X.509 authority:\n  Authority ID   : ff\n"),
        "{out}"
    );
    assert!(
        out.contains("\nPrepared X.509 authority:\n  No prepared X.509 authority found\n"),
        "{out}"
    );
    assert_eq!(out.matches("Authority ID   : 0a1b").count(), 2, "{out}");
    let v: serde_json::Value = serde_json::from_str(&json(&state).unwrap()).unwrap();
    assert_eq!(v["active"]["upstream"], "ab".repeat(32));
    assert!(v["prepared"].is_null());
    assert_eq!(v["old"][1]["tainted"], true);
    assert!(v["old"][0].get("upstream").is_none());
}

/// Under the shipped unit the server runs as its own user and owns the socket's directory:
/// as root, the CLI refuses it and says how to trust that user.
#[tokio::test]
async fn a_socket_directory_of_another_uid_is_refused_with_the_server_uid_hint() {
    use std::os::unix::fs::PermissionsExt;
    if carapace_common::euid() != 0 {
        // Owning a directory by another uid needs root; scripts/test.sh runs as root.
        panic!("this test needs root (it chowns a directory to uid 65534): run it as root");
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&run, Some(65534), Some(65534)).unwrap();
    let socket = run.join("admin.sock");
    std::fs::write(&socket, b"").unwrap();
    let err = super::client::connect(&socket, None)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("is owned by uid 65534"), "{err}");
    assert!(err.contains("--server-uid"), "{err}");
}

#[test]
fn jwt_mint_parses_and_requires_an_audience() {
    let cmd = parse(&[
        "jwt",
        "mint",
        "--spiffe-id",
        "spiffe://example.org/m",
        "--audience",
        "https://vault.example.org",
        "--audience",
        "b",
        "--ttl",
        "10m",
        "--output",
        "json",
    ])
    .unwrap();
    let AdminCommand::Jwt(JwtCommand::Mint(a)) = cmd else {
        panic!("{cmd:?}")
    };
    assert_eq!(a.audiences, ["https://vault.example.org", "b"]);
    assert_eq!(a.ttl, Some(Duration::from_secs(600)));
    assert_eq!(a.common.output, OutputFormat::Json);
    // --audience is required: a clap error (exit code 2), naming it.
    let err = parse(&["jwt", "mint", "--spiffe-id", "spiffe://example.org/m"]).unwrap_err();
    assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("--audience <AUDIENCE>"), "{err}");
    let err = parse(&[
        "jwt",
        "mint",
        "--spiffe-id",
        "spiffe://example.org/m",
        "--audience",
        "a",
        "--ttl",
        "an hour",
    ])
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("--ttl") && err.contains("expected seconds (60) or a duration with units"),
        "{err}"
    );
}

#[tokio::test]
async fn jwt_mint_bad_input_is_refused_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nothing-here.sock");
    let socket = socket.to_str().unwrap();
    let long = "a".repeat(1025);
    for (extra, needle) in [
        (
            vec!["--spiffe-id", "not-an-id", "--audience", "a"],
            "jwt mint: --spiffe-id: invalid SPIFFE ID \"not-an-id\": scheme must be spiffe:// \
             (spiffe://trust-domain/path)",
        ),
        (
            vec!["--spiffe-id", "spiffe://example.org/m", "--audience", ""],
            "jwt mint: --audience: cannot be empty",
        ),
        (
            vec![
                "--spiffe-id",
                "spiffe://example.org/m",
                "--audience",
                "a",
                "--audience",
                "a",
            ],
            "jwt mint: --audience: \"a\" is given twice",
        ),
        (
            vec![
                "--spiffe-id",
                "spiffe://example.org/m",
                "--audience",
                "a\nb",
            ],
            "jwt mint: --audience: \"a\\nb\" contains control characters",
        ),
        (
            vec!["--spiffe-id", "spiffe://example.org/m", "--audience", &long],
            "jwt mint: --audience: longer than 1024 bytes",
        ),
        (
            vec![
                "--spiffe-id",
                "spiffe://example.org/m",
                "--audience",
                "a",
                "--ttl",
                "86401",
            ],
            "jwt mint: --ttl: 86401s is outside the allowed range 1s to 1 day",
        ),
        (
            vec![
                "--spiffe-id",
                "spiffe://example.org/m",
                "--audience",
                "a",
                "--ttl",
                "0",
            ],
            "jwt mint: --ttl: must be at least one second",
        ),
    ] {
        let mut args = vec!["jwt", "mint"];
        args.extend(extra.iter().copied());
        args.extend(["--admin-socket", socket]);
        let cmd = parse(&args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        let err = execute(cmd).await.unwrap_err().to_string();
        assert_eq!(err, needle, "{args:?}");
    }
}

#[test]
fn jwt_mint_prints_the_token_alone_or_json() {
    let token = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln";
    let svid = carapace_proto::types::JwtSvid {
        token: token.into(),
        spiffe_id: "spiffe://example.org/m".into(),
        expires_at: 1_893_456_300,
        issued_at: 1_893_456_000,
    };
    let view = super::jwt::view_of_minted("jwt mint", "spiffe://example.org/m", Some(svid.clone()))
        .unwrap();
    assert_eq!(format_jwt_mint_human(&view), format!("{token}\n"));
    let v: serde_json::Value = serde_json::from_str(&json(&view).unwrap()).unwrap();
    assert_eq!(
        v,
        serde_json::json!({
            "token": token,
            "spiffe_id": "spiffe://example.org/m",
            "expires_at": 1_893_456_300,
            "issued_at": 1_893_456_000,
        })
    );
    // What the server answers is checked before anything is printed.
    let err = |requested: &str, svid: Option<carapace_proto::types::JwtSvid>| {
        super::jwt::view_of_minted("jwt mint", requested, svid)
            .unwrap_err()
            .to_string()
    };
    assert!(err("spiffe://example.org/m", None).contains("incomplete answer"));
    assert!(
        err("spiffe://example.org/other", Some(svid.clone())).contains(
            "minted a token for \"spiffe://example.org/m\", not spiffe://example.org/other"
        )
    );
    for bad in ["", "a.b", "a..c", "a.b.c.d", "a.b.c\n", "a.b+.c"] {
        let e = err(
            "spiffe://example.org/m",
            Some(carapace_proto::types::JwtSvid {
                token: bad.into(),
                ..svid.clone()
            }),
        );
        assert!(e.contains("not a JWT"), "{bad:?}: {e}");
    }
}

#[test]
fn localauthority_jwt_parses_like_x509_and_checks_kids_locally() {
    let kid = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs";
    let cmd = parse(&["localauthority", "jwt", "taint", "--authority-id", kid]).unwrap();
    assert!(matches!(
        cmd,
        AdminCommand::Localauthority(LocalAuthorityCommand::Jwt(JwtAuthorityCommand::Taint(ref a)))
            if a.authority_id == kid
    ));
    assert!(
        parse(&["localauthority", "jwt", "revoke"]).is_err(),
        "--authority-id is required"
    );
    assert!(
        parse(&["localauthority", "jwt", "taint"]).is_err(),
        "--authority-id is required"
    );
    assert!(
        parse(&["localauthority", "jwt", "activate"]).is_ok(),
        "its id is optional"
    );
    for verb in ["show", "prepare"] {
        parse(&["localauthority", "jwt", verb, "--output", "json"]).unwrap();
    }
    assert_eq!(
        super::authority::jwt_authority_id("c", &format!(" {kid} ")).unwrap(),
        kid
    );
}

#[tokio::test]
async fn localauthority_jwt_bad_kids_are_refused_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nothing-here.sock");
    let long = "a".repeat(129);
    for (verb, id) in [
        ("taint", "not a kid"),
        ("revoke", ""),
        ("activate", "a/b"),
        ("taint", long.as_str()),
        ("revoke", "kid="),
    ] {
        let cmd = parse(&[
            "localauthority",
            "jwt",
            verb,
            "--authority-id",
            id,
            "--admin-socket",
            socket.to_str().unwrap(),
        ])
        .unwrap();
        let err = execute(cmd).await.unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("localauthority jwt {verb}: --authority-id: ")),
            "{verb}: {err}"
        );
        assert!(
            !err.contains("nothing-here"),
            "{verb} tried to connect: {err}"
        );
    }
}

#[test]
fn localauthority_jwt_human_and_json_formats() {
    use carapace_proto::admin::{JwtAuthority, X509AuthorityStatus};
    // A P-256 SubjectPublicKeyInfo prefix is enough to see the encoding.
    let spki = vec![0x30, 0x59, 0x30, 0x13, 0x06, 0x07];
    let wire = |id: &str, status: X509AuthorityStatus, tainted: bool| JwtAuthority {
        authority_id: id.into(),
        status: status as i32,
        expires_at: 1_893_456_000,
        tainted,
        public_key: spki.clone(),
    };
    let old = JwtAuthorityView::from(&wire("kid-old", X509AuthorityStatus::Old, true));
    assert_eq!(
        old.public_key_pem,
        "-----BEGIN PUBLIC KEY-----\nMFkwEwYH\n-----END PUBLIC KEY-----\n"
    );
    assert_eq!(
        format_one_human("Tainted JWT authority", &old),
        "Tainted JWT authority:\n  \
         Authority ID   : kid-old\n  \
         Status         : old\n  \
         Expires at     : 2030-01-01T00:00:00Z\n  \
         Tainted        : true\n"
    );
    let state = state_of(
        [
            wire("kid-a", X509AuthorityStatus::Active, false),
            wire("kid-old", X509AuthorityStatus::Old, true),
            wire("kid-older", X509AuthorityStatus::Old, false),
        ]
        .iter()
        .map(JwtAuthorityView::from),
    );
    assert_eq!(state.active.as_ref().unwrap().authority_id, "kid-a");
    assert!(state.prepared.is_none());
    assert_eq!(state.old.len(), 2);
    let out = format_state_human(&state);
    assert!(
        out.starts_with(
            "Active JWT authority:\n  Authority ID   : kid-a\n  Status         : active\n"
        ),
        "{out}"
    );
    assert!(
        out.contains("\nPrepared JWT authority:\n  No prepared JWT authority found\n"),
        "{out}"
    );
    assert!(
        out.contains("\nOld JWT authorities:\n  Authority ID   : kid-old\n"),
        "{out}"
    );
    assert!(
        out.contains("Tainted        : true\n\n  Authority ID   : kid-older\n"),
        "{out}"
    );
    assert!(
        !out.contains("PUBLIC KEY"),
        "the key is in the JSON only: {out}"
    );
    let empty = format_state_human(&state_of(Vec::<JwtAuthorityView>::new()));
    assert!(empty.contains("No active JWT authority found"), "{empty}");
    assert!(empty.contains("No old JWT authority found"), "{empty}");
    let v: serde_json::Value = serde_json::from_str(&json(&state).unwrap()).unwrap();
    assert_eq!(v["active"]["authority_id"], "kid-a");
    assert_eq!(v["active"]["status"], "active");
    assert_eq!(v["active"]["expires_at"], 1_893_456_000);
    assert_eq!(v["active"]["tainted"], false);
    assert_eq!(
        v["active"]["public_key_pem"],
        "-----BEGIN PUBLIC KEY-----\nMFkwEwYH\n-----END PUBLIC KEY-----\n"
    );
    assert!(v["prepared"].is_null());
    assert_eq!(v["old"][0]["tainted"], true);
    let back: JwtAuthorityStateView = serde_json::from_value(v).unwrap();
    assert_eq!(back, state);
}

#[test]
fn jwt_svid_ttl_takes_bare_seconds_and_units() {
    let entry = |value: &str| {
        parse(&[
            "entry",
            "update",
            "--id",
            "e1",
            "--parent-id",
            "spiffe://example.org/a",
            "--spiffe-id",
            "spiffe://example.org/b",
            "--selector",
            "unix:uid:1",
            "--jwt-svid-ttl",
            value,
        ])
    };
    for (value, secs) in [("300", 300), ("300s", 300), ("5m", 300), ("1h", 3600)] {
        let AdminCommand::Entry(EntryCommand::Update(a)) = entry(value).unwrap() else {
            panic!()
        };
        assert_eq!(a.fields.jwt_svid_ttl, Some(Duration::from_secs(secs)));
        assert!(!a.fields.jwt_svid_include_jti, "off unless asked for");
    }
    let err = entry("an hour").unwrap_err().to_string();
    assert!(err.contains("--jwt-svid-ttl"), "{err}");
}

#[test]
fn help_texts_name_the_jwt_commands_and_flags() {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    let help = |cmd: &mut clap::Command, path: &[&str]| {
        let mut c = cmd.clone();
        for p in path {
            c = c
                .find_subcommand(p)
                .unwrap_or_else(|| panic!("{path:?}"))
                .clone();
        }
        c.render_long_help().to_string()
    };
    let top = help(&mut cmd, &[]);
    assert!(
        top.contains("jwt") && top.contains("Mint JWT-SVIDs"),
        "{top}"
    );
    let mint = help(&mut cmd, &["jwt", "mint"]);
    for needle in [
        "--audience <AUDIENCE>",
        "--ttl <DURATION>",
        "at most 1 day",
        "aud",
    ] {
        assert!(mint.contains(needle), "{needle:?} missing from\n{mint}");
    }
    let la = help(&mut cmd, &["localauthority", "jwt"]);
    for verb in ["show", "prepare", "activate", "taint", "revoke"] {
        assert!(la.contains(verb), "{verb} missing from\n{la}");
    }
    let create = help(&mut cmd, &["entry", "create"]);
    for needle in ["--jwt-svid-ttl <DURATION>", "--jwt-svid-include-jti", "jti"] {
        assert!(create.contains(needle), "{needle:?} missing from\n{create}");
    }
}

/// `entry create --data FILE` reads `json` from a temporary file.
fn read_data_json(json: &str) -> crate::Result<Vec<types::Entry>> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("entries.json");
    std::fs::write(&path, json).unwrap();
    entry::read_data(&path)
}

fn data_err(json: &str) -> String {
    read_data_json(json).unwrap_err().to_string()
}

#[test]
fn entry_create_data_conflicts_with_the_single_entry_flags() {
    let cmd = parse(&["entry", "create", "--data", "-"]).unwrap();
    let AdminCommand::Entry(EntryCommand::Create(a)) = cmd else {
        panic!("{cmd:?}")
    };
    assert_eq!(a.data, Some(PathBuf::from("-")));
    assert!(a.fields.is_none());
    for extra in [
        &["--spiffe-id", "spiffe://example.org/b"][..],
        &["--parent-id", "spiffe://example.org/a"],
        &["--selector", "unix:uid:1"],
        &["--x509-svid-ttl", "1h"],
        &["--jwt-svid-ttl", "1m"],
        &["--jwt-svid-include-jti"],
        &["--dns-name", "a.example"],
        &["--hint", "h"],
        &["--admin"],
        &["--downstream"],
        &["--expires-at", "2030-01-01T00:00:00Z"],
    ] {
        let mut args = vec!["entry", "create", "--data", "f.json"];
        args.extend_from_slice(extra);
        let e = parse(&args).unwrap_err();
        assert_eq!(
            e.kind(),
            clap::error::ErrorKind::ArgumentConflict,
            "{extra:?}: {e}"
        );
    }
    // Without --data the single-entry flags stay required.
    let e = parse(&["entry", "create", "--spiffe-id", "spiffe://example.org/b"]).unwrap_err();
    assert_eq!(
        e.kind(),
        clap::error::ErrorKind::MissingRequiredArgument,
        "{e}"
    );
}

#[test]
fn entry_create_data_reads_spires_format() {
    // SPIRE's `entry create -data` input, as its own test fixtures write it, plus the
    // object form of the IDs (`entry show -output json`) and the other fields.
    let entries = read_data_json(
        r#"{
          "entries": [
            {
              "selectors": [{"type": "unix", "value": "uid:1111"}],
              "spiffe_id": "spiffe://example.org/Blog",
              "parent_id": "spiffe://example.org/spire/agent/join_token/TokenBlog",
              "x509_svid_ttl": 200,
              "jwt_svid_ttl": 30,
              "admin": true
            },
            {
              "selectors": [{"type": "unix", "value": "uid:1111"}, {"type": "k8s", "value": "ns:db"}],
              "spiffe_id": {"trust_domain": "example.org", "path": "/Database"},
              "parent_id": {"trust_domain": "example.org", "path": "/spire/agent/join_token/TokenDatabase"},
              "ttl": 200,
              "federates_with": ["spiffe://partner.org", "other.example"],
              "downstream": true,
              "entryExpiry": 1893456000,
              "dns_names": ["db.example.org", "*.db.example.org"],
              "revision_number": "0",
              "store_svid": false,
              "hint": "db",
              "entry_id": "db-1",
              "created_at": null
            },
            {
              "SPIFFE_ID": "spiffe://example.org/x",
              "Parent_Id": "spiffe://example.org/spire/agent/join_token/T",
              "Selectors": [{"Type": "unix", "Value": "uid:1"}],
              "expires_at": "1893456000",
              "jwt_svid_include_jti": true
            }
          ]
        }"#,
    )
    .unwrap();
    assert_eq!(entries.len(), 3);
    let blog = &entries[0];
    assert_eq!(blog.spiffe_id, "spiffe://example.org/Blog");
    assert_eq!(
        blog.parent_id,
        "spiffe://example.org/spire/agent/join_token/TokenBlog"
    );
    assert_eq!((blog.x509_svid_ttl, blog.jwt_svid_ttl), (200, 30));
    assert!(blog.admin && !blog.downstream);
    assert_eq!(blog.id, "");
    let db = &entries[1];
    assert_eq!(db.spiffe_id, "spiffe://example.org/Database");
    assert_eq!(db.x509_svid_ttl, 200, "ttl is x509_svid_ttl's old name");
    assert_eq!(db.federates_with, ["partner.org", "other.example"]);
    assert!(blog.federates_with.is_empty());
    assert_eq!(db.selectors.len(), 2);
    assert_eq!(
        (
            db.selectors[1].r#type.as_str(),
            db.selectors[1].value.as_str()
        ),
        ("k8s", "ns:db")
    );
    assert_eq!(db.expires_at, 1_893_456_000);
    assert_eq!(db.dns_names, ["db.example.org", "*.db.example.org"]);
    assert_eq!((db.hint.as_str(), db.id.as_str()), ("db", "db-1"));
    assert!(db.downstream);
    let x = &entries[2];
    assert_eq!(x.spiffe_id, "spiffe://example.org/x");
    assert_eq!(x.expires_at, 1_893_456_000);
    assert!(x.jwt_svid_include_jti);
    assert_eq!(read_data_json(r#"{"entries": []}"#).unwrap().len(), 0);
}

#[test]
fn entry_create_data_errors_name_the_entry_and_field() {
    let ok = r#""spiffe_id": "spiffe://example.org/w", "parent_id": "spiffe://example.org/a", "selectors": [{"type": "unix", "value": "uid:1"}]"#;
    let one = |extra: &str| format!(r#"{{"entries": [{{{ok}}}, {{{ok}{extra}}}]}}"#);
    let cases: Vec<(String, &str)> = vec![
        ("{\"entries\": [".into(), "not valid JSON"),
        ("[]".into(), "expected the document to be an object {\"entries\": [...]}"),
        ("{}".into(), "entries: missing"),
        (r#"{"entries": {}}"#.into(), "expected \"entries\" to be an array"),
        (r#"{"entries": [], "extra": 1}"#.into(), "extra: unknown top-level field"),
        (r#"{"entries": [3]}"#.into(), "entries[0]: expected an object"),
        (r#"{"entries": null}"#.into(), "entries: missing"),
        (r#"{"entries": [], "Entries": []}"#.into(), "Entries: given twice"),
        (r#"{"entries": []} []"#.into(), "not valid JSON: trailing characters"),
        (one(r#", "selector": []"#), "entries[1].selector: unknown field"),
        (
            r#"{"entries": [{"parent_id": "spiffe://example.org/a", "selectors": [{"type": "unix", "value": "uid:1"}]}]}"#.into(),
            "entries[0].spiffe_id: required",
        ),
        (
            r#"{"entries": [{"spiffe_id": "http://x/y", "parent_id": "spiffe://example.org/a", "selectors": [{"type": "unix", "value": "uid:1"}]}]}"#.into(),
            "entries[0].spiffe_id:",
        ),
        (
            r#"{"entries": [{"spiffe_id": 5, "parent_id": "spiffe://example.org/a", "selectors": [{"type": "unix", "value": "uid:1"}]}]}"#.into(),
            "entries[0].spiffe_id: expected a string",
        ),
        (
            r#"{"entries": [{"spiffe_id": "spiffe://example.org/w", "parent_id": "spiffe://example.org/a", "selectors": []}]}"#.into(),
            "entries[0].selectors: at least one selector is required",
        ),
        (
            r#"{"entries": [{"spiffe_id": "spiffe://example.org/w", "parent_id": "spiffe://example.org/a", "selectors": [{"type": "unix"}]}]}"#.into(),
            "entries[0].selectors[0].value: required",
        ),
        (
            r#"{"entries": [{"spiffe_id": "spiffe://example.org/w", "parent_id": "spiffe://example.org/a", "selectors": [{"type": "unix", "value": "uid:01"}]}]}"#.into(),
            "entries[0].selectors[0]:",
        ),
        (one(r#", "x509_svid_ttl": -1"#), "entries[1].x509_svid_ttl: cannot be negative"),
        (one(r#", "x509_svid_ttl": 1.5"#), "entries[1].x509_svid_ttl: 1.5 is not a whole number"),
        (one(r#", "jwt_svid_ttl": 999999999"#), "entries[1].jwt_svid_ttl:"),
        (one(r#", "x509_svid_ttl": 10, "ttl": 20"#), "entries[1].ttl: 20 differs"),
        (one(r#", "entryExpiry": -5"#), "entries[1].entryExpiry:"),
        (one(r#", "dns_names": ["ok.example", "bad..name"]"#), "entries[1].dns_names[1]:"),
        (one(r#", "admin": "yes""#), "entries[1].admin: expected true or false"),
        (one(r#", "federates_with": ["spiffe://other.org/path"]"#), "entries[1].federates_with[0]:"),
        (one(r#", "federates_with": "other.org""#), "entries[1].federates_with:"),
        (one(r#", "store_svid": true"#), "entries[1].store_svid: stored SVIDs are not supported"),
        (one(r#", "entry_id": "has space""#), "entries[1].entry_id:"),
        (one(r#", "admin": true, "ADMIN": false"#), "given twice"),
        // Duplicates across the whole file, whatever the batch.
        (one(""), "entries[1]: same SPIFFE ID spiffe://example.org/w"),
    ];
    for (json, want) in cases {
        let e = data_err(&json);
        assert!(
            e.starts_with("entry create: --data ") && e.contains(want),
            "{json}\n  gave: {e}\n  want: {want}"
        );
    }
    let dup_ids = r#"{"entries": [
        {"entry_id": "a", "spiffe_id": "spiffe://example.org/1", "parent_id": "spiffe://example.org/p", "selectors": [{"type": "unix", "value": "uid:1"}]},
        {"entry_id": "a", "spiffe_id": "spiffe://example.org/2", "parent_id": "spiffe://example.org/p", "selectors": [{"type": "unix", "value": "uid:1"}]}]}"#;
    assert!(data_err(dup_ids).contains("entries[1].entry_id: \"a\" is also the id of entries[0]"));
    let missing = entry::read_data(std::path::Path::new("/nonexistent/entries.json")).unwrap_err();
    assert!(
        missing.to_string().contains("/nonexistent/entries.json"),
        "{missing}"
    );
}

#[test]
fn entry_create_data_reports_written_refused_and_unsent_batches() {
    use carapace_proto::admin::BatchCreateEntryResult;
    let batches = [0..1000, 1000..2000, 2000..2500];
    let sent: Vec<types::Entry> = (0..1000)
        .map(|i| types::Entry {
            spiffe_id: format!("spiffe://example.org/w/{}", 1000 + i),
            ..types::Entry::default()
        })
        .collect();
    let mut results: Vec<BatchCreateEntryResult> = (0..1000)
        .map(|i| BatchCreateEntryResult {
            index: i,
            ..BatchCreateEntryResult::default()
        })
        .collect();
    results[7].code = tonic::Code::InvalidArgument as i32;
    results[7].message = "not in trust domain".into();
    results[9].code = tonic::Code::AlreadyExists as i32;
    results[9].message = "similar entry e1 already exists".into();
    let e = entry::refused_batch_error(&batches, 1, &sent, &results).to_string();
    assert_eq!(
        e,
        "entry create: batch 1 written (1000 entries, entries[0..=999]); batch 2 of 3 \
         (entries[1000..=1999]) refused, nothing of it written:\n  \
         entries[1007] (spiffe://example.org/w/1007): not in trust domain\n  \
         entries[1009] (spiffe://example.org/w/1009): similar entry e1 already exists\n\
         1 later batch (entries[2000..=2499]) not sent"
    );
    let first = entry::refused_batch_error(&batches[..1], 0, &sent, &results).to_string();
    assert!(
        first.starts_with("entry create: nothing written; batch 1 of 1 (entries[0..=999]) refused"),
        "{first}"
    );
    assert!(!first.contains("not sent"), "{first}");
    let created = entry::CreatedView {
        entries: vec![entry(), entry()],
    };
    assert_eq!(
        entry::format_created_human(2, 1),
        "Created 2 entries in 1 batch\n"
    );
    assert_eq!(
        entry::format_created_human(1, 3),
        "Created 1 entry in 3 batches\n"
    );
    let json: serde_json::Value = serde_json::from_str(&json(&created).unwrap()).unwrap();
    assert_eq!(json["entries"][1]["spiffe_id"], "spiffe://example.org/web");
}

#[test]
fn federation_and_bundle_command_lines() {
    let cmd = parse(&[
        "federation",
        "create",
        "--trust-domain",
        "partner.org",
        "--bundle-endpoint-url",
        "https://partner.example:8443",
        "--profile",
        "https_spiffe",
        "--endpoint-spiffe-id",
        "spiffe://partner.org/spire/server",
        "--bundle-path",
        "-",
        "--bundle-format",
        "spiffe",
    ])
    .unwrap();
    let AdminCommand::Federation(FederationCommand::Create(a)) = cmd else {
        panic!("{cmd:?}")
    };
    assert_eq!(a.trust_domain, "partner.org");
    assert_eq!(a.fields.profile, Some(ProfileArg::HttpsSpiffe));
    assert_eq!(a.fields.bundle_path, Some(PathBuf::from("-")));
    assert_eq!(a.fields.bundle_format, BundleFormat::Spiffe);
    // SPIRE's flag name for the profile is accepted too.
    let cmd = parse(&[
        "federation",
        "update",
        "--trust-domain",
        "partner.org",
        "--bundle-endpoint-profile",
        "https_web",
        "--ca-file",
        "/ca.pem",
    ])
    .unwrap();
    let AdminCommand::Federation(FederationCommand::Update(a)) = cmd else {
        panic!("{cmd:?}")
    };
    assert_eq!(a.fields.profile, Some(ProfileArg::HttpsWeb));
    assert_eq!(a.fields.bundle_format, BundleFormat::Pem, "SPIRE's default");
    // --bundle-format means nothing without --bundle-path; profiles are spelled as the
    // specification spells them.
    let e = parse(&[
        "federation",
        "update",
        "--trust-domain",
        "p.org",
        "--bundle-format",
        "spiffe",
    ])
    .unwrap_err();
    assert!(e.to_string().contains("--bundle-path"), "{e}");
    let e = parse(&[
        "federation",
        "create",
        "--trust-domain",
        "p.org",
        "--profile",
        "https-web",
    ])
    .unwrap_err()
    .to_string();
    assert!(e.contains("https_spiffe") && e.contains("https_web"), "{e}");
    for args in [
        &["federation", "list", "--output", "json"][..],
        &["federation", "show", "--trust-domain", "p.org"],
        &["federation", "delete", "--trust-domain", "spiffe://p.org"],
        &["federation", "refresh", "--trust-domain", "p.org"],
        &[
            "bundle",
            "show",
            "--trust-domain",
            "p.org",
            "--format",
            "spiffe",
        ],
        &["bundle", "set", "--trust-domain", "p.org"],
        &[
            "bundle",
            "set",
            "--trust-domain",
            "p.org",
            "--format",
            "spiffe",
            "--path",
            "b.json",
        ],
        &["bundle", "list", "--include-local"],
        &[
            "bundle",
            "delete",
            "--trust-domain",
            "p.org",
            "--mode",
            "restrict",
        ],
    ] {
        parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    }
    let AdminCommand::Bundle(BundleCommand::Set(a)) =
        parse(&["bundle", "set", "--trust-domain", "p.org"]).unwrap()
    else {
        panic!()
    };
    assert_eq!((a.format, a.path), (BundleFormat::Pem, None), "stdin, PEM");
    assert!(
        parse(&[
            "bundle",
            "delete",
            "--trust-domain",
            "p.org",
            "--mode",
            "dissociate"
        ])
        .is_err()
    );
    assert!(
        parse(&["federation", "show"]).is_err(),
        "--trust-domain is required"
    );
}

#[tokio::test]
async fn federation_and_bundle_inputs_are_checked_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nothing-here.sock");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let empty = dir.path().join("empty.json");
    std::fs::write(&empty, "  \n").unwrap();
    let create = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "federation",
            "create",
            "--trust-domain",
            "partner.org",
            "--bundle-endpoint-url",
            "https://partner.example/",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let g = garbage.to_str().unwrap();
    let e = empty.to_str().unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            create(&[]),
            "federation create: --profile: required: https_spiffe or https_web",
        ),
        (
            create(&[
                "--profile",
                "https_web",
                "--endpoint-spiffe-id",
                "spiffe://partner.org/x",
            ]),
            "federation create: --endpoint-spiffe-id: only the https_spiffe profile",
        ),
        (
            create(&["--profile", "https_spiffe", "--ca-file", g]),
            "federation create: --ca-file: only the https_web profile",
        ),
        (
            create(&[
                "--profile",
                "https_spiffe",
                "--endpoint-spiffe-id",
                "partner.org",
            ]),
            "federation create: --endpoint-spiffe-id: ",
        ),
        (
            create(&["--profile", "https_web", "--ca-file", g]),
            "federation create: --ca-file: ",
        ),
        (
            create(&["--profile", "https_web", "--ca-file", "/nonexistent/ca.pem"]),
            "federation create: --ca-file /nonexistent/ca.pem: cannot read",
        ),
        (
            create(&["--profile", "https_spiffe", "--bundle-path", e]),
            "federation create: --bundle-path: ",
        ),
        (
            vec![
                "federation".into(),
                "create".into(),
                "--trust-domain".into(),
                "partner.org".into(),
                "--bundle-endpoint-url".into(),
                "http://partner.example/".into(),
                "--profile".into(),
                "https_web".into(),
            ],
            "federation create: --bundle-endpoint-url: \"http://partner.example/\": plain http:// is refused",
        ),
        (
            vec![
                "federation".into(),
                "show".into(),
                "--trust-domain".into(),
                "Partner.org".into(),
            ],
            "federation show: --trust-domain: ",
        ),
        (
            vec![
                "bundle".into(),
                "set".into(),
                "--trust-domain".into(),
                "p.org".into(),
                "--path".into(),
                e.into(),
            ],
            "bundle set: --path: ",
        ),
        (
            vec![
                "bundle".into(),
                "delete".into(),
                "--trust-domain".into(),
                "spiffe://p.org/path".into(),
            ],
            "bundle delete: --trust-domain: ",
        ),
    ];
    for (mut args, want) in cases {
        args.extend(["--admin-socket".into(), socket.to_str().unwrap().into()]);
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let cmd = parse(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        let err = execute(cmd).await.unwrap_err().to_string();
        assert!(
            err.starts_with(want),
            "{argv:?}\n  gave: {err}\n  want: {want}"
        );
        assert!(
            !err.contains("nothing-here"),
            "{argv:?} tried to connect: {err}"
        );
    }
}

/// The one check of a bundle endpoint URL (config file, admin API, CLI): the fetcher's
/// parser, `HttpsUrl::parse`, so that every URL accepted can be fetched; also required
/// and bounded in length.
#[test]
fn bundle_endpoint_urls_are_checked_strictly() {
    use crate::federation::check_endpoint_url;
    for ok in [
        "https://partner.example",
        "https://partner.example:8443/bundle?x=1",
        "https://127.0.0.1:9443",
        "https://[::1]:9443/b",
    ] {
        let url = check_endpoint_url(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        assert_eq!(url.to_string(), ok);
    }
    for (bad, want) in [
        ("", "is required"),
        ("http://partner.example/", "plain http:// is refused"),
        ("HTTPS://partner.example/", "must start with https://"),
        ("partner.example", "must start with https://"),
        ("https://", "no host"),
        ("https:///b", "no host"),
        ("https://u:p@partner.example/", "user info"),
        ("https://partner.example/#f", "#fragment"),
        ("https://partner.example:0/", "not a port number"),
        ("https://partner.example:99999/", "not a port number"),
        ("https://partner.example/a b", "spaces"),
        ("https://[::1/", "unclosed ["),
        ("https://[nope]/", "not an IPv6 address"),
        ("https://-bad-/", "not a DNS name"),
    ] {
        let e = check_endpoint_url(bad).unwrap_err();
        assert!(e.contains(want), "{bad:?}: {e}");
    }
    let long = format!("https://h/{}", "a".repeat(3000));
    assert!(
        check_endpoint_url(&long)
            .unwrap_err()
            .contains("longer than 2048 bytes")
    );
}

fn federation_view() -> FederationView {
    FederationView {
        trust_domain: "partner.org".into(),
        bundle_endpoint_url: "https://partner.example:8443".into(),
        profile: "https_spiffe".into(),
        endpoint_spiffe_id: Some("spiffe://partner.org/spire/server".into()),
        web_roots: None,
        source: "api".into(),
        last_success_at: Some(1_893_456_000),
        last_error: Some("connection refused".into()),
        last_error_at: Some(1_893_455_700),
        next_refresh_at: Some(1_893_456_300),
        bundle: Some(StoredBundleView {
            trust_domain: "partner.org".into(),
            origin: "fetched".into(),
            sequence: 7,
            updated_at: 1_893_456_000,
            x509_authorities: 2,
            jwt_authorities: 1,
        }),
    }
}

#[test]
fn federation_human_and_json_formats() {
    assert_eq!(
        format_federation_human(&federation_view()),
        "Trust domain     : partner.org\n\
         Endpoint URL     : https://partner.example:8443\n\
         Endpoint profile : https_spiffe\n\
         Endpoint ID      : spiffe://partner.org/spire/server\n\
         Source           : api\n\
         Last success     : 2030-01-01T00:00:00Z\n\
         Last error       : 2029-12-31T23:55:00Z (connection refused)\n\
         Next refresh     : 2030-01-01T00:05:00Z\n\
         Bundle sequence  : 7\n\
         Bundle origin    : fetched\n\
         Bundle updated   : 2030-01-01T00:00:00Z\n\
         Bundle keys      : 2 X.509, 1 JWT\n"
    );
    let fresh = FederationView {
        profile: "https_web".into(),
        endpoint_spiffe_id: None,
        web_roots: None,
        source: "config".into(),
        last_success_at: None,
        last_error: None,
        last_error_at: None,
        next_refresh_at: None,
        bundle: None,
        ..federation_view()
    };
    let out = format_federation_human(&fresh);
    for line in [
        "Web PKI roots    : the system's trust store\n",
        "Source           : config\n",
        "Last success     : never\n",
        "Last error       : none\n",
        "Next refresh     : not scheduled\n",
        "Bundle           : none stored yet\n",
    ] {
        assert!(out.contains(line), "{line:?} missing from\n{out}");
    }
    assert!(!out.contains("Endpoint ID"), "{out}");
    let with_roots = FederationView {
        web_roots: Some(2),
        ..fresh.clone()
    };
    assert!(
        format_federation_human(&with_roots).contains("Web PKI roots    : 2 CA certificates\n")
    );
    assert_eq!(
        format_federations_human(&[]),
        "Found 0 federation relationships\n"
    );
    let two = format_federations_human(&[federation_view(), fresh.clone()]);
    assert!(
        two.starts_with("Found 2 federation relationships\n\nTrust domain"),
        "{two}"
    );
    assert!(two.contains("1 JWT\n\nTrust domain"), "{two}");
    let list = FederationList {
        federations: vec![federation_view(), fresh],
    };
    let v: serde_json::Value = serde_json::from_str(&json(&list).unwrap()).unwrap();
    assert_eq!(v["federations"][0]["bundle"]["sequence"], 7);
    assert_eq!(
        v["federations"][1]["last_success_at"],
        serde_json::Value::Null
    );
    let back: FederationList = serde_json::from_value(v).unwrap();
    assert_eq!(back, list);
}

#[test]
fn stored_bundle_formats() {
    let local = StoredBundleView {
        trust_domain: "example.org".into(),
        origin: "local".into(),
        sequence: 3,
        updated_at: 0,
        x509_authorities: 1,
        jwt_authorities: 1,
    };
    assert_eq!(
        format_stored_bundle_human(&local),
        "Trust domain     : example.org\n\
         Origin           : local\n\
         Sequence         : 3\n\
         X.509 authorities: 1\n\
         JWT authorities  : 1\n"
    );
    let foreign = StoredBundleView {
        trust_domain: "partner.org".into(),
        origin: "static".into(),
        updated_at: 1_893_456_000,
        ..local.clone()
    };
    assert!(
        format_stored_bundle_human(&foreign).contains("Updated at       : 2030-01-01T00:00:00Z\n")
    );
    assert_eq!(format_stored_bundles_human(&[]), "Found 0 bundles\n");
    assert!(
        format_stored_bundles_human(&[local, foreign])
            .starts_with("Found 2 bundles\n\nTrust domain     : example.org\n")
    );
}

#[test]
fn help_texts_name_the_federation_commands_and_spires_equivalents() {
    use clap::CommandFactory;
    let cmd = Cli::command();
    let help = |path: &[&str]| {
        let mut c = cmd.clone();
        for p in path {
            c = c
                .find_subcommand(p)
                .unwrap_or_else(|| panic!("{path:?}"))
                .clone();
        }
        c.render_long_help().to_string()
    };
    let fed = help(&["federation"]);
    for verb in ["create", "update", "delete", "list", "show", "refresh"] {
        assert!(fed.contains(verb), "{verb} missing from\n{fed}");
    }
    let create = help(&["federation", "create"]);
    for needle in [
        "--trust-domain <TRUST_DOMAIN>",
        "--bundle-endpoint-url <URL>",
        "--profile <PROFILE>",
        "https_spiffe",
        "https_web",
        "--endpoint-spiffe-id <SPIFFE_ID>",
        "spiffe://<trust domain>/spire/server",
        "--ca-file <FILE>",
        "--bundle-path <FILE>",
        "--bundle-format <BUNDLE_FORMAT>",
        "spire-server federation create",
        "-trustDomainBundlePath",
    ] {
        assert!(create.contains(needle), "{needle:?} missing from\n{create}");
    }
    let set = help(&["bundle", "set"]);
    for needle in ["--path <FILE>", "standard input", "spire-server bundle set"] {
        assert!(set.contains(needle), "{needle:?} missing from\n{set}");
    }
    let bundle = help(&["bundle"]);
    for verb in ["show", "set", "list", "delete"] {
        assert!(bundle.contains(verb), "{verb} missing from\n{bundle}");
    }
}

#[test]
fn an_https_spiffe_relationship_without_a_bundle_says_how_to_give_one() {
    let none = FederationView {
        bundle: None,
        ..federation_view()
    };
    let hint = https_spiffe_hint(&none);
    assert!(
        hint.contains("No bundle of partner.org is stored yet")
            && hint.contains("--bundle-path")
            && hint.contains("bundle set --trust-domain partner.org"),
        "{hint}"
    );
    // With a bundle, for https_web, or for an endpoint another trust domain serves:
    // nothing to say.
    assert_eq!(https_spiffe_hint(&federation_view()), "");
    let web = FederationView {
        profile: "https_web".into(),
        endpoint_spiffe_id: None,
        ..none.clone()
    };
    assert_eq!(https_spiffe_hint(&web), "");
    let served_by_other = FederationView {
        endpoint_spiffe_id: Some("spiffe://hub.org/spire/server".into()),
        ..none
    };
    assert_eq!(https_spiffe_hint(&served_by_other), "");
}
