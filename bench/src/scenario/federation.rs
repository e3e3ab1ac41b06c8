//! B13 (issue 19): federation, with the real binaries. Two parts, each a `Result` of its
//! own ([`run`]); the report's section is [`section`].
//!
//! 1. **A bundle change reaching a federated workload** ([`run_change`]). Server A (trust
//!    domain `a.test`) serves its bundle on `[federation.bundle_endpoint]` (`https_spiffe`,
//!    `refresh_hint = "5s"`); server B (`b.test`, `[federation] refresh_floor = "1s"` so
//!    that A's hint rules) federates with it through `carapace-server federation create
//!    --profile https_spiffe --bundle-path <A's bundle show --format spiffe>`. One agent is
//!    attested to B; an entry for this process's uid with `--federates-with a.test` makes
//!    this process a workload that receives A's bundle. Each sample calls A's
//!    `PrepareX509Authority` (what `localauthority x509 prepare` calls: a new CA in A's
//!    bundle, served at once) and times until the workload's `FetchX509SVID` stream
//!    carries the new CA certificate in `federated_bundles["spiffe://a.test"]`; the samples
//!    are a random 0–5 s apart, so that they fall at every phase of B's poll. B's log
//!    (`federation: stored the peer's new bundle`) splits each sample into the wait for
//!    B's next fetch and what follows (B → agent → workload).
//! 2. **Many relationships on one server** ([`run_many`]). This process serves the
//!    bundles of `n` trust domains `td<i>.test` (one self-signed CA each, made with rcgen,
//!    carrying its `spiffe://td<i>.test` URI SAN, `spiffe_sequence` 1,
//!    `spiffe_refresh_hint` 5) from one HTTPS listener (`carapace_common::http::serve`,
//!    the servers' own; a certificate for 127.0.0.1 from a test CA), one path per trust
//!    domain. Server B (`[federation] refresh_floor = "5s"`) gets `n` `https_web`
//!    relationships through the admin API's `CreateFederation` (the test CA as the
//!    relationship's roots), and is timed until it holds every bundle; then B's CPU (its
//!    threads' schedstat, else `/proc/<pid>/stat` utime + stime) is measured over a
//!    window of steady refresh, with the interval between two fetches of each trust
//!    domain as this process saw them. Last, with an agent already running and its
//!    workload's stream open, one entry with `--federates-with` every trust domain is
//!    created through the CLI and timed until the workload holds all `n` federated
//!    bundles.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use tokio::sync::watch;
use tonic::Streaming;

use carapace_common::http::{Reply, Routes};
use carapace_core::plugin::KeyManager as _;
use carapace_core::{KeyType, TrustBundle, TrustDomain};
use carapace_keymanager_soft::MemoryKeyManager;
use carapace_proto::admin::{
    CreateFederationRequest, FederationProfile, FederationRelationship, ListFederationsRequest,
    PrepareX509AuthorityRequest,
};
use carapace_proto::workload::X509svidResponse;

use crate::harness::{self, Agent, Server, ServerOptions, message_of, timestamp_of};
use crate::process;
use crate::report::{Report, Table, failed};
use crate::stats::{Summary, fmt_bytes, fmt_pct, fmt_secs, fmt_us};

/// The refresh hint of every bundle endpoint here (A's, and the served bundles'), s.
pub const HINT_SECS: u64 = 5;

/// Part 1's trust domains.
const TD_A: &str = "a.test";
const TD_B: &str = "b.test";

/// How long one step may take before the run fails.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// B13's sizes.
#[derive(Debug, Clone)]
pub struct B13Plan {
    /// Part 1: bundle changes on A, one sample each.
    pub changes: usize,
    /// Part 2: relationships (trust domains) on server B.
    pub relationships: usize,
    /// Part 2: the window over which B's steady refresh CPU is measured.
    pub steady: Duration,
}

impl B13Plan {
    /// The full run, or the reduced `--quick` one.
    pub fn new(quick: bool) -> B13Plan {
        if quick {
            B13Plan {
                changes: 3,
                relationships: 500,
                steady: Duration::from_secs(15),
            }
        } else {
            B13Plan {
                changes: 10,
                relationships: 500,
                steady: Duration::from_secs(60),
            }
        }
    }
}

/// One bundle change of part 1.
#[derive(Debug, Clone)]
pub struct ChangeSample {
    /// Wall clock when the change was asked for.
    pub started: SystemTime,
    /// From asking A for the change to the workload's stream message carrying it.
    pub total: Duration,
    /// A's `PrepareX509Authority` call alone.
    pub prepare: Duration,
    /// From asking to B logging that it stored A's new bundle; `None` if not found.
    pub stored: Option<Duration>,
}

