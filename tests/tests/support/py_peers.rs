//! Python SPIFFE peers as workloads of an agent: a spiffe-tls server and client
//! (`tests/python/spiffetls_peer.py`) and py-spiffe's JWT calls
//! (`tests/python/jwt_client.py`). Included by `#[path]` from the test files that use
//! them.
#![allow(dead_code, reason = "each test file uses a part")]

use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use carapace_e2e::{Agent, Lab, python};
use serde_json::Value;

/// The path of `tests/python/<name>`.
pub(crate) fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(name)
}

/// A child process killed (and reaped) when dropped.
pub(crate) struct KillOnDrop(pub(crate) std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `spiffetls_peer.py serve` on `address` for the workload of `agent`, accepting
/// `client_id` only; returns once it listens.
pub(crate) fn serve_mtls(lab: &Lab, agent: &Agent, address: &str, client_id: &str) -> KillOnDrop {
    let err = lab
        .path()
        .join(format!("mtls-{}.err", address.replace(':', "-")));
    let mut child = Command::new(python())
        .arg(script("spiffetls_peer.py"))
        .arg("serve")
        .arg(&agent.socket)
        .arg(address)
        .arg(client_id)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(
        line.trim(),
        "listening",
        "the spiffe-tls server did not start: {}",
        std::fs::read_to_string(&err).unwrap_or_default()
    );
    KillOnDrop(child)
}

/// One `spiffetls_peer.py dial` from the workload of `agent`, authorizing `server_id`:
/// Ok(the server's answer), or Err(why the TLS connection was refused).
pub(crate) fn dial_mtls(
    agent: &Agent,
    address: &str,
    server_id: &str,
    message: &str,
) -> Result<String, String> {
    let out = Command::new(python())
        .arg(script("spiffetls_peer.py"))
        .arg("dial")
        .arg(&agent.socket)
        .arg(address)
        .arg(server_id)
        .arg(message)
        .output()
        .unwrap();
    match out.status.code() {
        Some(0) => {
            let v: Value = serde_json::from_slice(&out.stdout).unwrap();
            Ok(v["answer"].as_str().unwrap().to_owned())
        }
        Some(3) => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
        _ => panic!(
            "spiffetls_peer.py dial failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// `jwt_client.py <socket> <args>` (py-spiffe) as the workload of `agent`: its JSON, or
/// its refusal.
pub(crate) fn py_jwt(agent: &Agent, args: &[&str]) -> Result<Value, String> {
    let out = Command::new(python())
        .arg(script("jwt_client.py"))
        .arg(&agent.socket)
        .args(args)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}
