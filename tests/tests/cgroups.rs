//! End to end with real cgroups: the test creates cgroups in the layouts systemd, Docker
//! and the kubelet make (cgroup v2, needs root, as CI runs), starts py-spiffe workloads
//! inside them, and checks that the agent's `cgroups` and `systemd` attestors turn the
//! kernel's view of each into selectors that entries (combined with `unix` ones) match.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::path::{Path, PathBuf};
use std::process::Command;

use carapace_e2e::{Agent, Lab, Server, fetch_svid_script, py_fetch_output, python, uid_selector};

/// The cgroup v2 hierarchy's mount point (`/sys/fs/cgroup` on a pure v2 host,
/// `/sys/fs/cgroup/unified` on a hybrid one), from /proc/self/mountinfo.
fn unified_root() -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mount = pre.split_whitespace().nth(4)?;
            (post.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount))
        })
        .unwrap_or_else(|| panic!("no cgroup2 hierarchy is mounted: {info}"))
}

/// Cgroups this test created, removed (deepest first) when dropped.
struct Cgroups {
    created: Vec<PathBuf>,
    leaf: PathBuf,
}

impl Cgroups {
    /// Creates `rel` (e.g. `/a.slice/b.service`) and any missing parents.
    fn create(rel: &str) -> Cgroups {
        let root = unified_root();
        let mut created = Vec::new();
        let mut dir = root.clone();
        for part in rel.trim_start_matches('/').split('/') {
            dir = dir.join(part);
            if !dir.exists() {
                std::fs::create_dir(&dir).unwrap_or_else(|e| {
                    panic!(
                        "creating cgroup {}: {e} (these tests create cgroups and need root; \
                         CI runs as root)",
                        dir.display()
                    )
                });
                created.push(dir.clone());
            }
        }
        Cgroups { created, leaf: dir }
    }

