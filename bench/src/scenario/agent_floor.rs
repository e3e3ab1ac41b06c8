//! B15 (issue 22): how close the agent's Workload API is to the machine's floor.
//!
//! One release `carapace-server` and one release `carapace-agent` with the `unix`,
//! `cgroups` and `systemd` workload attestors (B6's measured configuration), its entry
//! requiring `unix:uid` and `systemd:unit` of B6's unit-like cgroup, the SVID cached. Beside
//! it, **the floor**: this executable in a hidden mode ([`FLOOR_FLAG`], [`floor_server`]), a
//! bare tonic server on a Unix socket on a default multi-thread tokio runtime (as the
//! agent's), implementing only `FetchX509SVID` by answering one pre-built
//! `X509SVIDResponse` (the bytes the agent answered once, so the message has the same size)
//! on a stream that then stays open until the client goes, `FetchJWTSVID` with the agent's
//! own answer (its cached token), and SDS `StreamSecrets` with the agent's own first
//! response to the first request; no attestation, no peer credentials, every other RPC
//! `Unimplemented`.
//!
//! The clients are child processes of this executable ([`CHILD_FLAG`], [`child`]) in the
//! unit cgroup, with the same client code (B6's `one_connection`: a new Unix-socket
//! connection, HTTP/2, `FetchX509SVID` until the first message, close) for floor and agent:
//!
//! 1. first response with one client loop and with `nproc` loops, floor and agent
//!    interleaved run by run;
//! 2. new connections per second: `nproc` client processes of a few loops each, started
//!    together, against the floor and then the agent;
//! 3. `FetchJWTSVID` (the token cached by a first fetch) and SDS `StreamSecrets` (the SVID
//!    and `ROOTCA`, as B12 asks) first responses on new connections, floor and agent, in
//!    every run right after its X.509 settings;
//! 4. memory: the agent's idle VmRSS, a burst of concurrent open streams (baseline, all
//!    open, 2 s and 10 s after they closed), and the RSS per cached X509-SVID on a second
//!    agent of the same configuration given bulk entries of another uid (so that its
//!    growth does not touch the first agent's figures; the bulk entries are not deleted:
//!    that agent is stopped at the end).
//!
//! [`run`] measures, [`section`] writes the report's section with the goals of issue 22.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result, anyhow, bail};
use futures::{Stream, StreamExt as _};
use prost::Message as _;
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use carapace_proto::sds::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use carapace_proto::sds::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use carapace_proto::sds::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use carapace_proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use carapace_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest,
    ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svidRequest,
    X509svidResponse,
};

use crate::harness::{self, Agent, LogFollower, Server, ServerOptions};
use crate::process::{self, Machine, Proc};
use crate::report::{Report, Table, failed};
use crate::scenario::jwt_mint::{self, AUDIENCE};
use crate::scenario::sds;
use crate::scenario::workload_attest::{
    self, AttestPlan, ConnRun, Target, UnitCgroup, UnitInfo, join_cgroup,
};
use crate::stats::{Repeated, Summary, fmt_bytes, fmt_count, fmt_secs, fmt_us};

/// The first argument of B15's hidden client mode (see [`child`]).
pub const CHILD_FLAG: &str = "--agent-floor-child";

/// The hidden floor server mode: `carapace-bench --floor-server <socket> <response-file>`.
pub const FLOOR_FLAG: &str = "--floor-server";

/// How long to wait for the agent to hold its SVIDs, and for the floor to answer.
const SYNC_TIMEOUT: Duration = Duration::from_secs(120);

/// The longest one JWT or SDS call may take before it counts as an error.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the burst may take to have all its streams open.
const BURST_TIMEOUT: Duration = Duration::from_secs(60);

/// How long after spawning the rate children they start together.
const RATE_START_DELAY: Duration = Duration::from_millis(800);

/// The SPIFFE ID of the measured workload.
const WORKLOAD_ID: &str = "spiffe://example.org/bench/b15";

/// The uid of the bulk entries' selector (no process of the benchmark runs as it).
const BULK_UID: u32 = 4242;

/// Goals of issue 22.
pub mod goal {
    /// First response, one client: p50 at most (µs).
    pub const P50_US: f64 = 350.0;
    /// First response, one client: p99 below (µs).
    pub const P99_US: f64 = 600.0;
    /// First response, `nproc` clients: p99 below (µs).
    pub const NPROC_P99_US: f64 = 1_500.0;
    /// New connections per second at least (on 2 cores).
    pub const RATE: f64 = 8_000.0;
    /// RSS per cached X509-SVID at most (bytes; 3 KB).
    pub const PER_SVID_BYTES: f64 = 3_000.0;
    /// Idle RSS at most (bytes; 10 MiB).
    pub const IDLE_BYTES: f64 = 10.0 * 1024.0 * 1024.0;
    /// RSS after the burst, at most this times the baseline.
    pub const BURST_RATIO: f64 = 1.10;
}

/// B15's sizes.
#[derive(Debug, Clone, PartialEq)]
pub struct B15Plan {
    /// Interleaved runs of each first-response setting.
    pub runs: usize,
    /// Seconds per first-response run.
    pub seconds: f64,
    /// Untimed connections per target before the runs.
    pub warmup: usize,
    /// Runs of the connection-rate part per target (floor, agent, floor, ...).
    pub rate_runs: usize,
    /// Seconds per connection-rate run.
    pub rate_seconds: f64,
    /// Concurrent loops in each of the `nproc` rate client processes.
    pub rate_loops: usize,
    /// Seconds of `FetchJWTSVID`, then of SDS, first responses in each run, after its
    /// X.509 settings (so the three kinds are sampled under the same load).
    pub call_seconds: f64,
    /// Seconds the agent idles before its idle RSS, and settles before other readings.
    pub settle: f64,
    /// Cached X509-SVID counts of the memory part, growing.
    pub bulk: Vec<usize>,
    /// Concurrent open streams of the burst.
    pub burst: usize,
    /// Seconds after the burst's streams closed at which the RSS is read.
    pub burst_after: Vec<f64>,
}

impl B15Plan {
    /// The full run, or the reduced `--quick` one.
    pub fn new(quick: bool) -> B15Plan {
        if quick {
            B15Plan {
                runs: 1,
                seconds: 0.5,
                warmup: 20,
                rate_runs: 1,
                rate_seconds: 1.0,
                rate_loops: 4,
                call_seconds: 0.5,
                settle: 0.5,
                bulk: vec![100, 300],
                burst: 200,
                burst_after: vec![0.5, 1.0],
            }
        } else {
            B15Plan {
                runs: 3,
                seconds: 2.0,
                warmup: 200,
                rate_runs: 1,
                rate_seconds: 3.0,
                rate_loops: 4,
                call_seconds: 1.0,
                settle: 2.0,
                bulk: vec![1_000, 10_000],
                burst: 2_000,
                burst_after: vec![2.0, 10.0],
            }
        }
    }
}

/// The agent's `[workload_api]` limits for a burst of `burst` connections under the
/// descriptor limit `nofile` (two descriptors per connection: socket and pidfd):
/// (`max_connections`, `max_connections_per_uid`).
pub fn connection_limits(nofile: Option<u64>, burst: usize) -> (usize, usize) {
    let per_uid = burst + 256;
    let mut total = per_uid + 1_024;
    if let Some(n) = nofile.and_then(|n| usize::try_from(n).ok()) {
        total = total.min(n.saturating_sub(256) / 2).max(2);
    }
    (total, per_uid.min(total - 1).max(1))
}

/// The agent's configuration: B6's measured attestors and `[workload_api]` limits.
pub fn agent_config(attestors: &str, limits: (usize, usize)) -> String {
    format!(
        "{attestors}[workload_api]\nmax_connections = {}\nmax_connections_per_uid = {}\n",
        limits.0, limits.1
    )
}

// ---------------------------------------------------------------------------------------
// The floor server.

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// What the floor answers to every RPC it does not serve.
const UNSERVED: &str = "the floor serves FetchX509SVID, FetchJWTSVID and StreamSecrets only";

/// The agent's own answers, as the floor serves them.
#[derive(Debug, Clone, Default)]
pub struct FloorMessages {
    /// The first `FetchX509SVID` message.
    pub x509: X509svidResponse,
    /// The first SDS `StreamSecrets` response.
    pub sds: DiscoveryResponse,
    /// The `FetchJWTSVID` answer (the token the agent cached).
    pub jwt: JwtsvidResponse,
}

/// `FetchX509SVID`, `FetchJWTSVID` and SDS `StreamSecrets` answered from pre-built
/// messages; nothing else.
#[derive(Debug, Clone)]
struct Floor(Arc<FloorMessages>);

#[tonic::async_trait]
impl SecretDiscoveryService for Floor {
    type DeltaSecretsStream = BoxStream<DeltaDiscoveryResponse>;
    type StreamSecretsStream = BoxStream<DiscoveryResponse>;

