//! An in-process `https_web` bundle endpoint (the server's own `federation::endpoint`)
//! serving a bundle the test controls, with a test CA (rcgen) certifying `localhost`;
//! shared by the bundle endpoint, refresh-loop and OIDC endpoint tests.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use carapace_core::TrustBundle;
use carapace_server::config::{BundleEndpoint, BundleEndpointProfile};
use carapace_server::federation::endpoint::Endpoint;
use tokio::sync::watch;

/// A test CA and a `localhost` certificate it signed.
pub(crate) struct Pki {
    pub(crate) ca_pem: String,
    pub(crate) ca_der: Vec<u8>,
    pub(crate) chain_pem: String,
    pub(crate) key_pem: String,
}

pub(crate) fn pki() -> Pki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    // Each CA its own name, so a client that trusts another finds no issuer at all.
    static SERIAL: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    ca.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("HTTPS endpoint test CA {n}"),
    );
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    Pki {
        ca_pem: ca_cert.pem(),
        ca_der: ca_cert.der().to_vec(),
        chain_pem: format!("{}{}", leaf.pem(), ca_cert.pem()),
        key_pem: leaf_key.serialize_pem(),
    }
}

pub(crate) fn write_private(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Writes `pki`'s certificate and key as `name.crt` and `name.key` in `dir`.
pub(crate) fn write_pki(dir: &Path, name: &str, pki: &Pki) -> (PathBuf, PathBuf) {
    let (cert, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert, &pki.chain_pem).unwrap();
    write_private(&key, &pki.key_pem);
    (cert, key)
}

/// An `https_web` endpoint running in process.
pub(crate) struct Running {
    pub(crate) addr: SocketAddr,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) cert_file: PathBuf,
    pub(crate) key_file: PathBuf,
    pub(crate) bundle: watch::Sender<Arc<TrustBundle>>,
    pub(crate) stop: watch::Sender<bool>,
    pub(crate) ca_der: Vec<u8>,
}

pub(crate) async fn start_web(bundle: TrustBundle, refresh_hint: Duration) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki();
    let (cert_file, key_file) = write_pki(dir.path(), "bundle", &pki);
    let cfg = BundleEndpoint {
        bind_address: "127.0.0.1:0".parse().unwrap(),
        refresh_hint,
        profile: BundleEndpointProfile::HttpsWeb {
            cert_file: cert_file.clone(),
            key_file: key_file.clone(),
        },
    };
    let (bundle_tx, bundle_rx) = watch::channel(Arc::new(bundle));
    let endpoint = Endpoint::bind(&cfg, bundle_rx)
        .await
        .unwrap()
        .with_reload_interval(Duration::from_millis(100));
    assert_eq!(endpoint.profile(), "https_web");
    let addr = endpoint.local_addr().unwrap();
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(endpoint.serve(None, stop_rx));
    Running {
        addr,
        dir,
        cert_file,
        key_file,
        bundle: bundle_tx,
        stop: stop_tx,
        ca_der: pki.ca_der,
    }
}

/// Polls `f` every 100 ms for up to 30 s.
pub(crate) async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    for _ in 0..300 {
        if let Some(v) = f().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}
