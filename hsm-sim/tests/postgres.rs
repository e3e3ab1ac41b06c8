//! The lab's PostgreSQL cluster: it starts, takes logins with the superuser's password
//! only, runs SQL, and is gone when dropped.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::os::unix::fs::PermissionsExt as _;
use std::process::Command;

use hsm_sim::postgres::{Postgres, program};

#[test]
fn a_cluster_starts_answers_with_its_password_only_and_stops() {
    let pg = Postgres::start().unwrap();
    let version = pg.psql("postgres", "SHOW server_version_num").unwrap();
    assert!(
        version.parse::<u32>().unwrap() >= 150_000,
        "PostgreSQL 15 or later: {version}"
    );
    pg.create_database("carapace_test").unwrap();
    assert_eq!(
        pg.psql("carapace_test", "SELECT current_database()")
            .unwrap(),
        "carapace_test"
    );
    // The password file is the superuser's password, and private.
    let file = pg.password_file();
    assert_eq!(
        std::fs::read_to_string(&file).unwrap().trim_end(),
        pg.password()
    );
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // A wrong password is refused.
    let out = Command::new(program("psql").unwrap())
        .args(["-X", "-h", "127.0.0.1", "-p", &pg.port().to_string()])
        .args(["-U", "carapace", "-d", "postgres", "-c", "SELECT 1"])
        .env("PGPASSWORD", "wrong")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("password authentication failed"),
        "{out:?}"
    );
    assert!(pg.create_database("bad name;").is_err());

    let port = pg.port();
    pg.stop().unwrap();
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "still listening after stop"
    );
}