    async fn stream_secrets(
        &self,
        request: Request<tonic::Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        // Answers the first request with the agent's own first response, ignores later
        // ones and ends when the client closes its side (as the agent's stream does).
        let first = Some(self.0.sds.clone());
        let stream = futures::stream::unfold(
            (request.into_inner(), first),
            |(mut requests, mut first)| async move {
                loop {
                    match requests.next().await {
                        Some(Ok(_)) => {
                            if let Some(r) = first.take() {
                                return Some((Ok(r), (requests, first)));
                            }
                        }
                        Some(Err(_)) | None => return None,
                    }
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn delta_secrets(
        &self,
        _request: Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(Status::unimplemented(UNSERVED))
    }

    async fn fetch_secrets(
        &self,
        _request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        Err(Status::unimplemented(UNSERVED))
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for Floor {
    type FetchX509SVIDStream = BoxStream<X509svidResponse>;
    type FetchX509BundlesStream = BoxStream<X509BundlesResponse>;
    type FetchJWTBundlesStream = BoxStream<JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        _request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let first = self.0.x509.clone();
        // The first message, then open until the client goes (as the agent's stream).
        let stream =
            futures::stream::once(async move { Ok(first) }).chain(futures::stream::pending());
        Ok(Response::new(Box::pin(stream)))
    }

    async fn fetch_x509_bundles(
        &self,
        _request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        Err(Status::unimplemented(UNSERVED))
    }

    async fn fetch_jwtsvid(
        &self,
        _request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        Ok(Response::new(self.0.jwt.clone()))
    }

    async fn fetch_jwt_bundles(
        &self,
        _request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        Err(Status::unimplemented(UNSERVED))
    }

    async fn validate_jwtsvid(
        &self,
        _request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        Err(Status::unimplemented(UNSERVED))
    }
}

/// Serves the floor on `listener` until it fails, answering `messages`.
pub async fn serve_floor(
    listener: tokio::net::UnixListener,
    messages: FloorMessages,
) -> Result<()> {
    let floor = Floor(Arc::new(messages));
    let incoming = futures::stream::unfold(listener, |l| async move {
        let conn = l.accept().await.map(|(s, _)| s);
        Some((conn, l))
    });
    tonic::transport::Server::builder()
        .add_service(SpiffeWorkloadApiServer::new(floor.clone()))
        .add_service(SecretDiscoveryServiceServer::new(floor))
        .serve_with_incoming(incoming)
        .await
        .context("serving the floor")
}

/// Reads and decodes the protobuf message in `path`.
fn read_message<M: prost::Message + Default>(path: &Path) -> Result<M> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    M::decode(bytes.as_slice()).with_context(|| format!("decoding {}", path.display()))
}

/// The floor server process: reads the encoded `X509SVIDResponse`, SDS
/// `DiscoveryResponse` and `JWTSVIDResponse` from `files` (in that order), binds `socket`
/// and serves on a default multi-thread runtime until it is stopped.
pub fn floor_server(socket: &Path, files: [&Path; 3]) -> Result<()> {
    let messages = FloorMessages {
        x509: read_message(files[0])?,
        sds: read_message(files[1])?,
        jwt: read_message(files[2])?,
    };
    let x509_bytes = messages.x509.encoded_len();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let _ = std::fs::remove_file(socket);
        let listener = tokio::net::UnixListener::bind(socket)
            .with_context(|| format!("binding {}", socket.display()))?;
        eprintln!(
            "floor serving on {} ({} workers, a {}-byte response)",
            socket.display(),
            tokio::runtime::Handle::current().metrics().num_workers(),
            x509_bytes
        );
        serve_floor(listener, messages).await
    })
}

// ---------------------------------------------------------------------------------------
// The client child.

/// What a client child does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Task {
    /// Waits until the agent answers, writes its `FetchX509SVID` message (encoded) to
    /// `response`, its first SDS `StreamSecrets` response for `spiffe_id` and `ROOTCA` to
    /// `sds_response`, and its `FetchJWTSVID` answer for `audience` to `jwt_response`
    /// (fetching it once makes the agent cache the token).
    Prime {
        /// The agent's socket.
        socket: PathBuf,
        /// Where the message goes.
        response: PathBuf,
        /// Where the SDS response goes.
        sds_response: PathBuf,
        /// Where the `FetchJWTSVID` answer goes.
        jwt_response: PathBuf,
        /// The SVID the SDS request names.
        spiffe_id: String,
        /// The JWT-SVID audience.
        audience: String,
    },
    /// The first-response runs, then JWT and SDS.
    Latency(LatencyArgs),
    /// One process of the connection-rate part.
    Rate {
        /// Whom to connect to.
        target: Target,
        /// Its index, for the output.
        index: usize,
        /// Concurrent loops.
        loops: usize,
        /// Seconds.
        seconds: f64,
        /// When to start (ms since the Unix epoch), the same for every process.
        start_at_ms: u64,
    },
    /// The memory burst.
    Burst {
        /// The agent's socket.
        socket: PathBuf,
        /// Its pid, for its VmRSS.
        agent_pid: u32,
        /// Streams held open at once.
        count: usize,
        /// Seconds after closing at which its VmRSS is read.
        after: Vec<f64>,
    },
}

/// What the latency child measures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatencyArgs {
    /// Floor (0) and agent (1).
    pub targets: Vec<Target>,
    /// (target, loops) settings; each run measures all of them.
    pub settings: Vec<(usize, usize)>,
    /// Runs.
    pub runs: usize,
    /// Seconds per run.
    pub seconds: f64,
    /// Untimed connections per target first.
    pub warmup: usize,
    /// Seconds of JWT, then of SDS, calls (on target 1) in each run.
    pub call_seconds: f64,
    /// The workload's SPIFFE ID (the SDS resource).
    pub spiffe_id: String,
    /// The JWT-SVID audience.
    pub audience: String,
}

/// The child's command line argument (after [`CHILD_FLAG`]), as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChildArgs {
    /// The cgroup to join first (`cgroup.procs`), if any.
    pub procs: Option<PathBuf>,
    /// What to do.
    pub task: Task,
}

/// Timed calls of one kind.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Calls {
    /// Connect start → first response, each successful call.
    pub samples: Vec<Duration>,
    /// Calls that failed.
    pub errors: usize,
    /// The first failure.
    pub first_error: Option<String>,
}

impl Calls {
    /// Adds `more`'s samples and errors to these (the first error stays first).
    fn append(&mut self, more: Calls) {
        self.samples.extend(more.samples);
        self.errors += more.errors;
        if self.first_error.is_none() {
            self.first_error = more.first_error;
        }
    }
}

/// What the priming child saw.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Primed {
    /// Size of the encoded `X509SVIDResponse`.
    pub response_bytes: usize,
    /// SVIDs in it.
    pub svids: usize,
    /// Why the first `FetchJWTSVID` failed, if it did.
    pub jwt_error: Option<String>,
}

/// What the latency child measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatencyOut {
    /// The child's cgroup v2 path while it ran.
    pub cgroup: String,
    /// Its tokio worker threads.
    pub workers: usize,
    /// Every run, in the order measured (`target` 0 floor, 1 agent).
    pub runs: Vec<ConnRun>,
    /// `FetchJWTSVID`, cached token, new connection each.
    pub jwt: Calls,
    /// The same against the floor, which answers the agent's own token.
    pub jwt_floor: Calls,
    /// SDS `StreamSecrets`, new connection each.
    pub sds: Calls,
    /// The same against the floor, which answers the agent's own first response.
    pub sds_floor: Calls,
}

/// What the burst measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Burst {
    /// Streams asked for.
    pub count: usize,
    /// Streams that got their first message and were held.
    pub opened: usize,
    /// Attempts that failed and were retried (e.g. the listen backlog full).
    pub retries: usize,
    /// Why the first retried attempt failed.
    pub retry_reason: Option<String>,
    /// Streams that never opened.
    pub errors: usize,
    /// The first failure.
    pub first_error: Option<String>,
    /// From the first attempt until every stream was open.
    pub open_wall: Duration,
    /// Agent VmRSS before.
    pub baseline: u64,
    /// Agent VmRSS with every stream open.
    pub open_rss: u64,
    /// Agent VmHWM then (since it started).
    pub hwm: u64,
    /// (seconds after closing, agent VmRSS).
    pub after: Vec<(f64, u64)>,
    /// The agent's open descriptors: before, with every stream open, then at each of
    /// `after` (whether it closed the connections).
    pub fds: Vec<usize>,
    /// The agent's private memory (`RssAnon`) at the same points: what of its VmRSS is
    /// heap and stacks rather than pages of its executable and libraries.
    pub anon: Vec<u64>,
}

/// How many descriptors process `pid` has open.
fn open_fds(pid: u32) -> Result<usize> {
    let dir = format!("/proc/{pid}/fd");
    Ok(std::fs::read_dir(&dir)
        .with_context(|| format!("reading {dir}"))?
        .count())
}

/// A child's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ChildOutput {
    /// See [`Task::Prime`].
    Primed(Primed),
    /// See [`Task::Latency`].
    Latency(LatencyOut),
    /// See [`Task::Rate`].
    Rate(ConnRun),
    /// See [`Task::Burst`].
    Burst(Burst),
}

