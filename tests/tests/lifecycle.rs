//! Processes that stop when told and do not step on each other: both binaries exit
//! within the shutdown grace period (5 s) of SIGTERM with streams and calls open, leaving
//! the datastore usable; a second instance on the same data directory, or on a live
//! Workload API socket, refuses to start and the first keeps serving.
#![forbid(unsafe_code)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: failing loudly is the point"
)]

use std::io::BufRead as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use carapace_e2e::{Agent, Lab, Proc, Server, bin, free_port, patience, uid_selector};

/// The binaries' shutdown grace period plus a generous margin for a loaded machine.
const EXIT_BOUND: Duration = Duration::from_secs(5 + 3);

/// `carapace-agent api watch` on `agent`, once it printed its first update: an open
/// Workload API stream.
fn open_watch(
    agent: &Agent,
) -> (
    Child,
    std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
) {
    let mut child = Command::new(bin("carapace-agent"))
        .args(["api", "watch", "--socket-path"])
        .arg(&agent.socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().expect("a first update").unwrap();
    assert!(first.contains("spiffe://example.org/"), "{first}");
    (child, lines)
}

/// Sends SIGTERM and returns the exit status and how long the exit took; panics if it
/// takes longer than [`EXIT_BOUND`].
fn terminate(proc: &mut Proc, what: &str) -> (std::process::ExitStatus, Duration) {
    let start = Instant::now();
    proc.sigterm();
    let status = proc.wait_exit(EXIT_BOUND + Duration::from_secs(30));
    let took = start.elapsed();
    let status = status
        .unwrap_or_else(|| panic!("{what} still runs {took:?} after SIGTERM:\n{}", proc.log()));
    assert!(
        took < EXIT_BOUND,
        "{what} took {took:?} to exit after SIGTERM (bound {EXIT_BOUND:?}):\n{}",
        proc.log()
    );
    (status, took)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_server_exits_promptly_on_sigterm_with_an_agent_syncing_and_calls_open() {
    let lab = Lab::new();
    let mut server = Server::start(&lab);
    let agent = Agent::start(&lab, &server, "agent");
    server.create_entry(&agent.id, "spiffe://example.org/w", &[&uid_selector()], &[]);
    agent.wait_for_an_svid().await;
    // Open while the server stops: the agent's sync stream, a Workload API watch on the
    // agent, and a connection to the admin socket that never sends a request.
    let (mut watch, _lines) = open_watch(&agent);
    let idle_admin = std::os::unix::net::UnixStream::connect(&server.admin_socket).unwrap();

    let (status, _) = terminate(&mut server.proc, "carapace-server");
    assert_eq!(status.code(), Some(0), "{}", server.log());
    drop(idle_admin);
    assert!(
        !server.admin_socket.exists(),
        "the server leaves its own admin socket behind"
    );
    // The agent keeps serving what it holds while the server is gone.
    assert!(agent.fetch(&[]).status.success());

    // The datastore is consistent: the same data dir starts again (its lock is free)
    // and still knows the agent and the entry.
    server.restart();
    let agents = server.cli_json(&["agent", "list"]);
    assert!(agents.to_string().contains(&agent.id), "{agents}");
    let entries = server.cli_json(&["entry", "show"]);
    assert!(
        entries.to_string().contains("spiffe://example.org/w"),
        "{entries}"
    );
    let _ = watch.kill();
    let _ = watch.wait();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_exits_promptly_on_sigterm_with_a_watch_open_and_removes_its_socket() {
    let lab = Lab::new();
    let server = Server::start(&lab);
    let mut agent = Agent::start(&lab, &server, "agent");
    server.create_entry(&agent.id, "spiffe://example.org/w", &[&uid_selector()], &[]);
    agent.wait_for_an_svid().await;
    let (mut watch, mut lines) = open_watch(&agent);

    let (status, _) = terminate(&mut agent.proc, "carapace-agent");
    assert_eq!(status.code(), Some(0), "{}", agent.proc.log());
    // The watch was ended by the agent, not left hanging.
    assert!(lines.next().is_none() || lines.next().is_none());
    let watch_status = watch.wait().unwrap();
    assert!(!watch_status.success(), "the watch ends with an error");
    // Its own socket is gone; its data dir can be used again at once.
    assert!(!agent.socket.exists(), "the agent leaves its socket behind");
    let bundle = lab.path().join("agent-bundle.pem");
    let mut again = Agent::spawn(
        &lab,
        &server,
        "agent",
        &["--trust-bundle".as_ref(), bundle.as_os_str()],
    );
    again.wait_healthy();
    again.wait_for_an_svid().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_agent_on_the_same_data_dir_refuses_naming_the_first_which_keeps_serving() {
    let lab = Lab::new();
    let server = Server::start(&lab);
    let mut first = Agent::start(&lab, &server, "agent");
    server.create_entry(&first.id, "spiffe://example.org/w", &[&uid_selector()], &[]);
    first.wait_for_an_svid().await;

    // Same name: same data dir and same socket path, as with the same config file.
    let bundle = lab.path().join("agent-bundle.pem");
    let mut second = Agent::spawn(
        &lab,
        &server,
        "agent",
        &["--trust-bundle".as_ref(), bundle.as_os_str()],
    );
    let status = second
        .proc
        .wait_exit(patience())
        .expect("the second agent exits");
    let log = second.proc.log();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("is in use by another carapace-agent")
            && log.contains(&format!("pid {}", first.proc.pid())),
        "{log}"
    );
    // The first one is untouched: running, its socket there and answering.
    assert!(first.proc.try_wait().is_none());
    let out = first.fetch(&[]);
    assert!(
        out.status.success()
            && String::from_utf8_lossy(&out.stdout).contains("spiffe://example.org/w"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_does_not_take_over_the_live_socket_of_another() {
    let lab = Lab::new();
    let server = Server::start(&lab);
    let mut first = Agent::start(&lab, &server, "agent");
    server.create_entry(&first.id, "spiffe://example.org/w", &[&uid_selector()], &[]);
    first.wait_for_an_svid().await;

    // Another data dir, the same socket path.
    let bundle = lab.path().join("other-bundle.pem");
    std::fs::write(&bundle, server.bundle_pem()).unwrap();
    let (token, _) = server.token();
    let mut cmd = Command::new(bin("carapace-agent"));
    cmd.arg("run")
        .arg("--data-dir")
        .arg(lab.path().join("other"))
        .arg("--socket-path")
        .arg(&first.socket)
        .arg("--server-address")
        .arg(&server.address)
        .arg("--join-token")
        .arg(&token)
        .arg("--trust-bundle")
        .arg(&bundle);
    let mut other = Proc::spawn("carapace-agent", cmd, lab.path().join("other.log"));
    let status = other.wait_exit(patience()).expect("the other agent exits");
    let log = other.log();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains(&first.socket.display().to_string()) && log.contains("address in use"),
        "{log}"
    );
    assert!(first.proc.try_wait().is_none());
    assert!(first.fetch(&[]).status.success());
}

#[test]
fn a_second_server_on_the_same_data_dir_refuses_naming_the_first() {
    let lab = Lab::new();
    let mut first = Server::start(&lab);
    // The same data dir, but its own port and admin socket: only the lock stops it.
    let mut cmd = Command::new(bin("carapace-server"));
    cmd.arg("run")
        .arg("--data-dir")
        .arg(&first.data_dir)
        .arg("--admin-socket")
        .arg(lab.path().join("second-admin").join("admin.sock"))
        .arg("--bind-address")
        .arg(format!("127.0.0.1:{}", free_port()));
    let mut second = Proc::spawn("carapace-server", cmd, lab.path().join("second.log"));
    let status = second
        .wait_exit(patience())
        .expect("the second server exits");
    let log = second.log();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("is in use by another carapace-server")
            && log.contains(&format!("pid {}", first.proc.pid())),
        "{log}"
    );
    assert!(
        !lab.path().join("second-admin").join("admin.sock").exists(),
        "the second server bound its admin socket before refusing"
    );
    first.wait_healthy();
}
