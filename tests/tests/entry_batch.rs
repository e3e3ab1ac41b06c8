//! `carapace-server entry create --data FILE` with the real binaries: thousands of
//! entries from a file in SPIRE's `-data` format, in batches of 1,000, reach the
//! datastore, the admin commands and an agent's workload; a malformed file writes
//! nothing and says where it is wrong; a batch the server refuses leaves the batches
//! before it written and says so.
#![forbid(unsafe_code)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: failing loudly is the point"
)]

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use carapace_e2e::{Agent, Lab, Server, bin, uid_selector};

/// An entry in SPIRE's `-data` format.
fn spire_entry(spiffe_id: &str, parent_id: &str, selector: (&str, &str)) -> serde_json::Value {
    serde_json::json!({
        "spiffe_id": spiffe_id,
        "parent_id": parent_id,
        "selectors": [{"type": selector.0, "value": selector.1}],
        "x509_svid_ttl": 3600,
        "jwt_svid_ttl": 300,
        "dns_names": [],
        "federates_with": [],
        "admin": false,
        "downstream": false,
        "entryExpiry": 0,
    })
}

/// Writes `{"entries": entries}` to `name` in the lab.
fn write_data(lab: &Lab, name: &str, entries: &[serde_json::Value]) -> PathBuf {
    let path = lab.path().join(name);
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&serde_json::json!({ "entries": entries })).unwrap(),
    )
    .unwrap();
    path
}