/// Calls `f` one after the other for `seconds`; `f` returns the time it measured.
async fn calls_for<F, Fut>(seconds: f64, mut f: F) -> Calls
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Duration>>,
{
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut out = Calls::default();
    while Instant::now() < deadline {
        match tokio::time::timeout(CALL_TIMEOUT, f()).await {
            Ok(Ok(d)) => out.samples.push(d),
            Ok(Err(e)) => {
                out.errors += 1;
                out.first_error.get_or_insert_with(|| format!("{e:#}"));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(_) => {
                out.errors += 1;
                out.first_error
                    .get_or_insert_with(|| format!("no answer within {CALL_TIMEOUT:?}"));
            }
        }
    }
    out
}

/// One `FetchJWTSVID` on a new connection: connect start → answer.
async fn jwt_call(socket: &Path, audience: &str) -> Result<Duration> {
    let t = Instant::now();
    jwt_mint::fetch_jwt(socket, audience)
        .await
        .map_err(|s| anyhow!("FetchJWTSVID: {:?}: {}", s.code(), s.message()))?;
    Ok(t.elapsed())
}

/// One SDS `StreamSecrets` on a new connection: connect start → first response (which
/// must hold `spiffe_id` and `ROOTCA`).
async fn sds_call(socket: &Path, spiffe_id: &str) -> Result<Duration> {
    sds_first(socket, spiffe_id).await.map(|(_, took)| took)
}

/// [`sds_call`]'s response and its time.
async fn sds_first(socket: &Path, spiffe_id: &str) -> Result<(DiscoveryResponse, Duration)> {
    let t = Instant::now();
    let channel = carapace_common::uds_channel(socket, None)
        .await
        .context("connecting to the Workload API")?;
    let mut client = SecretDiscoveryServiceClient::new(channel);
    let (resp, took) =
        sds::first_response(&mut client, sds::request(&[spiffe_id, "ROOTCA"]), t).await?;
    sds::check_response(&resp, spiffe_id)?;
    Ok((resp, took))
}

/// Connects until `socket` answers `FetchX509SVID` (for at most `timeout`); the first
/// message.
async fn first_answer(socket: &Path, timeout: Duration) -> Result<X509svidResponse> {
    let deadline = Instant::now() + timeout;
    loop {
        let attempt = async {
            let (_client, mut stream) = harness::x509_stream(socket).await?;
            stream
                .message()
                .await
                .map_err(|s| anyhow!("FetchX509SVID stream: {:?}: {}", s.code(), s.message()))?
                .ok_or_else(|| anyhow!("FetchX509SVID: stream closed without a message"))
        };
        match attempt.await {
            Ok(m) if !m.svids.is_empty() => return Ok(m),
            Ok(_) if Instant::now() > deadline => bail!("FetchX509SVID: no SVID"),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("{} never answered", socket.display())));
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn prime(
    socket: &Path,
    [response, sds_response, jwt_response]: [&PathBuf; 3],
    spiffe_id: &str,
    audience: &str,
) -> Result<Primed> {
    let write = |path: &Path, bytes: Vec<u8>| {
        std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
    };
    let msg = first_answer(socket, SYNC_TIMEOUT).await?;
    let bytes = msg.encode_to_vec();
    write(response, bytes.clone())?;
    let (sds, _) = sds_first(socket, spiffe_id).await?;
    write(sds_response, sds.encode_to_vec())?;
    // A failed fetch leaves the floor an empty answer, which B15's JWT calls count as
    // errors; the report names the failure.
    let (jwt, jwt_error) = match jwt_mint::fetch_jwt_response(socket, audience).await {
        Ok(r) => (r, None),
        Err(s) => (
            JwtsvidResponse::default(),
            Some(format!("{:?}: {}", s.code(), s.message())),
        ),
    };
    write(jwt_response, jwt.encode_to_vec())?;
    Ok(Primed {
        response_bytes: bytes.len(),
        svids: msg.svids.len(),
        jwt_error,
    })
}

async fn latency(a: &LatencyArgs) -> Result<(Vec<ConnRun>, [Calls; 4])> {
    let (targets, settings, runs, seconds) = (&a.targets, &a.settings, a.runs, a.seconds);
    for (i, t) in targets.iter().enumerate() {
        first_answer(&t.socket, SYNC_TIMEOUT).await?;
        for _ in 0..a.warmup {
            workload_attest::timed_connection(&t.socket)
                .await
                .with_context(|| format!("warm-up connection to target {i}"))?;
        }
    }
    let agent = targets.get(1).ok_or_else(|| anyhow!("no agent target"))?;
    let floor = targets.first().ok_or_else(|| anyhow!("no floor target"))?;
    let [mut jwt, mut jwt_floor, mut sds, mut sds_floor] =
        std::array::from_fn(|_| Calls::default());
    let mut out = Vec::new();
    let n = settings.len().max(1);
    for r in 0..runs.max(1) {
        for k in 0..settings.len() {
            let (t, loops) = settings[(k + r) % n];
            let target = targets.get(t).ok_or_else(|| anyhow!("no target {t}"))?;
            eprintln!(
                "==> B15: run {}/{}: {}, {loops} client loop(s), {seconds} s",
                r + 1,
                runs.max(1),
                if t == 0 { "floor" } else { "agent" }
            );
            out.push(workload_attest::conn_run(target, t, loops, seconds).await?);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        eprintln!(
            "==> B15: run {}/{}: FetchJWTSVID (cached) and SDS first responses, {} s each",
            r + 1,
            runs.max(1),
            a.call_seconds
        );
        let socket = agent.socket.as_path();
        jwt.append(calls_for(a.call_seconds, || jwt_call(socket, &a.audience)).await);
        sds.append(calls_for(a.call_seconds, || sds_call(socket, &a.spiffe_id)).await);
        let floor_socket = floor.socket.as_path();
        jwt_floor.append(calls_for(a.call_seconds, || jwt_call(floor_socket, &a.audience)).await);
        sds_floor.append(calls_for(a.call_seconds, || sds_call(floor_socket, &a.spiffe_id)).await);
    }
    Ok((out, [jwt, jwt_floor, sds, sds_floor]))
}

/// Opens `FetchX509SVID` on a new connection and waits for its first message.
async fn held_stream(socket: &Path) -> Result<harness::X509Stream> {
    let (client, mut stream) = harness::x509_stream(socket).await?;
    let msg = stream
        .message()
        .await
        .map_err(|s| anyhow!("FetchX509SVID stream: {:?}: {}", s.code(), s.message()))?
        .ok_or_else(|| anyhow!("FetchX509SVID: stream closed without a message"))?;
    if msg.svids.is_empty() {
        bail!("FetchX509SVID: a message without SVIDs");
    }
    Ok((client, stream))
}

async fn burst(socket: &Path, agent_pid: u32, count: usize, after: &[f64]) -> Result<Burst> {
    process::raise_nofile_limit()?;
    let baseline = process::rss_bytes(agent_pid)?;
    let fds = vec![open_fds(agent_pid)?];
    let anon = vec![process::status_bytes(agent_pid, "RssAnon")?];
    let t0 = Instant::now();
    let deadline = t0 + BURST_TIMEOUT;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..count {
        let socket = socket.to_path_buf();
        set.spawn(async move {
            let mut retries = (0usize, None);
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, held_stream(&socket)).await {
                    Ok(Ok(open)) => return (Ok(open), retries),
                    Ok(Err(e)) if Instant::now() < deadline => {
                        retries.0 += 1;
                        retries.1.get_or_insert_with(|| format!("{e:#}"));
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Ok(Err(e)) => return (Err(e), retries),
                    Err(_) => {
                        return (Err(anyhow!("not open within {BURST_TIMEOUT:?}")), retries);
                    }
                }
            }
        });
    }
    let mut open = Vec::with_capacity(count);
    let mut out = Burst {
        count,
        opened: 0,
        retries: 0,
        retry_reason: None,
        errors: 0,
        first_error: None,
        open_wall: Duration::ZERO,
        baseline,
        open_rss: 0,
        hwm: 0,
        after: Vec::new(),
        fds,
        anon,
    };
    while let Some(r) = set.join_next().await {
        let (r, (retries, why)) = r?;
        out.retries += retries;
        if out.retry_reason.is_none() {
            out.retry_reason = why;
        }
        match r {
            Ok(o) => open.push(o),
            Err(e) => {
                out.errors += 1;
                out.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    out.open_wall = t0.elapsed();
    out.opened = open.len();
    out.open_rss = process::rss_bytes(agent_pid)?;
    out.hwm = process::status_bytes(agent_pid, "VmHWM")?;
    out.fds.push(open_fds(agent_pid)?);
    out.anon.push(process::status_bytes(agent_pid, "RssAnon")?);
    drop(open);
    let closed = Instant::now();
    for &s in after {
        let at = closed + Duration::from_secs_f64(s);
        tokio::time::sleep_until(at.into()).await;
        out.after.push((s, process::rss_bytes(agent_pid)?));
        out.fds.push(open_fds(agent_pid)?);
        out.anon.push(process::status_bytes(agent_pid, "RssAnon")?);
    }
    Ok(out)
}

/// B15's client child: joins the unit cgroup, then does its task.
pub fn child(args: &ChildArgs) -> Result<ChildOutput> {
    if let Some(p) = &args.procs {
        join_cgroup(p, std::process::id())?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let workers = rt.metrics().num_workers();
    rt.block_on(async {
        Ok(match &args.task {
            Task::Prime {
                socket,
                response,
                sds_response,
                jwt_response,
                spiffe_id,
                audience,
            } => ChildOutput::Primed(
                prime(
                    socket,
                    [response, sds_response, jwt_response],
                    spiffe_id,
                    audience,
                )
                .await?,
            ),
            Task::Latency(a) => {
                let (runs, [jwt, jwt_floor, sds, sds_floor]) = latency(a).await?;
                ChildOutput::Latency(LatencyOut {
                    cgroup: std::fs::read_to_string("/proc/self/cgroup")
                        .ok()
                        .and_then(|t| workload_attest::parse_unified_path(&t))
                        .unwrap_or_else(|| "unknown".into()),
                    workers,
                    runs,
                    jwt,
                    jwt_floor,
                    sds,
                    sds_floor,
                })
            }
            Task::Rate {
                target,
                index,
                loops,
                seconds,
                start_at_ms,
            } => {
                let start = SystemTime::UNIX_EPOCH + Duration::from_millis(*start_at_ms);
                if let Ok(wait) = start.duration_since(SystemTime::now()) {
                    tokio::time::sleep(wait).await;
                }
                ChildOutput::Rate(
                    workload_attest::conn_run(target, *index, *loops, *seconds).await?,
                )
            }
            Task::Burst {
                socket,
                agent_pid,
                count,
                after,
            } => ChildOutput::Burst(burst(socket, *agent_pid, *count, after).await?),
        })
    })
}

// ---------------------------------------------------------------------------------------
// The parent.

/// One run of the connection-rate part: `nproc` processes together.
#[derive(Debug, Clone, PartialEq)]
pub struct RateRun {
    /// 0 floor, 1 agent.
    pub target: usize,
    /// Each process's run.
    pub processes: Vec<ConnRun>,
    /// The target's CPU time from spawning the processes until they all exited.
    pub target_cpu: Duration,
}

impl RateRun {
    /// Successful connections.
    pub fn connections(&self) -> usize {
        self.processes.iter().map(|p| p.samples.len()).sum()
    }

    /// Successful connections per second: all of them over the longest process's run.
    pub fn rate(&self) -> f64 {
        let wall = self
            .processes
            .iter()
            .map(|p| p.wall)
            .max()
            .unwrap_or_default();
        self.connections() as f64 / wall.as_secs_f64().max(f64::EPSILON)
    }

    /// Failed connections.
    pub fn errors(&self) -> usize {
        self.processes.iter().map(|p| p.errors).sum()
    }

    /// The first failure.
    pub fn first_error(&self) -> Option<&str> {
        self.processes.iter().find_map(|p| p.first_error.as_deref())
    }

    /// Target (floor or agent) CPU-µs per connection.
    pub fn target_us(&self) -> f64 {
        self.target_cpu.as_secs_f64() * 1e6 / self.connections().max(1) as f64
    }

    /// Client CPU-µs per connection (all processes, over their runs).
    pub fn client_us(&self) -> f64 {
        let cpu: Duration = self.processes.iter().map(|p| p.client_cpu).sum();
        cpu.as_secs_f64() * 1e6 / self.connections().max(1) as f64
    }

    /// Loops per process.
    pub fn loops(&self) -> usize {
        self.processes.first().map_or(0, |p| p.loops)
    }
}

/// The floor and what it answers.
#[derive(Debug, Clone, PartialEq)]
pub struct FloorInfo {
    /// What the priming child saw.
    pub primed: Primed,
    /// The floor process's pid.
    pub pid: u32,
}

/// The first-response part.
#[derive(Debug, Clone, PartialEq)]
pub struct Latency {
    /// The child's measurements.
    pub out: LatencyOut,
}

/// The RSS-per-SVID part, on a second agent.
#[derive(Debug, Clone, PartialEq)]
pub struct Bulk {
    /// Its VmRSS before any bulk entry (attested, no SVID).
    pub base: u64,
    /// (SVIDs held, VmRSS, first create → the agent holds them).
    pub levels: Vec<(usize, u64, Duration)>,
}

/// Machine facts at B15's start and end.
#[derive(Debug, Clone, PartialEq)]
pub struct Facts {
    /// `lscpu` model name.
    pub cpu_model: String,
    /// Cores this process may use.
    pub nproc: usize,
    /// `uname -r`.
    pub kernel: String,
    /// Load average at the start and at the end.
    pub loadavg: (String, String),
    /// RLIMIT_NOFILE (soft).
    pub nofile: Option<u64>,
    /// The agent's `[workload_api]` limits (total, per uid).
    pub limits: (usize, usize),
}

/// Everything B15 measured; each part may have failed on its own.
#[derive(Debug)]
pub struct B15Result {
    /// The machine.
    pub facts: Facts,
    /// The unit cgroup, or why there is none.
    pub unit: std::result::Result<UnitInfo, String>,
    /// The agent's entry selectors.
    pub selectors: Vec<String>,
    /// The floor.
    pub floor: Result<FloorInfo>,
    /// The agent's VmRSS idle with its SVID, before any connection.
    pub idle_rss: u64,
    /// Of which private (`RssAnon`).
    pub idle_anon: u64,
    /// First responses (floor and agent), JWT, SDS.
    pub latency: Result<Latency>,
    /// Connections per second.
    pub rate: Result<Vec<RateRun>>,
    /// The burst.
    pub burst: Result<Burst>,
    /// RSS per cached SVID.
    pub bulk: Result<Bulk>,
    /// Wall time of the whole of B15.
    pub wall: Duration,
}

impl B15Result {
    /// The failures, for the exit status.
    pub fn into_errors(self) -> Vec<anyhow::Error> {
        let floor = self.floor.err();
        // Without a floor, the latency and rate parts say so: count it once.
        let (latency, rate) = if floor.is_some() {
            (None, None)
        } else {
            (self.latency.err(), self.rate.err())
        };
        [floor, latency, rate, self.burst.err(), self.bulk.err()]
            .into_iter()
            .flatten()
            .collect()
    }
}

/// Prime (the child writes the agent's message), start the floor, wait until it answers.
async fn start_floor(
    dir: &Path,
    agent: &Agent,
    procs: Option<PathBuf>,
) -> Result<(Proc, FloorInfo)> {
    let response = dir.join("x509-response.pb");
    let sds_response = dir.join("sds-response.pb");
    let jwt_response = dir.join("jwt-response.pb");
    let args = ChildArgs {
        procs,
        task: Task::Prime {
            socket: agent.socket.clone(),
            response: response.clone(),
            sds_response: sds_response.clone(),
            jwt_response: jwt_response.clone(),
            spiffe_id: WORKLOAD_ID.to_owned(),
            audience: AUDIENCE.to_owned(),
        },
    };
    let primed = match process::run_json_child(CHILD_FLAG, &args, &[]).await? {
        ChildOutput::Primed(p) => p,
        other => bail!("the priming child answered {other:?}"),
    };
    let socket = dir.join("floor.sock");
    let exe = std::env::current_exe().context("locating this executable")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg(FLOOR_FLAG)
        .arg(&socket)
        .arg(&response)
        .arg(&sds_response)
        .arg(&jwt_response);
    let mut proc = Proc::spawn("floor server", cmd, &dir.join("floor.log"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        proc.check_alive()?;
        if socket.exists() && first_answer(&socket, Duration::ZERO).await.is_ok() {
            break;
        }
        if Instant::now() > deadline {
            bail!("the floor server never answered:\n{}", proc.log_tail(20));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid = proc.pid();
    Ok((proc, FloorInfo { primed, pid }))
}

/// The connection-rate part: `rate_runs` × (floor, agent), `nproc` processes each.
async fn rates(
    targets: &[Target],
    procs: Option<PathBuf>,
    plan: &B15Plan,
    nproc: usize,
) -> Result<Vec<RateRun>> {
    let mut out = Vec::new();
    for r in 0..plan.rate_runs.max(1) {
        for (index, target) in targets.iter().enumerate() {
            eprintln!(
                "==> B15: connections/s run {}/{}: {}, {nproc} processes × {} loops, {} s",
                r + 1,
                plan.rate_runs.max(1),
                if index == 0 { "floor" } else { "agent" },
                plan.rate_loops,
                plan.rate_seconds
            );
            let cpu0 = process::cpu_time(target.agent_pid)?;
            let start = SystemTime::now() + RATE_START_DELAY;
            let start_at_ms = u64::try_from(
                start
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_millis(),
            )?;
            let args = ChildArgs {
                procs: procs.clone(),
                task: Task::Rate {
                    target: target.clone(),
                    index,
                    loops: plan.rate_loops,
                    seconds: plan.rate_seconds,
                    start_at_ms,
                },
            };
            let children = (0..nproc.max(1))
                .map(|_| process::run_json_child::<_, ChildOutput>(CHILD_FLAG, &args, &[]));
            let mut processes = Vec::new();
            for o in futures::future::try_join_all(children).await? {
                match o {
                    ChildOutput::Rate(run) => processes.push(run),
                    other => bail!("a rate child answered {other:?}"),
                }
            }
            let target_cpu = process::cpu_time(target.agent_pid)?.saturating_sub(cpu0);
            out.push(RateRun {
                target: index,
                processes,
                target_cpu,
            });
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    Ok(out)
}

/// Writes SPIRE's `-data` format: entries `from..to`, parented to `parent`, each with
/// `unix:uid:<uid>`.
fn bulk_data(parent: &str, uid: u32, from: usize, to: usize) -> String {
    let entries: Vec<serde_json::Value> = (from..to)
        .map(|i| {
            serde_json::json!({
                "spiffe_id": format!("spiffe://{}/bench/b15-bulk-{i}", harness::TRUST_DOMAIN),
                "parent_id": parent,
                "selectors": [{"type": "unix", "value": format!("uid:{uid}")}],
            })
        })
        .collect();
    serde_json::json!({ "entries": entries }).to_string()
}

/// RSS per cached SVID on a second agent of the same configuration.
async fn bulk(
    bin_dir: &Path,
    dir: &Path,
    server: &Server,
    config: &str,
    plan: &B15Plan,
) -> Result<Bulk> {
    eprintln!(
        "==> B15: memory per cached SVID on a second agent ({:?})",
        plan.bulk
    );
    let mut agent =
        Agent::start_with_config(bin_dir, &dir.join("agent-bulk"), server, Some(config)).await?;
    let mut follower = LogFollower::from_start(agent.proc.log());
    let settle = Duration::from_secs_f64(plan.settle);
    tokio::time::sleep(settle).await;
    let base = process::rss_bytes(agent.proc.pid())?;
    let mut levels = Vec::new();
    let mut have = 0;
    for &n in &plan.bulk {
        if n <= have {
            continue;
        }
        let data = dir.join(format!("bulk-{n}.json"));
        std::fs::write(&data, bulk_data(&agent.agent_id, BULK_UID, have, n))?;
        let t = Instant::now();
        let path = data.to_string_lossy().into_owned();
        server.cli(&["entry", "create", "--data", &path]).await?;
        let at = agent
            .wait_held(&mut follower, n as u64, SYNC_TIMEOUT)
            .await?;
        tokio::time::sleep(settle).await;
        levels.push((n, process::rss_bytes(agent.proc.pid())?, at - t));
        have = n;
    }
    agent.proc.check_alive()?;
    Ok(Bulk { base, levels })
}

/// B15 under `dir`.
pub async fn run(bin_dir: &Path, dir: &Path, plan: &B15Plan) -> Result<B15Result> {
    let t0 = Instant::now();
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let machine = Machine::detect();
    let nproc = machine.nproc;
    let nofile = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
    let limits = connection_limits(nofile, plan.burst);
    let unit = UnitCgroup::create();
    let unit_info = unit.as_ref().ok().map(|u| u.info.clone());
    let unit_shown = match &unit {
        Ok(u) => Ok(u.info.clone()),
        Err(e) => Err(format!("{e:#}")),
    };
    let procs = unit_info.as_ref().map(|u| u.procs.clone());
    let uid = rustix::process::geteuid().as_raw();
    let setup = workload_attest::agent_setups(
        &AttestPlan::new(true),
        uid,
        unit_info.as_ref().map(|u| u.unit.as_str()),
    )
    .into_iter()
    .next()
    .ok_or_else(|| anyhow!("no agent setup"))?;
    let config = agent_config(&setup.config, limits);

    eprintln!("==> B15: starting a server and the agent");
    let server = Server::start(bin_dir, &dir.join("server"), &ServerOptions::default()).await?;
    let admin = server.admin().await?;
    let mut agent =
        Agent::start_with_config(bin_dir, &dir.join("agent"), &server, Some(&config)).await?;
    let mut follower = LogFollower::from_start(agent.proc.log());
    let e = workload_attest::entry_with(WORKLOAD_ID, &agent.agent_id, &setup.entry_selectors)?;
    harness::create_entries(&admin, vec![e], 1).await?;
    agent.wait_held(&mut follower, 1, SYNC_TIMEOUT).await?;
    tokio::time::sleep(Duration::from_secs_f64(plan.settle)).await;
    let idle_rss = process::rss_bytes(agent.proc.pid())?;
    let idle_anon = process::status_bytes(agent.proc.pid(), "RssAnon")?;

    let floor = start_floor(dir, &agent, procs.clone()).await;
    let (latency, rate) = match &floor {
        Ok((_, f)) => {
            let targets = vec![
                Target {
                    socket: dir.join("floor.sock"),
                    agent_pid: f.pid,
                },
                Target {
                    socket: agent.socket.clone(),
                    agent_pid: agent.proc.pid(),
                },
            ];
            let mut loops = vec![1, nproc];
            loops.dedup();
            let settings: Vec<(usize, usize)> =
                loops.into_iter().flat_map(|l| [(0, l), (1, l)]).collect();
            let args = ChildArgs {
                procs: procs.clone(),
                task: Task::Latency(LatencyArgs {
                    targets: targets.clone(),
                    settings,
                    runs: plan.runs,
                    seconds: plan.seconds,
                    warmup: plan.warmup,
                    call_seconds: plan.call_seconds,
                    spiffe_id: WORKLOAD_ID.to_owned(),
                    audience: AUDIENCE.to_owned(),
                }),
            };
            let latency = match process::run_json_child(CHILD_FLAG, &args, &[]).await {
                Ok(ChildOutput::Latency(out)) => Ok(Latency { out }),
                Ok(other) => Err(anyhow!("the latency child answered {other:?}")),
                Err(e) => Err(e),
            };
            let rate = rates(&targets, procs.clone(), plan, nproc).await;
            (latency, rate)
        }
        Err(e) => (
            Err(anyhow!("no floor server: {e:#}")),
            Err(anyhow!("no floor server: {e:#}")),
        ),
    };
    let floor = floor.map(|(proc, f)| {
        drop(proc);
        f
    });
    agent.proc.check_alive()?;

    eprintln!("==> B15: burst of {} open streams", plan.burst);
    let burst = async {
        if limits.1 < plan.burst + 8 {
            bail!(
                "the agent may hold only {} connections per uid (RLIMIT_NOFILE {nofile:?}): too few for a burst of {}",
                limits.1,
                plan.burst
            );
        }
        tokio::time::sleep(Duration::from_secs_f64(plan.settle)).await;
        let args = ChildArgs {
            procs: procs.clone(),
            task: Task::Burst {
                socket: agent.socket.clone(),
                agent_pid: agent.proc.pid(),
                count: plan.burst,
                after: plan.burst_after.clone(),
            },
        };
        match process::run_json_child(CHILD_FLAG, &args, &[]).await? {
            ChildOutput::Burst(b) => Ok(b),
            other => bail!("the burst child answered {other:?}"),
        }
    }
    .await;
    agent.proc.check_alive()?;
    drop(agent);
    let bulk = bulk(bin_dir, dir, &server, &config, plan).await;
    drop(unit);
    Ok(B15Result {
        facts: Facts {
            cpu_model: machine.cpu_model,
            nproc,
            kernel: machine.kernel,
            loadavg: (machine.loadavg, process::loadavg_now()),
            nofile,
            limits,
        },
        unit: unit_shown,
        selectors: setup.entry_selectors,
        floor,
        idle_rss,
        idle_anon,
        latency,
        rate,
        burst,
        bulk,
        wall: t0.elapsed(),
    })
}

// ---------------------------------------------------------------------------------------
// The report.

/// First-response figures of one setting over all its runs.
#[derive(Debug, Clone, Copy)]
struct Setting {
    first: Summary,
    rate: Option<Repeated>,
    target_us: f64,
    client_us: f64,
    errors: usize,
}

impl Setting {
    fn of(runs: &[ConnRun], target: usize, loops: usize) -> Option<Setting> {
        let runs: Vec<&ConnRun> = runs
            .iter()
            .filter(|r| r.target == target && r.loops == loops)
            .collect();
        let samples: Vec<Duration> = runs
            .iter()
            .flat_map(|r| r.samples.iter().copied())
            .collect();
        let med = |v: Vec<f64>| Repeated::of(&v).map_or(f64::NAN, |r| r.median);
        Some(Setting {
            first: Summary::of_durations_us(&samples)?,
            rate: Repeated::of(&runs.iter().map(|r| r.rate()).collect::<Vec<_>>()),
            target_us: med(runs.iter().map(|r| r.agent_us()).collect()),
            client_us: med(runs.iter().map(|r| r.client_us()).collect()),
            errors: runs.iter().map(|r| r.errors).sum(),
        })
    }
}

/// `met`, `**not met**`, or `n/a` when there is no figure.
fn verdict(v: Option<bool>) -> &'static str {
    match v {
        Some(true) => "met",
        Some(false) => "**not met**",
        None => "n/a",
    }
}

/// `1.85×`, or `—`.
fn ratio(agent: f64, floor: f64) -> String {
    let r = agent / floor;
    if r.is_finite() {
        format!("{r:.2}×")
    } else {
        "—".into()
    }
}

/// One row of the summary: figure, floor, agent, agent / floor, goal, verdict.
fn summary_row(
    t: &mut Table,
    figure: &str,
    floor: Option<f64>,
    agent: Option<f64>,
    fmt: impl Fn(f64) -> String,
    goal: &str,
    met: impl Fn(f64) -> bool,
) {
    t.row([
        figure.to_owned(),
        floor.map_or("—".into(), &fmt),
        agent.map_or("—".into(), &fmt),
        match (agent, floor) {
            (Some(a), Some(f)) => ratio(a, f),
            _ => "—".into(),
        },
        goal.to_owned(),
        if goal == "—" {
            "—"
        } else {
            verdict(agent.map(&met))
        }
        .to_owned(),
    ]);
}

fn summary(r: &mut Report, res: &B15Result, plan: &B15Plan) {
    let nproc = res.facts.nproc;
    let runs = res.latency.as_ref().ok().map(|l| l.out.runs.as_slice());
    let set = |target: usize, loops: usize| runs.and_then(|v| Setting::of(v, target, loops));
    let (f1, a1) = (set(0, 1), set(1, 1));
    let (fn_, an) = (set(0, nproc), set(1, nproc));
    let mut t = Table::new([
        "figure",
        "floor",
        "agent",
        "agent / floor",
        "goal (issue 22)",
        "verdict",
    ]);
    summary_row(
        &mut t,
        "First response, 1 client: p50",
        f1.map(|s| s.first.p50),
        a1.map(|s| s.first.p50),
        fmt_us,
        "≤ 0.35 ms",
        |v| v <= goal::P50_US,
    );
    summary_row(
        &mut t,
        "First response, 1 client: p99",
        f1.map(|s| s.first.p99),
        a1.map(|s| s.first.p99),
        fmt_us,
        "< 0.6 ms",
        |v| v < goal::P99_US,
    );
    summary_row(
        &mut t,
        "First response, 1 client: max",
        f1.map(|s| s.first.max),
        a1.map(|s| s.first.max),
        fmt_us,
        "—",
        |_| true,
    );
    summary_row(
        &mut t,
        &format!("First response, {nproc} concurrent clients: p50"),
        fn_.map(|s| s.first.p50),
        an.map(|s| s.first.p50),
        fmt_us,
        "—",
        |_| true,
    );
    summary_row(
        &mut t,
        &format!("First response, {nproc} concurrent clients: p99"),
        fn_.map(|s| s.first.p99),
        an.map(|s| s.first.p99),
        fmt_us,
        "< 1.5 ms",
        |v| v < goal::NPROC_P99_US,
    );
    let rates = res.rate.as_ref().ok();
    let rate_of = |target: usize, f: fn(&RateRun) -> f64| {
        rates.and_then(|v| {
            let x: Vec<f64> = v.iter().filter(|r| r.target == target).map(f).collect();
            Repeated::of(&x).map(|r| r.median)
        })
    };
    let loops = rates
        .and_then(|v| v.first())
        .map_or(plan.rate_loops, RateRun::loops);
    summary_row(
        &mut t,
        &format!("New connections/s ({nproc} client processes × {loops} loops)"),
        rate_of(0, RateRun::rate),
        rate_of(1, RateRun::rate),
        fmt_count,
        &format!(
            "≥ 8,000/s on 2 cores{}",
            if nproc == 2 {
                String::new()
            } else {
                format!(" (here {nproc})")
            }
        ),
        |v| v >= goal::RATE,
    );
    summary_row(
        &mut t,
        "… server CPU-µs per connection (floor process / agent)",
        rate_of(0, RateRun::target_us),
        rate_of(1, RateRun::target_us),
        fmt_count,
        "—",
        |_| true,
    );
    summary_row(
        &mut t,
        "… client CPU-µs per connection",
        rate_of(0, RateRun::client_us),
        rate_of(1, RateRun::client_us),
        fmt_count,
        "—",
        |_| true,
    );
    summary_row(
        &mut t,
        "… failed connections",
        rate_of(0, |r| r.errors() as f64),
        rate_of(1, |r| r.errors() as f64),
        fmt_count,
        "—",
        |_| true,
    );
    let l = res.latency.as_ref().ok();
    for (name, floor, calls) in [
        (
            "FetchJWTSVID (cached), 1 client",
            l.map(|l| &l.out.jwt_floor),
            l.map(|l| &l.out.jwt),
        ),
        (
            "SDS StreamSecrets, 1 client",
            l.map(|l| &l.out.sds_floor),
            l.map(|l| &l.out.sds),
        ),
    ] {
        let s = calls.and_then(|c| Summary::of_durations_us(&c.samples));
        let f = floor.and_then(|c| Summary::of_durations_us(&c.samples));
        summary_row(
            &mut t,
            &format!("{name}: p50"),
            f.map(|s| s.p50),
            s.map(|s| s.p50),
            fmt_us,
            "≤ 0.35 ms",
            |v| v <= goal::P50_US,
        );
        summary_row(
            &mut t,
            &format!("{name}: p99"),
            f.map(|s| s.p99),
            s.map(|s| s.p99),
            fmt_us,
            "< 0.6 ms",
            |v| v < goal::P99_US,
        );
    }
    let bytes = |v: f64| format!("{} ({} B)", fmt_bytes(v), fmt_count(v));
    summary_row(
        &mut t,
        "Idle VmRSS (1 SVID, no connection)",
        None,
        Some(res.idle_rss as f64),
        bytes,
        "≤ 10 MiB",
        |v| v <= goal::IDLE_BYTES,
    );
    if let Ok(b) = &res.bulk {
        for &(n, rss, _) in &b.levels {
            summary_row(
                &mut t,
                &format!("VmRSS per cached X509-SVID at {}", fmt_count(n as f64)),
                None,
                Some((rss as f64 - b.base as f64) / n.max(1) as f64),
                bytes,
                "≤ 3 KB",
                |v| v <= goal::PER_SVID_BYTES,
            );
        }
    } else {
        summary_row(
            &mut t,
            "VmRSS per cached X509-SVID",
            None,
            None,
            bytes,
            "≤ 3 KB",
            |_| true,
        );
    }
    match &res.burst {
        Ok(b) => {
            let rel = |v: u64| v as f64 / b.baseline.max(1) as f64;
            t.row([
                format!(
                    "VmRSS with {} streams open / baseline",
                    fmt_count(b.opened as f64)
                ),
                "—".into(),
                format!(
                    "{} / {}",
                    fmt_bytes(b.open_rss as f64),
                    fmt_bytes(b.baseline as f64)
                ),
                format!("{:.2}× baseline", rel(b.open_rss)),
                "—".into(),
                "—".into(),
            ]);
            for &(s, rss) in &b.after {
                t.row([
                    format!("VmRSS {s} s after the burst closed"),
                    "—".into(),
                    fmt_bytes(rss as f64),
                    format!("{:.2}× baseline", rel(rss)),
                    "within 10 % of baseline".into(),
                    verdict(Some(rel(rss) <= goal::BURST_RATIO && b.opened == b.count)).into(),
                ]);
            }
        }
        Err(_) => {
            t.row([
                "VmRSS after a burst",
                "—",
                "—",
                "—",
                "within 10 % of baseline",
                "n/a",
            ]);
        }
    }
    r.table(&t);
}

fn latency_details(r: &mut Report, l: &Latency, nproc: usize) {
    let mut t = Table::new([
        "target",
        "client loops",
        "run",
        "connections",
        "p50",
        "p99",
        "max",
        "connections/s",
        "server CPU-µs per connection",
        "client CPU-µs per connection",
        "errors",
    ]);
    let mut seen = std::collections::HashMap::new();
    for run in &l.out.runs {
        let k = seen.entry((run.target, run.loops)).or_insert(0usize);
        *k += 1;
        let s = Summary::of_durations_us(&run.samples);
        t.row([
            if run.target == 0 { "floor" } else { "agent" }.to_owned(),
            run.loops.to_string(),
            k.to_string(),
            fmt_count(run.samples.len() as f64),
            s.map(|s| fmt_us(s.p50)).unwrap_or_default(),
            s.map(|s| fmt_us(s.p99)).unwrap_or_default(),
            s.map(|s| fmt_us(s.max)).unwrap_or_default(),
            fmt_count(run.rate()),
            fmt_count(run.agent_us()),
            fmt_count(run.client_us()),
            match &run.first_error {
                Some(e) if run.errors > 0 => format!("{} (first: {e})", run.errors),
                _ => "0".into(),
            },
        ]);
    }
    r.table(&t);
    for loops in [1, nproc] {
        if let (Some(f), Some(a)) = (
            Setting::of(&l.out.runs, 0, loops),
            Setting::of(&l.out.runs, 1, loops),
        ) {
            r.bullet(&format!(
                "{loops} loop{}, all runs: floor p50 {} / p99 {} / max {} ({} connections, {} errors, {} server and {} client CPU-µs per connection); agent p50 {} / p99 {} / max {} ({} connections, {} errors, {} agent and {} client CPU-µs); the agent adds {} at p50 and {} CPU-µs per connection; connections/s {} → {}.",
                if loops == 1 { "" } else { "s" },
                fmt_us(f.first.p50),
                fmt_us(f.first.p99),
                fmt_us(f.first.max),
                fmt_count(f.first.n as f64),
                f.errors,
                fmt_count(f.target_us),
                fmt_count(f.client_us),
                fmt_us(a.first.p50),
                fmt_us(a.first.p99),
                fmt_us(a.first.max),
                fmt_count(a.first.n as f64),
                a.errors,
                fmt_count(a.target_us),
                fmt_count(a.client_us),
                fmt_us(a.first.p50 - f.first.p50),
                fmt_count(a.target_us - f.target_us),
                f.rate.map(|x| x.fmt_count()).unwrap_or_default(),
                a.rate.map(|x| x.fmt_count()).unwrap_or_default(),
            ));
            if loops == nproc {
                break;
            }
        }
    }
    let mut c = Table::new([
        "call (new connection each)",
        "calls",
        "p50",
        "p99",
        "max",
        "errors",
    ]);
    for (name, calls) in [
        ("agent: FetchJWTSVID, token cached", &l.out.jwt),
        ("floor: FetchJWTSVID (the agent's token)", &l.out.jwt_floor),
        ("agent: SDS StreamSecrets (SVID + ROOTCA)", &l.out.sds),
        (
            "floor: SDS StreamSecrets (the agent's first response)",
            &l.out.sds_floor,
        ),
    ] {
        let s = Summary::of_durations_us(&calls.samples);
        c.row([
            name.to_owned(),
            fmt_count(calls.samples.len() as f64),
            s.map(|s| fmt_us(s.p50)).unwrap_or_default(),
            s.map(|s| fmt_us(s.p99)).unwrap_or_default(),
            s.map(|s| fmt_us(s.max)).unwrap_or_default(),
            match &calls.first_error {
                Some(e) if calls.errors > 0 => format!("{} (first: {e})", calls.errors),
                _ => "0".into(),
            },
        ]);
    }
    r.table(&c);
}

fn rate_details(r: &mut Report, rates: &[RateRun], nproc: usize) {
    let mut t = Table::new([
        "target",
        "processes × loops",
        "connections/s",
        "connections",
        "errors",
        "server CPU-µs per connection",
        "client CPU-µs per connection",
        "server cores",
    ]);
    for run in rates {
        let wall = run
            .processes
            .iter()
            .map(|p| p.wall)
            .max()
            .unwrap_or_default()
            .as_secs_f64()
            .max(f64::EPSILON);
        t.row([
            if run.target == 0 { "floor" } else { "agent" }.to_owned(),
            format!("{} × {}", run.processes.len(), run.loops()),
            fmt_count(run.rate()),
            fmt_count(run.connections() as f64),
            match run.first_error() {
                Some(e) if run.errors() > 0 => format!("{} (first: {e})", run.errors()),
                _ => "0".into(),
            },
            fmt_count(run.target_us()),
            fmt_count(run.client_us()),
            format!("{:.2} of {nproc}", run.target_cpu.as_secs_f64() / wall),
        ]);
    }
    r.table(&t);
}

fn memory_details(r: &mut Report, res: &B15Result, plan: &B15Plan) {
    r.bullet(&format!(
        "Idle: VmRSS of the measured agent {} s after it logged `held=1`, before any Workload API connection: {}, of which private (`RssAnon`: heap, stacks) {}, the rest pages of the executable and its libraries.",
        plan.settle,
        fmt_bytes(res.idle_rss as f64),
        fmt_bytes(res.idle_anon as f64)
    ));
    match &res.bulk {
        Ok(b) => {
            let mut t = Table::new([
                "second agent",
                "VmRSS",
                "growth",
                "per cached X509-SVID",
                "per SVID added since the previous row",
                "entries created → held",
            ]);
            t.row([
                "attested, no SVID".to_owned(),
                fmt_bytes(b.base as f64),
                "—".into(),
                "—".into(),
                "—".into(),
                "—".into(),
            ]);
            let per = |d: f64, n: usize| {
                let v = d / n.max(1) as f64;
                format!("{} ({} B)", fmt_bytes(v), fmt_count(v))
            };
            let mut prev = (0usize, b.base);
            for &(n, rss, took) in &b.levels {
                let d = rss as f64 - b.base as f64;
                t.row([
                    format!("{} SVIDs held", fmt_count(n as f64)),
                    fmt_bytes(rss as f64),
                    fmt_bytes(d),
                    per(d, n),
                    per(rss as f64 - prev.1 as f64, n - prev.0),
                    fmt_secs(took),
                ]);
                prev = (n, rss);
            }
            r.table(&t);
        }
        Err(e) => failed(r, "B15 RSS per cached SVID", e),
    }
    match &res.burst {
        Ok(b) => {
            let growth = (b.open_rss as f64 / b.baseline.max(1) as f64 - 1.0) * 100.0;
            // The points at which the burst reads the agent: `fds` and `anon` follow them.
            let when: Vec<String> = ["before".to_owned(), "with the streams open".to_owned()]
                .into_iter()
                .chain(b.after.iter().map(|(s, _)| format!("{s} s after closing")))
                .collect();
            r.bullet(&format!(
                "Burst: {} of {} `FetchX509SVID` streams opened at once on new connections and held (first message received) in {} ({} attempts retried{}, {} failed{}); agent VmRSS {} before, {} with them open ({growth:+.1} %; VmHWM since start {}), then {} after they closed. The agent's open descriptors: {}.",
                fmt_count(b.opened as f64),
                fmt_count(b.count as f64),
                fmt_secs(b.open_wall),
                fmt_count(b.retries as f64),
                b.retry_reason
                    .as_ref()
                    .map(|e| format!(", first because: {e}"))
                    .unwrap_or_default(),
                b.errors,
                b.first_error
                    .as_ref()
                    .map(|e| format!(", first: {e}"))
                    .unwrap_or_default(),
                fmt_bytes(b.baseline as f64),
                fmt_bytes(b.open_rss as f64),
                fmt_bytes(b.hwm as f64),
                b.after
                    .iter()
                    .map(|(s, v)| format!(
                        "{} at {s} s ({:.2}× baseline)",
                        fmt_bytes(*v as f64),
                        *v as f64 / b.baseline.max(1) as f64
                    ))
                    .collect::<Vec<_>>()
                    .join(", "),
                at_each(&when, &b.fds, |n| fmt_count(*n as f64)),
            ));
            r.bullet(&format!(
                "Of that VmRSS, the agent's private memory (`RssAnon`: heap and stacks; the rest is pages of the executable and its libraries): {}.",
                at_each(&when, &b.anon, |n| fmt_bytes(*n as f64)),
            ));
        }
        Err(e) => failed(r, "B15 burst", e),
    }
}

/// "`when` value, …" for each reading in `values`, labelled by the point it was taken at.
fn at_each<T>(when: &[String], values: &[T], fmt: impl Fn(&T) -> String) -> String {
    when.iter()
        .zip(values)
        .map(|(w, v)| format!("{w} {}", fmt(v)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// B15's report section.
pub fn section(r: &mut Report, res: &B15Result, plan: &B15Plan) {
    let f = &res.facts;
    let nproc = f.nproc;
    r.para(&format!(
        "One release `carapace-server` and one release `carapace-agent` (join token) with B6's measured workload attestors (`unix` + `cgroups` + `systemd`), `[workload_api] max_connections = {}`, `max_connections_per_uid = {}`, an entry `{WORKLOAD_ID}` with selectors {}, its SVID cached. **The floor**: this executable in a hidden mode (`carapace-bench {FLOOR_FLAG} <socket> <x509> <sds> <jwt>`), a bare tonic server on its own Unix socket on a default multi-thread tokio runtime (as the agent's) that answers `FetchX509SVID` with one pre-built `X509SVIDResponse` — the bytes the agent answered once{} — on a stream left open until the client goes, `FetchJWTSVID` with the agent's own answer (its cached token), and SDS `StreamSecrets`' first request with the agent's own first SDS response: no attestation, no peer credentials, every other RPC `Unimplemented`. The clients are child processes (`carapace-bench {CHILD_FLAG}`) in the unit cgroup{}, with the same client code for floor and agent: a new Unix-socket connection (a new tonic channel), HTTP/2, `FetchX509SVID` with `workload.spiffe.io: true`, timed from connect start to the first message, then close. First responses: {} interleaved run(s) of {} s per setting (floor and agent, 1 and {nproc} loops; the order rotates from run to run) after {} untimed connections per target; figures over all connections of all runs. Connections/s: {nproc} client processes (one per core) × {} loops each, started together, {} s per run, floor then agent ({} run(s) each); server CPU from `/proc/<pid>/stat` from spawning the processes until they all exited, client CPU: the processes' `CLOCK_PROCESS_CPUTIME_ID` over their runs. JWT and SDS: {} s each of one client in every run, right after that run's X.509 settings (so all three are sampled under the same load), a new connection per call, on the same agent and on the floor (FetchJWTSVID with audience `{AUDIENCE}`, the token cached by one fetch before; `StreamSecrets` naming the SVID and `ROOTCA` as B12 does). Memory: VmRSS from `/proc/<pid>/status`; RSS per cached SVID on a second agent of the same configuration given bulk entries of uid {BULK_UID} (`entry create --data`), growing {}, read {} s after its log says `held=N`, (VmRSS − VmRSS before any) / N; the bulk entries stay (that agent is stopped at the end). B15 took {:.0} s.",
        f.limits.0,
        f.limits.1,
        res.selectors
            .iter()
            .map(|s| format!("`{s}`"))
            .collect::<Vec<_>>()
            .join(" + "),
        match &res.floor {
            Ok(fl) => format!(
                " ({} bytes, {} SVID{})",
                fmt_count(fl.primed.response_bytes as f64),
                fl.primed.svids,
                if fl.primed.svids == 1 { "" } else { "s" }
            ),
            Err(_) => String::new(),
        },
        match &res.unit {
            Ok(u) => format!(" `{}` (`trusted.invocation_id` set, as B6 makes it)", u.path),
            Err(e) => format!(" — none could be made ({e}), so the entry requires `unix:uid` only"),
        },
        plan.runs,
        plan.seconds,
        plan.warmup,
        plan.rate_loops,
        plan.rate_seconds,
        plan.rate_runs,
        plan.call_seconds,
        plan.bulk
            .iter()
            .map(|n| fmt_count(*n as f64))
            .collect::<Vec<_>>()
            .join(" → "),
        plan.settle,
        res.wall.as_secs_f64(),
    ));
    r.bullet(&format!(
        "Machine: {} — nproc {nproc} — kernel {} — load average {} at B15's start, {} at its end — RLIMIT_NOFILE {}. Nothing is pinned: floor or agent and the clients share every core.",
        f.cpu_model,
        f.kernel,
        f.loadavg.0,
        f.loadavg.1,
        f.nofile.map_or("unlimited".into(), |n| n.to_string()),
    ));
    if let Ok(l) = &res.latency {
        r.bullet(&format!(
            "Clients: cgroup `{}`, {} tokio workers in the latency child.",
            l.out.cgroup, l.out.workers
        ));
    }
    if let Ok(fl) = &res.floor
        && let Some(e) = &fl.primed.jwt_error
    {
        r.bullet(&format!(
            "The first FetchJWTSVID (priming the cache) failed: {e}."
        ));
    }
    r.heading(3, "Summary against issue 22's goals");
    summary(r, res, plan);
    r.heading(3, "First responses, run by run");
    match (&res.floor, &res.latency) {
        (Err(e), _) => failed(r, "B15 floor server", e),
        (_, Err(e)) => failed(r, "B15 first responses", e),
        (_, Ok(l)) => latency_details(r, l, nproc),
    }
    r.heading(3, "New connections per second");
    match &res.rate {
        Ok(v) => rate_details(r, v, nproc),
        Err(e) => failed(r, "B15 connections per second", e),
    }
    r.heading(3, "Memory");
    memory_details(r, res, plan);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(target: usize, loops: usize, us: u64, n: usize) -> ConnRun {
        ConnRun {
            target,
            loops,
            samples: vec![Duration::from_micros(us); n],
            connect: vec![Duration::from_micros(40); n],
            errors: 0,
            first_error: None,
            wall: Duration::from_secs(1),
            agent_cpu: Duration::from_micros(us / 2) * u32::try_from(n).unwrap(),
            client_cpu: Duration::from_micros(100) * u32::try_from(n).unwrap(),
            idle: Duration::ZERO,
        }
    }

    #[test]
    fn limits_leave_room_for_the_burst_and_fit_the_descriptors() {
        let (total, per_uid) = connection_limits(Some(20_000), 2_000);
        assert!(per_uid >= 2_000 && per_uid < total && total * 2 < 20_000);
        let (total, per_uid) = connection_limits(Some(1_024), 2_000);
        assert!(total * 2 < 1_024 && per_uid < total);
        let c = agent_config("[workload_attestor.unix]\n", (3_000, 2_256));
        let t: toml::Table = c.parse().unwrap();
        assert_eq!(
            t["workload_api"]["max_connections_per_uid"].as_integer(),
            Some(2_256)
        );
        let data: serde_json::Value =
            serde_json::from_str(&bulk_data("spiffe://example.org/a", 4242, 10, 13)).unwrap();
        let e = data["entries"].as_array().unwrap();
        assert_eq!(e.len(), 3);
        assert_eq!(e[0]["spiffe_id"], "spiffe://example.org/bench/b15-bulk-10");
        assert_eq!(e[2]["selectors"][0]["value"], "uid:4242");
        let quick = B15Plan::new(true);
        let full = B15Plan::new(false);
        assert!(quick.seconds < full.seconds && quick.burst < full.burst);
        assert_eq!(full.bulk, vec![1_000, 10_000]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_floor_answers_its_message_to_the_shared_client() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("floor.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let msg = X509svidResponse {
            svids: vec![carapace_proto::workload::X509svid {
                spiffe_id: WORKLOAD_ID.into(),
                x509_svid: vec![1; 600],
                x509_svid_key: vec![2; 138],
                bundle: vec![3; 500],
                hint: String::new(),
            }],
            ..Default::default()
        };
        let sds_msg = DiscoveryResponse {
            version_info: "1".into(),
            nonce: "n".into(),
            type_url: "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret".into(),
            ..Default::default()
        };
        let jwt_msg = JwtsvidResponse {
            svids: vec![carapace_proto::workload::Jwtsvid {
                spiffe_id: WORKLOAD_ID.into(),
                svid: "a.b.c".into(),
                hint: String::new(),
            }],
        };
        let server = tokio::spawn(serve_floor(
            listener,
            FloorMessages {
                x509: msg.clone(),
                sds: sds_msg.clone(),
                jwt: jwt_msg,
            },
        ));
        let got = first_answer(&socket, Duration::from_secs(5)).await.unwrap();
        assert_eq!(got, msg);
        // SDS: the first request gets the agent's first response, byte for byte.
        let channel = carapace_common::uds_channel(&socket, None).await.unwrap();
        let mut client = SecretDiscoveryServiceClient::new(channel);
        let (got, _) = sds::first_response(
            &mut client,
            sds::request(&[WORKLOAD_ID, "ROOTCA"]),
            Instant::now(),
        )
        .await
        .unwrap();
        assert_eq!(got, sds_msg);
        let (first, connect) = workload_attest::one_connection(&socket).await.unwrap();
        assert!(first >= connect);
        let token = jwt_mint::fetch_jwt(&socket, AUDIENCE).await.unwrap();
        assert_eq!(token, "a.b.c");
        let bundles = harness::workload_client(&socket)
            .await
            .unwrap()
            .fetch_x509_bundles(X509BundlesRequest {})
            .await
            .unwrap_err();
        assert_eq!(bundles.code(), tonic::Code::Unimplemented);
        server.abort();
    }

    fn result(latency: Result<Latency>) -> B15Result {
        B15Result {
            facts: Facts {
                cpu_model: "AMD EPYC".into(),
                nproc: 2,
                kernel: "6.1".into(),
                loadavg: ("0.50 0.40 0.30".into(), "1.50 0.60 0.40".into()),
                nofile: Some(20_000),
                limits: (3_280, 2_256),
            },
            unit: Ok(UnitInfo {
                path: "/x.slice/b6-x.service".into(),
                unit: "b6-x.service".into(),
                slice: "x.slice".into(),
                invocation_id: "00".repeat(16),
                procs: "/sys/fs/cgroup/x.slice/b6-x.service/cgroup.procs".into(),
            }),
            selectors: vec!["unix:uid:0".into(), "systemd:unit:b6-x.service".into()],
            floor: Ok(FloorInfo {
                primed: Primed {
                    response_bytes: 1_300,
                    svids: 1,
                    jwt_error: None,
                },
                pid: 42,
            }),
            idle_rss: 9 << 20,
            idle_anon: 2 << 20,
            latency,
            rate: Ok(vec![
                RateRun {
                    target: 0,
                    processes: vec![conn(0, 4, 400, 10_000), conn(0, 4, 400, 10_000)],
                    target_cpu: Duration::from_secs(1),
                },
                RateRun {
                    target: 1,
                    processes: vec![conn(1, 4, 900, 3_000), conn(1, 4, 900, 3_000)],
                    target_cpu: Duration::from_millis(1_200),
                },
            ]),
            burst: Ok(Burst {
                count: 2_000,
                opened: 2_000,
                retries: 3,
                retry_reason: Some("EAGAIN".into()),
                errors: 0,
                first_error: None,
                open_wall: Duration::from_millis(900),
                baseline: 10 << 20,
                open_rss: 30 << 20,
                hwm: 31 << 20,
                after: vec![(2.0, 12 << 20), (10.0, 10_800_000)],
                fds: vec![20, 4_020, 20, 20],
                anon: vec![2 << 20, 60 << 20, 4 << 20, 3 << 20],
            }),
            bulk: Ok(Bulk {
                base: 8 << 20,
                levels: vec![
                    (1_000, (8 << 20) + 2_500_000, Duration::from_secs(1)),
                    (10_000, (8 << 20) + 35_000_000, Duration::from_secs(4)),
                ],
            }),
            wall: Duration::from_secs(95),
        }
    }

    #[test]
    fn the_section_compares_floor_and_agent_against_the_goals() {
        let runs = vec![
            conn(0, 1, 150, 1_000),
            conn(1, 1, 300, 1_000),
            conn(0, 2, 250, 1_000),
            conn(1, 2, 2_000, 1_000),
        ];
        let out = LatencyOut {
            cgroup: "/x.slice/b6-x.service".into(),
            workers: 2,
            runs,
            jwt: Calls {
                samples: vec![Duration::from_micros(280); 100],
                errors: 0,
                first_error: None,
            },
            sds: Calls {
                samples: vec![Duration::from_micros(700); 100],
                errors: 1,
                first_error: Some("boom".into()),
            },
            jwt_floor: Calls {
                samples: vec![Duration::from_micros(200); 100],
                errors: 0,
                first_error: None,
            },
            sds_floor: Calls {
                samples: vec![Duration::from_micros(400); 100],
                errors: 0,
                first_error: None,
            },
        };
        let res = result(Ok(Latency { out }));
        let plan = B15Plan::new(false);
        let mut r = Report::new();
        section(&mut r, &res, &plan);
        let text = r.finish();
        assert!(
            text.contains(
                "| First response, 1 client: p50 | 150 µs | 300 µs | 2.00× | ≤ 0.35 ms | met |"
            ),
            "{text}"
        );
        assert!(
            text.contains("| First response, 2 concurrent clients: p99 | 250 µs | 2.00 ms | 8.00× | < 1.5 ms | **not met** |"),
            "{text}"
        );
        // 20,000 connections over 1 s against 6,000.
        assert!(
            text.contains("| New connections/s (2 client processes × 4 loops) | 20,000 | 6,000 | 0.30× | ≥ 8,000/s on 2 cores | **not met** |"),
            "{text}"
        );
        assert!(
            text.contains(
                "| FetchJWTSVID (cached), 1 client: p50 | 200 µs | 280 µs | 1.40× | ≤ 0.35 ms | met |"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "| SDS StreamSecrets, 1 client: p99 | 400 µs | 700 µs | 1.75× | < 0.6 ms | **not met** |"
            ),
            "{text}"
        );
        // 2,500,000 B / 1,000 = 2,500 B; 35,000,000 / 10,000 = 3,500 B.
        assert!(
            text.contains(
                "| VmRSS per cached X509-SVID at 1,000 | — | 2.4 KiB (2,500 B) | — | ≤ 3 KB | met |"
            ),
            "{text}"
        );
        assert!(text.contains("| VmRSS per cached X509-SVID at 10,000 | — | 3.4 KiB (3,500 B) | — | ≤ 3 KB | **not met** |"), "{text}");
        assert!(text.contains("| VmRSS 2 s after the burst closed | — | 12.0 MiB | 1.20× baseline | within 10 % of baseline | **not met** |"), "{text}");
        assert!(text.contains("| VmRSS 10 s after the burst closed | — | 10.3 MiB | 1.03× baseline | within 10 % of baseline | met |"), "{text}");
        assert!(text.contains("| Idle VmRSS (1 SVID, no connection) | — | 9.0 MiB (9,437,184 B) | — | ≤ 10 MiB | met |"), "{text}");
        assert!(text.contains("nproc 2"), "{text}");
        assert!(
            text.contains("before 20, with the streams open 4,020, 2 s after closing 20, 10 s after closing 20"),
            "{text}"
        );
        assert!(
            text.contains("private memory (`RssAnon`: heap and stacks; the rest is pages of the executable and its libraries): before 2.0 MiB, with the streams open 60.0 MiB, 2 s after closing 4.0 MiB, 10 s after closing 3.0 MiB."),
            "{text}"
        );
        assert!(
            text.contains("of which private (`RssAnon`: heap, stacks) 2.0 MiB"),
            "{text}"
        );
        // (35,000,000 − 2,500,000) / 9,000 ≈ 3,611 B per SVID added.
        assert!(text.contains("| 3.5 KiB (3,611 B) |"), "{text}");
        assert!(!text.contains("FAILED"), "{text}");
        assert!(res.into_errors().is_empty());

        let mut broken = result(Err(anyhow!("child died")));
        broken.burst = Err(anyhow!("too few descriptors"));
        let mut r = Report::new();
        section(&mut r, &broken, &plan);
        let text = r.finish();
        assert!(text.contains("**B15 first responses FAILED:**"), "{text}");
        assert!(text.contains("**B15 burst FAILED:**"), "{text}");
        assert!(
            text.contains("| First response, 1 client: p50 | — | — | — | ≤ 0.35 ms | n/a |"),
            "{text}"
        );
        assert_eq!(broken.into_errors().len(), 2);
    }
}
