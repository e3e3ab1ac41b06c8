//! End to end: the admin API on the node API's TLS port (issue 17). A workload whose
//! entry is marked `--admin` fetches its X509-SVID from a real agent (`carapace-agent api
//! fetch x509 --write`) and administers the server with `carapace-server ...
//! --server-address --svid --svid-key --bundle`; a workload without the flag, an agent's
//! own SVID and a caller without a certificate are refused with `PermissionDenied`, and
//! nothing changes. On one connection, the same still-valid admin SVID is refused on the
//! call after its entry loses the flag or is deleted: authorization is per call.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use carapace_core::TrustBundle;
use carapace_e2e::{Agent, Lab, Server, SvidFiles, bin, td, uid_selector};
use carapace_proto::admin::admin_client::AdminClient;
use carapace_proto::admin::{ListAgentsRequest, ListEntriesRequest};
use tonic::Code;
use tonic::transport::Channel;

const ADMIN_ID: &str = "spiffe://example.org/ops/admin";
const WEB_ID: &str = "spiffe://example.org/web";
/// Where the remote commands are told the admin socket is: nowhere, so a command that
/// succeeds went over TLS.
const NO_SOCKET: &str = "/nonexistent/carapace-admin-remote/admin.sock";

/// `carapace-server <args> --server-address ... --svid ... --svid-key ... --bundle ...`.
fn remote(server: &Server, files: &SvidFiles, args: &[&str]) -> Output {
    Command::new(bin("carapace-server"))
        .args(args)
        .arg("--server-address")
        .arg(&server.address)
        .arg("--svid")
        .arg(&files.svid)
        .arg("--svid-key")
        .arg(&files.key)
        .arg("--bundle")
        .arg(&files.bundle)
        .arg("--admin-socket")
        .arg(NO_SOCKET)
        .output()
        .unwrap()
}

