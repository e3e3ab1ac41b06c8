//! An agent given several server addresses (`--server-address` repeated) uses the first
//! that answers and, when the one it uses dies, moves to another with its identity intact.
//! Until several servers share one database (PostgreSQL, issue 17) the "other server" here
//! is the same server reached at its own address, while the first address is a TCP relay
//! the test kills: what the agent sees is a server that vanished mid-stream.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use carapace_e2e::{Agent, Lab, Server, free_port, uid_selector};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A TCP relay to `to`; aborting its task closes the listener and every relayed
/// connection at once, as a dying server does.
struct Relay {
    addr: String,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

async fn relay(to: String) -> Relay {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                return;
            };
            count.fetch_add(1, Ordering::SeqCst);
            let to = to.clone();
            conns.spawn(async move {
                if let Ok(mut out) = TcpStream::connect(&to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    });
    Relay {
        addr,
        accepted,
        task,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_moves_to_the_next_server_when_its_server_dies_and_keeps_its_identity() {
    let lab = Lab::new();
    let mut server = Server::start(&lab);
    let real = server.address.clone();
    let first = relay(real.clone()).await;

    // The agent's list: the relay first, then the server's own address.
    server.address = first.addr.clone();
    let agent = Agent::start_with(
        &lab,
        &server,
        "agent",
        &["--server-address".as_ref(), real.as_ref()],
    );
    server.address = real.clone();
    server.create_entry(
        &agent.id,
        "spiffe://example.org/before",
        &[&uid_selector()],
        &[],
    );
    agent.wait_for_svid("spiffe://example.org/before").await;
    assert!(
        first.accepted.load(Ordering::SeqCst) > 0,
        "the agent did not use the first address"
    );

    // The first server dies: the agent reconnects to the next and is served there.
    first.task.abort();
    let _ = first.task.await;
    server.create_entry(
        &agent.id,
        "spiffe://example.org/after",
        &[&uid_selector()],
        &[],
    );
    agent.wait_for_svid("spiffe://example.org/after").await;
    // Same identity: one agent, never attested again, and the first SVID still held.
    let agents = server.cli_json(&["agent", "list"])["agents"].clone();
    assert_eq!(agents.as_array().unwrap().len(), 1, "{agents}");
    assert_eq!(agents[0]["spiffe_id"], agent.id.as_str());
    let held = String::from_utf8_lossy(&agent.fetch(&[]).stdout).into_owned();
    assert!(held.contains("spiffe://example.org/before"), "{held}");
    assert!(
        agent.proc.log().contains("switched to another server"),
        "{}",
        agent.proc.log()
    );

    // A new agent whose first address does not answer at all attests through the next.
    let dead = format!("127.0.0.1:{}", free_port());
    server.address = dead;
    let second = Agent::start_with(
        &lab,
        &server,
        "second",
        &["--server-address".as_ref(), real.as_ref()],
    );
    server.address = real;
    server.create_entry(
        &second.id,
        "spiffe://example.org/second",
        &[&uid_selector()],
        &[],
    );
    second.wait_for_svid("spiffe://example.org/second").await;
}