/// Part 1's figures.
#[derive(Debug, Clone)]
pub struct ChangeResult {
    /// The samples, in order.
    pub samples: Vec<ChangeSample>,
    /// Load average when part 1 began.
    pub loadavg: String,
}

/// Part 2's figures.
#[derive(Debug, Clone)]
pub struct ManyResult {
    /// Relationships made.
    pub n: usize,
    /// Creating them all through the admin API (8 calls in flight).
    pub create: Duration,
    /// From the first create call to B holding every trust domain's bundle.
    pub all_fetched: Duration,
    /// B's CPU time over that.
    pub initial_cpu: Duration,
    /// The intervals between two fetches of one trust domain in the window.
    pub intervals: Vec<Duration>,
    /// The steady window.
    pub window: Duration,
    /// B's CPU time over the window.
    pub cpu: Duration,
    /// Bundle fetches this process served over the window.
    pub fetches: u64,
    /// B's RSS after the window.
    pub rss: u64,
    /// Relationships whose last fetch failed at the end (each with the first error).
    pub failing: Vec<String>,
    /// From starting `entry create --federates-with` × n to the workload holding all n
    /// federated bundles.
    pub entry_total: Duration,
    /// The `entry create` command alone.
    pub entry_cli: Duration,
    /// The agent's CPU time over that step.
    pub agent_cpu: Duration,
    /// B's CPU time over that step.
    pub server_cpu: Duration,
    /// The agent's RSS once the workload held them all.
    pub agent_rss: u64,
    /// Protobuf size of the `federated_bundles` of the sync message carrying all n
    /// bundles, computed from the bundles received.
    pub sync_bytes: usize,
    /// Protobuf size of the `federated_bundles` map of the Workload API message.
    pub workload_bytes: usize,
    /// Load average when part 2 began.
    pub loadavg: String,
}

/// What B13 measured: each part on its own.
#[derive(Debug)]
pub struct B13Result {
    /// Part 1.
    pub change: Result<ChangeResult>,
    /// Part 2.
    pub many: Result<ManyResult>,
}

impl B13Result {
    /// The parts that failed.
    pub fn into_errors(self) -> Vec<anyhow::Error> {
        [self.change.err(), self.many.err()]
            .into_iter()
            .flatten()
            .collect()
    }
}

/// Runs both parts under `dir`.
pub async fn run(bin_dir: &Path, dir: &Path, plan: &B13Plan) -> Result<B13Result> {
    eprintln!(
        "==> B13: a bundle change on A reaching B's federated workload ({} samples)",
        plan.changes
    );
    let change = run_change(bin_dir, &dir.join("change"), plan).await;
    eprintln!(
        "==> B13: {} relationships on one server ({} s steady window)",
        plan.relationships,
        plan.steady.as_secs()
    );
    let many = run_many(bin_dir, &dir.join("many"), plan).await;
    Ok(B13Result { change, many })
}

/// `config` written to `<dir>/<name>`, as server options.
fn server_options(dir: &Path, name: &str, config: &str) -> Result<ServerOptions> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(name);
    std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
    Ok(ServerOptions {
        config: Some(path),
        envs: Vec::new(),
    })
}