fn remote_json(server: &Server, files: &SvidFiles, args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.extend(["--output", "json"]);
    let out = remote(server, files, &a);
    assert!(
        out.status.success(),
        "{args:?} over TLS failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A remote command that must be refused: exit 1, `needle` in the message, nothing on
/// stdout.
fn assert_refused(server: &Server, files: &SvidFiles, args: &[&str], needle: &str) {
    let out = remote(server, files, args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    assert!(err.contains(needle), "{args:?}: {err}");
    assert!(out.stdout.is_empty(), "{args:?}");
}

/// `log` without its ANSI colour sequences.
fn without_colors(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A server, an agent, and two entries for this process as a workload: `ops/admin`
/// (`--admin`) and `web` (not). Returns them with each SVID's files.
async fn setup(lab: &Lab) -> (Server, Agent, String, SvidFiles, SvidFiles) {
    let server = Server::start(lab);
    let agent = Agent::start(lab, &server, "agent");
    let uid = uid_selector();
    let admin_entry = server.create_entry(&agent.id, ADMIN_ID, &[&uid], &["--admin"]);
    server.create_entry(&agent.id, WEB_ID, &[&uid], &[]);
    agent.wait_for_svid(ADMIN_ID).await;
    agent.wait_for_svid(WEB_ID).await;
    let dir = lab.path().join("workload");
    let admin = agent.fetch_files(&dir, ADMIN_ID);
    let web = agent.fetch_files(&dir, WEB_ID);
    (server, agent, admin_entry, admin, web)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_admin_svid_administers_remotely_and_other_callers_are_refused() {
    let lab = Lab::new();
    let (server, agent, _, admin, web) = setup(&lab).await;

    // The admin SVID creates an entry, reads it back and lists the agents, over TLS.
    let created = remote_json(
        &server,
        &admin,
        &[
            "entry",
            "create",
            "--parent-id",
            &agent.id,
            "--spiffe-id",
            "spiffe://example.org/made-remotely",
            "--selector",
            "unix:uid:4242",
        ],
    );
    let id = created["id"].as_str().unwrap().to_owned();
    let shown = remote_json(&server, &admin, &["entry", "show", "--id", &id]);
    assert_eq!(
        shown["entries"][0]["spiffe_id"], "spiffe://example.org/made-remotely",
        "{shown}"
    );
    let agents = remote_json(&server, &admin, &["agent", "list"]);
    assert!(
        agents["agents"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["spiffe_id"] == agent.id.as_str()),
        "{agents}"
    );
    // The socket sees what was done remotely.
    let local = server.cli_json(&["entry", "show", "--id", &id]);
    assert_eq!(
        local["entries"][0]["spiffe_id"], "spiffe://example.org/made-remotely",
        "{local}"
    );
    assert_eq!(
        local["entries"][0]["parent_id"],
        agent.id.as_str(),
        "{local}"
    );
    assert_eq!(server.cli_json(&["entry", "count"])["count"], 3);
    // Each remote call is logged with its caller.
    let log = without_colors(&server.log());
    assert!(
        log.contains(&format!("remote admin call caller={ADMIN_ID}")),
        "{log}"
    );

    // A workload SVID whose entry is not marked admin: refused, nothing created.
    let create_evil = [
        "entry",
        "create",
        "--parent-id",
        &agent.id,
        "--spiffe-id",
        "spiffe://example.org/evil",
        "--selector",
        "unix:uid:0",
    ];
    let not_admin = format!("{WEB_ID} is not the SPIFFE ID of any registration entry marked admin");
    assert_refused(&server, &web, &create_evil, &not_admin);
    assert_refused(&server, &web, &["agent", "list"], &not_admin);
    assert_refused(&server, &web, &["entry", "delete", "--id", &id], &not_admin);

    // The agent's own SVID and key (what a thief of the node's identity holds): an
    // agent never administers.
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(agent.data_dir.join("agent.json")).unwrap()).unwrap();
    let agent_files = SvidFiles {
        svid: lab.path().join("agent-svid.pem"),
        key: agent
            .data_dir
            .join("keys")
            .join(format!("{}.key", state["key_id"].as_str().unwrap())),
        bundle: web.bundle.clone(),
    };
    std::fs::write(&agent_files.svid, state["svid_chain_pem"].as_str().unwrap()).unwrap();
    assert!(agent_files.key.exists(), "{:?}", agent_files.key);
    let agent_refused = format!(
        "{} is an agent's SVID; agent and server SVIDs never administer",
        agent.id
    );
    assert_refused(&server, &agent_files, &create_evil, &agent_refused);
    assert_refused(&server, &agent_files, &["agent", "list"], &agent_refused);

    // No client certificate at all (not something the CLI sends; a raw client).
    let bundle = TrustBundle::from_pem(td(), &server.bundle_pem()).unwrap();
    let (_keep, rx) = tokio::sync::watch::channel(Arc::new(bundle));
    let tls = carapace_tls::client_config(rx, td().server_id(), None).unwrap();
    let channel = carapace_common::tls_channel(
        &server.address,
        Arc::new(tls),
        std::time::Duration::from_secs(10),
        std::time::Duration::from_secs(10),
    )
    .await
    .unwrap();
    let err = AdminClient::new(channel)
        .list_agents(ListAgentsRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains(
            "requires an X509-SVID of an admin entry as client certificate; none was presented"
        ),
        "{err:?}"
    );

    // A server that is not of this bundle (another server's CA, same trust domain) is
    // refused by the CLI itself: the admin's request never reaches it.
    let impostor = Server::start_opts(
        &lab,
        carapace_e2e::ServerOptions {
            name: Some("impostor".into()),
            ..Default::default()
        },
    );
    let out = remote(&impostor, &admin, &create_evil);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "cannot reach the server at {} over TLS",
            impostor.address
        )) && err.contains("invalid peer certificate"),
        "{err}"
    );
    assert_eq!(impostor.cli_json(&["entry", "count"])["count"], 0);
    assert!(
        !without_colors(&impostor.log()).contains("remote admin call"),
        "{}",
        impostor.log()
    );

    // Nothing the refused callers tried happened.
    assert_eq!(server.cli_json(&["entry", "count"])["count"], 3);
    let evil = server.cli_json(&["entry", "show", "--spiffe-id", "spiffe://example.org/evil"]);
    assert_eq!(evil["entries"].as_array().unwrap().len(), 0, "{evil}");
    let still = server.cli_json(&["entry", "show", "--id", &id]);
    assert_eq!(still["entries"].as_array().unwrap().len(), 1, "{still}");
}

/// Counts the TLS handshakes of a client: rustls asks for the client certificate once per
/// full handshake (resumption is off), so one count means one connection.
#[derive(Debug)]
struct CountingCert {
    key: Arc<rustls::sign::CertifiedKey>,
    handshakes: Arc<AtomicUsize>,
}

impl rustls::client::ResolvesClientCert for CountingCert {
    fn resolve(
        &self,
        _hints: &[&[u8]],
        _schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.handshakes.fetch_add(1, Ordering::SeqCst);
        Some(self.key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// An admin client over one TLS connection presenting `files`' SVID, and its handshake
/// count.
async fn one_connection(
    server: &Server,
    files: &SvidFiles,
) -> (AdminClient<Channel>, Arc<AtomicUsize>) {
    let chain =
        carapace_core::bundle::certs_from_pem(&std::fs::read_to_string(&files.svid).unwrap())
            .unwrap();
    let key = carapace_keymanager_soft::load_key_file(&files.key, "admin").unwrap();
    let bundle =
        TrustBundle::from_pem(td(), &std::fs::read_to_string(&files.bundle).unwrap()).unwrap();
    let (_keep, rx) = tokio::sync::watch::channel(Arc::new(bundle));
    let handshakes = Arc::new(AtomicUsize::new(0));
    let mut tls = rustls::ClientConfig::builder_with_provider(carapace_tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(carapace_tls::SpiffeServerVerifier::new(
            rx,
            td().server_id(),
        ))
        .with_client_cert_resolver(Arc::new(CountingCert {
            key: carapace_tls::certified_key(&chain, Arc::new(key)),
            handshakes: handshakes.clone(),
        }));
    tls.alpn_protocols = vec![b"h2".to_vec()];
    tls.resumption = rustls::client::Resumption::disabled();
    let channel = carapace_common::tls_channel(
        &server.address,
        Arc::new(tls),
        std::time::Duration::from_secs(10),
        std::time::Duration::from_secs(10),
    )
    .await
    .unwrap();
    (AdminClient::new(channel), handshakes)
}

async fn list(client: &mut AdminClient<Channel>) -> Result<usize, tonic::Status> {
    client
        .list_entries(ListEntriesRequest::default())
        .await
        .map(|r| r.into_inner().entries.len())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_admin_svid_is_refused_on_the_next_call_once_its_entry_loses_admin() {
    let lab = Lab::new();
    let (server, agent, admin_entry, admin, _) = setup(&lab).await;
    let uid = uid_selector();
    let (mut client, handshakes) = one_connection(&server, &admin).await;
    let not_admin =
        format!("{ADMIN_ID} is not the SPIFFE ID of any registration entry marked admin");

    assert_eq!(list(&mut client).await.unwrap(), 2);

    // `entry update` without --admin: the next call on the same connection is refused.
    let update = |admin_flag: bool| {
        let mut args = vec![
            "entry",
            "update",
            "--id",
            &admin_entry,
            "--parent-id",
            &agent.id,
            "--spiffe-id",
            ADMIN_ID,
            "--selector",
            &uid,
        ];
        if admin_flag {
            args.push("--admin");
        }
        let out = server.cli_json(&args);
        assert_eq!(out["admin"], admin_flag, "{out}");
    };
    update(false);
    let err = list(&mut client).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains(&not_admin), "{err:?}");

    // The flag back: the same connection is served again.
    update(true);
    assert_eq!(list(&mut client).await.unwrap(), 2);

    // The entry deleted: refused again, with the SVID still valid (it expires in an hour).
    server.cli_ok(&["entry", "delete", "--id", &admin_entry]);
    let err = list(&mut client).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains(&not_admin), "{err:?}");

    assert_eq!(
        handshakes.load(Ordering::SeqCst),
        1,
        "every call must have gone over the first connection"
    );
    // The CLI with the same files is refused too, and changes nothing.
    let before = server.cli_json(&["entry", "count"])["count"].clone();
    assert_refused(
        &server,
        &admin,
        &[
            "entry",
            "create",
            "--parent-id",
            &agent.id,
            "--spiffe-id",
            "spiffe://example.org/after-delete",
            "--selector",
            "unix:uid:4242",
        ],
        &not_admin,
    );
    assert_eq!(server.cli_json(&["entry", "count"])["count"], before);
}
