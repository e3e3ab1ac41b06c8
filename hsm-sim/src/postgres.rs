//! A throwaway PostgreSQL cluster: `initdb` into a temporary directory and `postgres` on a
//! free loopback port, for the datastore tests that run on PostgreSQL as well as SQLite.
//!
//! It uses Debian's `postgresql` package (its programs live in
//! `/usr/lib/postgresql/<version>/bin`, which is not on `PATH`; the newest version there
//! wins, then `PATH`). PostgreSQL refuses to run as root, so when the lab runs as root the
//! cluster's directory is given to `nobody` (uid 65534) and `initdb` and `postgres` run
//! as that user through `setpriv`; otherwise they run as the caller.
//!
//! The cluster has one superuser, `carapace`, whose password (random, in the 0600 file
//! [`Postgres::password_file`]) is required over TCP (`scram-sha-256`); nothing listens
//! on a Unix socket outside the directory. `fsync` is off: the data is thrown away.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use tempfile::TempDir;

use crate::process::{self, Child, ProcessGroup, require};
use crate::{Error, Result};

/// The Debian package of the server (`initdb`, `postgres`) and, through its
/// dependencies, the client (`psql`).
pub const POSTGRES_PACKAGES: &str = "postgresql";

/// The superuser of a lab cluster.
pub const SUPERUSER: &str = "carapace";

/// How long a started cluster gets to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Start attempts with a fresh port when postgres exits at start (a port taken meanwhile).
const START_ATTEMPTS: usize = 3;
/// Who runs the cluster when the lab runs as root: `nobody`.
const UNPRIVILEGED: u32 = 65534;

/// A running PostgreSQL cluster. Dropping it stops `postgres` (see [`Child`]) and removes
/// its directory.
#[derive(Debug)]
pub struct Postgres {
    // Field order matters: the daemon is stopped before its directory is removed.
    child: Child,
    port: u16,
    password: String,
    dir: PathBuf,
    psql: PathBuf,
    _tmp: TempDir,
}

/// The program `name` of the newest PostgreSQL in `/usr/lib/postgresql/*/bin`, else on
/// `PATH`, else [`Error::MissingPackage`].
pub fn program(name: &str) -> Result<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((v, e.path().join("bin").join(name)))
        })
        .filter(|(_, p)| p.is_file())
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, p)) => Ok(p),
        None => require(name, POSTGRES_PACKAGES),
    }
}

/// `cmd` to run as the cluster's owner: through `setpriv` as `nobody` when we are root.
fn as_owner(program: &Path) -> Result<Command> {
    if rustix::process::geteuid().is_root() {
        let setpriv = require("setpriv", "util-linux")?;
        let mut cmd = Command::new(setpriv);
        cmd.arg(format!("--reuid={UNPRIVILEGED}"))
            .arg(format!("--regid={UNPRIVILEGED}"))
            .arg("--clear-groups")
            .arg("--")
            .arg(program);
        Ok(cmd)
    } else {
        Ok(Command::new(program))
    }
}

/// Gives `path` (and what is in it) to the cluster's owner when we are root.
fn give_to_owner(path: &Path) -> Result<()> {
    if !rustix::process::geteuid().is_root() {
        return Ok(());
    }
    let owner = Some(UNPRIVILEGED);
    std::os::unix::fs::chown(path, owner, owner).map_err(|e| Error::io(path, e))?;
    if path.is_dir() {
        for entry in std::fs::read_dir(path).map_err(|e| Error::io(path, e))? {
            let entry = entry.map_err(|e| Error::io(path, e))?;
            give_to_owner(&entry.path())?;
        }
    }
    Ok(())
}

impl Postgres {
    /// Creates a cluster in a new temporary directory and starts it on a free loopback
    /// port. Returns once it accepts TCP connections.
    pub fn start() -> Result<Postgres> {
        Self::start_with(None)
    }

    /// [`Postgres::start`] with TLS on: a certificate for `server_names` (DNS names or
    /// IP addresses, in its subjectAltName) issued by a fresh CA whose certificate is
    /// [`Postgres::ca_file`]. Clients may still connect without TLS; `sslmode` decides.
    pub fn start_tls(server_names: &[&str]) -> Result<Postgres> {
        Self::start_with(Some(server_names))
    }

