//! Web PKI test certificates made with openssl (not rcgen: a tool the project did not
//! write): a CA and a server certificate for given DNS names or IP addresses, as an
//! operator's PKI would issue them (the PostgreSQL TLS tests, the federation `https_web`
//! bundle endpoint).

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::process::{self, require};
use crate::{Error, Result};

/// Makes, in `dir`, a CA (`tls-ca.pem`) and a server certificate for `names` it issued
/// (`tls-server.pem`, key `tls-server.key` mode 0600): P-256, one day, with openssl.
/// Returns the certificate and key paths.
pub fn make_ca_and_server_cert(dir: &Path, names: &[&str]) -> Result<(PathBuf, PathBuf)> {
    let openssl = require("openssl", "openssl")?;
    let f = |n: &str| dir.join(n);
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    process::run(
        Command::new(&openssl)
            .args(["req", "-x509"])
            .args(ec)
            .arg("-keyout")
            .arg(f("tls-ca.key"))
            .arg("-out")
            .arg(f("tls-ca.pem"))
            .args(["-days", "1", "-subj", "/CN=carapace lab CA"]),
        None,
    )?;
    process::run(
        Command::new(&openssl)
            .arg("req")
            .args(ec)
            .arg("-keyout")
            .arg(f("tls-server.key"))
            .arg("-out")
            .arg(f("tls-server.csr"))
            .args(["-subj", "/CN=carapace lab server"]),
        None,
    )?;
    let san: Vec<String> = names
        .iter()
        .map(|n| {
            if n.parse::<std::net::IpAddr>().is_ok() {
                format!("IP:{n}")
            } else {
                format!("DNS:{n}")
            }
        })
        .collect();
    let ext = f("tls-server.ext");
    std::fs::write(&ext, format!("subjectAltName={}\n", san.join(",")))
        .map_err(|e| Error::io(&ext, e))?;
    process::run(
        Command::new(&openssl)
            .args(["x509", "-req", "-days", "1", "-CAcreateserial"])
            .arg("-in")
            .arg(f("tls-server.csr"))
            .arg("-CA")
            .arg(f("tls-ca.pem"))
            .arg("-CAkey")
            .arg(f("tls-ca.key"))
            .arg("-extfile")
            .arg(&ext)
            .arg("-out")
            .arg(f("tls-server.pem")),
        None,
    )?;
    let key = f("tls-server.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(&key, e))?;
    Ok((f("tls-server.pem"), key))
}
