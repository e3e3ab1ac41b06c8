//! The real server binary on a real PostgreSQL (Debian's `postgresql`, started by the test
//! in a temporary directory): it keeps its rows there, survives a restart from them, and
//! refuses a password it would have to take from the url or a wrong one, with a message
//! that never repeats the password.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use carapace_e2e::{
    Agent, Lab, Server, ServerOptions, bin, eventually, eventually_within, now, openssl_verify,
    uid_selector,
};
use hsm_sim::postgres::Postgres;

/// A lab PostgreSQL; a missing one fails with the command that installs it.
fn postgres() -> Postgres {
    Postgres::start().unwrap_or_else(|e| {
        panic!(
            "{e} (install it with `apt-get install -y {}`, or run scripts/test.sh)",
            hsm_sim::postgres::POSTGRES_PACKAGES
        )
    })
}

/// A server config whose `[datastore]` is `datastore` (TOML lines).
fn config(lab: &Lab, name: &str, datastore: &str) -> PathBuf {
    let path = lab.path().join(format!("{name}.toml"));
    std::fs::write(&path, format!("[datastore]\n{datastore}\n")).unwrap();
    path
}

/// Server `s<i>` of a trust domain whose servers share the datastore of config `cfg`.
fn shared(i: usize, cfg: &std::path::Path) -> ServerOptions {
    ServerOptions {
        name: Some(format!("s{i}")),
        extra: vec!["--config".into(), cfg.display().to_string()],
        ..ServerOptions::default()
    }
}