    fn start_with(tls: Option<&[&str]>) -> Result<Postgres> {
        let initdb = program("initdb")?;
        let postgres = program("postgres")?;
        let psql = program("psql")?;
        let tmp = tempfile::Builder::new()
            .prefix("carapace-pg-")
            .tempdir()
            .map_err(|e| Error::io(std::env::temp_dir(), e))?;
        let dir = tmp.path().to_owned();
        let (data, sockets, pwfile) = (dir.join("data"), dir.join("sockets"), dir.join("pwfile"));
        let password = process::random_hex(24)?;
        std::fs::write(&pwfile, format!("{password}\n")).map_err(|e| Error::io(&pwfile, e))?;
        std::fs::set_permissions(&pwfile, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io(&pwfile, e))?;
        std::fs::create_dir(&sockets).map_err(|e| Error::io(&sockets, e))?;
        let tls_files = tls
            .map(|names| crate::tls::make_ca_and_server_cert(&dir, names))
            .transpose()?;
        give_to_owner(&dir)?;

        let mut cmd = as_owner(&initdb)?;
        cmd.arg("-D")
            .arg(&data)
            .args(["-U", SUPERUSER, "--auth=scram-sha-256", "--no-sync"])
            .args(["--encoding=UTF8", "--no-locale"])
            .arg(format!("--pwfile={}", pwfile.display()));
        process::run(&mut cmd, None)?;

        let mut last = None;
        for _ in 0..START_ATTEMPTS {
            let port = process::free_tcp_port()?;
            let mut cmd = as_owner(&postgres)?;
            cmd.arg("-D")
                .arg(&data)
                .arg("-k")
                .arg(&sockets)
                .args(["-p", &port.to_string()])
                .args(["-c", "listen_addresses=127.0.0.1"])
                .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
                .args(["-c", "full_page_writes=off"]);
            if let Some((cert, key)) = &tls_files {
                cmd.args(["-c", "ssl=on"])
                    .arg("-c")
                    .arg(format!("ssl_cert_file={}", cert.display()))
                    .arg("-c")
                    .arg(format!("ssl_key_file={}", key.display()));
            }
            let mut child = Child::spawn(
                "postgres",
                &mut cmd,
                &dir.join("postgres.log"),
                ProcessGroup::Inherit,
            )?;
            match process::wait_ready(&mut child, READY_TIMEOUT, || process::tcp_answers(port)) {
                Ok(()) => {
                    let pg = Postgres {
                        child,
                        port,
                        password,
                        dir,
                        psql,
                        _tmp: tmp,
                    };
                    // Accepting TCP comes before accepting logins (recovery at start).
                    pg.wait_for_login()?;
                    return Ok(pg);
                }
                Err(e) if child.try_wait()?.is_some() => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::Other("postgres did not start".into())))
    }

    fn wait_for_login(&self) -> Result<()> {
        let deadline = std::time::Instant::now() + READY_TIMEOUT;
        loop {
            match self.psql("postgres", "SELECT 1") {
                Ok(_) => return Ok(()),
                Err(e) if std::time::Instant::now() > deadline => {
                    return Err(self.child.not_ready(format!("no login: {e}")));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// The loopback port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The CA certificate (PEM) of a cluster started with [`Postgres::start_tls`].
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("tls-ca.pem")
    }

    /// The superuser's password.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// A file (mode 0600) holding the superuser's password and a newline.
    pub fn password_file(&self) -> PathBuf {
        self.dir.join("pwfile")
    }

    /// The URL of `database` without the password (it comes from [`Self::password`] or
    /// [`Self::password_file`]): `postgres://carapace@127.0.0.1:<port>/<database>`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{database}", self.port)
    }

    /// The URL of `database` with the password in it, for clients that take only a URL.
    pub fn url_with_password(&self, database: &str) -> String {
        format!(
            "postgres://{SUPERUSER}:{}@127.0.0.1:{}/{database}",
            self.password, self.port
        )
    }

    /// Runs one SQL command with `psql` on `database` as the superuser; returns its output
    /// (unaligned, tuples only).
    pub fn psql(&self, database: &str, sql: &str) -> Result<String> {
        let mut cmd = Command::new(&self.psql);
        cmd.args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", SUPERUSER, "-d", database, "-c", sql])
            // The password through the environment of this one child, never argv.
            .env("PGPASSWORD", &self.password)
            .env("PGCONNECT_TIMEOUT", "5");
        let out = process::run(&mut cmd, None)?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Creates the database `name` (letters, digits and `_`).
    pub fn create_database(&self, name: &str) -> Result<()> {
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(Error::Other(format!("{name:?} is not a lab database name")));
        }
        self.psql("postgres", &format!("CREATE DATABASE {name}"))
            .map(|_| ())
    }

    /// Creates a new, empty database with a name no other call in this process (nor,
    /// with the pid in it, another process on this cluster) gets, and returns the name.
    pub fn fresh_database(&self) -> Result<String> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let name = format!(
            "t{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        self.create_database(&name)?;
        Ok(name)
    }

    /// Stops the cluster now and returns how `postgres` ended.
    pub fn stop(self) -> Result<std::process::ExitStatus> {
        self.child.stop()
    }
}

/// A cluster shared by the callers that hold it at the same time: the first caller starts
/// it, later callers get the same one while any holder keeps its `Arc`, and the last one
/// to drop it stops it (and removes its directory). Tests that run concurrently thus share
/// one cluster (each in its own [`Postgres::fresh_database`]) and nothing outlives the
/// test binary, even when a test panics.
pub fn shared() -> Result<Arc<Postgres>> {
    static SHARED: Mutex<Weak<Postgres>> = Mutex::new(Weak::new());
    let mut slot = SHARED.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(pg) = slot.upgrade() {
        return Ok(pg);
    }
    let pg = Arc::new(Postgres::start()?);
    *slot = Arc::downgrade(&pg);
    Ok(pg)
}