/// Reads `stream` until a message satisfies `done`; returns it and when it came.
async fn wait_for(
    stream: &mut Streaming<X509svidResponse>,
    timeout: Duration,
    what: &str,
    done: impl Fn(&X509svidResponse) -> bool,
) -> Result<(X509svidResponse, Instant)> {
    let read = async {
        loop {
            let msg = stream
                .message()
                .await
                .map_err(|s| anyhow!("FetchX509SVID stream: {:?}: {}", s.code(), s.message()))?
                .ok_or_else(|| anyhow!("FetchX509SVID stream ended"))?;
            let at = Instant::now();
            if done(&msg) {
                return Ok::<_, anyhow::Error>((msg, at));
            }
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| anyhow!("{what}: not within {timeout:?}"))?
}

/// Opens `FetchX509SVID` on the agent's socket once the agent has an SVID for this
/// process (until then the Workload API answers "no identity issued": tried again);
/// returns the stream and its first message with an SVID.
async fn open_stream(agent: &Agent) -> Result<(harness::X509Stream, X509svidResponse)> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let attempt = async {
            let (client, mut stream) = harness::x509_stream(&agent.socket).await?;
            let (first, _) = wait_for(&mut stream, STEP_TIMEOUT, "first SVID", |m| {
                !m.svids.is_empty()
            })
            .await?;
            Ok::<_, anyhow::Error>(((client, stream), first))
        };
        match attempt.await {
            Ok(open) => return Ok(open),
            Err(e) if Instant::now() > deadline => {
                bail!("the workload never got an SVID: {e:#}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// CPU time a process has used so far: from its threads' schedstat (nanoseconds) where
/// the kernel has it, else `/proc/<pid>/stat` (10 ms ticks).
fn cpu_of(pid: u32) -> Result<Duration> {
    match process::schedstat_cpu(pid) {
        Some(d) => Ok(d),
        None => process::cpu_time(pid),
    }
}

/// Whether `needle` occurs in `haystack`.
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Part 1: a bundle change on A reaching B's federated workload.
pub async fn run_change(bin_dir: &Path, dir: &Path, plan: &B13Plan) -> Result<ChangeResult> {
    let loadavg = process::loadavg_now();
    let port_a = process::free_port()?;
    let opts_a = server_options(
        dir,
        "a.toml",
        &format!(
            "[federation.bundle_endpoint]\nbind_address = \"127.0.0.1:{port_a}\"\nrefresh_hint = \"{HINT_SECS}s\"\nprofile = \"https_spiffe\"\n"
        ),
    )?;
    let a = Server::start_in(bin_dir, &dir.join("a"), &opts_a, TD_A).await?;
    let bootstrap = dir.join("a.test.bundle");
    std::fs::write(
        &bootstrap,
        a.cli(&["bundle", "show", "--format", "spiffe"]).await?,
    )?;
    let opts_b = server_options(dir, "b.toml", "[federation]\nrefresh_floor = \"1s\"\n")?;
    let mut b = Server::start_in(bin_dir, &dir.join("b"), &opts_b, TD_B).await?;
    let bootstrap = bootstrap.to_string_lossy().into_owned();
    b.cli(&[
        "federation",
        "create",
        "--trust-domain",
        TD_A,
        "--bundle-endpoint-url",
        &format!("https://127.0.0.1:{port_a}"),
        "--profile",
        "https_spiffe",
        "--bundle-path",
        &bootstrap,
        "--bundle-format",
        "spiffe",
    ])
    .await?;
    let mut agent = Agent::start(bin_dir, &dir.join("agent"), &b).await?;
    let uid = rustix::process::geteuid().as_raw();
    b.cli(&[
        "entry",
        "create",
        "--parent-id",
        &agent.agent_id,
        "--spiffe-id",
        &format!("spiffe://{TD_B}/bench/federated"),
        "--selector",
        &format!("unix:uid:{uid}"),
        "--federates-with",
        TD_A,
    ])
    .await?;
    let key = format!("spiffe://{TD_A}");
    let ((_client, mut stream), first) = open_stream(&agent).await?;
    // The first message may come before the federated bundle: then wait for it.
    let has_a = |m: &X509svidResponse| m.federated_bundles.contains_key(&key);
    if !has_a(&first) {
        wait_for(&mut stream, STEP_TIMEOUT, "a.test's bundle", has_a).await?;
    }

    let mut admin_a = a.admin().await?;
    let mut samples = Vec::with_capacity(plan.changes);
    for i in 0..plan.changes {
        let pause = rand::random_range(0..=HINT_SECS * 1000);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let started = SystemTime::now();
        let t0 = Instant::now();
        let authority = admin_a
            .prepare_x509_authority(PrepareX509AuthorityRequest {})
            .await
            .map_err(|s| anyhow!("PrepareX509Authority: {:?}: {}", s.code(), s.message()))?
            .into_inner();
        let prepare = t0.elapsed();
        let cert = authority.certificate;
        if cert.is_empty() {
            bail!("PrepareX509Authority returned no certificate");
        }
        let (_, at) = wait_for(
            &mut stream,
            STEP_TIMEOUT,
            &format!("sample {i}: A's new CA in the workload's federated bundle"),
            |m| {
                m.federated_bundles
                    .get(&key)
                    .is_some_and(|der| contains(der, &cert))
            },
        )
        .await?;
        samples.push(ChangeSample {
            started,
            total: at - t0,
            prepare,
            stored: None,
        });
    }
    agent.proc.check_alive()?;
    b.proc.check_alive()?;
    let stored = stored_instants(&harness::read_log(b.proc.log())?, TD_A);
    for s in &mut samples {
        s.stored = stored
            .iter()
            .find(|t| **t >= s.started)
            .and_then(|t| t.duration_since(s.started).ok())
            .filter(|d| *d <= s.total + Duration::from_millis(5));
    }
    Ok(ChangeResult { samples, loadavg })
}

/// When B logged that it stored `td`'s new bundle, in order.
fn stored_instants(log: &[serde_json::Value], td: &str) -> Vec<SystemTime> {
    let mut v: Vec<SystemTime> = log
        .iter()
        .filter(|l| {
            message_of(l) == Some("federation: stored the peer's new bundle")
                && l.get("fields")
                    .and_then(|f| f.get("trust_domain"))
                    .and_then(|v| v.as_str())
                    == Some(td)
        })
        .filter_map(timestamp_of)
        .collect();
    v.sort();
    v
}

/// The bundles of many trust domains, served by this process, one path each.
struct Peers {
    /// `/<td>` → the trust domain's SPIFFE bundle JSON.
    bundles: HashMap<String, String>,
    /// GETs answered with a bundle.
    served: AtomicU64,
    /// When each path was fetched.
    fetched: std::sync::Mutex<HashMap<String, Vec<Instant>>>,
}

impl Peers {
    /// The intervals between consecutive fetches of the same trust domain, both within
    /// `from..until`.
    fn intervals(&self, from: Instant, until: Instant) -> Vec<Duration> {
        let Ok(fetched) = self.fetched.lock() else {
            return Vec::new();
        };
        fetched
            .values()
            .flat_map(|times| {
                times
                    .windows(2)
                    .filter(|w| w[0] >= from && w[1] <= until)
                    .map(|w| w[1] - w[0])
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

#[async_trait::async_trait]
impl Routes for Peers {
    async fn get(&self, path: &str) -> Reply {
        match self.bundles.get(path) {
            Some(json) => {
                self.served.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut f) = self.fetched.lock() {
                    f.entry(path.to_owned()).or_default().push(Instant::now());
                }
                Reply::json(json.clone()).with_header("cache-control", "no-store")
            }
            None => Reply::text(404, "no such trust domain\n"),
        }
    }
}

/// The `i`-th trust domain of part 2.
fn peer_td(i: usize) -> String {
    format!("td{i}.test")
}

/// A self-signed CA certificate (DER) for `td`, carrying its SPIFFE ID.
fn peer_ca(td: &str) -> Result<Vec<u8>> {
    let key = rcgen::KeyPair::generate().context("generating a P-256 key")?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{td} bench CA"));
    params.subject_alt_names = vec![rcgen::SanType::URI(
        rcgen::string::Ia5String::try_from(format!("spiffe://{td}"))
            .map_err(|e| anyhow!("spiffe://{td}: {e}"))?,
    )];
    Ok(params.self_signed(&key)?.der().to_vec())
}

/// The listener serving [`Peers`]: its address, the test CA (PEM) its certificate chains
/// to, and the counters; serving stops when the returned sender is dropped.
async fn serve_peers(
    n: usize,
) -> Result<(
    std::net::SocketAddr,
    String,
    Arc<Peers>,
    watch::Sender<bool>,
)> {
    // The test CA and the listener's certificate for 127.0.0.1 (and localhost).
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "carapace-bench B13 test CA");
    let ca_pem = ca_params.self_signed(&ca_key)?.pem();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let km = MemoryKeyManager::new();
    let tls_key = km.generate_key("b13-peers-tls", KeyType::EcP256).await?;
    let signer = carapace_tls::RcgenKey::new(tls_key.clone())?;
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?
        .signed_by(&signer, &issuer)?;
    let certified = carapace_tls::certified_key(&[leaf.der().to_vec()], tls_key);
    let resolver = Arc::new(carapace_tls::FixedCert(std::sync::RwLock::new(certified)));
    let tls = carapace_server::oidc::https_config("b13 peers", resolver)
        .map_err(|e| anyhow!("the peers' TLS settings: {e}"))?;

    // One CA and bundle per trust domain.
    let mut bundles = HashMap::with_capacity(n);
    for i in 0..n {
        let td = peer_td(i);
        let mut bundle = TrustBundle::new(TrustDomain::new(&td)?);
        bundle.x509_authorities = vec![peer_ca(&td)?];
        bundle.sequence = 1;
        bundle.refresh_hint = Some(HINT_SECS);
        bundles.insert(format!("/{td}"), bundle.to_spiffe_json()?);
    }
    let peers = Arc::new(Peers {
        bundles,
        served: AtomicU64::new(0),
        fetched: std::sync::Mutex::new(HashMap::new()),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(carapace_common::http::serve(
        listener,
        "b13 peers",
        Some(Arc::new(tls)),
        peers.clone(),
        stopped,
    ));
    Ok((addr, ca_pem, peers, stop))
}

/// Protobuf length of a varint.
fn varint_len(v: usize) -> usize {
    let mut v = v as u64;
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

/// Protobuf length of a length-delimited field of `len` bytes (tag of one byte).
fn field_len(len: usize) -> usize {
    1 + varint_len(len) + len
}

/// Protobuf size of the sync message's `federated_bundles` for these bundles (trust
/// domain name → concatenated DER of one CA each), each with sequence 1 and the hint.
fn sync_share(bundles: &HashMap<String, Vec<u8>>) -> usize {
    bundles
        .iter()
        .map(|(id, der)| {
            let name = id.trim_start_matches("spiffe://");
            let inner = field_len(name.len())
                + field_len(der.len())
                + 1
                + varint_len(1)
                + 1
                + varint_len(HINT_SECS as usize);
            field_len(inner)
        })
        .sum()
}

/// Protobuf size of the Workload API message's `federated_bundles` map.
fn workload_share(bundles: &HashMap<String, Vec<u8>>) -> usize {
    bundles
        .iter()
        .map(|(k, v)| field_len(field_len(k.len()) + field_len(v.len())))
        .sum()
}

/// Part 2: many relationships on one server.
pub async fn run_many(bin_dir: &Path, dir: &Path, plan: &B13Plan) -> Result<ManyResult> {
    let loadavg = process::loadavg_now();
    let n = plan.relationships;
    let (addr, ca_pem, peers, _stop) = serve_peers(n).await?;
    let opts = server_options(
        dir,
        "b.toml",
        &format!("[federation]\nrefresh_floor = \"{HINT_SECS}s\"\n"),
    )?;
    let mut b = Server::start_in(bin_dir, &dir.join("b"), &opts, TD_B).await?;
    let mut agent = Agent::start(bin_dir, &dir.join("agent"), &b).await?;
    let uid = rustix::process::geteuid().as_raw();
    let selector = format!("unix:uid:{uid}");
    b.cli(&[
        "entry",
        "create",
        "--parent-id",
        &agent.agent_id,
        "--spiffe-id",
        &format!("spiffe://{TD_B}/bench/plain"),
        "--selector",
        &selector,
    ])
    .await?;
    let ((_client, mut stream), _) = open_stream(&agent).await?;

    // The relationships, 8 calls in flight on one connection.
    let admin = b.admin().await?;
    let pid = b.proc.pid();
    let initial_cpu0 = cpu_of(pid)?;
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for lane in 0..8 {
        let mut admin = admin.clone();
        let ca_pem = ca_pem.clone();
        set.spawn(async move {
            for i in (lane..n).step_by(8) {
                let td = peer_td(i);
                admin
                    .create_federation(CreateFederationRequest {
                        relationship: Some(FederationRelationship {
                            trust_domain: td.clone(),
                            bundle_endpoint_url: format!("https://{addr}/{td}"),
                            profile: FederationProfile::HttpsWeb as i32,
                            web_roots_pem: ca_pem.clone(),
                            ..Default::default()
                        }),
                        bootstrap_bundle: None,
                    })
                    .await
                    .map_err(|s| {
                        anyhow!("CreateFederation {td}: {:?}: {}", s.code(), s.message())
                    })?;
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    let create = t0.elapsed();
    let mut admin_list = admin.clone();
    let (all_fetched, initial_cpu) = loop {
        let list = admin_list
            .list_federations(ListFederationsRequest {})
            .await
            .map_err(|s| anyhow!("ListFederations: {:?}: {}", s.code(), s.message()))?
            .into_inner()
            .federations;
        let have = list
            .iter()
            .filter(|f| {
                f.bundle.is_some() && f.status.as_ref().is_some_and(|s| s.last_success_at > 0)
            })
            .count();
        if have == n {
            break (t0.elapsed(), cpu_of(pid)?.saturating_sub(initial_cpu0));
        }
        b.proc.check_alive()?;
        if t0.elapsed() > STEP_TIMEOUT * 5 {
            bail!("B held {have} of {n} bundles after {:?}", t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // Steady refresh: one hint's worth of settling, then the window.
    tokio::time::sleep(Duration::from_secs(HINT_SECS)).await;
    let cpu0 = cpu_of(pid)?;
    let served0 = peers.served.load(Ordering::Relaxed);
    let w0 = Instant::now();
    tokio::time::sleep(plan.steady).await;
    let cpu = cpu_of(pid)?.saturating_sub(cpu0);
    let window = w0.elapsed();
    let intervals = peers.intervals(w0, Instant::now());
    let fetches = peers.served.load(Ordering::Relaxed) - served0;
    let rss = process::rss_bytes(pid)?;
    b.proc.check_alive()?;
    let failing: Vec<String> = admin_list
        .list_federations(ListFederationsRequest {})
        .await
        .map_err(|s| anyhow!("ListFederations: {:?}: {}", s.code(), s.message()))?
        .into_inner()
        .federations
        .into_iter()
        .filter_map(|f| {
            let s = f.status?;
            (s.last_error_at > s.last_success_at).then(|| {
                format!(
                    "{}: {}",
                    f.relationship.map(|r| r.trust_domain).unwrap_or_default(),
                    s.last_error
                )
            })
        })
        .collect();

    // One entry federating with every trust domain, on the running agent.
    let mut args: Vec<String> = [
        "entry",
        "create",
        "--parent-id",
        &agent.agent_id,
        "--spiffe-id",
        &format!("spiffe://{TD_B}/bench/federates-with-all"),
        "--selector",
        &selector,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    for i in 0..n {
        args.push("--federates-with".into());
        args.push(peer_td(i));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent_cpu0 = cpu_of(agent.proc.pid())?;
    let server_cpu0 = cpu_of(pid)?;
    let t0 = Instant::now();
    b.cli(&args).await?;
    let entry_cli = t0.elapsed();
    let (msg, at) = wait_for(
        &mut stream,
        STEP_TIMEOUT,
        &format!("the workload holding {n} federated bundles"),
        |m| m.federated_bundles.len() >= n,
    )
    .await?;
    let entry_total = at - t0;
    let agent_cpu = cpu_of(agent.proc.pid())?.saturating_sub(agent_cpu0);
    let server_cpu = cpu_of(pid)?.saturating_sub(server_cpu0);
    let agent_rss = process::rss_bytes(agent.proc.pid())?;
    agent.proc.check_alive()?;
    Ok(ManyResult {
        n,
        create,
        all_fetched,
        initial_cpu,
        intervals,
        window,
        cpu,
        fetches,
        rss,
        failing,
        entry_total,
        entry_cli,
        agent_cpu,
        server_cpu,
        agent_rss,
        sync_bytes: sync_share(&msg.federated_bundles),
        workload_bytes: workload_share(&msg.federated_bundles),
        loadavg,
    })
}

/// Writes B13's section.
pub fn section(r: &mut Report, res: &B13Result, plan: &B13Plan) {
    r.heading(
        3,
        "A bundle change on one trust domain reaching a federated workload of another",
    );
    match &res.change {
        Ok(c) => change_section(r, c, plan),
        Err(e) => failed(r, "B13 part 1 (bundle change → federated workload)", e),
    }
    r.heading(
        3,
        &format!(
            "{} federation relationships on one server: refresh CPU, and an agent entitled to them all",
            plan.relationships
        ),
    );
    match &res.many {
        Ok(m) => many_section(r, m),
        Err(e) => failed(r, "B13 part 2 (many relationships)", e),
    }
}

fn change_section(r: &mut Report, c: &ChangeResult, plan: &B13Plan) {
    r.para(&format!(
        "Release `carapace-server` A (trust domain {TD_A}, `[federation.bundle_endpoint]` on 127.0.0.1, profile `https_spiffe`, `refresh_hint = \"{HINT_SECS}s\"`) and B ({TD_B}, `[federation] refresh_floor = \"1s\"`, so A's hint sets B's poll), each its own data dir; B federates with A through `carapace-server federation create --trust-domain {TD_A} --bundle-endpoint-url https://127.0.0.1:<port> --profile https_spiffe --bundle-path <A's bundle show --format spiffe> --bundle-format spiffe`. One release `carapace-agent` attested to B; an entry for this process's uid with `--federates-with {TD_A}`; this process keeps its `FetchX509SVID` stream open. Each sample calls A's admin `PrepareX509Authority` (what `localauthority x509 prepare` calls: a new CA enters A's bundle and its endpoint serves it at once, with a higher `spiffe_sequence`) and times until a stream message carries the new CA certificate in `federated_bundles[\"spiffe://{TD_A}\"]`. {n} samples, each after a random 0–{HINT_SECS} s pause, so that the changes fall at every phase of B's poll. Load average when part 1 began: {load}.",
        n = plan.changes,
        load = c.loadavg,
    ));
    let total: Vec<Duration> = c.samples.iter().map(|s| s.total).collect();
    let prepare: Vec<Duration> = c.samples.iter().map(|s| s.prepare).collect();
    let stored: Vec<Duration> = c.samples.iter().filter_map(|s| s.stored).collect();
    let after: Vec<Duration> = c
        .samples
        .iter()
        .filter_map(|s| s.stored.map(|d| s.total.saturating_sub(d)))
        .collect();
    let mut t = Table::new(["figure", "samples", "p50", "max"]);
    for (label, v) in [
        (
            "**bundle change on A → B's federated workload holds the new CA**",
            &total,
        ),
        ("of which A's `PrepareX509Authority` call", &prepare),
        (
            "change → B stored A's new bundle (B's log: waiting for its next poll, and the fetch)",
            &stored,
        ),
        (
            "B stored it → the workload's stream message (B → agent sync → Workload API)",
            &after,
        ),
    ] {
        if let Some(s) = Summary::of_durations_us(v) {
            t.row([
                label.to_owned(),
                s.n.to_string(),
                fmt_us(s.p50),
                fmt_us(s.max),
            ]);
        }
    }
    r.table(&t);
    let max = Summary::of_durations_us(&total).map_or(f64::NAN, |s| s.max);
    let bound = (HINT_SECS as f64 + 1.0) * 1e6;
    r.bullet(&format!(
        "Expected: at most the {HINT_SECS} s hint, plus up to 1 s (B schedules its polls in whole seconds) and the propagation after B stores the bundle — {}: max {} against {}.",
        if max <= bound + 500_000.0 {
            "so it is"
        } else {
            "**it is not**"
        },
        fmt_us(max),
        fmt_us(bound),
    ));
}

fn many_section(r: &mut Report, m: &ManyResult) {
    let per_min = m.cpu.as_secs_f64() * 60.0 / m.window.as_secs_f64().max(1e-9);
    let rate = m.fetches as f64 / m.window.as_secs_f64().max(1e-9);
    r.para(&format!(
        "This process serves the bundles of {n} trust domains `td0.test` … `td{last}.test` (one self-signed P-256 CA each, made with rcgen, carrying `spiffe://td<i>.test`; `spiffe_sequence` 1, `spiffe_refresh_hint` {HINT_SECS}) from one HTTPS listener on 127.0.0.1 (the project's own `carapace_common::http::serve`, no keep-alive, so every fetch is a new TLS handshake; its certificate from a test CA), one path per trust domain. Release `carapace-server` B ({TD_B}, `[federation] refresh_floor = \"{HINT_SECS}s\"`) gets {n} `https_web` relationships through the admin API's `CreateFederation` (8 calls in flight; the test CA as each relationship's roots, as `--ca-file` gives them). One release `carapace-agent` runs on B with a plain entry for this process's uid, whose `FetchX509SVID` stream stays open. Load average when part 2 began: {load}.",
        n = m.n,
        last = m.n.saturating_sub(1),
        load = m.loadavg,
    ));
    let mut t = Table::new(["figure", "value"]);
    t.row([
        format!("creating {} relationships (admin API)", m.n),
        fmt_secs(m.create),
    ]);
    t.row([
        "first create call → B holds every bundle (ListFederations: each has a bundle and a last success)".to_owned(),
        fmt_secs(m.all_fetched),
    ]);
    t.row([
        "B's CPU over that (creates, first fetches, stores)".to_owned(),
        fmt_secs(m.initial_cpu),
    ]);
    t.row([
        format!(
            "**B's CPU in steady refresh** (over {}; threads' schedstat)",
            fmt_secs(m.window)
        ),
        format!(
            "**{:.2} s per minute** ({} of one core)",
            per_min,
            fmt_pct(per_min / 60.0)
        ),
    ]);
    t.row([
        "fetches served over the window".to_owned(),
        format!(
            "{} ({rate:.1}/s; {n}/{HINT_SECS} s = {ideal:.1}/s expected)",
            m.fetches,
            n = m.n,
            ideal = m.n as f64 / HINT_SECS as f64
        ),
    ]);
    if let Some(s) = Summary::of_durations_us(&m.intervals) {
        t.row([
            format!(
                "interval between two fetches of one trust domain (hint {HINT_SECS} s, floor {HINT_SECS} s): min / p50 / p99 / max ({} intervals)",
                s.n
            ),
            format!(
                "{} / {} / {} / {}",
                fmt_us(s.min),
                fmt_us(s.p50),
                fmt_us(s.p99),
                fmt_us(s.max)
            ),
        ]);
    }
    t.row([
        "B's CPU per fetch (TLS handshake, parse, compare, status write)".to_owned(),
        if m.fetches > 0 {
            fmt_us(m.cpu.as_secs_f64() * 1e6 / m.fetches as f64)
        } else {
            "n/a".to_owned()
        },
    ]);
    t.row([
        "B's RSS after the window".to_owned(),
        fmt_bytes(m.rss as f64),
    ]);
    t.row([
        format!(
            "**entry with `--federates-with` × {} created (CLI) → the running agent's workload holds all {} federated bundles**",
            m.n, m.n
        ),
        format!("**{}**", fmt_secs(m.entry_total)),
    ]);
    t.row([
        "of which the `entry create` command".to_owned(),
        fmt_secs(m.entry_cli),
    ]);
    t.row([
        "B's / the agent's CPU over that step".to_owned(),
        format!("{} / {}", fmt_secs(m.server_cpu), fmt_secs(m.agent_cpu)),
    ]);
    t.row([
        "the agent's RSS holding them".to_owned(),
        fmt_bytes(m.agent_rss as f64),
    ]);
    t.row([
        format!(
            "size of the {} federated bundles in the sync message / in the Workload API message (protobuf, computed from the bundles received)",
            m.n
        ),
        format!(
            "{} / {}",
            fmt_bytes(m.sync_bytes as f64),
            fmt_bytes(m.workload_bytes as f64)
        ),
    ]);
    r.table(&t);
    if m.failing.is_empty() {
        r.bullet(&format!(
            "Every relationship's last fetch succeeded at the end of the window ({} of {}).",
            m.n, m.n
        ));
    } else {
        r.bullet(&format!(
            "**{} relationships' last fetch failed** at the end of the window; first: {}.",
            m.failing.len(),
            m.failing[0]
        ));
    }
    r.bullet("SPIRE (spire#6490): its agent fetches the federated bundles one by one inside its 5-second sync under a 30 s RPC deadline, so with many federations the whole sync times out and nothing (entries, bundles, SVIDs) is updated; here the server pushes the bundles on the agent's open sync stream in the same message as the entry, once, and afterwards only those that changed.");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needle_search() {
        assert!(contains(b"abcdef", b"cde"));
        assert!(!contains(b"abcdef", b"ced"));
        assert!(!contains(b"abc", b""));
        assert!(!contains(b"ab", b"abc"));
    }

    #[test]
    fn protobuf_sizes() {
        assert_eq!(varint_len(0), 1);
        assert_eq!(varint_len(127), 1);
        assert_eq!(varint_len(128), 2);
        assert_eq!(varint_len(16_384), 3);
        assert_eq!(field_len(3), 5);
        let mut m = HashMap::new();
        m.insert("spiffe://x.test".to_owned(), vec![0u8; 200]);
        // Bundle: name (1+1+6) + DER (1+2+200) + sequence (2) + hint (2) = 215, in a
        // field of 1+2+215.
        assert_eq!(sync_share(&m), 218);
        // Map entry: key (1+1+15) + value (1+2+200) = 220, in a field of 1+2+220.
        assert_eq!(workload_share(&m), 223);
    }

    #[test]
    fn stored_lines_are_the_trust_domains() {
        let line = |td: &str| -> serde_json::Value {
            serde_json::from_str(&format!(
                r#"{{"timestamp":"2026-12-07T06:00:00.500000Z","fields":{{"message":"federation: stored the peer's new bundle","trust_domain":"{td}","sequence":3}}}}"#
            ))
            .unwrap()
        };
        let log = vec![line("a.test"), line("other.test")];
        assert_eq!(stored_instants(&log, "a.test").len(), 1);
        assert!(stored_instants(&log, "c.test").is_empty());
    }

    #[test]
    fn peer_cas_carry_their_trust_domain() {
        let der = peer_ca("td7.test").unwrap();
        assert!(contains(&der, b"spiffe://td7.test"));
        let mut bundle = TrustBundle::new(TrustDomain::new("td7.test").unwrap());
        bundle.x509_authorities = vec![der];
        bundle.sequence = 1;
        bundle.refresh_hint = Some(HINT_SECS);
        let json = bundle.to_spiffe_json().unwrap();
        let back =
            TrustBundle::from_spiffe_json(TrustDomain::new("td7.test").unwrap(), &json).unwrap();
        assert_eq!(back, bundle);
    }
}
