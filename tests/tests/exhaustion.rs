//! Exhaustion by local users and unauthenticated peers (issue 13, section 3): the real
//! binaries under connection floods, lowered descriptor limits and oversized attestation
//! messages, observed from outside (what clients receive, the processes' descriptors,
//! CPU time and memory).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use carapace_agent::node_attestor::JoinTokenClient;
use carapace_agent::node_client;
use carapace_core::plugin::KeyManager;
use carapace_core::{KeyType, TrustBundle};
use carapace_e2e::{Agent, Lab, Server, ServerOptions, eventually, my_uid, td, uid_selector};
use carapace_keymanager_soft::MemoryKeyManager;
use carapace_proto::node::{AttestParams, AttestRequest, attest_request};
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use zeroize::Zeroizing;

/// Descriptors a process holds now.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// utime + stime of a process, in clock ticks (1/100 s on Linux).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Resident memory of a process, in KiB.
fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap()
}

fn tls_without_client_cert(server: &Server) -> Arc<rustls::ClientConfig> {
    let bundle = TrustBundle::from_pem(td(), &server.bundle_pem()).unwrap();
    let (_tx, rx) = watch::channel(Arc::new(bundle));
    Arc::new(carapace_tls::client_config(rx, td().server_id(), None).unwrap())
}

/// A real join-token attestation; the agent's SPIFFE ID.
async fn attest(server: &Server, km: &MemoryKeyManager, name: &str) -> String {
    let (token, id) = server.token();
    let key = km.generate_key(name, KeyType::EcP256).await.unwrap();
    let csr = carapace_tls::csr_for_key(key.clone()).unwrap();
    let result = node_client::attest(
        &server.address,
        tls_without_client_cert(server),
        &JoinTokenClient::new(Zeroizing::new(token)),
        csr,
        key.public_key_der(),
    )
    .await
    .unwrap_or_else(|e| panic!("attestation failed: {e}\n{}", server.log()));
    assert!(result.svid.is_some());
    id
}

/// A TLS connection to the node API without a client certificate, doing nothing.
async fn idle_tls(
    address: &str,
    tls: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(address).await?;
    let name = rustls_pki_types::ServerName::try_from("carapace-server").unwrap();
    tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
}

/// Reads until end-of-file or an error; how long it took.
async fn time_to_close<S: tokio::io::AsyncRead + Unpin>(mut s: S, start: Instant) -> Duration {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return start.elapsed(),
            Ok(_) => {}
        }
    }
}

