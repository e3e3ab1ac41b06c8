//! Entry changes reach agents as diffs (issue 17): after one entry of 10,000 changes, the
//! sync message carries that entry alone; removals reach the agent and its workloads; a
//! new stream that resumes what the agent holds (after a disconnect, or from a server
//! restarted with nothing in memory) gets a diff. Prints the byte counts and the real
//! agent's CPU time for BENCHMARKS.md ("Sync diffs (issue 17)").
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::time::Duration;

use carapace_agent::sync::HeldEntries;
use carapace_e2e::{Agent, Lab, Server, eventually, uds_channel, uid_selector};
use carapace_keymanager_soft::MemoryKeyManager;
use carapace_proto::admin::admin_client::AdminClient;
use carapace_proto::admin::{CreateEntryRequest, DeleteEntryRequest, UpdateEntryRequest};
use carapace_proto::node::{SyncAuthorizedRequest, SyncAuthorizedResponse};
use carapace_proto::types;
use futures::StreamExt;
use prost::Message;
use tonic::transport::Channel;

const N: usize = 10_000;
const GROUP: &str = "spiffe://example.org/group";
const NOBODY: &str = "unix:uid:4000000";

#[path = "support/node_agent.rs"]
#[allow(dead_code, reason = "each test file uses part of it")]
mod node_agent;
use node_agent::TestAgent;

/// Opens sync streams as the agent, to see the sync messages themselves.
trait OpenSync {
    async fn open(&self, req: SyncAuthorizedRequest) -> tonic::Streaming<SyncAuthorizedResponse>;
}

impl OpenSync for TestAgent {
    async fn open(&self, req: SyncAuthorizedRequest) -> tonic::Streaming<SyncAuthorizedResponse> {
        self.client()
            .sync_authorized(req)
            .await
            .unwrap()
            .into_inner()
    }
}

async fn next(stream: &mut tonic::Streaming<SyncAuthorizedResponse>) -> SyncAuthorizedResponse {
    tokio::time::timeout(Duration::from_secs(60), stream.message())
        .await
        .expect("a sync message within 60 s")
        .unwrap()
        .expect("the stream is open")
}

async fn admin(server: &Server) -> AdminClient<Channel> {
    AdminClient::new(uds_channel(&server.admin_socket).await)
        .max_decoding_message_size(64 * 1024 * 1024)
}

fn wire_entry(parent: &str, spiffe_id: &str, selector: &str) -> types::Entry {
    let (t, v) = selector.split_once(':').unwrap();
    types::Entry {
        spiffe_id: spiffe_id.into(),
        parent_id: parent.into(),
        selectors: vec![types::Selector {
            r#type: t.into(),
            value: v.into(),
        }],
        ..Default::default()
    }
}

async fn create(a: &mut AdminClient<Channel>, e: types::Entry) -> types::Entry {
    a.create_entry(CreateEntryRequest { entry: Some(e) })
        .await
        .unwrap()
        .into_inner()
}

/// utime + stime of `pid`, in milliseconds.
fn cpu_ms(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `after` starts at field 3.
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    let hz: u64 = String::from_utf8(
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .parse()
    .unwrap();
    ticks * 1000 / hz
}

/// Waits until `pid` is back to idle (under 150 ms of CPU in a second, twice running:
/// an agent holding 10,000 entries spends some every tick, signing spends a whole core);
/// returns its CPU time then.
async fn cpu_when_quiet(pid: u32) -> u64 {
    let mut quiet = 0;
    let mut last = cpu_ms(pid);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = cpu_ms(pid);
        quiet = if now - last < 150 { quiet + 1 } else { 0 };
        last = now;
        if quiet == 2 {
            return now;
        }
    }
}

/// CPU ms `pid` spends idle in `secs` seconds.
async fn idle_cpu(pid: u32, secs: u64) -> u64 {
    let c = cpu_ms(pid);
    tokio::time::sleep(Duration::from_secs(secs)).await;
    cpu_ms(pid) - c
}