fn pg_datastore(pg: &Postgres, db: &str) -> String {
    format!(
        "url = \"{}\"\nsslmode = \"disable\"\npassword_file = \"{}\"",
        pg.url(db),
        pg.password_file().display()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_on_postgres_keeps_its_rows_there_and_restarts_from_them() {
    let pg = postgres();
    pg.create_database("carapace").unwrap();
    let lab = Lab::new();
    let cfg = config(&lab, "server", &pg_datastore(&pg, "carapace"));
    let mut server = Server::start_with(&lab, &["--config", cfg.to_str().unwrap()]);
    let agent = Agent::start(&lab, &server, "agent");
    let id = server.create_entry(
        &agent.id,
        "spiffe://example.org/pg",
        &[&uid_selector()],
        &[],
    );
    agent.wait_for_svid("spiffe://example.org/pg").await;

    // The rows are in PostgreSQL, and no SQLite file was made.
    let sql = |q: &str| pg.psql("carapace", q).unwrap();
    assert_eq!(
        sql(&format!("SELECT spiffe_id FROM entries WHERE id = '{id}'")),
        "spiffe://example.org/pg"
    );
    assert_eq!(
        sql(&format!(
            "SELECT COUNT(*) FROM attested_agents WHERE spiffe_id = '{}'",
            agent.id
        )),
        "1"
    );
    assert_eq!(sql("SELECT COUNT(*) FROM server_ca_journals"), "1");
    assert!(!server.data_dir.join("datastore.sqlite3").exists());
    assert!(
        server
            .log()
            .contains("postgres postgres://carapace@127.0.0.1:"),
        "{}",
        server.log()
    );

    // Restarted, it serves the same CA and the same entries from the database.
    let bundle = server.bundle_pem();
    server.restart();
    assert_eq!(server.bundle_pem(), bundle);
    let listed = server.cli_json(&["entry", "show", "--id", &id]);
    assert_eq!(
        listed["entries"][0]["spiffe_id"], "spiffe://example.org/pg",
        "{listed}"
    );
    assert!(!server.log().contains(pg.password()));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_password_stops_the_server_and_a_url_password_is_refused_unrepeated() {
    let pg = postgres();
    pg.create_database("carapace").unwrap();
    let lab = Lab::new();

    // A wrong password: the server exits non-zero and names the database, not the
    // password.
    let wrong = lab.path().join("wrong-password");
    std::fs::write(&wrong, "not-the-password\n").unwrap();
    std::fs::set_permissions(&wrong, PermissionsExt::from_mode(0o600)).unwrap();
    let cfg = config(
        &lab,
        "wrong",
        &format!(
            "url = \"{}\"\nsslmode = \"disable\"\npassword_file = \"{}\"",
            pg.url("carapace"),
            wrong.display()
        ),
    );
    let mut server = Server::spawn_opts(
        &lab,
        ServerOptions {
            name: Some("wrong".into()),
            extra: vec!["--config".into(), cfg.display().to_string()],
            ..ServerOptions::default()
        },
    );
    let (status, log) = server.wait_exit();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains(&format!("connecting to {}", pg.url("carapace")))
            && log.contains("password authentication failed"),
        "{log}"
    );
    assert!(!log.contains("not-the-password"), "{log}");

    // A password file others can read: validate names it and the fix.
    std::fs::set_permissions(&wrong, PermissionsExt::from_mode(0o644)).unwrap();
    let out = Command::new(bin("carapace-server"))
        .args(["validate", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(64), "{text}");
    assert!(
        text.contains("has mode 644") && text.contains("chmod 600"),
        "{text}"
    );

    // A password in the url: refused by validate and by run, never repeated.
    let secret = pg.password().to_owned();
    let cfg = config(
        &lab,
        "inurl",
        &format!("url = \"{}\"", pg.url_with_password("carapace")),
    );
    for args in [
        vec!["validate", "--config", cfg.to_str().unwrap()],
        vec!["run", "--config", cfg.to_str().unwrap()],
    ] {
        let out = Command::new(bin("carapace-server"))
            .args(&args)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{args:?}: {text}");
        assert!(
            text.contains("datastore.url: it has a password in its user info"),
            "{args:?}: {text}"
        );
        assert!(!text.contains(&secret), "{args:?}: {text}");
    }
    // Nothing was written to the database by either attempt.
    assert_eq!(
        pg.psql(
            "carapace",
            "SELECT COUNT(*) FROM pg_tables WHERE schemaname = 'public'"
        )
        .unwrap(),
        "0"
    );
}

/// How many CA certificates `bundle show` prints.
fn ca_count(bundle_pem: &str) -> usize {
    bundle_pem.matches("BEGIN CERTIFICATE").count()
}

/// Three servers started together on an empty PostgreSQL database serve one trust
/// domain: each its own CA, every CA in every server's bundle, an entry made on one
/// server reaching a workload whose agent is on another; `kill -9` of a server moves its
/// agent to another within 10 s, the workload keeps a valid SVID and gets the next
/// rotation.
#[tokio::test(flavor = "multi_thread")]
async fn three_servers_share_a_trust_domain_and_survive_kill_9_of_one() {
    let pg = postgres();
    pg.create_database("carapace").unwrap();
    let lab = Lab::new();
    let cfg = config(&lab, "shared", &pg_datastore(&pg, "carapace"));
    // Started together on the empty database: the migrations run once, no server fails.
    let mut servers: Vec<Server> = (1..=3)
        .map(|i| Server::spawn_opts(&lab, shared(i, &cfg)))
        .collect();
    for s in &mut servers {
        s.wait_healthy();
    }
    assert_eq!(
        pg.psql("carapace", "SELECT COUNT(*) FROM server_ca_journals")
            .unwrap(),
        "3",
        "one CA journal per server"
    );
    // Every server serves every server's CA.
    for s in &servers {
        eventually("every CA in every server's bundle", || async {
            (ca_count(&s.bundle_pem()) == 3).then_some(())
        })
        .await;
    }

    // An agent on s1 (then s2, s3) and one on s2 (then s3, s1).
    let addr: Vec<String> = servers.iter().map(|s| s.address.clone()).collect();
    let a1 = Agent::start_with(
        &lab,
        &servers[0],
        "a1",
        &[
            "--server-address".as_ref(),
            addr[1].as_ref(),
            "--server-address".as_ref(),
            addr[2].as_ref(),
        ],
    );
    let a2 = Agent::start_with(
        &lab,
        &servers[1],
        "a2",
        &[
            "--server-address".as_ref(),
            addr[2].as_ref(),
            "--server-address".as_ref(),
            addr[0].as_ref(),
        ],
    );
    // Entries made on s3 and s1 reach agents served by s1 and s2.
    servers[2].create_entry(
        &a1.id,
        "spiffe://example.org/one",
        &[&uid_selector()],
        &["--x509-svid-ttl", "20s"],
    );
    servers[0].create_entry(&a2.id, "spiffe://example.org/two", &[&uid_selector()], &[]);
    a1.wait_for_svid("spiffe://example.org/one").await;
    a2.wait_for_svid("spiffe://example.org/two").await;
    // An SVID signed by s1's CA verifies against s3's bundle.
    let held = a1.held_svid("spiffe://example.org/one").unwrap();
    let verified = openssl_verify(&lab, &held.chain_pem, &servers[2].bundle_pem());
    assert!(verified.contains(": OK"), "{verified}");

    // kill -9 s1: a1 is served by another server within 10 s.
    servers[0].kill();
    let killed = Instant::now();
    servers[1].create_entry(
        &a1.id,
        "spiffe://example.org/after",
        &[&uid_selector()],
        &[],
    );
    a1.wait_for_svid("spiffe://example.org/after").await;
    let moved = killed.elapsed();
    assert!(moved < Duration::from_secs(10), "a1 moved after {moved:?}");
    // The workload still holds a valid SVID, and the next rotation of the 20 s one
    // arrives (a new chain, signed by s2 or s3).
    let before = a1.held_svid("spiffe://example.org/one").unwrap();
    assert!(before.expires_at > now() as i64, "still valid");
    let rotated = eventually_within(
        "the next rotation of the 20 s SVID",
        Duration::from_secs(20),
        || async {
            a1.held_svid("spiffe://example.org/one")
                .filter(|s| s.chain_pem != before.chain_pem)
        },
    )
    .await;
    let verified = openssl_verify(&lab, &rotated.chain_pem, &servers[2].bundle_pem());
    assert!(verified.contains(": OK"), "{verified}");
    // Both agents are still the agents they were: never attested again.
    let agents = servers[2].cli_json(&["agent", "list"])["agents"].clone();
    assert_eq!(agents.as_array().unwrap().len(), 2, "{agents}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_foreign_bundle_set_on_one_server_reaches_the_agents_of_another() {
    let pg = postgres();
    pg.create_database("carapace").unwrap();
    let lab = Lab::new();
    let cfg = config(&lab, "shared", &pg_datastore(&pg, "carapace"));
    let servers: Vec<Server> = (1..=2)
        .map(|i| Server::start_opts(&lab, shared(i, &cfg)))
        .collect();
    // The peer: a server of another trust domain, on its own SQLite.
    let peer = Server::start_opts(
        &lab,
        ServerOptions {
            name: Some("peer".into()),
            extra: vec!["--trust-domain".into(), "partner.test".into()],
            ..ServerOptions::default()
        },
    );
    let peer_pem = lab.path().join("partner.pem");
    std::fs::write(&peer_pem, peer.bundle_pem()).unwrap();

    // An agent served by s2, whose workload federates with partner.test.
    let agent = Agent::start(&lab, &servers[1], "a");
    servers[1].create_entry(
        &agent.id,
        "spiffe://example.org/web",
        &[&uid_selector()],
        &["--federates-with", "partner.test"],
    );
    agent.wait_for_svid("spiffe://example.org/web").await;

    // The bundle is set through s1: s2 serves it, and its agent hands it to the workload.
    servers[0].cli_ok(&[
        "bundle",
        "set",
        "--trust-domain",
        "partner.test",
        "--path",
        peer_pem.to_str().unwrap(),
    ]);
    let set = Instant::now();
    assert_eq!(
        servers[1].cli_ok(&["bundle", "show", "--trust-domain", "partner.test"]),
        peer.bundle_pem()
    );
    eventually(
        "the foreign bundle at the workload of s2's agent",
        || async {
            let out = agent.fetch(&["--output", "json"]);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            (v["federated_bundles"]["spiffe://partner.test"].as_str()? == peer.bundle_pem())
                .then_some(())
        },
    )
    .await;
    let took = set.elapsed();
    assert!(took < Duration::from_secs(5), "took {took:?}");

    // Deleted through s2: withdrawn from the workload.
    servers[1].cli_ok(&["bundle", "delete", "--trust-domain", "partner.test"]);
    eventually("the foreign bundle withdrawn", || async {
        let out = agent.fetch(&["--output", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v["federated_bundles"]
            .get("spiffe://partner.test")
            .is_none()
            .then_some(())
    })
    .await;
}