fn write_config(lab: &Lab, name: &str, text: &str) -> std::path::PathBuf {
    let path = lab.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Connects `n` silent Unix-socket clients as uid 65534, waits up to `hold` seconds for
/// the agent to close them, and reports when each closed (seconds after the last
/// connect) and how many are still open.
const SILENT_CLIENTS: &str = r#"
import json, select, socket, sys, time
path, n, hold = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
socks = []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    socks.append(s)
t0 = time.monotonic()
print("connected", flush=True)
sys.stdin.readline()
live = {s.fileno(): s for s in socks}
closed = []
deadline = t0 + hold
while live and time.monotonic() < deadline:
    ready, _, _ = select.select(list(live.values()), [], [], max(0.0, deadline - time.monotonic()))
    for s in ready:
        try:
            data = s.recv(4096)
        except OSError:
            data = b""
        if not data:
            closed.append(time.monotonic() - t0)
            del live[s.fileno()]
            s.close()
print(json.dumps({"closed": closed, "open": len(live)}), flush=True)
"#;

#[tokio::test(flavor = "multi_thread")]
async fn workload_api_serves_root_while_uid_65534_floods_it_with_silent_connections() {
    assert_eq!(
        my_uid(),
        0,
        "this test runs clients as uid 65534 and must run as root (CI does)"
    );
    let lab = Lab::new();
    let server = Server::start(&lab);
    let config = write_config(
        &lab,
        "agent.toml",
        "[workload_api]\nmax_connections = 16\nmax_connections_per_uid = 4\nconnection_idle_timeout = \"3s\"\n",
    );
    let agent = Agent::start_with(
        &lab,
        &server,
        "agent",
        &["--config".as_ref(), config.as_os_str()],
    );
    server.create_entry(
        &agent.id,
        "spiffe://example.org/root-workload",
        &[&uid_selector()],
        &[],
    );
    eventually("root's SVID", || async {
        agent.fetch(&[]).status.success().then_some(())
    })
    .await;

    // The agent may hold what systemd gives it by default, and less.
    let out = Command::new("prlimit")
        .arg("--pid")
        .arg(agent.proc.pid().to_string())
        .arg("--nofile=128:128")
        .output()
        .unwrap();
    assert!(out.status.success(), "prlimit: {out:?}");

    // 200 silent connections from uid 65534: 400 descriptors without a cap.
    let mut flood = Command::new("python3")
        .args(["-c", SILENT_CLIENTS])
        .arg(&agent.socket)
        .args(["200", "15"])
        .uid(65534)
        .gid(65534)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(flood.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert_eq!(line.trim(), "connected");

    // Root, another uid, is served while uid 65534 holds its cap.
    let mut fetch = Command::new(carapace_e2e::bin("carapace-agent"))
        .args(["api", "fetch", "x509", "--socket-path"])
        .arg(&agent.socket)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = fetch.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            fetch.kill().unwrap();
            fetch.wait().unwrap();
            flood.kill().unwrap();
            panic!("root's fetch during the flood hung for 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "root's fetch during the flood failed");
    assert!(
        open_fds(agent.proc.pid()) < 100,
        "the agent holds {} descriptors",
        open_fds(agent.proc.pid())
    );

    // Every silent connection is closed by the agent: all but the per-uid cap at once
    // (displaced), the last ones after the idle timeout.
    use std::io::Write as _;
    writeln!(flood.stdin.as_mut().unwrap()).unwrap();
    line.clear();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    flood.wait().unwrap();
    let report: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(report["open"], 0, "connections left open: {report}");
    let closed: Vec<f64> = report["closed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let late: Vec<f64> = closed.iter().copied().filter(|t| *t >= 2.0).collect();
    assert!(
        !late.is_empty() && late.len() <= 4,
        "at most the per-uid cap (4) stays until the idle timeout: {late:?}"
    );
    assert!(
        late.iter().all(|t| *t < 3.0 + 8.0),
        "closed after the 3 s idle timeout: {late:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_attestation_succeeds_while_a_thousand_idle_tls_connections_are_held() {
    let lab = Lab::new();
    let server = Server::start_opts(
        &lab,
        ServerOptions {
            nofile: Some(1024),
            ..ServerOptions::default()
        },
    );
    let pid = server.proc.pid();
    let tls = tls_without_client_cert(&server);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..1000 {
        let (address, tls) = (server.address.clone(), tls.clone());
        tasks.spawn(async move { idle_tls(&address, tls).await });
    }
    let mut held = Vec::new();
    while let Some(r) = tasks.join_next().await {
        if let Ok(conn) = r.unwrap() {
            held.push(conn);
        }
    }
    let fds = open_fds(pid);
    assert!(fds < 700, "the server holds {fds} descriptors of 1024");

    // The admin API and a real attestation are served while the connections are held.
    let start = Instant::now();
    let km = MemoryKeyManager::new();
    let id = tokio::time::timeout(Duration::from_secs(20), attest(&server, &km, "legit"))
        .await
        .expect("a legitimate attestation must not hang");
    assert!(id.starts_with("spiffe://example.org/spire/agent/join_token/"));
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "token generate + attestation took {:?}",
        start.elapsed()
    );
    drop(held);
}

#[tokio::test(flavor = "multi_thread")]
async fn node_api_closes_idle_unauthenticated_connections() {
    let lab = Lab::new();
    let config = write_config(
        &lab,
        "server.toml",
        "[node_api]\nunauthenticated_idle_timeout = \"2s\"\n",
    );
    let server = Server::start_with(&lab, &["--config", config.to_str().unwrap()]);
    let start = Instant::now();
    // A TCP connection that never sends a ClientHello, and a TLS one that never sends
    // an RPC.
    let silent = tokio::net::TcpStream::connect(&server.address)
        .await
        .unwrap();
    let tls = idle_tls(&server.address, tls_without_client_cert(&server))
        .await
        .unwrap();
    let (silent, tls) = tokio::time::timeout(
        Duration::from_secs(30),
        futures::future::join(time_to_close(silent, start), time_to_close(tls, start)),
    )
    .await
    .expect("the server must close idle connections");
    for (what, t) in [("silent TCP", silent), ("idle TLS", tls)] {
        assert!(
            t >= Duration::from_millis(1500) && t < Duration::from_secs(9),
            "{what} connection closed after {t:?}, not the 2 s idle timeout"
        );
    }
}

fn big_attest_request(payload_bytes: usize) -> AttestRequest {
    AttestRequest {
        step: Some(attest_request::Step::Params(AttestParams {
            attestor: "join_token".into(),
            payload: vec![b'x'; payload_bytes],
            csr: Vec::new(),
        })),
    }
}

/// Sends one unauthenticated `Attest` with a payload of `payload_bytes`; the status
/// the caller receives.
async fn unauthenticated_attest(
    server: &Server,
    tls: Arc<rustls::ClientConfig>,
    payload_bytes: usize,
) -> tonic::Status {
    let mut client = node_client::channel(&server.address, tls).unwrap();
    let request = tokio_stream::once(big_attest_request(payload_bytes));
    match client.attest(request).await {
        Err(status) => status,
        Ok(resp) => match resp.into_inner().message().await {
            Err(status) => status,
            Ok(m) => panic!("an oversized attestation was answered: {m:?}"),
        },
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unauthenticated_attest_of_one_mib_is_refused_and_real_ones_still_work() {
    let lab = Lab::new();
    let server = Server::start(&lab);
    let status = unauthenticated_attest(&server, tls_without_client_cert(&server), 1 << 20).await;
    assert!(
        status.message().contains("too large") && status.message().contains("131072"),
        "{status:?}"
    );
    let km = MemoryKeyManager::new();
    attest(&server, &km, "legit").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn parallel_big_unauthenticated_attests_leave_server_memory_bounded() {
    let lab = Lab::new();
    let server = Server::start(&lab);
    let pid = server.proc.pid();
    let before = vm_rss_kib(pid);
    let tls = tls_without_client_cert(&server);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (address, tls) = (server.address.clone(), tls.clone());
        tasks.spawn(async move {
            let mut client = node_client::channel(&address, tls).unwrap();
            let request = tokio_stream::once(big_attest_request(8 << 20));
            match client.attest(request).await {
                Err(s) => s.code(),
                Ok(r) => match r.into_inner().message().await {
                    Err(s) => s.code(),
                    Ok(_) => tonic::Code::Ok,
                },
            }
        });
    }
    let mut peak = before;
    while !tasks.is_empty() {
        tokio::select! {
            r = tasks.join_next() => {
                assert_ne!(r.unwrap().unwrap(), tonic::Code::Ok, "an 8 MiB attestation was accepted");
            }
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
        peak = peak.max(vm_rss_kib(pid));
    }
    // 16 x 8 MiB = 128 MiB if the server buffered them.
    assert!(
        peak - before < 64 * 1024,
        "server RSS grew from {before} KiB to {peak} KiB"
    );
    let km = MemoryKeyManager::new();
    attest(&server, &km, "legit").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn accept_loops_out_of_descriptors_back_off_instead_of_spinning() {
    let lab = Lab::new();
    // Caps an operator set too high for the descriptor limit: the table fills up.
    let config = write_config(
        &lab,
        "server.toml",
        "[node_api]\nmax_connections = 120\nmax_connections_per_ip = 120\n",
    );
    let mut server = Server::start_opts(
        &lab,
        ServerOptions {
            nofile: Some(128),
            extra: vec!["--config".into(), config.display().to_string()],
            ..ServerOptions::default()
        },
    );
    let pid = server.proc.pid();
    // Fill the server's descriptor table: silent node API and admin connections.
    let mut held_tcp = Vec::new();
    for _ in 0..100 {
        held_tcp.push(
            tokio::net::TcpStream::connect(&server.address)
                .await
                .unwrap(),
        );
    }
    let mut held_unix = Vec::new();
    for _ in 0..100 {
        held_unix.push(
            tokio::net::UnixStream::connect(&server.admin_socket)
                .await
                .unwrap(),
        );
    }
    eventually("the server out of descriptors", || async {
        (open_fds(pid) >= 127).then_some(())
    })
    .await;
    // Pending connections stay in the backlogs: each accept fails with EMFILE.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ticks = cpu_ticks(pid);
    let window = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let used = cpu_ticks(pid) - ticks;
    let elapsed_ticks = window.elapsed().as_millis() as u64 / 10;
    assert!(
        used * 5 < elapsed_ticks,
        "the server used {used} ticks of CPU in {elapsed_ticks} (more than 20%) while out of descriptors"
    );
    // Once the connections go away, the server serves again.
    drop(held_tcp);
    drop(held_unix);
    eventually("the admin API after the flood", || async {
        server.cli(&["healthcheck"]).status.success().then_some(())
    })
    .await;
    assert!(server.proc.try_wait().is_none(), "the server exited");
}

#[tokio::test(flavor = "multi_thread")]
async fn attestations_beyond_the_in_flight_cap_are_refused_promptly() {
    let lab = Lab::new();
    let config = write_config(
        &lab,
        "server.toml",
        "[node_api]\nmax_attestations_in_flight = 2\n",
    );
    let server = Server::start_with(&lab, &["--config", config.to_str().unwrap()]);
    let tls = tls_without_client_cert(&server);
    // Two attestations that never send their first message hold both permits.
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let mut client = node_client::channel(&server.address, tls.clone()).unwrap();
        // A request stream that ends, empty, when `go_away` is dropped.
        let (go_away, gone) = tokio::sync::oneshot::channel::<()>();
        let request = futures::StreamExt::filter_map(futures::stream::once(gone), |_| async {
            None::<AttestRequest>
        });
        let resp = client.attest(request).await.unwrap();
        stalled.push((client, resp, go_away));
    }
    let start = Instant::now();
    let status = unauthenticated_attest(&server, tls.clone(), 16).await;
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    // Their permits come back when they go away.
    drop(stalled);
    let km = MemoryKeyManager::new();
    eventually("an attestation after the stalled ones left", || async {
        let (token, _) = server.token();
        let key = km.generate_key("k", KeyType::EcP256).await.ok()?;
        let csr = carapace_tls::csr_for_key(key.clone()).ok()?;
        node_client::attest(
            &server.address,
            tls.clone(),
            &JoinTokenClient::new(Zeroizing::new(token)),
            csr,
            key.public_key_der(),
        )
        .await
        .ok()
    })
    .await;
}