/// Fixed window for one change's CPU time, idle time included (reported apart).
const WINDOW: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread")]
async fn one_changed_entry_out_of_ten_thousand_reaches_the_agent_as_a_one_entry_diff() {
    let lab = Lab::new();
    let mut server = Server::start(&lab);
    let agent = Agent::start(&lab, &server, "a");
    let km = MemoryKeyManager::new();
    let test = node_agent::attest(&server, &km, "t").await;
    let mut adm = admin(&server).await;

    // 10,000 entries under one parent ID; the real agent and the test agent each get them
    // through an entry of that ID parented to them. This process, as a workload, matches
    // w/0 .. w/2 on the real agent.
    let made: Vec<types::Entry> = futures::stream::iter(0..N)
        .map(|i| {
            let mut a = adm.clone();
            async move {
                let sel = if i < 3 {
                    uid_selector()
                } else {
                    NOBODY.to_owned()
                };
                create(
                    &mut a,
                    wire_entry(GROUP, &format!("spiffe://example.org/w/{i}"), &sel),
                )
                .await
            }
        })
        .buffered(16)
        .collect()
        .await;
    let w = |i: usize| format!("spiffe://example.org/w/{i}");

    // Full state: the test agent's first message.
    create(&mut adm, wire_entry(&test.id, GROUP, NOBODY)).await;
    let mut stream = test.open(SyncAuthorizedRequest::default()).await;
    let first = next(&mut stream).await;
    assert!(first.full);
    assert_eq!(first.entries.len(), N + 1);
    assert!(first.bundle.is_some());
    let full_bytes = first.encoded_len();
    let mut held = HeldEntries::default();
    held.apply(&first, true, false).unwrap();

    // The real agent takes the same 10,000 at once.
    let pid = agent.proc.pid();
    let cpu0 = cpu_when_quiet(pid).await;
    let t0 = std::time::Instant::now();
    create(&mut adm, wire_entry(&agent.id, GROUP, NOBODY)).await;
    for i in 0..3 {
        agent.wait_for_svid(&w(i)).await;
    }
    let cpu_full = cpu_when_quiet(pid).await - cpu0;
    let full_secs = t0.elapsed().as_secs_f64();
    let idle = idle_cpu(pid, WINDOW.as_secs()).await;
    let before = agent.held_svid(&w(0)).unwrap();

    // One entry changes: one entry in the message, nothing else.
    let mut changed = made[0].clone();
    changed.hint = "changed".into();
    let cpu1 = cpu_ms(pid);
    let t1 = tokio::time::Instant::now();
    adm.update_entry(UpdateEntryRequest {
        entry: Some(changed),
    })
    .await
    .unwrap();
    let diff = next(&mut stream).await;
    assert!(!diff.full);
    assert_eq!(diff.entries.len(), 1, "{diff:?}");
    assert_eq!(diff.entries[0].id, made[0].id);
    assert_eq!(diff.entries[0].hint, "changed");
    assert!(diff.removed.is_empty() && diff.bundle.is_none(), "{diff:?}");
    let diff_bytes = diff.encoded_len();
    held.apply(&diff, false, false).unwrap();
    // The real agent re-signs that entry's SVID.
    eventually("the changed entry's new SVID", || async {
        agent
            .held_svid(&w(0))
            .filter(|s| s.chain_pem != before.chain_pem)
    })
    .await;
    tokio::time::sleep_until(t1 + WINDOW).await;
    let cpu_diff = cpu_ms(pid) - cpu1;

    println!(
        "sync of {N} entries: full state {full_bytes} bytes, one changed entry {diff_bytes} bytes"
    );
    println!(
        "agent CPU (utime+stime): taking the {N} entries (and signing their SVIDs) {cpu_full} ms \
         in {full_secs:.1} s; one changed entry {cpu_diff} ms in a {} s window; idle {idle} ms \
         per {} s holding {N} entries",
        WINDOW.as_secs(),
        WINDOW.as_secs()
    );
    assert!(
        diff_bytes * 100 < full_bytes,
        "a one-entry diff ({diff_bytes} B) is not far smaller than the full state ({full_bytes} B)"
    );

    // A removal reaches the agent: the message names it, and the workload loses its SVID.
    adm.delete_entry(DeleteEntryRequest {
        id: made[1].id.clone(),
    })
    .await
    .unwrap();
    let gone = next(&mut stream).await;
    assert!(!gone.full && gone.entries.is_empty(), "{gone:?}");
    assert_eq!(gone.removed, [made[1].id.clone()]);
    held.apply(&gone, false, false).unwrap();
    eventually("the workload to lose the deleted entry's SVID", || async {
        agent.held_svid(&w(1)).is_none().then_some(())
    })
    .await;
    assert!(agent.held_svid(&w(0)).is_some(), "the others stay");
    assert_eq!(held.entries().len(), N);

    // Disconnected while one entry changes and one goes: the resumed stream opens with
    // exactly that, not the full list.
    drop(stream);
    let mut again = made[3].clone();
    again.hint = "while away".into();
    adm.update_entry(UpdateEntryRequest { entry: Some(again) })
        .await
        .unwrap();
    adm.delete_entry(DeleteEntryRequest {
        id: made[2].id.clone(),
    })
    .await
    .unwrap();
    let req = held.resume_request();
    let resume_request_bytes = req.encoded_len();
    let mut stream = test.open(req).await;
    let resumed = next(&mut stream).await;
    assert!(!resumed.full, "a known state resumes");
    assert_eq!(resumed.entries.len(), 1);
    assert_eq!(resumed.entries[0].id, made[3].id);
    assert_eq!(resumed.removed, [made[2].id.clone()]);
    held.apply(&resumed, true, true).unwrap();
    drop(stream);
    eventually("the workload to lose w/2 on the real agent", || async {
        agent.held_svid(&w(2)).is_none().then_some(())
    })
    .await;

    // A server with nothing in memory (restarted: as another server on the same database
    // would) resumes the same held state with an empty diff.
    server.restart();
    let mut stream = test.open(held.resume_request()).await;
    let resumed = next(&mut stream).await;
    assert!(!resumed.full);
    assert!(
        resumed.entries.is_empty() && resumed.removed.is_empty(),
        "{resumed:?}"
    );
    let resumed_bytes = resumed.encoded_len();
    // An agent claiming entries it does not hold gets them removed, nothing more.
    let mut claim = held.resume_request();
    claim.held.push(carapace_proto::node::HeldEntry {
        id: "not-mine".into(),
        digest: vec![0; 32],
    });
    let lied = next(&mut test.open(claim).await).await;
    assert!(lied.entries.is_empty());
    assert_eq!(lied.removed, ["not-mine"]);
    // Without a resume: the full state.
    let fresh = next(&mut test.open(SyncAuthorizedRequest::default()).await).await;
    assert!(fresh.full);
    assert_eq!(fresh.entries.len(), N - 1);
    println!(
        "resume after a disconnect: request {resume_request_bytes} bytes; after a server restart \
         with nothing changed: first message {resumed_bytes} bytes (the bundle only)"
    );

    // The real agent, reconnected to the restarted server, still takes changes.
    let before = agent.held_svid(&w(0)).unwrap();
    let mut changed = made[0].clone();
    changed.hint = "after restart".into();
    adm = admin(&server).await;
    adm.update_entry(UpdateEntryRequest {
        entry: Some(changed),
    })
    .await
    .unwrap();
    eventually("the changed entry's new SVID after the restart", || async {
        agent
            .held_svid(&w(0))
            .filter(|s| s.chain_pem != before.chain_pem)
    })
    .await;
    assert!(agent.held_svid(&w(2)).is_none());
}
