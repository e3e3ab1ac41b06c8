//! The admin API served on a real socket in a tempdir, driven through the CLI (as an
//! operator would) and directly over gRPC (as a client that skips the CLI's checks).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use clap::Parser;
use tokio::sync::oneshot;

use carapace_core::{EntryId, RegistrationEntry, Selector, SpiffeId, TrustBundle, TrustDomain};

use super::test_support::{AGENT, new_admin_api};
use super::*;
use crate::admin::cli::{self as admin_cli, AdminCommand, EntryList, EntryView, TokenView};
use crate::datastore::AttestedAgent;
use carapace_core::clock::unix_now;

#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: AdminCommand,
}

struct Server {
    dir: tempfile::TempDir,
    socket: PathBuf,
    cache: Arc<EntryCache>,
    ca: Arc<CaManager>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<()>>,
}

async fn start() -> Server {
    let (api, cache, ca) = new_admin_api().await;
    serve_api(api, cache, ca)
}

/// Serves `api` on a new socket in a tempdir.
fn serve_api(api: AdminApi, cache: Arc<EntryCache>, ca: Arc<CaManager>) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("private").join("admin.sock");
    let listener = bind(&socket).unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, api, async move {
        let _ = rx.await;
    }));
    Server {
        dir,
        socket,
        cache,
        ca,
        stop: Some(tx),
        task,
    }
}

impl Server {
    /// Runs `carapace-server <args> --admin-socket <socket>` through the CLI.
    async fn run(&self, args: &[&str]) -> Result<String> {
        let socket = self.socket.to_str().unwrap();
        let argv = std::iter::once("carapace-server")
            .chain(args.iter().copied())
            .chain(["--admin-socket", socket]);
        let cli = Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        admin_cli::execute(cli.cmd).await
    }

    async fn ok(&self, args: &[&str]) -> String {
        self.run(args)
            .await
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    async fn err(&self, args: &[&str]) -> String {
        match self.run(args).await {
            Ok(out) => panic!("{args:?} succeeded:\n{out}"),
            Err(e) => e.to_string(),
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }
}

fn line_value<'a>(out: &'a str, label: &str) -> &'a str {
    out.lines()
        .find_map(|l| {
            l.strip_prefix(label)
                .and_then(|r| r.trim_start().strip_prefix(':'))
                .map(str::trim)
        })
        .unwrap_or_else(|| panic!("no {label:?} in\n{out}"))
}

#[tokio::test]
async fn entry_lifecycle_through_the_cli() {
    let s = start().await;
    let out = s
        .ok(&[
            "entry",
            "create",
            "--parent-id",
            AGENT,
            "--spiffe-id",
            "spiffe://example.org/web",
            "--selector",
            "unix:uid:1000",
            "--selector",
            "unix:user:www",
            "--x509-svid-ttl",
            "1h",
            "--jwt-svid-ttl",
            "2m",
            "--jwt-svid-include-jti",
            "--dns-name",
            "web.example.org",
            "--federates-with",
            "spiffe://partner.org",
            "--federates-with",
            "b.example",
            "--hint",
            "web",
            "--admin",
            "--expires-at",
            "2100-01-01T00:00:00Z",
        ])
        .await;
    let id = line_value(&out, "Entry ID").to_owned();
    let stored = s.cache.get_entry(&EntryId::new(&id).unwrap()).unwrap();
    assert_eq!(
        (stored.jwt_svid_ttl, stored.jwt_svid_include_jti),
        (Some(Duration::from_secs(120)), true)
    );
    let names: Vec<&str> = stored.federates_with.iter().map(|t| t.name()).collect();
    assert_eq!(names, ["partner.org", "b.example"]);
    uuid::Uuid::parse_str(&id).unwrap_or_else(|e| panic!("entry id {id:?} is not a uuid: {e}"));
    for line in [
        "SPIFFE ID        : spiffe://example.org/web\n",
        &format!("Parent ID        : {AGENT}\n"),
        "Revision         : 0\n",
        "X509-SVID TTL    : 1h\n",
        "JWT-SVID TTL     : 2m\n",
        "JWT-SVID jti     : true\n",
        "Selector         : unix:uid:1000\n",
        "Selector         : unix:user:www\n",
        "DNS name         : web.example.org\n",
        "FederatesWith    : partner.org\n",
        "FederatesWith    : b.example\n",
        "Hint             : web\n",
        "Admin            : true\n",
        "Expires at       : 2100-01-01T00:00:00Z\n",
    ] {
        assert!(out.contains(line), "{line:?} missing from\n{out}");
    }
    assert!(!out.contains("Downstream"), "{out}");

    // A second entry, in JSON.
    let out = s
        .ok(&[
            "entry",
            "create",
            "--parent-id",
            AGENT,
            "--spiffe-id",
            "spiffe://example.org/db",
            "--selector",
            "unix:uid:1001",
            "--downstream",
            "--output",
            "json",
        ])
        .await;
    let db: EntryView = serde_json::from_str(&out).unwrap();
    assert_ne!(db.id, id);
    assert_eq!(db.spiffe_id, "spiffe://example.org/db");
    assert_eq!(db.parent_id, AGENT);
    assert_eq!(db.selectors, ["unix:uid:1001"]);
    assert_eq!(
        (db.x509_svid_ttl, db.expires_at, db.revision),
        (None, None, 0)
    );
    assert!(db.downstream && !db.admin);
    assert!(
        (db.created_at - unix_now()).abs() < 60,
        "created_at is now: {}",
        db.created_at
    );

    // Show, by each filter.
    let all = s.ok(&["entry", "show"]).await;
    assert!(all.starts_with("Found 2 entries\n"), "{all}");
    let by_id = s.ok(&["entry", "show", "--id", &id]).await;
    assert!(
        by_id.starts_with("Found 1 entry\n") && by_id.contains(&id),
        "{by_id}"
    );
    let by_spiffe = s
        .ok(&["entry", "show", "--spiffe-id", "spiffe://example.org/db"])
        .await;
    assert!(
        by_spiffe.starts_with("Found 1 entry\n") && by_spiffe.contains(&db.id),
        "{by_spiffe}"
    );
    let by_parent = s.ok(&["entry", "show", "--parent-id", AGENT]).await;
    assert!(by_parent.starts_with("Found 2 entries\n"), "{by_parent}");
    let by_sel = s
        .ok(&["entry", "show", "--selector", "unix:user:www"])
        .await;
    assert!(
        by_sel.starts_with("Found 1 entry\n") && by_sel.contains(&id),
        "{by_sel}"
    );
    let none = s
        .ok(&[
            "entry",
            "show",
            "--selector",
            "unix:user:www",
            "--parent-id",
            "spiffe://example.org/x",
        ])
        .await;
    assert_eq!(none, "Found 0 entries\n");
    let list: EntryList = serde_json::from_str(
        &s.ok(&["entry", "show", "--id", &db.id, "--output", "json"])
            .await,
    )
    .unwrap();
    assert_eq!(list.entries, std::slice::from_ref(&db));

    // Update: full replace; the revision goes up and the creation time stays.
    let out = s
        .ok(&[
            "entry",
            "update",
            "--id",
            &id,
            "--parent-id",
            AGENT,
            "--spiffe-id",
            "spiffe://example.org/web2",
            "--selector",
            "unix:uid:1002",
            "--output",
            "json",
        ])
        .await;
    let updated: EntryView = serde_json::from_str(&out).unwrap();
    assert_eq!(updated.id, id);
    assert_eq!(updated.spiffe_id, "spiffe://example.org/web2");
    assert_eq!(updated.selectors, ["unix:uid:1002"]);
    assert_eq!(updated.revision, 1);
    assert_eq!(
        (updated.x509_svid_ttl, updated.expires_at, updated.admin),
        (None, None, false)
    );
    assert_eq!(
        (updated.jwt_svid_ttl, updated.jwt_svid_include_jti),
        (None, false),
        "an update without the JWT flags resets them to the defaults"
    );
    assert!(updated.dns_names.is_empty() && updated.hint.is_empty());
    assert_eq!(
        s.ok(&["entry", "show", "--spiffe-id", "spiffe://example.org/web"])
            .await,
        "Found 0 entries\n"
    );
    let err = s
        .err(&[
            "entry",
            "update",
            "--id",
            "no-such-entry",
            "--parent-id",
            AGENT,
            "--spiffe-id",
            "spiffe://example.org/x",
            "--selector",
            "unix:uid:1",
        ])
        .await;
    assert_eq!(err, "entry update: entry no-such-entry not found");

    // Count.
    assert_eq!(s.ok(&["entry", "count"]).await, "2 registration entries\n");
    assert_eq!(
        s.ok(&["entry", "count", "--selector", "unix:uid:1002"])
            .await,
        "1 registration entry\n"
    );
    let v: serde_json::Value =
        serde_json::from_str(&s.ok(&["entry", "count", "--output", "json"]).await).unwrap();
    assert_eq!(v["count"], 2);

    // Delete.
    assert_eq!(
        s.ok(&["entry", "delete", "--id", &id]).await,
        format!("Deleted entry {id}\n")
    );
    assert_eq!(s.ok(&["entry", "count"]).await, "1 registration entry\n");
    assert_eq!(s.cache.entry_count(), 1);
    let err = s.err(&["entry", "delete", "--id", &id]).await;
    assert_eq!(err, format!("entry delete: entry {id} not found"));
    s.stop().await;
}