    /// Sets `trusted.<name>` on the leaf, as systemd does for `invocation_id`.
    fn set_trusted_xattr(&self, name: &str, value: &str) {
        let out = Command::new("python3")
            .args([
                "-c",
                "import os,sys; os.setxattr(sys.argv[1], sys.argv[2], sys.argv[3].encode())",
            ])
            .arg(&self.leaf)
            .arg(format!("trusted.{name}"))
            .arg(value)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs py-spiffe's fetch as a process of this cgroup; its JSON output, or its error.
    fn py_fetch(&self, socket: &Path) -> Result<serde_json::Value, String> {
        // The shell joins the cgroup, then becomes the workload: the kernel, not the
        // workload, reports the cgroup from then on.
        py_fetch_output(
            Command::new("sh")
                .args([
                    "-c",
                    "echo $$ > \"$1/cgroup.procs\" && exec \"$2\" \"$3\" \"$4\"",
                    "sh",
                ])
                .arg(&self.leaf)
                .arg(python())
                .arg(fetch_svid_script())
                .arg(socket)
                .output()
                .unwrap(),
        )
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        for dir in self.created.iter().rev() {
            // Empty once its processes exited; retried briefly while the kernel tears
            // the last one down.
            for _ in 0..50 {
                if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
}

fn ids(v: &serde_json::Value) -> Vec<String> {
    let mut ids: Vec<String> = v["svids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["spiffe_id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

/// An agent with the `unix`, `cgroups` and `systemd` workload attestors.
fn agent(lab: &Lab, server: &Server) -> Agent {
    let config = lab.path().join("agent.toml");
    std::fs::write(
        &config,
        "trust_domain = \"example.org\"\n[workload_attestor.unix]\n\
         [workload_attestor.cgroups]\n[workload_attestor.systemd]\n",
    )
    .unwrap();
    Agent::start_with(
        lab,
        server,
        "agent",
        &["--config".as_ref(), config.as_os_str()],
    )
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf))
        .unwrap();
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// Polls until `fetch` returns exactly `want` (entries reach the agent asynchronously).
async fn until_ids(
    what: &str,
    want: &[&str],
    fetch: impl Fn() -> Result<serde_json::Value, String>,
) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let got = fetch().map(|v| ids(&v));
        if got.as_deref().is_ok_and(|g| g == want) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: wanted {want:?}, got {got:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_systemd_service_is_identified_by_unit_and_invocation_id_combined_with_unix() {
    let lab = Lab::new();
    let server = Server::start(&lab);
    let agent = agent(&lab, &server);
    let tag = random_hex(4);
    let slice = format!("carapace-e2e-{tag}.slice");
    let web = Cgroups::create(&format!("/{slice}/web-{tag}.service"));
    let invocation = random_hex(16);
    web.set_trusted_xattr("invocation_id", &invocation);
    let other = Cgroups::create(&format!("/{slice}/other-{tag}.service"));

    // Selectors of two attestors in one entry: this uid, in that unit.
    server.create_entry(
        &agent.id,
        "spiffe://example.org/web",
        &[&uid_selector(), &format!("systemd:unit:web-{tag}.service")],
        &[],
    );
    // This very run of the unit.
    server.create_entry(
        &agent.id,
        "spiffe://example.org/web-run",
        &[&format!("systemd:invocation_id:{invocation}")],
        &[],
    );
    // Every unit of the slice.
    server.create_entry(
        &agent.id,
        "spiffe://example.org/slice-member",
        &[&format!("systemd:slice:{slice}")],
        &[],
    );
    until_ids(
        "the web unit",
        &[
            "spiffe://example.org/slice-member",
            "spiffe://example.org/web",
            "spiffe://example.org/web-run",
        ],
        || web.py_fetch(&agent.socket),
    )
    .await;
    // Another unit of the same slice, same uid: only the slice's identity.
    until_ids(
        "the other unit",
        &["spiffe://example.org/slice-member"],
        || other.py_fetch(&agent.socket),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_docker_container_and_a_kubernetes_pod_are_identified_by_their_cgroups() {
    let lab = Lab::new();
    let server = Server::start(&lab);
    let agent = agent(&lab, &server);
    let tag = random_hex(4);
    // Docker's systemd cgroup driver: <slice>/docker-<id>.scope.
    let container = random_hex(32);
    let docker = Cgroups::create(&format!(
        "/carapace-e2e-{tag}.slice/docker-{container}.scope"
    ));
    // The kubelet's systemd driver, a burstable pod with a containerd container.
    let pod = format!(
        "{}-{}-4{}-8{}-{}",
        random_hex(4),
        random_hex(2),
        &random_hex(2)[1..],
        &random_hex(2)[1..],
        random_hex(6)
    );
    let pod_container = random_hex(32);
    let k8s = Cgroups::create(&format!(
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/\
         cri-containerd-{pod_container}.scope",
        pod.replace('-', "_")
    ));

    server.create_entry(
        &agent.id,
        "spiffe://example.org/docker-app",
        &[&format!("cgroups:container_id:{container}")],
        &[],
    );
    server.create_entry(
        &agent.id,
        "spiffe://example.org/k8s-pod",
        &[
            &format!("cgroups:pod_uid:{pod}"),
            "cgroups:qos_class:burstable",
        ],
        &[],
    );
    server.create_entry(
        &agent.id,
        "spiffe://example.org/k8s-container",
        &[
            &format!("cgroups:container_id:{pod_container}"),
            "cgroups:container_runtime:containerd",
        ],
        &[],
    );
    until_ids(
        "the docker container",
        &["spiffe://example.org/docker-app"],
        || docker.py_fetch(&agent.socket),
    )
    .await;
    until_ids(
        "the pod's container",
        &[
            "spiffe://example.org/k8s-container",
            "spiffe://example.org/k8s-pod",
        ],
        || k8s.py_fetch(&agent.socket),
    )
    .await;
    // The test process itself is in none of them.
    let err = carapace_e2e::py_fetch_result(&agent.socket).unwrap_err();
    assert!(
        err.contains("no identity issued") || err.contains("PERMISSION_DENIED"),
        "{err}"
    );
}
