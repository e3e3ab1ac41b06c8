//! An SSH CA and one host certified by it, made with `ssh-keygen`: what a fleet managed
//! with OpenSSH host certificates has, for `sshpop` node attestation.
//!
//! Layout of the directory (0700): `ssh_ca` and `ssh_ca.pub` (the CA's ed25519 key
//! pair), `ssh_host_ed25519_key` and `ssh_host_ed25519_key.pub` (the host's ed25519 key
//! pair, named as sshd names it), and `ssh_host_ed25519_key-cert.pub` (its host
//! certificate signed by the CA, where the `sshpop` agent looks for it by default). The
//! private keys are 0600 and unencrypted.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::process::{self, require};
use crate::{Error, Result};

/// The Debian package that provides `ssh-keygen`.
pub const OPENSSH_CLIENT_PACKAGE: &str = "openssh-client";
/// The host's short name; its principals are this name and `<name>.<domain>`.
pub const LAB_HOST: &str = "node1";
/// The validity of the host certificate (`ssh-keygen -V`): from five minutes ago, so that
/// a server whose clock is a little behind accepts it at once, for 52 weeks.
pub const HOST_CERT_VALIDITY: &str = "-5m:+52w";

/// The SSH CA and the certified host of a lab (see [`provision_lab_host`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabSshHost {
    /// The CA's private key (0600): what signs host certificates.
    pub ca_key: PathBuf,
    /// The CA's public key, one authorized_keys line: the server's `cert_authorities_path`.
    pub ca_pub: PathBuf,
    /// The host's private key (0600): the agent's `host_key_path`.
    pub host_key: PathBuf,
    /// The host's public key.
    pub host_pub: PathBuf,
    /// The host certificate, `<host_key>-cert.pub` (the agent's default `host_cert_path`).
    pub host_cert: PathBuf,
    /// The certificate's key ID.
    pub key_id: String,
    /// The certificate's principals: `node1.<domain>` and `node1`.
    pub principals: Vec<String>,
    /// The host key's fingerprint as `ssh-keygen -l -E sha256` prints it (`SHA256:...`).
    pub host_fingerprint: String,
}

impl LabSshHost {
    /// The path segment of the agent ID the host attests with over `sshpop`: the host
    /// key's SHA-256 fingerprint in unpadded URL-safe base64.
    pub fn agent_path(&self) -> String {
        self.host_fingerprint
            .trim_start_matches("SHA256:")
            .replace('+', "-")
            .replace('/', "_")
    }
}

/// Creates, in `dir` (created 0700 if missing; it must not hold an SSH CA yet), an
/// ed25519 SSH CA, an ed25519 host key, and the host's certificate signed by the CA:
/// `-h -I lab-node1 -n node1.<domain>,node1 -V -5m:+52w`.
pub fn provision_lab_host(dir: &Path, domain: &str) -> Result<LabSshHost> {
    let ssh_keygen = require("ssh-keygen", OPENSSH_CLIENT_PACKAGE)?;
    crate::private_dir(dir)?;
    let ca_key = dir.join("ssh_ca");
    let host_key = dir.join("ssh_host_ed25519_key");
    let fqdn = format!("{LAB_HOST}.{domain}");
    let host = LabSshHost {
        ca_pub: pub_path(&ca_key, ".pub"),
        host_pub: pub_path(&host_key, ".pub"),
        host_cert: pub_path(&host_key, "-cert.pub"),
        ca_key,
        host_key,
        key_id: format!("lab-{LAB_HOST}"),
        principals: vec![fqdn.clone(), LAB_HOST.to_owned()],
        host_fingerprint: String::new(),
    };
    // ssh-keygen would ask before overwriting a key, and read "no" from the empty stdin.
    if host.ca_key.exists() {
        return Err(Error::Other(format!(
            "{} already holds an SSH CA",
            dir.display()
        )));
    }
    for (key, comment) in [
        (&host.ca_key, format!("carapace-lab SSH CA ({domain})")),
        (&host.host_key, format!("root@{fqdn}")),
    ] {
        let mut cmd = Command::new(&ssh_keygen);
        cmd.args(["-q", "-t", "ed25519", "-N", "", "-C"])
            .arg(comment)
            .arg("-f")
            .arg(key);
        process::run(&mut cmd, None)?;
        crate::set_mode(key, 0o600)?;
    }
    let mut cmd = Command::new(&ssh_keygen);
    cmd.arg("-q")
        .arg("-s")
        .arg(&host.ca_key)
        .args(["-h", "-I", &host.key_id, "-n", &host.principals.join(",")])
        .args(["-V", HOST_CERT_VALIDITY])
        .arg(&host.host_pub);
    process::run(&mut cmd, None)?;
    if !host.host_cert.is_file() {
        return Err(Error::Other(format!(
            "ssh-keygen -s wrote no {}",
            host.host_cert.display()
        )));
    }
    let mut cmd = Command::new(&ssh_keygen);
    cmd.args(["-l", "-E", "sha256", "-f"]).arg(&host.host_pub);
    let out = process::run(&mut cmd, None)?;
    let listed = String::from_utf8_lossy(&out.stdout);
    let host_fingerprint = listed
        .split_whitespace()
        .nth(1)
        .filter(|f| f.starts_with("SHA256:"))
        .ok_or_else(|| {
            Error::Other(format!(
                "ssh-keygen -l {}: no SHA256 fingerprint in {listed:?}",
                host.host_pub.display()
            ))
        })?
        .to_owned();
    Ok(LabSshHost {
        host_fingerprint,
        ..host
    })
}

/// `key` with `suffix` appended to its file name, as ssh-keygen names what belongs to it.
fn pub_path(key: &Path, suffix: &str) -> PathBuf {
    let mut p = key.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn the_agent_path_is_the_fingerprint_in_url_safe_base64() {
        let host = LabSshHost {
            ca_key: PathBuf::new(),
            ca_pub: PathBuf::new(),
            host_key: PathBuf::new(),
            host_pub: PathBuf::new(),
            host_cert: PathBuf::new(),
            key_id: String::new(),
            principals: Vec::new(),
            host_fingerprint: "SHA256:a+b/c+d/e".into(),
        };
        assert_eq!(host.agent_path(), "a-b_c-d_e");
    }

    #[test]
    fn provisions_private_keys_and_refuses_to_overwrite_a_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ssh");
        let host = provision_lab_host(&dir, "lab.test").unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&host.ca_key), 0o600);
        assert_eq!(mode(&host.host_key), 0o600);
        assert_eq!(
            host.host_cert,
            dir.join("ssh_host_ed25519_key-cert.pub"),
            "where the agent looks by default"
        );
        assert!(host.ca_pub.is_file() && host.host_pub.is_file());
        assert_eq!(host.principals, ["node1.lab.test", "node1"]);
        assert_eq!(host.key_id, "lab-node1");
        assert_eq!(host.host_fingerprint.len(), "SHA256:".len() + 43);

        let ca = std::fs::read(&host.ca_key).unwrap();
        let e = provision_lab_host(&dir, "lab.test").unwrap_err();
        assert!(e.to_string().contains("already holds an SSH CA"), "{e}");
        assert_eq!(std::fs::read(&host.ca_key).unwrap(), ca);
    }
}
