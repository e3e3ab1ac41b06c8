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

use carapace_e2e::{Agent, Lab, Server, ServerOptions, bin, uid_selector};
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