fn count(server: &Server) -> u64 {
    server.cli_json(&["entry", "count"])["count"]
        .as_u64()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `entry create --data - <args>` with `input` on standard input.
fn create_from_stdin(server: &Server, args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(bin("carapace-server"))
        .args(["entry", "create", "--data", "-"])
        .args(args)
        .arg("--admin-socket")
        .arg(&server.admin_socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn thousands_of_entries_from_a_spire_data_file_reach_the_datastore_and_a_workload() {
    let lab = Lab::new();
    let server = Server::start(&lab);
    let agent = Agent::start(&lab, &server, "agent");

    // 2,500 entries: 2,490 under agents that never attest, 10 under this agent, one of
    // which (1,777) matches this test process as a workload.
    let mine = 1_777;
    let entries: Vec<serde_json::Value> = (0..2_500)
        .map(|i| {
            let spiffe_id = format!("spiffe://example.org/bulk/{i}");
            if (1_770..1_780).contains(&i) {
                let uid = if i == mine {
                    uid_selector()
                } else {
                    format!("unix:uid:{}", 200_000 + i)
                };
                let value = uid.strip_prefix("unix:").unwrap().to_owned();
                spire_entry(&spiffe_id, &agent.id, ("unix", &value))
            } else {
                let parent = format!("spiffe://example.org/spire/agent/join_token/none{i}");
                spire_entry(&spiffe_id, &parent, ("unix", &format!("uid:{i}")))
            }
        })
        .collect();
    let path = write_data(&lab, "entries.json", &entries);
    let out = server.cli_ok(&["entry", "create", "--data", path.to_str().unwrap()]);
    assert_eq!(out, "Created 2500 entries in 3 batches\n");

    assert_eq!(count(&server), 2_500);
    let shown = server.cli_json(&[
        "entry",
        "show",
        "--spiffe-id",
        &format!("spiffe://example.org/bulk/{mine}"),
    ]);
    let shown = shown["entries"].as_array().unwrap();
    assert_eq!(shown.len(), 1);
    assert_eq!(shown[0]["parent_id"], agent.id.as_str());
    assert_eq!(shown[0]["selectors"][0], uid_selector().as_str());
    assert_eq!(shown[0]["x509_svid_ttl"], 3600);
    assert_eq!(shown[0]["jwt_svid_ttl"], 300);
    let by_parent = server.cli_json(&["entry", "count", "--parent-id", &agent.id]);
    assert_eq!(by_parent["count"], 10);

    agent
        .wait_for_svid(&format!("spiffe://example.org/bulk/{mine}"))
        .await;

    // The same file again: every entry exists already; nothing more is written.
    let again = server.cli(&["entry", "create", "--data", path.to_str().unwrap()]);
    assert!(!again.status.success());
    let err = stderr(&again);
    assert!(
        err.contains("nothing written; batch 1 of 3 (entries[0..=999]) refused")
            && err.contains("entries[0] (spiffe://example.org/bulk/0): similar entry"),
        "{err}"
    );
    assert_eq!(count(&server), 2_500);

    // From standard input, with JSON output: the created entries.
    let more: Vec<serde_json::Value> = (0..3)
        .map(|i| {
            spire_entry(
                &format!("spiffe://example.org/stdin/{i}"),
                &agent.id,
                ("unix", &format!("uid:{}", 300_000 + i)),
            )
        })
        .collect();
    let input = serde_json::json!({ "entries": more }).to_string();
    let out = create_from_stdin(&server, &["--output", "json"], input.as_bytes());
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let created = v["entries"].as_array().unwrap();
    assert_eq!(created.len(), 3);
    assert_eq!(created[2]["spiffe_id"], "spiffe://example.org/stdin/2");
    assert!(!created[2]["id"].as_str().unwrap().is_empty());
    assert_eq!(count(&server), 2_503);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_file_writes_nothing_and_a_refused_batch_keeps_the_ones_before() {
    let lab = Lab::new();
    let server = Server::start(&lab);
    let parent = "spiffe://example.org/spire/agent/join_token/p";
    let good = |i: usize| {
        spire_entry(
            &format!("spiffe://example.org/m/{i}"),
            parent,
            ("unix", &format!("uid:{i}")),
        )
    };

    // A JSON syntax error: exit 1, the line named, nothing written.
    let path = lab.path().join("broken.json");
    std::fs::write(
        &path,
        "{\"entries\": [\n  {\"spiffe_id\": \"spiffe://example.org/a\",,}\n]}",
    )
    .unwrap();
    let out = server.cli(&["entry", "create", "--data", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "entry create: --data {}: not valid JSON",
            path.display()
        )) && err.contains("line 2"),
        "{err}"
    );

    // A bad selector in entry 1,999 (batch 2): nothing at all is sent.
    let mut entries: Vec<serde_json::Value> = (0..2_500).map(good).collect();
    entries[1_999]["selectors"][0]["value"] = "uuid:0".into();
    let path = write_data(&lab, "bad-selector.json", &entries);
    let out = server.cli(&["entry", "create", "--data", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("entries[1999].selectors[0]: invalid selector \"unix:uuid:0\""),
        "{err}"
    );
    assert!(out.stdout.is_empty());

    // The same through standard input, with an unknown field.
    entries[1_999] = good(1_999);
    entries[5]["selector"] = "unix:uid:5".into();
    let input = serde_json::json!({ "entries": entries }).to_string();
    let out = create_from_stdin(&server, &[], input.as_bytes());
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("--data -: entries[5].selector: unknown field"),
        "{}",
        stderr(&out)
    );
    assert_eq!(count(&server), 0, "nothing written by a malformed file");

    // Well formed, but entry 1,500 is outside the trust domain, which only the server
    // knows: batch 1 is written, batch 2 refused whole, batch 3 not sent.
    entries
        .get_mut(5)
        .unwrap()
        .as_object_mut()
        .unwrap()
        .remove("selector");
    entries[1_500]["spiffe_id"] = "spiffe://other.org/m/1500".into();
    let path = write_data(&lab, "foreign.json", &entries);
    let out = server.cli(&["entry", "create", "--data", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains(
            "batch 1 written (1000 entries, entries[0..=999]); batch 2 of 3 \
             (entries[1000..=1999]) refused, nothing of it written:\n  entries[1500] \
             (spiffe://other.org/m/1500): "
        ) && err.contains("not in trust domain example.org")
            && err.contains("1 later batch (entries[2000..=2499]) not sent"),
        "{err}"
    );
    assert_eq!(count(&server), 1_000);
    assert_eq!(
        server.cli_json(&[
            "entry",
            "count",
            "--spiffe-id",
            "spiffe://example.org/m/1000"
        ])["count"],
        0
    );
    assert_eq!(
        server.cli_json(&[
            "entry",
            "count",
            "--spiffe-id",
            "spiffe://example.org/m/999"
        ])["count"],
        1
    );
}