#[tokio::test]
async fn out_of_range_times_and_ttls_are_refused_and_write_nothing() {
    let s = start().await;
    let create = |extra: &[&'static str]| {
        let mut v = vec![
            "entry",
            "create",
            "--parent-id",
            AGENT,
            "--spiffe-id",
            "spiffe://example.org/w",
            "--selector",
            "unix:uid:1",
        ];
        v.extend_from_slice(extra);
        v
    };
    // The CLI refuses before sending, naming the flag and the range.
    let err = s
        .err(&create(&["--x509-svid-ttl", "9223372036854775807s"]))
        .await;
    assert!(
        err.starts_with("entry create: --x509-svid-ttl: ") && err.contains("1s to 365 days"),
        "{err}"
    );
    let err = s.err(&create(&["--x509-svid-ttl", "366days"])).await;
    assert!(err.contains("--x509-svid-ttl"), "{err}");
    let clap_err = Cli::try_parse_from(
        std::iter::once("carapace-server")
            .chain(create(&["--expires-at", "99999999999999"]))
            .chain(["--admin-socket", "/x"]),
    )
    .unwrap_err()
    .to_string();
    assert!(
        clap_err.contains("--expires-at") && clap_err.contains("9999-12-31T23:59:59Z"),
        "{clap_err}"
    );
    let err = s
        .err(&["token", "generate", "--ttl", "9223372036854775807"])
        .await;
    assert!(err.starts_with("token generate: --ttl: "), "{err}");
    let err = s
        .err(&[
            "x509",
            "mint",
            "--spiffe-id",
            "spiffe://example.org/m",
            "--ttl",
            "400days",
        ])
        .await;
    assert!(err.starts_with("x509 mint: --ttl: "), "{err}");

    // The server refuses them too when asked directly: InvalidArgument, naming the field.
    let mut client = admin_cli::connect(&s.socket, None).await.unwrap();
    let good = types::Entry {
        spiffe_id: "spiffe://example.org/w".into(),
        parent_id: AGENT.into(),
        selectors: vec![types::Selector {
            r#type: "unix".into(),
            value: "uid:1".into(),
        }],
        ..Default::default()
    };
    for (field, wire) in [
        (
            "x509_svid_ttl",
            types::Entry {
                x509_svid_ttl: i64::MAX,
                ..good.clone()
            },
        ),
        (
            "x509_svid_ttl",
            types::Entry {
                x509_svid_ttl: 366 * 86_400,
                ..good.clone()
            },
        ),
        (
            "jwt_svid_ttl",
            types::Entry {
                jwt_svid_ttl: i64::MAX,
                ..good.clone()
            },
        ),
        (
            "jwt_svid_ttl",
            types::Entry {
                jwt_svid_ttl: 86_401,
                jwt_svid_include_jti: true,
                ..good.clone()
            },
        ),
        (
            "jwt_svid_ttl",
            types::Entry {
                jwt_svid_ttl: -1,
                ..good.clone()
            },
        ),
        (
            "expires_at",
            types::Entry {
                expires_at: 99_999_999_999_999,
                ..good.clone()
            },
        ),
        (
            "selector",
            types::Entry {
                selectors: vec![types::Selector {
                    r#type: "unix".into(),
                    value: "uid:01".into(),
                }],
                ..good.clone()
            },
        ),
    ] {
        let status = client
            .create_entry(CreateEntryRequest {
                entry: Some(wire.clone()),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{field}");
        assert!(status.message().contains(field), "{}", status.message());
    }
    let status = client
        .create_join_token(CreateJoinTokenRequest {
            ttl: i64::MAX,
            spiffe_id: "spiffe://example.org/alias".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("ttl"), "{}", status.message());
    let status = client
        .mint_x509svid(MintX509svidRequest {
            spiffe_id: "spiffe://example.org/m".into(),
            csr: vec![1],
            ttl: i64::MAX,
            dns_names: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("ttl"), "{}", status.message());

    // Nothing was written: no entry, no alias entry, no join token.
    assert_eq!(s.ok(&["entry", "count"]).await, "0 registration entries\n");
    assert_eq!(s.cache.entry_count(), 0);
    assert_eq!(
        s.cache
            .datastore()
            .prune_expired_join_tokens(i64::MAX)
            .await
            .unwrap(),
        0
    );

    // An update to an out-of-range value changes nothing either.
    let created = client
        .create_entry(CreateEntryRequest {
            entry: Some(good.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    let status = client
        .update_entry(UpdateEntryRequest {
            entry: Some(types::Entry {
                expires_at: i64::MAX,
                ..created.clone()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let status = client
        .update_entry(UpdateEntryRequest {
            entry: Some(types::Entry {
                jwt_svid_ttl: 86_401,
                jwt_svid_include_jti: true,
                ..created.clone()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("jwt_svid_ttl"),
        "{}",
        status.message()
    );
    let shown = s.ok(&["entry", "show", "--output", "json"]).await;
    let list: EntryList = serde_json::from_str(&shown).unwrap();
    assert_eq!(list.entries.len(), 1);
    assert_eq!(list.entries[0].expires_at, None);
    assert_eq!(
        (
            list.entries[0].jwt_svid_ttl,
            list.entries[0].jwt_svid_include_jti
        ),
        (None, false),
        "the refused update left the JWT settings alone"
    );
    assert_eq!(list.entries[0].revision, created.revision);
    // The edges of the ranges are accepted: uid 1 in canonical form, the last second
    // X.509 can write, and a 365-day TTL.
    s.ok(&create(&[
        "--selector",
        "unix:gid:0",
        "--expires-at",
        "9999-12-31T23:59:59Z",
        "--x509-svid-ttl",
        "365days",
        "--jwt-svid-ttl",
        "1day",
        "--jwt-svid-include-jti",
    ]))
    .await;
    s.stop().await;
}

#[tokio::test]
async fn entry_show_prints_rows_an_older_version_stored_with_extreme_values() {
    let s = start().await;
    // Written to the datastore directly, past validation, as an older version could.
    let e = RegistrationEntry {
        federates_with: Vec::new(),
        id: EntryId::new("old-row").unwrap(),
        spiffe_id: "spiffe://example.org/old".parse().unwrap(),
        parent_id: AGENT.parse().unwrap(),
        selectors: [Selector::stored("unix", "uid:01").unwrap()]
            .into_iter()
            .collect(),
        x509_svid_ttl: Some(Duration::from_secs(i64::MAX as u64)),
        jwt_svid_ttl: None,
        jwt_svid_include_jti: false,
        dns_names: vec![],
        hint: String::new(),
        admin: false,
        downstream: false,
        expires_at: Some(99_999_999_999_999),
        revision: 0,
        created_at: 1,
    };
    s.cache.datastore().create_entry(&e).await.unwrap();
    let out = s.ok(&["entry", "show"]).await;
    assert!(out.contains("Entry ID         : old-row"), "{out}");
    assert!(
        out.contains("Expires at       : unix 99999999999999 (outside 1970-01-01..9999-12-31)"),
        "{out}"
    );
    assert!(out.contains("Selector         : unix:uid:01"), "{out}");
    let json = s.ok(&["entry", "show", "--output", "json"]).await;
    let list: EntryList = serde_json::from_str(&json).unwrap();
    assert_eq!(list.entries[0].expires_at, Some(99_999_999_999_999));
    // And it can be deleted.
    s.ok(&["entry", "delete", "--id", "old-row"]).await;
    assert_eq!(s.ok(&["entry", "count"]).await, "0 registration entries\n");
    s.stop().await;
}

#[tokio::test]
async fn bad_entries_write_nothing() {
    let s = start().await;
    let create = |spiffe: &'static str, parent: &'static str, sel: &'static str| {
        [
            "entry",
            "create",
            "--parent-id",
            parent,
            "--spiffe-id",
            spiffe,
            "--selector",
            sel,
        ]
    };
    let err = s
        .err(&create("spiffe://example.org/a b", AGENT, "unix:uid:1"))
        .await;
    assert!(
        err.starts_with("entry create: --spiffe-id: invalid SPIFFE ID"),
        "{err}"
    );
    let err = s
        .err(&create("spiffe://example.org/w", AGENT, "unix:uuid:0"))
        .await;
    assert!(
        err.starts_with("entry create: --selector: invalid selector \"unix:uuid:0\""),
        "{err}"
    );
    let err = s
        .err(&create("spiffe://example.org/spire/w", AGENT, "unix:uid:1"))
        .await;
    assert!(
        err.starts_with("entry create: invalid entry: spiffe_id:")
            && err.contains("reserved path /spire"),
        "{err}"
    );
    let err = s
        .err(&create(
            "spiffe://example.org/w",
            "spiffe://other.org/agent",
            "unix:uid:1",
        ))
        .await;
    assert!(
        err.contains("parent_id") && err.contains("not in trust domain example.org"),
        "{err}"
    );
    // Federating with the own trust domain, or twice with one.
    for (feds, want) in [
        (&["example.org"][..], "is the entry's own trust domain"),
        (&["spiffe://b.org", "b.org"][..], "b.org is named twice"),
    ] {
        let mut argv = create("spiffe://example.org/w", AGENT, "unix:uid:1").to_vec();
        for f in feds {
            argv.extend(["--federates-with", f]);
        }
        let err = s.err(&argv).await;
        assert!(
            err.contains("federates_with") && err.contains(want),
            "{err}"
        );
    }

    // No selectors: clap refuses; the server refuses too when asked directly.
    let argv = [
        "carapace-server",
        "entry",
        "create",
        "--parent-id",
        AGENT,
        "--spiffe-id",
        "spiffe://example.org/w",
    ];
    assert!(
        Cli::try_parse_from(argv)
            .unwrap_err()
            .to_string()
            .contains("--selector")
    );
    let mut client = admin_cli::connect(&s.socket, None).await.unwrap();
    let wire = types::Entry {
        id: "client-chosen".into(),
        spiffe_id: "spiffe://example.org/w".into(),
        parent_id: AGENT.into(),
        ..Default::default()
    };
    let status = client
        .create_entry(CreateEntryRequest {
            entry: Some(wire.clone()),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("selectors"),
        "{}",
        status.message()
    );
    let status = client
        .create_entry(CreateEntryRequest { entry: None })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    // Malformed filters are refused, naming the filter.
    let status = client
        .list_entries(ListEntriesRequest {
            spiffe_id: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("filter spiffe_id"),
        "{}",
        status.message()
    );

    assert_eq!(s.ok(&["entry", "count"]).await, "0 registration entries\n");
    assert_eq!(s.cache.entry_count(), 0);

    // A client-chosen id is ignored.
    let wire = types::Entry {
        selectors: vec![types::Selector {
            r#type: "unix".into(),
            value: "uid:1".into(),
        }],
        ..wire
    };
    let e = client
        .create_entry(CreateEntryRequest { entry: Some(wire) })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(e.id, "client-chosen");
    s.stop().await;
}

#[tokio::test]
async fn nothing_is_sent_when_client_side_checks_fail() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nothing.sock");
    let cli = Cli::try_parse_from([
        "carapace-server",
        "entry",
        "create",
        "--parent-id",
        AGENT,
        "--spiffe-id",
        "bad",
        "--selector",
        "unix:uid:1",
        "--admin-socket",
        missing.to_str().unwrap(),
    ])
    .unwrap();
    let err = admin_cli::execute(cli.cmd).await.unwrap_err().to_string();
    assert!(
        err.contains("--spiffe-id") && !err.contains("cannot reach"),
        "{err}"
    );
    let cli = Cli::try_parse_from([
        "carapace-server",
        "healthcheck",
        "--admin-socket",
        missing.to_str().unwrap(),
    ])
    .unwrap();
    let err = admin_cli::execute(cli.cmd).await.unwrap_err().to_string();
    assert!(
        err.starts_with(&format!(
            "cannot reach the server's admin socket {}: ",
            missing.display()
        )) && err.ends_with("(is carapace-server running? is --admin-socket right?)"),
        "{err}"
    );
}

/// Captures every log line of this thread.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn join_tokens_and_their_alias_entries() {
    let logs = Capture::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let s = start().await;

    let out = s.ok(&["token", "generate"]).await;
    let token = line_value(&out, "Token");
    let (id, secret) = token.split_once('.').unwrap();
    let hex = |v: &str, n: usize| v.len() == n && v.bytes().all(|b| b.is_ascii_hexdigit());
    assert!(hex(id, 16) && hex(secret, 48), "token {token:?}");
    assert_eq!(
        line_value(&out, "Agent ID"),
        format!("spiffe://example.org/spire/agent/join_token/{id}")
    );
    let expires = humantime::parse_rfc3339(line_value(&out, "Expires")).unwrap();
    let left = expires
        .duration_since(std::time::SystemTime::now())
        .unwrap()
        .as_secs();
    assert!((500..=600).contains(&left), "default ttl: {left}");
    assert_eq!(s.cache.entry_count(), 0, "no alias without --spiffe-id");

    let out = s
        .ok(&[
            "token",
            "generate",
            "--spiffe-id",
            "spiffe://example.org/node-group",
            "--ttl",
            "120",
            "--output",
            "json",
        ])
        .await;
    let t: TokenView = serde_json::from_str(&out).unwrap();
    assert!(
        t.agent_id
            .starts_with("spiffe://example.org/spire/agent/join_token/")
    );
    assert!(
        (t.expires_at - unix_now() - 120).abs() <= 2,
        "ttl 120: {}",
        t.expires_at
    );
    let alias_id = t.agent_id.rsplit('/').next().unwrap().to_owned();
    let list: EntryList = serde_json::from_str(
        &s.ok(&[
            "entry",
            "show",
            "--parent-id",
            &t.agent_id,
            "--output",
            "json",
        ])
        .await,
    )
    .unwrap();
    assert_eq!(list.entries.len(), 1);
    assert_eq!(list.entries[0].spiffe_id, "spiffe://example.org/node-group");
    assert_eq!(
        list.entries[0].selectors,
        [format!("join_token:{alias_id}")]
    );

    // A bad alias ID writes neither the token nor the entry; negative ttls are refused.
    let err = s
        .err(&[
            "token",
            "generate",
            "--spiffe-id",
            "spiffe://example.org/spire/x",
        ])
        .await;
    assert!(err.contains("reserved"), "{err}");
    let mut client = admin_cli::connect(&s.socket, None).await.unwrap();
    let status = client
        .create_join_token(CreateJoinTokenRequest {
            ttl: -1,
            spiffe_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(s.cache.entry_count(), 1);

    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("created join token") && logs.contains(id),
        "the capture works:\n{logs}"
    );
    assert!(
        !logs.contains(secret),
        "a token secret reached the logs:\n{logs}"
    );
    assert!(!logs.contains(&t.token), "a token reached the logs");
    let (_, secret2) = t.token.split_once('.').unwrap();
    assert!(!logs.contains(secret2), "a token secret reached the logs");
    s.stop().await;
}

#[tokio::test]
async fn bundle_show_in_both_formats() {
    let s = start().await;
    let td = TrustDomain::new("example.org").unwrap();
    let expected = s.ca.bundle().borrow().clone();
    let pem = s.ok(&["bundle", "show"]).await;
    assert!(
        pem.starts_with("-----BEGIN CERTIFICATE-----\n")
            && pem.ends_with("-----END CERTIFICATE-----\n")
    );
    let b = TrustBundle::from_pem(td.clone(), &pem).unwrap();
    assert_eq!(b.x509_authorities, expected.x509_authorities);
    let json = s.ok(&["bundle", "show", "--format", "spiffe"]).await;
    let b = TrustBundle::from_spiffe_json(td.clone(), &json).unwrap();
    assert_eq!(b.x509_authorities, expected.x509_authorities);
    assert_eq!(b.sequence, expected.sequence);
    let json = s.ok(&["bundle", "show", "--output", "json"]).await;
    TrustBundle::from_spiffe_json(td, &json).unwrap();
    s.stop().await;
}

#[tokio::test]
async fn localauthority_x509_lifecycle_through_the_cli() {
    let s = start().await;
    let td = TrustDomain::new("example.org").unwrap();
    let show = |out: String| -> serde_json::Value { serde_json::from_str(&out).unwrap() };
    let state = show(
        s.ok(&["localauthority", "x509", "show", "--output", "json"])
            .await,
    );
    let first = state["active"]["authority_id"].as_str().unwrap().to_owned();
    assert_eq!(state["active"]["status"], "active");
    assert_eq!(state["active"]["tainted"], false);
    assert!(state["active"].get("upstream").is_none(), "self-signed");
    assert!(state["prepared"].is_null());
    assert_eq!(state["old"], serde_json::json!([]));
    let human = s.ok(&["localauthority", "x509", "show"]).await;
    assert!(human.starts_with("Active X.509 authority:\n"), "{human}");
    assert!(
        human.contains(&format!("  Authority ID   : {first}\n")),
        "{human}"
    );
    assert!(
        human.contains("No prepared X.509 authority found"),
        "{human}"
    );

    // Out-of-order steps are refused with the reason, and change nothing.
    let bundle0 = s.ca.bundle().borrow().clone();
    let err = s
        .err(&["localauthority", "x509", "taint", "--authority-id", &first])
        .await;
    assert!(err.contains("active X.509 authority"), "{err}");
    let err = s.err(&["localauthority", "x509", "activate"]).await;
    assert!(err.contains("no prepared X.509 authority"), "{err}");
    let err = s
        .err(&[
            "localauthority",
            "x509",
            "revoke",
            "--authority-id",
            "abcdef",
        ])
        .await;
    assert!(err.contains("no X.509 authority abcdef"), "{err}");
    assert_eq!(*s.ca.bundle().borrow().as_ref(), *bundle0);

    let prepared = show(
        s.ok(&["localauthority", "x509", "prepare", "--output", "json"])
            .await,
    );
    let next = prepared["authority_id"].as_str().unwrap().to_owned();
    assert_eq!(prepared["status"], "prepared");
    let state = show(
        s.ok(&["localauthority", "x509", "show", "--output", "json"])
            .await,
    );
    assert_eq!(state["prepared"]["authority_id"], next.as_str());
    assert_eq!(s.ca.bundle().borrow().x509_authorities.len(), 2);
    let out = s
        .ok(&[
            "localauthority",
            "x509",
            "activate",
            "--authority-id",
            &next,
        ])
        .await;
    assert!(out.starts_with("Activated X.509 authority:\n"), "{out}");
    assert!(out.contains(&next), "{out}");
    let state = show(
        s.ok(&["localauthority", "x509", "show", "--output", "json"])
            .await,
    );
    assert_eq!(state["active"]["authority_id"], next.as_str());
    assert_eq!(state["old"][0]["authority_id"], first.as_str());
    assert_eq!(state["old"][0]["status"], "old");

    // Revoking an untainted authority is refused; the bundle stays as it is.
    let before = s.ca.bundle().borrow().clone();
    let err = s
        .err(&["localauthority", "x509", "revoke", "--authority-id", &first])
        .await;
    assert!(err.contains("only a tainted"), "{err}");
    assert_eq!(*s.ca.bundle().borrow().as_ref(), *before);

    let tainted = show(
        s.ok(&[
            "localauthority",
            "x509",
            "taint",
            "--authority-id",
            &first,
            "--output",
            "json",
        ])
        .await,
    );
    assert_eq!(tainted["tainted"], true);
    // The bundle the admin API (and the node API) sends names it tainted.
    let mut client = admin_cli::connect(&s.socket, None).await.unwrap();
    let wire = client
        .get_bundle(GetBundleRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(wire.tainted_x509_authorities.len(), 1);
    assert!(wire.sequence > before.sequence);
    let first_der = wire.tainted_x509_authorities[0].clone();
    assert_eq!(crate::ca::authority_id(&first_der), first);
    let pem = s.ok(&["bundle", "show"]).await;
    assert!(
        TrustBundle::from_pem(td.clone(), &pem)
            .unwrap()
            .x509_authorities
            .contains(&first_der)
    );

    let out = s
        .ok(&["localauthority", "x509", "revoke", "--authority-id", &first])
        .await;
    assert!(out.starts_with("Revoked X.509 authority:\n"), "{out}");
    let pem = s.ok(&["bundle", "show"]).await;
    let b = TrustBundle::from_pem(td, &pem).unwrap();
    assert!(!b.x509_authorities.contains(&first_der));
    assert_eq!(b.x509_authorities.len(), 1);
    let state = show(
        s.ok(&["localauthority", "x509", "show", "--output", "json"])
            .await,
    );
    assert_eq!(state["old"], serde_json::json!([]));

    // The server refuses what the CLI would not send.
    for bad in ["", "zz"] {
        let status = client
            .taint_x509_authority(carapace_proto::admin::TaintX509AuthorityRequest {
                authority_id: bad.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{bad:?}");
    }
    let status = client
        .revoke_x509_authority(carapace_proto::admin::RevokeX509AuthorityRequest {
            authority_id: next.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    s.stop().await;
}

#[tokio::test]
async fn x509_mint_writes_a_verifiable_svid() {
    use std::os::unix::fs::PermissionsExt as _;
    let s = start().await;
    let out_dir = s.dir.path().join("out");
    let out = s
        .ok(&[
            "x509",
            "mint",
            "--spiffe-id",
            "spiffe://example.org/batch",
            "--ttl",
            "10m",
            "--dns-name",
            "batch.example.org",
            "--write",
            out_dir.to_str().unwrap(),
        ])
        .await;
    assert!(
        out.contains(&format!(
            "Private key written to {}",
            out_dir.join("svid.key").display()
        )),
        "{out}"
    );
    let key_mode = std::fs::metadata(out_dir.join("svid.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(key_mode, 0o600);
    let chain = carapace_core::bundle::certs_from_pem(
        &std::fs::read_to_string(out_dir.join("svid.pem")).unwrap(),
    )
    .unwrap();
    let td = TrustDomain::new("example.org").unwrap();
    let bundle = TrustBundle::from_pem(
        td,
        &std::fs::read_to_string(out_dir.join("bundle.pem")).unwrap(),
    )
    .unwrap();
    let now = unix_now();
    let v = carapace_core::x509svid::verify_chain(&chain, &bundle, now as u64).unwrap();
    assert_eq!(v.spiffe_id.as_str(), "spiffe://example.org/batch");
    assert!(
        (v.not_after - now - 600).abs() <= 2,
        "ttl 10m: {}",
        v.not_after - now
    );
    let key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(out_dir.join("svid.key")).unwrap())
        .unwrap();
    assert_eq!(
        carapace_core::x509svid::public_key_of(&chain[0]).unwrap(),
        rcgen::PublicKeyData::subject_public_key_info(&key)
    );

    // Printed, like spire-server x509 mint.
    let out = s
        .ok(&["x509", "mint", "--spiffe-id", "spiffe://example.org/batch"])
        .await;
    assert!(
        out.starts_with("X509-SVID:\n-----BEGIN CERTIFICATE-----"),
        "{out}"
    );
    assert!(
        out.contains("Private key:\n-----BEGIN PRIVATE KEY-----"),
        "{out}"
    );
    assert!(
        out.contains("Root CAs:\n-----BEGIN CERTIFICATE-----"),
        "{out}"
    );

    let err = s
        .err(&[
            "x509",
            "mint",
            "--spiffe-id",
            "spiffe://example.org/spire/agent/x/y",
        ])
        .await;
    assert!(
        err.starts_with("x509 mint: spiffe_id:") && err.contains("reserved path /spire"),
        "{err}"
    );
    let err = s
        .err(&["x509", "mint", "--spiffe-id", "spiffe://other.org/w"])
        .await;
    assert!(err.contains("not in trust domain example.org"), "{err}");
    let mut client = admin_cli::connect(&s.socket, None).await.unwrap();
    let status = client
        .mint_x509svid(MintX509svidRequest {
            spiffe_id: "spiffe://example.org/w".into(),
            csr: b"not a csr".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("csr"), "{}", status.message());
    s.stop().await;
}

#[tokio::test]
async fn agents_list_show_ban_evict() {
    let s = start().await;
    let id: SpiffeId = AGENT.parse().unwrap();
    s.cache
        .upsert_agent(AttestedAgent {
            spiffe_id: id.clone(),
            attestor: "join_token".into(),
            serial: "0a1b2c".into(),
            new_serial: None,
            expires_at: 1_893_456_000,
            banned: false,
            reattestable: false,
            attested_at: 1_893_450_000,
            selectors: ["region:eu".parse::<Selector>().unwrap()]
                .into_iter()
                .collect(),
            refused: None,
        })
        .await
        .unwrap();
    let list = s.ok(&["agent", "list"]).await;
    assert!(
        list.starts_with("Found 1 attested agent\n") && list.contains(AGENT),
        "{list}"
    );
    let show = s.ok(&["agent", "show", "--spiffe-id", AGENT]).await;
    for line in [
        "Attestation type : join_token\n",
        "Serial number    : 0a1b2c\n",
        "Expires at       : 2030-01-01T00:00:00Z\n",
        "Banned           : false\n",
        "Selector         : region:eu\n",
    ] {
        assert!(show.contains(line), "{line:?} missing from\n{show}");
    }
    assert_eq!(
        s.ok(&["agent", "ban", "--spiffe-id", AGENT]).await,
        format!("Agent banned: {AGENT}\n")
    );
    assert!(s.cache.get_agent(&id).unwrap().banned);
    let v: serde_json::Value = serde_json::from_str(
        &s.ok(&["agent", "show", "--spiffe-id", AGENT, "--output", "json"])
            .await,
    )
    .unwrap();
    assert_eq!(v["banned"], true);
    assert_eq!(
        s.ok(&["agent", "evict", "--spiffe-id", AGENT]).await,
        format!("Agent evicted: {AGENT}\n")
    );
    assert!(s.cache.get_agent(&id).is_none());
    let err = s.err(&["agent", "show", "--spiffe-id", AGENT]).await;
    assert_eq!(err, format!("agent show: agent {AGENT} not found"));
    let err = s.err(&["agent", "ban", "--spiffe-id", AGENT]).await;
    assert!(err.contains("not found"), "{err}");
    let err = s.err(&["agent", "evict", "--spiffe-id", AGENT]).await;
    assert!(err.contains("not found"), "{err}");
    assert_eq!(s.ok(&["agent", "list"]).await, "Found 0 attested agents\n");
    s.stop().await;
}

#[tokio::test]
async fn healthcheck_and_socket_permissions() {
    use std::os::unix::fs::PermissionsExt as _;
    let s = start().await;
    assert_eq!(s.ok(&["healthcheck"]).await, "Server is healthy.\n");
    let v: serde_json::Value =
        serde_json::from_str(&s.ok(&["healthcheck", "--output", "json"]).await).unwrap();
    assert_eq!(v["healthy"], true);
    assert_eq!(v["trust_domain"], "example.org");
    assert_eq!(v["ca_expires_at"], s.ca.active().unwrap().not_after);
    assert_eq!(
        (v["agents"].as_u64(), v["entries"].as_u64()),
        (Some(0), Some(0))
    );
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&s.socket), 0o600);
    assert_eq!(mode(s.socket.parent().unwrap()), 0o700);
    s.stop().await;
}

#[tokio::test]
async fn bind_handles_directories_and_leftovers() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    // An existing directory with a loose mode is refused with the chmod to run, and
    // left as it was: the server never changes what it did not create.
    let loose = dir.path().join("loose");
    std::fs::create_dir(&loose).unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o755)).unwrap();
    let err = bind(&loose.join("admin.sock")).unwrap_err().to_string();
    assert!(
        err.contains(&format!("chmod 700 {}", loose.display())),
        "{err}"
    );
    assert_eq!(mode(&loose), 0o755);
    assert!(!loose.join("admin.sock").exists());
    // A missing one is created private.
    let private = dir.path().join("private");
    let socket = private.join("admin.sock");
    let first = bind(&socket).unwrap();
    assert_eq!(mode(&private), 0o700);
    // A live socket is not taken over.
    let err = bind(&socket).unwrap_err().to_string();
    assert!(
        err.contains(&format!(
            "admin socket {}: address in use",
            socket.display()
        )),
        "{err}"
    );
    // A stale one (its listener gone, its file left) is replaced.
    drop(first);
    assert!(socket.exists());
    let _second = bind(&socket).unwrap();
    // A regular file is never deleted.
    let file = private.join("file.sock");
    std::fs::write(&file, b"keep me").unwrap();
    let err = bind(&file).unwrap_err().to_string();
    assert!(
        err.contains("not a socket") && err.contains(&file.display().to_string()),
        "{err}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    // The parent must be a directory.
    let err = bind(&file.join("admin.sock")).unwrap_err().to_string();
    assert!(err.contains("not a directory"), "{err}");
}

#[tokio::test]
async fn bind_refuses_paths_others_could_change_and_changes_nothing() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    // A directory another user pre-created (the /tmp/carapace-server attack): they
    // could swap what lies below it.
    let theirs = dir.path().join("carapace-server");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    let err = bind(&theirs.join("private/admin.sock"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("{} is owned by uid 65534", theirs.display())),
        "{err}"
    );
    assert!(!theirs.join("private").exists());
    // A shared directory (mode 1777) as the socket's directory: refused, not made
    // 0700 (as root with --admin-socket /tmp/admin.sock, that was /tmp).
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let err = bind(&shared.join("admin.sock")).unwrap_err().to_string();
    assert!(err.contains("has mode 1777"), "{err}");
    assert_eq!(mode(&shared), 0o1777);
    assert!(!shared.join("admin.sock").exists());
    // A group-writable directory on the way.
    let group = dir.path().join("group");
    std::fs::create_dir(&group).unwrap();
    std::fs::set_permissions(&group, std::fs::Permissions::from_mode(0o770)).unwrap();
    let err = bind(&group.join("private/admin.sock"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("has mode 770"), "{err}");
    assert_eq!(mode(&group), 0o770);
    assert!(!group.join("private").exists());
}

/// `n` wire entries under AGENT, `/batch/<first + i>`, each with its own selector.
fn wire_batch(first: usize, n: usize) -> Vec<types::Entry> {
    (first..first + n)
        .map(|i| types::Entry {
            spiffe_id: format!("spiffe://example.org/batch/{i}"),
            parent_id: AGENT.into(),
            selectors: vec![types::Selector {
                r#type: "unix".into(),
                value: format!("uid:{i}"),
            }],
            dns_names: vec![format!("w{i}.example.org")],
            ..types::Entry::default()
        })
        .collect()
}

#[tokio::test]
async fn batch_create_entry_writes_all_or_nothing_and_names_every_refusal() {
    let s = start().await;
    let mut client = admin_cli::connect(&s.socket, None).await.unwrap();

    // Over the limit: refused as a whole, naming the count and the limit.
    let err = client
        .batch_create_entry(admin::BatchCreateEntryRequest {
            entries: wire_batch(0, 1_001),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("1001 entries") && err.message().contains("at most 1000"),
        "{}",
        err.message()
    );

    // A stored entry, then a batch with a foreign SPIFFE ID (2), an entry similar to
    // the stored one (4), and a duplicate within the batch (6 repeats 5).
    let stored = s
        .ok(&[
            "entry",
            "create",
            "--parent-id",
            AGENT,
            "--spiffe-id",
            "spiffe://example.org/batch/stored",
            "--selector",
            "unix:uid:4242",
        ])
        .await;
    let stored_id = line_value(&stored, "Entry ID").to_owned();
    let rev = s.cache.revision();
    let mut bad = wire_batch(0, 8);
    bad[2].spiffe_id = "spiffe://other.org/w".into();
    bad[4].spiffe_id = "spiffe://example.org/batch/stored".into();
    bad[4].selectors[0].value = "uid:4242".into();
    bad[6] = bad[5].clone();
    let resp = client
        .batch_create_entry(admin::BatchCreateEntryRequest { entries: bad })
        .await
        .unwrap()
        .into_inner();
    assert!(!resp.created);
    assert_eq!(resp.results.len(), 8);
    assert!(resp.results.iter().all(|r| r.entry.is_none()));
    let refused: Vec<(u32, i32)> = resp
        .results
        .iter()
        .filter(|r| r.code != 0)
        .map(|r| (r.index, r.code))
        .collect();
    assert_eq!(
        refused,
        [
            (2, tonic::Code::InvalidArgument as i32),
            (4, tonic::Code::AlreadyExists as i32),
            (6, tonic::Code::AlreadyExists as i32),
        ]
    );
    assert!(
        resp.results[2]
            .message
            .contains("not in trust domain example.org")
    );
    assert!(
        resp.results[4].message.contains(&stored_id),
        "{}",
        resp.results[4].message
    );
    assert!(resp.results[6].message.contains("entry 5 of this batch"));
    let filter = crate::datastore::EntryFilter::default();
    assert_eq!(
        s.cache.datastore().count_entries(&filter).await.unwrap(),
        1,
        "nothing written"
    );
    assert_eq!(s.cache.entry_count(), 1);
    assert_eq!(
        s.cache.revision(),
        rev,
        "no revision bump for a refused batch"
    );

    // A malformed SPIFFE ID (which the CLI would have caught) is named as well.
    let mut malformed = wire_batch(0, 3);
    malformed[1].spiffe_id = "spiffe://example.org/a b".into();
    let resp = client
        .batch_create_entry(admin::BatchCreateEntryRequest { entries: malformed })
        .await
        .unwrap()
        .into_inner();
    assert!(!resp.created);
    assert_eq!(resp.results[1].code, tonic::Code::InvalidArgument as i32);
    assert!(
        resp.results[1].message.contains("spiffe_id")
            || resp.results[1].message.contains("SPIFFE ID"),
        "{}",
        resp.results[1].message
    );
    assert_eq!(s.cache.datastore().count_entries(&filter).await.unwrap(), 1);

    // A full batch of 1,000: written, indexed, one revision bump; a client id is kept.
    let mut good = wire_batch(0, 1_000);
    good[7].id = "my-own-id".into();
    let resp = client
        .batch_create_entry(admin::BatchCreateEntryRequest { entries: good })
        .await
        .unwrap()
        .into_inner();
    assert!(resp.created);
    assert_eq!(resp.results.len(), 1_000);
    assert!(
        resp.results
            .iter()
            .all(|r| r.code == 0 && r.entry.is_some())
    );
    let e7 = resp.results[7].entry.as_ref().unwrap();
    assert_eq!(
        (e7.id.as_str(), e7.spiffe_id.as_str()),
        ("my-own-id", "spiffe://example.org/batch/7")
    );
    assert_eq!(
        s.cache.datastore().count_entries(&filter).await.unwrap(),
        1_001
    );
    assert_eq!(s.cache.entry_count(), 1_001);
    assert_eq!(
        s.cache.revision(),
        rev + 1,
        "the revision is bumped once per batch"
    );
    let id7 = EntryId::new("my-own-id").unwrap();
    assert_eq!(
        s.cache.get_entry(&id7).unwrap().dns_names,
        ["w7.example.org"]
    );
    let agent: SpiffeId = AGENT.parse().unwrap();
    assert_eq!(s.cache.authorized_entries(&agent).len(), 1_001);

    // The same batch again: every entry is refused (the id and similar entries exist).
    let resp = client
        .batch_create_entry(admin::BatchCreateEntryRequest {
            entries: wire_batch(0, 10),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!resp.created);
    assert!(
        resp.results
            .iter()
            .all(|r| r.code == tonic::Code::AlreadyExists as i32)
    );
    s.stop().await;
}

#[tokio::test]
async fn entry_create_data_writes_the_batches_before_a_refused_one() {
    let s = start().await;
    // 2,500 entries: batch 2 has one outside the trust domain.
    let mut entries: Vec<serde_json::Value> = (0..2_500)
        .map(|i| {
            serde_json::json!({
                "spiffe_id": format!("spiffe://example.org/file/{i}"),
                "parent_id": AGENT,
                "selectors": [{"type": "unix", "value": format!("uid:{i}")}],
                "x509_svid_ttl": 600,
            })
        })
        .collect();
    entries[1_234]["spiffe_id"] = "spiffe://other.org/w".into();
    let path = s.dir.path().join("entries.json");
    std::fs::write(&path, serde_json::json!({ "entries": entries }).to_string()).unwrap();
    let err = s
        .err(&["entry", "create", "--data", path.to_str().unwrap()])
        .await;
    assert!(
        err.starts_with(
            "entry create: batch 1 written (1000 entries, entries[0..=999]); batch 2 of 3 \
             (entries[1000..=1999]) refused, nothing of it written:\n  entries[1234] \
             (spiffe://other.org/w): "
        ) && err.ends_with("1 later batch (entries[2000..=2499]) not sent"),
        "{err}"
    );
    let filter = crate::datastore::EntryFilter::default();
    assert_eq!(
        s.cache.datastore().count_entries(&filter).await.unwrap(),
        1_000
    );

    // Fixed, the rest (entries 1000..) goes through; JSON output lists what was created.
    let rest: Vec<serde_json::Value> = entries[1_000..]
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, mut e)| {
            if i == 234 {
                e["spiffe_id"] = "spiffe://example.org/file/fixed".into();
            }
            e
        })
        .collect();
    std::fs::write(&path, serde_json::json!({ "entries": rest }).to_string()).unwrap();
    let out = s
        .ok(&[
            "entry",
            "create",
            "--data",
            path.to_str().unwrap(),
            "--output",
            "json",
        ])
        .await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let created = v["entries"].as_array().unwrap();
    assert_eq!(created.len(), 1_500);
    assert_eq!(created[234]["spiffe_id"], "spiffe://example.org/file/fixed");
    assert_eq!(created[0]["x509_svid_ttl"], 600);
    assert_eq!(
        s.cache.datastore().count_entries(&filter).await.unwrap(),
        2_500
    );
    assert_eq!(s.cache.entry_count(), 2_500);
    s.stop().await;
}

// Federation relationships and foreign bundles.

/// `federation create` of other.org over https_web (the system's roots), the
/// relationship most federation tests start from.
const CREATE_OTHER_WEB: &[&str] = &[
    "federation",
    "create",
    "--trust-domain",
    "other.org",
    "--bundle-endpoint-url",
    "https://other.example/",
    "--profile",
    "https_web",
];

/// A refresh loop stand-in (the loop itself is tested with real peers where it is
/// built): counts the relationship changes it is told of, and answers `refresh_now`
/// with a success, or with `fail`'s error.
#[derive(Default)]
struct FakeRefresher {
    changed: std::sync::atomic::AtomicUsize,
    fail: Option<String>,
}

#[async_trait::async_trait]
impl crate::federation::Refresher for FakeRefresher {
    async fn refresh_now(&self, _td: &TrustDomain) -> Result<crate::federation::Refreshed> {
        let now = unix_now();
        let status = match &self.fail {
            Some(e) => crate::federation::Status {
                last_error: Some(e.clone()),
                last_error_at: Some(now),
                next_refresh_at: Some(now + 300),
                ..Default::default()
            },
            None => crate::federation::Status {
                last_success_at: Some(now),
                next_refresh_at: Some(now + 300),
                ..Default::default()
            },
        };
        Ok(crate::federation::Refreshed {
            error: self.fail.clone(),
            status,
        })
    }

    fn relationships_changed(&self) {
        self.changed
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl FakeRefresher {
    fn changes(&self) -> usize {
        self.changed.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A server for `td`, with `refresher` as its refresh loop when given.
async fn start_td(td: &str, refresher: Option<Arc<FakeRefresher>>) -> Server {
    let (ca, ds) = super::test_support::new_ca(td).await;
    let cache = EntryCache::load(TrustDomain::new(td).unwrap(), ds)
        .await
        .unwrap();
    let mut api = AdminApi::new(
        cache.clone(),
        ca.clone(),
        AdminSettings {
            default_x509_svid_ttl: Duration::from_secs(3600),
            default_join_token_ttl: Duration::from_secs(600),
            jwt: Default::default(),
        },
    );
    if let Some(r) = refresher {
        api = api.with_refresher(r);
    }
    serve_api(api, cache, ca)
}

impl Server {
    /// Writes `content` to a file in the server's tempdir; returns its path.
    fn file(&self, name: &str, content: &str) -> String {
        let path = self.dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        path.to_str().unwrap().to_owned()
    }

    async fn foreign(&self, td: &str) -> Option<crate::federation::ForeignBundle> {
        self.cache
            .datastore()
            .foreign_bundle(&TrustDomain::new(td).unwrap())
            .await
            .unwrap()
    }

    async fn relationships(&self) -> usize {
        self.cache
            .datastore()
            .list_federations()
            .await
            .unwrap()
            .len()
    }
}

/// `other.org`'s bundle as its server prints it in the SPIFFE format.
async fn other_bundle() -> (String, TrustBundle) {
    let other = start_td("other.org", None).await;
    let json = other.ok(&["bundle", "show", "--format", "spiffe"]).await;
    let bundle = other.ca.bundle().borrow().as_ref().clone();
    other.stop().await;
    (json, bundle)
}

#[tokio::test]
async fn federation_lifecycle_through_the_cli() {
    let refresher = Arc::new(FakeRefresher::default());
    let s = start_td("example.org", Some(refresher.clone())).await;
    let (json, other) = other_bundle().await;
    let bootstrap = s.file("other.json", &json);
    assert_eq!(
        s.ok(&["federation", "list"]).await,
        "Found 0 federation relationships\n"
    );
    let out = s
        .ok(&[
            "federation",
            "create",
            "--trust-domain",
            "other.org",
            "--bundle-endpoint-url",
            "https://other.example:8443/bundle",
            "--profile",
            "https_spiffe",
            "--bundle-path",
            &bootstrap,
            "--bundle-format",
            "spiffe",
        ])
        .await;
    assert_eq!(refresher.changes(), 1, "the refresh loop is told at once");
    for (label, value) in [
        ("Trust domain", "other.org"),
        ("Endpoint URL", "https://other.example:8443/bundle"),
        ("Endpoint profile", "https_spiffe"),
        // The API's default: what a Carapace or SPIRE server presents.
        ("Endpoint ID", "spiffe://other.org/spire/server"),
        ("Source", "api"),
        ("Last success", "never"),
        ("Last error", "none"),
        ("Bundle origin", "static"),
    ] {
        assert_eq!(line_value(&out, label), value, "{label} in\n{out}");
    }
    // The bootstrap bundle is stored as the peer's bundle, authorities intact.
    let stored = s
        .foreign("other.org")
        .await
        .expect("bootstrap bundle stored");
    assert_eq!(stored.origin, crate::federation::Origin::Static);
    assert_eq!(stored.bundle.x509_authorities, other.x509_authorities);
    assert_eq!(
        line_value(&out, "Bundle sequence"),
        other.sequence.to_string()
    );

    // A second create is refused, naming the trust domain.
    let err = s
        .err(&[
            "federation",
            "create",
            "--trust-domain",
            "spiffe://other.org",
            "--bundle-endpoint-url",
            "https://elsewhere.example/",
            "--profile",
            "https_web",
        ])
        .await;
    assert!(
        err.starts_with("federation create: ") && err.contains("other.org"),
        "{err}"
    );
    assert_eq!(s.relationships().await, 1);

    let listed = s.ok(&["federation", "list"]).await;
    assert!(
        listed.starts_with("Found 1 federation relationship\n\nTrust domain     : other.org\n"),
        "{listed}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&s.ok(&["federation", "list", "--output", "json"]).await).unwrap();
    assert_eq!(
        v["federations"][0]["endpoint_spiffe_id"],
        "spiffe://other.org/spire/server"
    );
    assert_eq!(v["federations"][0]["bundle"]["origin"], "static");

    // Update: switch to https_web with a CA file of its own; the URL stays.
    let ca_file = s.file("web-ca.pem", &other.to_pem());
    let out = s
        .ok(&[
            "federation",
            "update",
            "--trust-domain",
            "other.org",
            "--profile",
            "https_web",
            "--ca-file",
            &ca_file,
        ])
        .await;
    assert_eq!(refresher.changes(), 2);
    assert_eq!(line_value(&out, "Endpoint profile"), "https_web");
    assert_eq!(
        line_value(&out, "Endpoint URL"),
        "https://other.example:8443/bundle"
    );
    assert_eq!(line_value(&out, "Web PKI roots"), "1 CA certificate");
    assert!(!out.contains("Endpoint ID"), "{out}");
    let (rel, _) = s
        .cache
        .datastore()
        .get_federation(&TrustDomain::new("other.org").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        rel.profile,
        crate::federation::Profile::HttpsWeb {
            roots_pem: Some(other.to_pem())
        }
    );
    let out = s
        .ok(&[
            "federation",
            "update",
            "--trust-domain",
            "other.org",
            "--bundle-endpoint-url",
            "https://[::1]:9443",
        ])
        .await;
    assert_eq!(line_value(&out, "Endpoint URL"), "https://[::1]:9443");
    assert_eq!(refresher.changes(), 3);
    assert_eq!(
        line_value(&out, "Web PKI roots"),
        "1 CA certificate",
        "kept"
    );
    let shown = s
        .ok(&["federation", "show", "--trust-domain", "other.org"])
        .await;
    assert_eq!(shown, out);

    let out = s
        .ok(&["federation", "delete", "--trust-domain", "other.org"])
        .await;
    assert_eq!(
        out,
        "Deleted the federation relationship with other.org and its bundle\n"
    );
    assert_eq!(refresher.changes(), 4);
    assert_eq!(s.relationships().await, 0);
    assert!(
        s.foreign("other.org").await.is_none(),
        "its bundle went too"
    );
    let err = s
        .err(&["federation", "show", "--trust-domain", "other.org"])
        .await;
    assert_eq!(
        err,
        "federation show: no federation relationship with other.org"
    );
    // An https_spiffe relationship without the peer's bundle: how to give it one.
    let out = s
        .ok(&[
            "federation",
            "create",
            "--trust-domain",
            "other.org",
            "--bundle-endpoint-url",
            "https://other.example/",
            "--profile",
            "https_spiffe",
        ])
        .await;
    assert_eq!(line_value(&out, "Bundle"), "none stored yet");
    assert!(
        out.contains("\nNo bundle of other.org is stored yet: the first fetch cannot authenticate spiffe://other.org/spire/server"),
        "{out}"
    );
    s.stop().await;
}

#[tokio::test]
async fn federation_refusals_write_nothing() {
    let refresher = Arc::new(FakeRefresher::default());
    let s = start_td("example.org", Some(refresher.clone())).await;
    let mut client = admin_cli::connect(&s.socket, None).await.unwrap();
    let rel = |td: &str, url: &str, profile: admin::FederationProfile, id: &str| {
        admin::FederationRelationship {
            trust_domain: td.into(),
            bundle_endpoint_url: url.into(),
            profile: profile as i32,
            endpoint_spiffe_id: id.into(),
            ..Default::default()
        }
    };
    use admin::FederationProfile::{HttpsSpiffe, HttpsWeb};
    let cases = [
        (
            rel("example.org", "https://a.example/", HttpsSpiffe, ""),
            "relationship.trust_domain: example.org is this server's own trust domain",
        ),
        (
            rel("spiffe://example.org", "https://a.example/", HttpsWeb, ""),
            "own trust domain",
        ),
        (
            rel("other.org", "http://a.example/", HttpsWeb, ""),
            "relationship.bundle_endpoint_url: \"http://a.example/\": plain http:// is refused",
        ),
        (
            rel("other.org", "https://user:pw@a.example/", HttpsWeb, ""),
            "user info",
        ),
        (
            rel("other.org", "https://a.example/#frag", HttpsWeb, ""),
            "#fragment",
        ),
        (
            rel("other.org", "https://a.example:0/", HttpsWeb, ""),
            "not a port number",
        ),
        (
            rel(
                "other.org",
                "https://a.example/",
                HttpsWeb,
                "spiffe://other.org/spire/server",
            ),
            "relationship.endpoint_spiffe_id: only the https_spiffe profile",
        ),
        (
            rel("other.org", "https://a.example/", HttpsSpiffe, "not-an-id"),
            "relationship.endpoint_spiffe_id:",
        ),
        (
            rel(
                "other.org",
                "https://a.example/",
                admin::FederationProfile::Unspecified,
                "",
            ),
            "relationship.profile is required",
        ),
        (
            admin::FederationRelationship {
                web_roots_pem: "garbage".into(),
                ..rel("other.org", "https://a.example/", HttpsWeb, "")
            },
            "relationship.web_roots_pem",
        ),
        (
            admin::FederationRelationship {
                web_roots_pem: "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
                    .into(),
                ..rel("other.org", "https://a.example/", HttpsSpiffe, "")
            },
            "only the https_web profile takes web PKI roots",
        ),
    ];
    for (r, want) in cases {
        let status = client
            .create_federation(admin::CreateFederationRequest {
                relationship: Some(r.clone()),
                bootstrap_bundle: None,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{r:?}");
        assert!(
            status.message().contains(want),
            "{r:?}: {}",
            status.message()
        );
    }
    // A garbage bootstrap bundle: refused, and the relationship is not created either.
    for (format, content, want) in [
        (
            admin::BundleFormat::Spiffe,
            "{\"keys\": [",
            "bootstrap_bundle: not a SPIFFE bundle",
        ),
        (
            admin::BundleFormat::Pem,
            "hello",
            "bootstrap_bundle: not a PEM bundle",
        ),
        (
            admin::BundleFormat::Spiffe,
            "{\"keys\": []}",
            "holds no X.509 authority and no JWT key",
        ),
        (admin::BundleFormat::Unspecified, "x", "format is required"),
    ] {
        let status = client
            .create_federation(admin::CreateFederationRequest {
                relationship: Some(rel("other.org", "https://a.example/", HttpsSpiffe, "")),
                bootstrap_bundle: Some(admin::BundleDocument {
                    format: format as i32,
                    content: content.into(),
                }),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains(want), "{}", status.message());
    }
    // Through the CLI: the same refusals, named after the flags, before anything is sent.
    fn create<'a>(td: &'a str, url: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec![
            "federation",
            "create",
            "--trust-domain",
            td,
            "--bundle-endpoint-url",
            url,
        ];
        v.extend_from_slice(extra);
        v
    }
    let err = s
        .err(&create(
            "example.org",
            "https://a.example/",
            &["--profile", "https_web"],
        ))
        .await;
    assert!(
        err.starts_with(
            "federation create: relationship.trust_domain: example.org is this server's own"
        ),
        "{err}"
    );
    let err = s
        .err(&create(
            "other.org",
            "http://a.example/",
            &["--profile", "https_web"],
        ))
        .await;
    assert!(err.starts_with("federation create: --bundle-endpoint-url: \"http://a.example/\": plain http:// is refused"), "{err}");
    let err = s
        .err(&create(
            "other.org",
            "https://a.example/",
            &[
                "--profile",
                "https_web",
                "--endpoint-spiffe-id",
                "spiffe://other.org/x",
            ],
        ))
        .await;
    assert!(
        err.starts_with("federation create: --endpoint-spiffe-id: only the https_spiffe profile"),
        "{err}"
    );
    let garbage = s.file("garbage.json", "this is not a bundle");
    let err = s
        .err(&create(
            "other.org",
            "https://a.example/",
            &[
                "--profile",
                "https_spiffe",
                "--bundle-path",
                &garbage,
                "--bundle-format",
                "spiffe",
            ],
        ))
        .await;
    assert!(
        err.starts_with("federation create: bootstrap_bundle: not a SPIFFE bundle"),
        "{err}"
    );
    assert_eq!(s.relationships().await, 0);
    assert!(s.foreign("other.org").await.is_none());
    assert_eq!(refresher.changes(), 0, "nothing changed, nothing announced");

    // Unknown trust domains: NotFound everywhere.
    for args in [
        &["federation", "show", "--trust-domain", "nowhere.org"][..],
        &["federation", "delete", "--trust-domain", "nowhere.org"],
        &["federation", "refresh", "--trust-domain", "nowhere.org"],
        &[
            "federation",
            "update",
            "--trust-domain",
            "nowhere.org",
            "--profile",
            "https_web",
        ],
        &["bundle", "show", "--trust-domain", "nowhere.org"],
        &["bundle", "delete", "--trust-domain", "nowhere.org"],
    ] {
        match s.run(args).await {
            Err(crate::Error::NotFound(m)) => assert!(m.contains("nowhere.org"), "{args:?}: {m}"),
            other => panic!("{args:?}: {other:?}"),
        }
    }
    let status = client
        .update_federation(admin::UpdateFederationRequest {
            relationship: Some(rel("nowhere.org", "https://a.example/", HttpsWeb, "")),
            bootstrap_bundle: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{}", status.message());
    assert_eq!(s.relationships().await, 0);
    s.stop().await;
}

#[tokio::test]
async fn config_file_relationships_are_read_only_here() {
    let refresher = Arc::new(FakeRefresher::default());
    let s = start_td("example.org", Some(refresher.clone())).await;
    let td = TrustDomain::new("cfg.org").unwrap();
    let rel = crate::federation::Relationship {
        trust_domain: td.clone(),
        url: "https://cfg.example/".into(),
        profile: crate::federation::Profile::HttpsSpiffe {
            endpoint_id: td.server_id(),
        },
        source: crate::federation::Source::Config,
    };
    s.cache
        .datastore()
        .replace_config_federations(std::slice::from_ref(&rel))
        .await
        .unwrap();
    let out = s
        .ok(&["federation", "show", "--trust-domain", "cfg.org"])
        .await;
    assert_eq!(line_value(&out, "Source"), "config");
    let err = s
        .err(&[
            "federation",
            "update",
            "--trust-domain",
            "cfg.org",
            "--bundle-endpoint-url",
            "https://elsewhere.example/",
        ])
        .await;
    assert!(
        err.starts_with("federation update: the federation relationship with cfg.org is defined in the config file ([[federation.federates_with]])"),
        "{err}"
    );
    let err = s
        .err(&["federation", "delete", "--trust-domain", "cfg.org"])
        .await;
    assert!(
        err.contains("[[federation.federates_with]]") && err.contains("remove it there"),
        "{err}"
    );
    let err = s
        .err(&["bundle", "delete", "--trust-domain", "cfg.org"])
        .await;
    assert!(err.contains("[[federation.federates_with]]"), "{err}");
    let (stored, _) = s
        .cache
        .datastore()
        .get_federation(&td)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored, rel, "unchanged");
    assert_eq!(refresher.changes(), 0);
    s.stop().await;
}

#[tokio::test]
async fn federation_refresh_reports_the_fetch() {
    // No refresh loop: a clear refusal.
    let s = start_td("example.org", None).await;
    s.ok(CREATE_OTHER_WEB).await;
    match s
        .run(&["federation", "refresh", "--trust-domain", "other.org"])
        .await
    {
        Err(crate::Error::FailedPrecondition(m)) => {
            assert!(
                m.starts_with("federation refresh: this server runs no federation refresh loop"),
                "{m}"
            )
        }
        other => panic!("{other:?}"),
    }
    s.stop().await;

    let ok = Arc::new(FakeRefresher::default());
    let s = start_td("example.org", Some(ok)).await;
    s.ok(CREATE_OTHER_WEB).await;
    let out = s
        .ok(&["federation", "refresh", "--trust-domain", "other.org"])
        .await;
    assert_ne!(line_value(&out, "Last success"), "never", "{out}");
    assert_ne!(line_value(&out, "Next refresh"), "not scheduled", "{out}");
    s.stop().await;

    let failing = Arc::new(FakeRefresher {
        fail: Some("connection refused".into()),
        ..Default::default()
    });
    let s = start_td("example.org", Some(failing)).await;
    s.ok(CREATE_OTHER_WEB).await;
    match s
        .run(&["federation", "refresh", "--trust-domain", "other.org"])
        .await
    {
        Err(crate::Error::FailedPrecondition(m)) => {
            assert!(
                m.starts_with("federation refresh: fetching the bundle of other.org failed: connection refused\n"),
                "{m}"
            );
            assert!(m.contains("Last error       : "), "the status follows: {m}");
        }
        other => panic!("a failed fetch must fail the command: {other:?}"),
    }
    s.stop().await;
}

#[tokio::test]
async fn bundle_show_spiffe_from_one_server_sets_on_another() {
    let a = start().await;
    let b = start_td("other.org", None).await;
    let a_bundle = a.ca.bundle().borrow().as_ref().clone();
    let json = a.ok(&["bundle", "show", "--format", "spiffe"]).await;
    // What SPIRE's `bundle set -format spiffe` demands of each key (its bundleutil
    // decoder): a `use` of x509-svid with exactly one x5c certificate, or of jwt-svid
    // with a kid; and an EC key's curve and coordinates for go-jose to build it.
    let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
    let keys = doc["keys"].as_array().unwrap();
    assert_eq!(
        keys.len(),
        a_bundle.x509_authorities.len() + a_bundle.jwt_authorities.len()
    );
    for k in keys {
        match k["use"].as_str() {
            Some("x509-svid") => assert_eq!(k["x5c"].as_array().unwrap().len(), 1, "{k}"),
            Some("jwt-svid") => assert!(!k["kid"].as_str().unwrap().is_empty(), "{k}"),
            other => panic!("use {other:?} in {k}"),
        }
        assert_eq!(
            (k["kty"].as_str(), k["crv"].as_str()),
            (Some("EC"), Some("P-256")),
            "{k}"
        );
        assert!(k["x"].is_string() && k["y"].is_string(), "{k}");
    }
    assert_eq!(doc["spiffe_sequence"], a_bundle.sequence);
    let path = b.file("example.json", &json);
    let out = b
        .ok(&[
            "bundle",
            "set",
            "--trust-domain",
            "spiffe://example.org",
            "--format",
            "spiffe",
            "--path",
            &path,
        ])
        .await;
    assert!(
        out.starts_with("Bundle set\nTrust domain     : example.org\n"),
        "{out}"
    );
    assert_eq!(line_value(&out, "Origin"), "static");
    assert_eq!(
        line_value(&out, "X.509 authorities"),
        a_bundle.x509_authorities.len().to_string()
    );
    // B now holds A's authorities and JWT keys, and prints them back the same way.
    let stored = b.foreign("example.org").await.unwrap();
    assert_eq!(stored.bundle.x509_authorities, a_bundle.x509_authorities);
    assert_eq!(
        stored
            .bundle
            .jwt_authorities
            .iter()
            .map(|k| (&k.kid, &k.public_key_der))
            .collect::<Vec<_>>(),
        a_bundle
            .jwt_authorities
            .iter()
            .map(|k| (&k.kid, &k.public_key_der))
            .collect::<Vec<_>>()
    );
    let back = b
        .ok(&[
            "bundle",
            "show",
            "--trust-domain",
            "example.org",
            "--format",
            "spiffe",
        ])
        .await;
    let td = TrustDomain::new("example.org").unwrap();
    let parsed = TrustBundle::from_spiffe_json(td.clone(), &back).unwrap();
    assert_eq!(parsed.x509_authorities, a_bundle.x509_authorities);
    assert_eq!(parsed.sequence, a_bundle.sequence);
    // The local bundle is still what `bundle show` prints by default.
    let own = b.ok(&["bundle", "show"]).await;
    assert_eq!(own, b.ca.bundle().borrow().to_pem());
    assert_eq!(
        b.ok(&["bundle", "show", "--trust-domain", "spiffe://other.org"])
            .await,
        own,
        "naming the local trust domain shows the local bundle"
    );
    // Listed, with the local one only when asked for.
    let listed = b.ok(&["bundle", "list"]).await;
    assert!(
        listed.starts_with("Found 1 bundle\n\nTrust domain     : example.org\n"),
        "{listed}"
    );
    let v: serde_json::Value = serde_json::from_str(
        &b.ok(&["bundle", "list", "--include-local", "--output", "json"])
            .await,
    )
    .unwrap();
    assert_eq!(v["bundles"][0]["trust_domain"], "other.org");
    assert_eq!(v["bundles"][0]["origin"], "local");
    assert_eq!(v["bundles"][1]["trust_domain"], "example.org");
    // PEM works too, and replaces it.
    let pem = b.file("example.pem", &a.ok(&["bundle", "show"]).await);
    b.ok(&[
        "bundle",
        "set",
        "--trust-domain",
        "example.org",
        "--path",
        &pem,
    ])
    .await;
    let stored = b.foreign("example.org").await.unwrap();
    assert_eq!(stored.bundle.x509_authorities, a_bundle.x509_authorities);
    assert!(
        stored.bundle.jwt_authorities.is_empty(),
        "PEM has no JWT keys"
    );

    // With no relationship, the bundle can be deleted.
    let out = b
        .ok(&["bundle", "delete", "--trust-domain", "example.org"])
        .await;
    assert_eq!(out, "Deleted the bundle of example.org\n");
    assert!(b.foreign("example.org").await.is_none());
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn bad_bundles_and_local_trust_domain_are_refused_and_store_nothing() {
    let s = start().await;
    let (json, _) = other_bundle().await;
    let garbage = s.file(
        "garbage",
        "{\"keys\": [{\"kty\": \"EC\", \"use\": \"x509-svid\", \"x5c\": [\"!!\"]}]}",
    );
    let err = s
        .err(&[
            "bundle",
            "set",
            "--trust-domain",
            "other.org",
            "--format",
            "spiffe",
            "--path",
            &garbage,
        ])
        .await;
    assert!(
        err.starts_with("bundle set: bundle: not a SPIFFE bundle (JWK Set): ")
            && err.contains("x5c is not base64"),
        "{err}"
    );
    let err = s
        .err(&[
            "bundle",
            "set",
            "--trust-domain",
            "other.org",
            "--format",
            "pem",
            "--path",
            &garbage,
        ])
        .await;
    assert!(
        err.starts_with("bundle set: bundle: not a PEM bundle: "),
        "{err}"
    );
    let empty = s.file("empty", "\n");
    let err = s
        .err(&[
            "bundle",
            "set",
            "--trust-domain",
            "other.org",
            "--path",
            &empty,
        ])
        .await;
    assert!(err.contains("--path") && err.contains("is empty"), "{err}");
    // A SPIFFE bundle from the wrong format flag.
    let spiffe = s.file("other.json", &json);
    let err = s
        .err(&[
            "bundle",
            "set",
            "--trust-domain",
            "other.org",
            "--format",
            "pem",
            "--path",
            &spiffe,
        ])
        .await;
    assert!(err.contains("not a PEM bundle"), "{err}");
    // A bundle whose CAs name another trust domain (set under the wrong name).
    let err = s
        .err(&[
            "bundle",
            "set",
            "--trust-domain",
            "third.org",
            "--format",
            "spiffe",
            "--path",
            &spiffe,
        ])
        .await;
    assert!(
        err.starts_with(
            "bundle set: bundle: the bundle is not third.org's: X.509 authority 0 is a CA of \
             trust domain other.org"
        ),
        "{err}"
    );
    assert!(s.foreign("third.org").await.is_none());
    // The local trust domain is never a foreign one.
    let err = s
        .err(&[
            "bundle",
            "set",
            "--trust-domain",
            "example.org",
            "--format",
            "spiffe",
            "--path",
            &spiffe,
        ])
        .await;
    assert!(
        err.starts_with("bundle set: trust_domain: example.org is this server's own trust domain"),
        "{err}"
    );
    let err = s
        .err(&["bundle", "delete", "--trust-domain", "example.org"])
        .await;
    assert!(err.contains("own trust domain"), "{err}");
    assert_eq!(s.ok(&["bundle", "list"]).await, "Found 0 bundles\n");
    assert!(s.foreign("other.org").await.is_none());
    assert!(s.foreign("example.org").await.is_none());

    // While a relationship names the trust domain, its bundle stays.
    s.ok(&[
        "bundle",
        "set",
        "--trust-domain",
        "other.org",
        "--format",
        "spiffe",
        "--path",
        &spiffe,
    ])
    .await;
    s.ok(&[
        "federation",
        "create",
        "--trust-domain",
        "other.org",
        "--bundle-endpoint-url",
        "https://other.example/",
        "--profile",
        "https_spiffe",
    ])
    .await;
    let err = s
        .err(&["bundle", "delete", "--trust-domain", "other.org"])
        .await;
    assert!(
        err.starts_with("bundle delete: a federation relationship with other.org exists")
            && err.contains("delete the federation relationship first"),
        "{err}"
    );
    assert!(s.foreign("other.org").await.is_some());
    s.stop().await;
}
