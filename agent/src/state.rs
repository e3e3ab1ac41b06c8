//! What the agent keeps in its data directory so that a restart does not re-attest:
//! `agent.json` (the agent key's id in the disk key manager and the agent SVID chain)
//! and `bundle.pem` (the last trust bundle from the server). Both are written atomically
//! with mode 0600; the key itself is a 0600 file under `keys/`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use carapace_core::{TrustBundle, TrustDomain};

use crate::{Error, Result};

/// The agent's identity on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentState {
    /// Id of the agent key in the disk key manager.
    pub key_id: String,
    /// The agent SVID chain, DER, leaf first.
    pub svid_chain: Vec<Vec<u8>>,
    /// Whether the attestor can attest again (renewal by re-attestation).
    pub reattestable: bool,
}

#[derive(Serialize, Deserialize)]
struct OnDisk {
    key_id: String,
    svid_chain_pem: String,
    reattestable: bool,
}

/// Writes `bytes` to `path` atomically with mode 0600.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::Io {
            context: format!("cannot write {}", path.display()),
            source: e,
        }
    })
}

impl AgentState {
    /// Loads the state, if any.
    pub fn load(data_dir: &Path) -> Result<Option<AgentState>> {
        let path = data_dir.join("agent.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(Error::Io {
                    context: format!("cannot read {}", path.display()),
                    source: e,
                });
            }
        };
        let d: OnDisk = serde_json::from_str(&text)
            .map_err(|e| Error::Config(format!("{} is corrupt: {e}", path.display())))?;
        let svid_chain = carapace_core::bundle::certs_from_pem(&d.svid_chain_pem)?;
        if svid_chain.is_empty() {
            return Err(Error::Config(format!("{} holds no SVID", path.display())));
        }
        Ok(Some(AgentState {
            key_id: d.key_id,
            svid_chain,
            reattestable: d.reattestable,
        }))
    }

    /// Saves the state.
    pub fn save(&self, data_dir: &Path) -> Result<()> {
        let d = OnDisk {
            key_id: self.key_id.clone(),
            svid_chain_pem: self
                .svid_chain
                .iter()
                .map(|c| carapace_core::bundle::der_to_pem(c))
                .collect(),
            reattestable: self.reattestable,
        };
        let json = serde_json::to_vec_pretty(&d).map_err(|e| Error::Config(e.to_string()))?;
        write_private(&data_dir.join("agent.json"), &json)
    }
}

/// Loads the stored bundle, if any.
pub fn load_bundle(data_dir: &Path, td: &TrustDomain) -> Result<Option<TrustBundle>> {
    let path = data_dir.join("bundle.pem");
    match std::fs::read_to_string(&path) {
        Ok(pem) => Ok(Some(TrustBundle::from_pem(td.clone(), &pem)?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Io {
            context: format!("cannot read {}", path.display()),
            source: e,
        }),
    }
}

/// Saves the bundle.
pub fn save_bundle(data_dir: &Path, bundle: &TrustBundle) -> Result<()> {
    write_private(&data_dir.join("bundle.pem"), bundle.to_pem().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn round_trip_and_private_files() {
        let dir = tempfile::tempdir().unwrap();
        assert!(AgentState::load(dir.path()).unwrap().is_none());
        let kp = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x".into()])
            .unwrap()
            .self_signed(&kp)
            .unwrap();
        let s = AgentState {
            key_id: "agent-1".into(),
            svid_chain: vec![cert.der().to_vec()],
            reattestable: false,
        };
        s.save(dir.path()).unwrap();
        assert_eq!(AgentState::load(dir.path()).unwrap().unwrap(), s);
        let mode = std::fs::metadata(dir.path().join("agent.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let td = TrustDomain::new("example.org").unwrap();
        let mut b = TrustBundle::new(td.clone());
        b.x509_authorities.push(cert.der().to_vec());
        save_bundle(dir.path(), &b).unwrap();
        assert_eq!(
            load_bundle(dir.path(), &td)
                .unwrap()
                .unwrap()
                .x509_authorities,
            b.x509_authorities
        );
    }

    #[test]
    fn a_corrupt_state_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("agent.json"), "{").unwrap();
        let e = AgentState::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("agent.json is corrupt"), "{e}");
    }
}
