//! B8 (S7): JWT-SVID mint, from the signing ceiling to the workload.
//!
//! - The ceiling ([`measure_ceiling`]): JWT-SVIDs signed per second in this process with
//!   the server's own function, [`carapace_server::jwt_keys::sign`] on the active JWT
//!   slot of a [`CaManager`](carapace_server::ca::CaManager) over the in-memory key
//!   manager ([`inproc::bench_ca`]), on 1 thread and on every core, for ES256 (the
//!   default `jwt_key_type`) and RS256 (for reference).
//! - The node API ([`node_api`]): `NewJWTSVID` (one token per call) through the real
//!   `carapace-server`, over 1 and 2 mTLS connections with several calls in flight on
//!   each ([`NodeBench`]), at a few entry counts of the calling agent, with the software key
//!   (the default disk key manager) and with the JWT key in SoftHSM2
//!   (`[key_manager.pkcs11]`, `sessions` = every core) beside SoftHSM2's raw P-256 rate
//!   measured in the same run ([`pkcs11::raw_rates`]).
//! - The agent ([`agent_fetch`]): `FetchJWTSVID` on the real `carapace-agent`'s Workload
//!   API, each call on a new connection: cached (the same audience every time) and
//!   uncached (a new audience every time: one `NewJWTSVID` round trip to the server). An
//!   agent that answers `Unimplemented` (its JWT Workload API not built yet) leaves the
//!   part "not measured", which is no failure.
//!
//! Every token counted is checked for shape, and one per server (and the ceiling's) is
//! verified with `core::jose::verify` against the JWT keys of the bundle in the SPIFFE
//! format (`carapace-server bundle show --format spiffe` for the real server), with its
//! audience and `sub`.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use carapace_core::KeyType;
use carapace_core::jose::{self, Algorithm, KeySet, Policy};
use carapace_proto::node::NewJwtsvidRequest;
use carapace_proto::node::node_client::NodeClient;
use carapace_proto::workload::{JwtsvidRequest, JwtsvidResponse};
use carapace_server::jwt_keys::{self, JwtRequest, JwtSlot};
use hsm_sim::softhsm::SoftHsm;

use crate::harness::{self, Agent, LogFollower, Server, ServerOptions, workload_id};
use crate::inproc;
use crate::node_load::{Calls, NodeBench, NodeResult, NodeRun, RunsSummary, best_connections};
use crate::pkcs11::{
    self, NEEDS_SOFTHSM, RawRate, server_options, session_counts, softhsm_description,
};
use crate::process;
use crate::report::{Report, Table, failed};
use crate::stats::{Repeated, Summary, fmt_cores, fmt_count, fmt_pct, fmt_us};

/// The audience of every token but the agent's uncached ones.
pub const AUDIENCE: &str = "spiffe://example.org/bench/service";

/// The tokens' lifetime (the server's `default_jwt_svid_ttl`).
pub const TOKEN_TTL: Duration = Duration::from_secs(300);

/// The goal on the node API with a software ES256 key (issue 16): tokens per second per
/// core.
pub const GOAL_PER_CORE: f64 = 20_000.0;

/// The goal with the key in SoftHSM2: this share of the token's raw signing rate.
pub const GOAL_HSM_SHARE: f64 = 0.7;

/// The goal for a cached `FetchJWTSVID` on a new connection: p99 below this, µs.
pub const GOAL_CACHED_P99_US: f64 = 1_000.0;

/// How long the agent may take to get its workload's identity.
const SYNC_TIMEOUT: Duration = Duration::from_secs(60);

/// B8's sizes.
#[derive(Debug, Clone)]
pub struct JwtPlan {
    /// Ceiling: ES256 tokens per run.
    pub ceiling_tokens: usize,
    /// Ceiling: RS256 tokens per run (RSA-2048 signs ~30× slower).
    pub ceiling_tokens_rsa: usize,
    /// Ceiling: runs per algorithm and thread count.
    pub ceiling_runs: usize,
    /// Node API: tokens per run.
    pub tokens_per_run: usize,
    /// Node API: runs per (entries, connections).
    pub runs: usize,
    /// Node API: mTLS connections.
    pub connections: Vec<usize>,
    /// Node API: calls in flight on each connection.
    pub in_flight: usize,
    /// Node API, software key: entries parented to the calling agent, one setting after
    /// the other on the same server (the server finds the entry among the agent's).
    pub entry_levels: Vec<usize>,
    /// Node API, SoftHSM2: entries parented to the agent (the smallest level).
    pub hsm_entries: usize,
    /// SoftHSM2's raw rate: runs per thread count.
    pub raw_runs: usize,
    /// SoftHSM2's raw rate: seconds per run.
    pub raw_seconds: f64,
    /// Agent: timed calls, cached and uncached each.
    pub agent_calls: usize,
}

impl JwtPlan {
    /// The full run, or the reduced `--quick` one.
    pub fn new(quick: bool) -> JwtPlan {
        if quick {
            JwtPlan {
                ceiling_tokens: 2_000,
                ceiling_tokens_rsa: 100,
                ceiling_runs: 1,
                tokens_per_run: 2_000,
                runs: 1,
                connections: vec![1, 2],
                in_flight: 8,
                entry_levels: vec![10, 200],
                hsm_entries: 10,
                raw_runs: 1,
                raw_seconds: 0.5,
                agent_calls: 100,
            }
        } else {
            JwtPlan {
                ceiling_tokens: 20_000,
                ceiling_tokens_rsa: 1_000,
                ceiling_runs: 3,
                tokens_per_run: 20_000,
                runs: 3,
                connections: vec![1, 2],
                in_flight: 16,
                entry_levels: vec![10, 1_000],
                hsm_entries: 10,
                raw_runs: 3,
                raw_seconds: 2.0,
                agent_calls: 1_000,
            }
        }
    }
}

/// The ceiling for one algorithm at one thread count.
#[derive(Debug, Clone)]
pub struct SignRate {
    /// `ES256`, `RS256`.
    pub alg: Algorithm,
    /// Threads signing.
    pub threads: usize,
    /// Tokens per run.
    pub tokens: usize,
    /// Tokens/s of each run.
    pub rates: Vec<f64>,
}

/// The requests the ceiling signs: one per benchmark workload of `entries`, each for
/// [`AUDIENCE`] with the default lifetime, as the node API makes them.
fn requests(entries: usize) -> Result<Vec<JwtRequest>> {
    (0..entries.max(1))
        .map(|i| {
            Ok(JwtRequest {
                spiffe_id: workload_id(i).parse().map_err(|e| anyhow!("{e}"))?,
                audiences: vec![AUDIENCE.to_owned()],
                ttl: TOKEN_TTL,
                issuer: None,
                include_jti: false,
            })
        })
        .collect()
}

/// Signs `total` tokens (requests cycling over `reqs`) with `slot` on `threads` threads;
/// returns the wall time.
pub fn sign_all(
    slot: &JwtSlot,
    reqs: &[JwtRequest],
    total: usize,
    threads: usize,
) -> Result<Duration> {
    if reqs.is_empty() {
        bail!("no requests");
    }
    let now = carapace_core::clock::unix_now();
    inproc::on_threads(total, threads, |share| {
        let mut signed = 0;
        for k in share {
            let t = jwt_keys::sign(slot, &reqs[k % reqs.len()], now)?;
            signed += usize::from(!t.token.is_empty());
        }
        Ok(signed)
    })
}

/// The JWT keys of a bundle in the SPIFFE format (JWKS with `use: jwt-svid`).
pub fn jwt_keys_of(spiffe_json: &str, alg: Algorithm) -> Result<KeySet> {
    let keys = KeySet::from_jwks_json(spiffe_json.as_bytes(), &[alg])
        .map_err(|e| anyhow!("the bundle's JWT keys: {e}"))?;
    if keys.is_empty() {
        bail!("the bundle has no {} JWT key", alg.name());
    }
    Ok(keys)
}

/// Verifies `token` with `keys` (`alg` only, audience `audience`) and checks its `sub`.
pub fn verify_token(
    token: &str,
    keys: &KeySet,
    alg: Algorithm,
    audience: &str,
    sub: &str,
) -> Result<()> {
    let policy = Policy {
        algorithms: &[alg],
        now: SystemTime::now(),
        leeway: Duration::from_secs(5),
        audience: Some(audience),
        issuer: None,
        max_token_bytes: jose::MAX_TOKEN_BYTES,
    };
    let claims = jose::verify(token, keys, &policy)
        .map_err(|e| anyhow!("the token does not verify: {e}"))?;
    let got = claims
        .required_string("sub")
        .map_err(|e| anyhow!("the token's sub: {e}"))?;
    if got != sub {
        bail!("the token's sub is {got:?}, expected {sub:?}");
    }
    Ok(())
}

/// The ceiling for ES256 and RS256, each on 1 thread and every core, `plan.ceiling_runs`
/// times (alternating thread counts); one token of each is verified first.
pub async fn measure_ceiling(plan: &JwtPlan, nproc: usize) -> Result<Vec<SignRate>> {
    let reqs = requests(100)?;
    let mut counts = vec![1];
    if nproc > 1 {
        counts.push(nproc);
    }
    let mut out = Vec::new();
    for (key_type, tokens) in [
        (KeyType::EcP256, plan.ceiling_tokens),
        (KeyType::Rsa2048, plan.ceiling_tokens_rsa),
    ] {
        let alg = Algorithm::for_key_type(key_type);
        let ca = inproc::bench_ca(key_type).await?;
        let slot = ca.jwt_active()?;
        let one = jwt_keys::sign(&slot, &reqs[0], carapace_core::clock::unix_now())?;
        let bundle = ca.bundle().borrow().clone();
        let keys = jwt_keys_of(&bundle.to_spiffe_json()?, alg)?;
        verify_token(&one.token, &keys, alg, AUDIENCE, reqs[0].spiffe_id.as_str())
            .with_context(|| format!("{} ceiling", alg.name()))?;
        let mut rates: Vec<SignRate> = counts
            .iter()
            .map(|&threads| SignRate {
                alg,
                threads,
                tokens,
                rates: Vec::new(),
            })
            .collect();
        // Warm-up: caches, allocator, CPU frequency.
        sign_all(&slot, &reqs, (tokens / 10).max(nproc), nproc)?;
        for _ in 0..plan.ceiling_runs.max(1) {
            for r in &mut rates {
                let wall = sign_all(&slot, &reqs, tokens, r.threads)?;
                r.rates.push(tokens as f64 / wall.as_secs_f64());
            }
        }
        out.extend(rates);
    }
    Ok(out)
}

/// One lane: `count` `NewJWTSVID` calls one after the other on `client`, for the entries
/// `entry_ids[(first + i) % len]`; each answer must carry a token of three parts for the
/// entry's SPIFFE ID (the `i`-th entry is [`workload_id`]`(i)`).
async fn jwt_lane(
    mut client: NodeClient<Channel>,
    entry_ids: Arc<Vec<String>>,
    first: usize,
    count: usize,
) -> Result<Calls> {
    let mut calls = Calls::default();
    let n = entry_ids.len().max(1);
    for i in 0..count {
        let k = (first + i) % n;
        let req = NewJwtsvidRequest {
            entry_id: entry_ids.get(k).cloned().unwrap_or_default(),
            audience: vec![AUDIENCE.to_owned()],
        };
        let t = Instant::now();
        match client.new_jwtsvid(req).await {
            Ok(resp) => {
                calls.latencies.push(t.elapsed());
                match resp.into_inner().svid {
                    Some(s) if s.token.split('.').count() == 3 && s.spiffe_id == workload_id(k) => {
                        calls.ok += 1;
                    }
                    Some(s) => calls.failed(|| {
                        format!(
                            "a token of {} parts for {:?}",
                            s.token.split('.').count(),
                            s.spiffe_id
                        )
                    }),
                    None => calls.failed(|| "an answer without a JWT-SVID".into()),
                }
            }
            Err(s) => calls.failed(|| format!("NewJWTSVID: {:?}: {}", s.code(), s.message())),
        }
    }
    Ok(calls)
}

/// The lanes of one run: `tokens` calls over the first `conns` clients, `in_flight` lanes
/// on each, entries taken round-robin.
fn jwt_lanes(
    bench: &NodeBench,
    conns: usize,
    in_flight: usize,
    tokens: usize,
) -> Vec<impl std::future::Future<Output = Result<Calls>> + Send + 'static + use<>> {
    let lanes = conns.max(1) * in_flight.max(1);
    let per = tokens.div_ceil(lanes);
    let ids = Arc::new(bench.entry_ids.clone());
    (0..lanes)
        .map(|l| {
            let client = bench.clients[l % conns.max(1)].clone();
            let first = l * per;
            let count = per.min(tokens.saturating_sub(first));
            jwt_lane(client, ids.clone(), first, count)
        })
        .collect()
}

/// The node API at each of `entry_levels` (entries grown on the same server).
#[derive(Debug)]
pub struct JwtNode {
    /// By entry count.
    pub by_entries: Vec<NodeResult>,
}

/// `NewJWTSVID` through a fresh server under `dir` started with `opts`: for each entry
/// count, a warm-up (and one token verified with `bundle show --format spiffe`), then
/// `plan.runs` runs per connection count.
pub async fn node_api(
    bin_dir: &Path,
    dir: &Path,
    opts: &ServerOptions,
    plan: &JwtPlan,
    entry_levels: &[usize],
) -> Result<JwtNode> {
    let max_conns = plan.connections.iter().copied().max().unwrap_or(1).max(1);
    let mut bench = NodeBench::start(bin_dir, dir, opts, max_conns).await?;
    let bundle = bench
        .server
        .cli(&["bundle", "show", "--format", "spiffe"])
        .await?;
    let keys = jwt_keys_of(&bundle, Algorithm::ES256)?;
    let mut by_entries = Vec::new();
    for &entries in entry_levels {
        bench.grow_entries(entries.max(1)).await?;
        // Warm-up, and one token verified as a relying party would.
        let mut c = bench.clients[0].clone();
        let resp = c
            .new_jwtsvid(NewJwtsvidRequest {
                entry_id: bench.entry_ids[0].clone(),
                audience: vec![AUDIENCE.to_owned()],
            })
            .await
            .map_err(|s| anyhow!("NewJWTSVID: {:?}: {}", s.code(), s.message()))?
            .into_inner();
        let token = resp.svid.map(|s| s.token).unwrap_or_default();
        verify_token(&token, &keys, Algorithm::ES256, AUDIENCE, &workload_id(0))
            .context("NewJWTSVID's token")?;
        let warm = bench
            .run(jwt_lanes(&bench, max_conns, plan.in_flight, 200))
            .await?;
        if warm.signed == 0 {
            bail!(
                "warm-up: no token signed ({} errors; first: {})",
                warm.errors,
                warm.first_error.unwrap_or_default()
            );
        }
        let rss_idle = bench.server_rss()?;
        let mut by_connections = Vec::new();
        for &conns in &plan.connections {
            let conns = conns.clamp(1, max_conns);
            let mut runs = Vec::new();
            for _ in 0..plan.runs.max(1) {
                let lanes = jwt_lanes(&bench, conns, plan.in_flight, plan.tokens_per_run);
                runs.push(bench.run(lanes).await?);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            by_connections.push((conns, runs));
        }
        by_entries.push(bench.result(by_connections, rss_idle)?);
    }
    bench.stop();
    Ok(JwtNode { by_entries })
}

/// The agent part: `FetchJWTSVID` latency on new connections.
#[derive(Debug)]
pub enum AgentFetch {
    /// Measured.
    Measured {
        /// The same audience every call, after one untimed call (served from the
        /// agent's cache).
        cached: FetchLevel,
        /// A new audience every call (one `NewJWTSVID` round trip to the server each).
        uncached: FetchLevel,
    },
    /// The agent does not serve JWT-SVIDs yet (why).
    NotAvailable(String),
}

/// Calls of one kind.
#[derive(Debug, Clone, Default)]
pub struct FetchLevel {
    /// From connecting to the answer, each call.
    pub latencies: Vec<Duration>,
    /// Failed calls.
    pub errors: usize,
    /// The first failure.
    pub first_error: Option<String>,
    /// Agent CPU over the calls.
    pub agent_cpu: Duration,
    /// Server CPU over the calls.
    pub server_cpu: Duration,
}

/// One `FetchJWTSVID` on a new connection to `socket`; the token of the answer's first
/// SVID.
pub async fn fetch_jwt(
    socket: &Path,
    audience: &str,
) -> std::result::Result<String, tonic::Status> {
    fetch_jwt_response(socket, audience)
        .await?
        .svids
        .into_iter()
        .next()
        .map(|s| s.svid)
        .filter(|t| t.split('.').count() == 3)
        .ok_or_else(|| tonic::Status::internal("an answer without a JWT-SVID of three parts"))
}

/// One `FetchJWTSVID` on a new connection to `socket`: the whole answer.
pub async fn fetch_jwt_response(
    socket: &Path,
    audience: &str,
) -> std::result::Result<JwtsvidResponse, tonic::Status> {
    let mut client = harness::workload_client(socket)
        .await
        .map_err(|e| tonic::Status::unavailable(format!("{e:#}")))?;
    let mut req = tonic::Request::new(JwtsvidRequest {
        audience: vec![audience.to_owned()],
        spiffe_id: String::new(),
    });
    req.metadata_mut()
        .insert("workload.spiffe.io", MetadataValue::from_static("true"));
    Ok(client.fetch_jwtsvid(req).await?.into_inner())
}

/// `calls` fetches, each on a new connection, with the audience `audience(i)`.
async fn fetch_level(
    agent: &Agent,
    server: &Server,
    calls: usize,
    audience: impl Fn(usize) -> String,
) -> Result<FetchLevel> {
    let (apid, spid) = (agent.proc.pid(), server.proc.pid());
    let (a0, s0) = (process::cpu_time(apid)?, process::cpu_time(spid)?);
    let mut out = FetchLevel::default();
    for i in 0..calls {
        let t = Instant::now();
        match fetch_jwt(&agent.socket, &audience(i)).await {
            Ok(_) => out.latencies.push(t.elapsed()),
            Err(s) => {
                out.errors += 1;
                out.first_error
                    .get_or_insert_with(|| format!("{:?}: {}", s.code(), s.message()));
            }
        }
    }
    out.agent_cpu = process::cpu_time(apid)?.saturating_sub(a0);
    out.server_cpu = process::cpu_time(spid)?.saturating_sub(s0);
    Ok(out)
}

/// FetchJWTSVID latency on the agent, cached and uncached.
///
/// AGENT-SIDE PART OF B8 (issue 16): written against the standard Workload API
/// (`FetchJWTSVID` with the security header and an audience). Until the agent's JWT
/// Workload API lands it answers `Unimplemented`, and this returns
/// [`AgentFetch::NotAvailable`]; afterwards it measures with no change here.
pub async fn agent_fetch(bin_dir: &Path, dir: &Path, calls: usize) -> Result<AgentFetch> {
    let server = Server::start(bin_dir, dir, &ServerOptions::default()).await?;
    let mut agent = Agent::start(bin_dir, dir, &server).await?;
    let admin = server.admin().await?;
    let uid = rustix::process::geteuid().as_raw();
    let mut follower = LogFollower::from_start(agent.proc.log());
    let me = format!("spiffe://{}/bench/jwt-me", harness::TRUST_DOMAIN);
    harness::create_entries(
        &admin,
        vec![harness::entry(
            &me,
            &agent.agent_id,
            &format!("unix:uid:{uid}"),
        )?],
        1,
    )
    .await?;
    agent.wait_held(&mut follower, 1, SYNC_TIMEOUT).await?;
    // The first answer: a token, or Unimplemented (not built), or PermissionDenied until
    // the agent has the identity.
    let deadline = Instant::now() + SYNC_TIMEOUT;
    let token = loop {
        match fetch_jwt(&agent.socket, AUDIENCE).await {
            Ok(t) => break t,
            Err(s) if s.code() == Code::Unimplemented => {
                return Ok(AgentFetch::NotAvailable(format!(
                    "the agent answers FetchJWTSVID with Unimplemented ({})",
                    s.message()
                )));
            }
            Err(s) if s.code() == Code::PermissionDenied && Instant::now() < deadline => {
                agent.proc.check_alive()?;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(s) => bail!("FetchJWTSVID: {:?}: {}", s.code(), s.message()),
        }
    };
    let bundle = server
        .cli(&["bundle", "show", "--format", "spiffe"])
        .await?;
    let keys = jwt_keys_of(&bundle, Algorithm::ES256)?;
    verify_token(&token, &keys, Algorithm::ES256, AUDIENCE, &me).context("FetchJWTSVID's token")?;
    let cached = fetch_level(&agent, &server, calls, |_| AUDIENCE.to_owned()).await?;
    let uncached = fetch_level(&agent, &server, calls, |i| {
        format!("spiffe://example.org/bench/uncached-{i}")
    })
    .await?;
    agent.proc.check_alive()?;
    Ok(AgentFetch::Measured { cached, uncached })
}

/// What B8 measured; each part may have failed on its own.
#[derive(Debug)]
pub struct B8 {
    /// `/proc/loadavg` when B8 started.
    pub loadavg: String,
    /// The in-process ceiling.
    pub ceiling: Result<Vec<SignRate>>,
    /// The node API with the software key.
    pub soft: Result<JwtNode>,
    /// SoftHSM2's version, module and crypto library (or why it is missing).
    pub softhsm: String,
    /// SoftHSM2's raw P-256 rate by thread count.
    pub raw: Result<Vec<RawRate>>,
    /// The `sessions` of the SoftHSM2 server.
    pub hsm_sessions: usize,
    /// The node API with the JWT key in SoftHSM2.
    pub hsm: Result<JwtNode>,
    /// The agent part.
    pub agent: Result<AgentFetch>,
}

impl B8 {
    /// The failed parts, as errors (for the exit status); an agent that does not serve
    /// JWT-SVIDs yet is no failure.
    pub fn into_errors(self) -> Vec<anyhow::Error> {
        let tag = |what: &'static str| move |e: anyhow::Error| e.context(format!("B8 {what}"));
        [
            self.ceiling.err().map(tag("ceiling")),
            self.soft.err().map(tag("node API, software key")),
            self.raw.err().map(tag("SoftHSM2 raw rate")),
            self.hsm.err().map(tag("node API, SoftHSM2")),
            self.agent.err().map(tag("agent FetchJWTSVID")),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

/// B8: the ceiling, the node API with the software key, SoftHSM2's raw rate and the node
/// API with the JWT key in SoftHSM2, then the agent.
pub async fn run(bin_dir: &Path, dir: &Path, plan: &JwtPlan, nproc: usize) -> Result<B8> {
    let loadavg = process::loadavg_now();
    eprintln!(
        "==> B8: JWT signing ceiling (ES256 {} and RS256 {} tokens per run, 1 and {nproc} threads, {} runs)",
        plan.ceiling_tokens, plan.ceiling_tokens_rsa, plan.ceiling_runs
    );
    let ceiling = measure_ceiling(plan, nproc).await;
    eprintln!(
        "==> B8: NewJWTSVID, software key ({} tokens per run, {} runs, entries {:?}, connections {:?}, {} in flight each)",
        plan.tokens_per_run, plan.runs, plan.entry_levels, plan.connections, plan.in_flight
    );
    let soft = node_api(
        bin_dir,
        &dir.join("software"),
        &ServerOptions::default(),
        plan,
        &plan.entry_levels,
    )
    .await;
    let counts = session_counts(nproc);
    let hsm_sessions = counts.iter().copied().max().unwrap_or(1);
    let (softhsm, raw, hsm) = match SoftHsm::new() {
        Err(e) => {
            let e = format!("{NEEDS_SOFTHSM}: {e}");
            (e.clone(), Err(anyhow!("{e}")), Err(anyhow!("{e}")))
        }
        Ok(h) => {
            eprintln!(
                "==> B8: SoftHSM2 raw sign rate (threads {counts:?}, {} runs of {} s)",
                plan.raw_runs, plan.raw_seconds
            );
            let raw = match h.init_token("bench8-raw") {
                Ok(token) => {
                    pkcs11::raw_rates(&h, &token, &counts, plan.raw_runs, plan.raw_seconds).await
                }
                Err(e) => Err(e.into()),
            };
            eprintln!(
                "==> B8: NewJWTSVID with the JWT key in SoftHSM2 (sessions = {hsm_sessions})"
            );
            let hdir = dir.join(format!("pkcs11-s{hsm_sessions}"));
            let hsm = async {
                let token = h.init_token(&format!("bench8-s{hsm_sessions}"))?;
                let opts = server_options(&hdir, &h, &token, hsm_sessions)?;
                node_api(bin_dir, &hdir, &opts, plan, &[plan.hsm_entries]).await
            }
            .await;
            (softhsm_description(h.module()), raw, hsm)
        }
    };
    eprintln!(
        "==> B8: agent FetchJWTSVID ({} calls cached, {} uncached)",
        plan.agent_calls, plan.agent_calls
    );
    let agent = agent_fetch(bin_dir, &dir.join("agent"), plan.agent_calls).await;
    Ok(B8 {
        loadavg,
        ceiling,
        soft,
        softhsm,
        raw,
        hsm_sessions,
        hsm,
        agent,
    })
}

/// The highest median tokens/s of a node run, and its entries and connections.
fn best(node: &JwtNode) -> Option<(usize, usize, Repeated)> {
    node.by_entries
        .iter()
        .filter_map(|n| best_connections(n).map(|(c, r)| (n.entries, c, r)))
        .max_by(|a, b| a.2.median.total_cmp(&b.2.median))
}

/// The median server CPU-µs per token over every run at `entries`' result.
fn server_us(n: &NodeResult) -> Option<f64> {
    crate::node_load::median_over_runs(n, NodeRun::cpu_us_per_svid)
}

fn node_table(r: &mut Report, node: &JwtNode, plan: &JwtPlan, nproc: usize) {
    let mut t = Table::new([
        "entries",
        "connections × in flight",
        "tokens/s: median (range, runs)",
        "call p50",
        "p99",
        "max",
        "server CPU-µs per token",
        "tokens/s per core of server CPU",
        "load generator CPU-µs per token",
        "cores ours / idle / others",
        "errors",
    ]);
    for n in &node.by_entries {
        for (conns, runs) in &n.by_connections {
            let sum = RunsSummary::of(runs, nproc);
            let cpu = sum.server_cpu_us;
            t.row([
                fmt_count(n.entries as f64),
                format!("{conns} × {}", plan.in_flight),
                sum.rate.map(|r| r.fmt_count()).unwrap_or_default(),
                sum.latency.map(|l| fmt_us(l.p50)).unwrap_or_default(),
                sum.latency.map(|l| fmt_us(l.p99)).unwrap_or_default(),
                sum.latency.map(|l| fmt_us(l.max)).unwrap_or_default(),
                cpu.map(|c| fmt_cpu_us(c.median)).unwrap_or_default(),
                cpu.map(|c| fmt_count(1e6 / c.median)).unwrap_or_default(),
                sum.client_cpu_us
                    .map(|c| fmt_cpu_us(c.median))
                    .unwrap_or_default(),
                fmt_cores(&sum.cores),
                sum.errors,
            ]);
        }
    }
    r.table(&t);
}

/// CPU-µs: one decimal below 100, else a rounded count.
fn fmt_cpu_us(us: f64) -> String {
    if us < 100.0 {
        format!("{us:.1}")
    } else {
        fmt_count(us)
    }
}

/// How B8 is set up, as the report says it.
pub const METHOD: &str = "Ceiling: `carapace_server::jwt_keys::sign` (claims sub/aud/exp/iat, JWS header alg/kid/typ, signature through the key manager) on the active JWT slot of a `CaManager` over `Datastore::open_in_memory()` and `MemoryKeyManager` with `jwt_key_type` ec-p256 (ES256, ring) and rsa-2048 (RS256, ring), std threads each taking an equal share. Node API: the release `carapace-server` (SQLite, disk key manager, default `jwt_key_type` = ec-p256) on a free 127.0.0.1 port; this process attests as an agent with a join token (`carapace_agent::node_client`) and sends `NewJWTSVID` (one token per call, audience one string) for entries parented to it, over 1 and 2 mTLS connections with several calls in flight on each; the entries are created between the entry settings on the same server. Each answer must hold a token of three parts for the entry's SPIFFE ID; one token per server is verified with `core::jose::verify` against `carapace-server bundle show --format spiffe`. Server CPU from /proc/<pid>/stat (utime + stime, 10 ms ticks) around each run. SoftHSM2: the same against a server with `[key_manager.pkcs11]` (its X.509 CA, JWT and TLS keys in a fresh token), beside SoftHSM2's raw P-256 `C_Sign` rate measured alone in a child process (as B3). Agent: the release `carapace-agent` attested to its own server, one entry for this process's uid; each `FetchJWTSVID` on a new Unix-socket connection, timed from connecting to the answer.";

/// B8's report section.
pub fn section(r: &mut Report, b8: &B8, plan: &JwtPlan, nproc: usize) {
    r.para(METHOD);
    r.bullet(&format!("Load average when B8 started: {}.", b8.loadavg));

    r.heading(
        3,
        "Ceiling: JWT-SVIDs signed in process with the server's own function",
    );
    let mut ceiling_es = None;
    match &b8.ceiling {
        Ok(rates) => {
            let mut t = Table::new([
                "algorithm",
                "threads",
                "tokens per run",
                "tokens/s: median (range, runs)",
                "CPU-µs per token (threads × wall / tokens)",
            ]);
            for c in rates {
                let Some(rep) = Repeated::of(&c.rates) else {
                    continue;
                };
                if c.alg == Algorithm::ES256 {
                    ceiling_es = Some(ceiling_es.map_or(rep.median, |m: f64| m.max(rep.median)));
                }
                t.row([
                    c.alg.name().to_owned(),
                    c.threads.to_string(),
                    fmt_count(c.tokens as f64),
                    rep.fmt_count(),
                    fmt_cpu_us(c.threads as f64 * 1e6 / rep.median),
                ]);
            }
            r.table(&t);
        }
        Err(e) => failed(r, "JWT signing ceiling", e),
    }

    r.heading(3, "Node API: NewJWTSVID, software key (ES256)");
    match &b8.soft {
        Ok(node) => {
            node_table(r, node, plan, nproc);
            if let Some((entries, conns, rep)) = best(node) {
                let per_core = rep.median / nproc as f64;
                let cpu = node
                    .by_entries
                    .iter()
                    .find(|n| n.entries == entries)
                    .and_then(server_us);
                let server_per_core = cpu.map(|c| 1e6 / c);
                let met = server_per_core.is_some_and(|s| s >= GOAL_PER_CORE);
                r.bullet(&format!(
                    "**Goal (≥ {} tokens/s per core with a software ES256 key): {}** — best {} tokens/s ({} entries, {conns} connection(s)): {} per core of the machine (server and load generator share the {nproc} cores), {} per core of server CPU ({} server CPU-µs per token).",
                    fmt_count(GOAL_PER_CORE),
                    if met { "met" } else { "not met" },
                    fmt_count(rep.median),
                    fmt_count(entries as f64),
                    fmt_count(per_core),
                    server_per_core.map(fmt_count).unwrap_or_else(|| "—".into()),
                    cpu.map(fmt_cpu_us).unwrap_or_else(|| "—".into()),
                ));
                if let Some(ceiling) = ceiling_es {
                    r.bullet(&format!(
                        "Node API / ES256 ceiling (all cores, same run): {} / {} = {}.",
                        fmt_count(rep.median),
                        fmt_count(ceiling),
                        fmt_pct(rep.median / ceiling)
                    ));
                }
            }
            if let [first, .., last] = node.by_entries.as_slice()
                && let (Some(a), Some(b)) = (server_us(first), server_us(last))
            {
                r.bullet(&format!(
                    "Entries of the calling agent: server CPU per token {} µs with {} entries, {} µs with {} ({:+.1} µs: the server finds the call's entry among the agent's authorized entries).",
                    fmt_cpu_us(a),
                    fmt_count(first.entries as f64),
                    fmt_cpu_us(b),
                    fmt_count(last.entries as f64),
                    b - a
                ));
            }
        }
        Err(e) => failed(r, "NewJWTSVID with the software key", e),
    }

    r.heading(3, "Node API: NewJWTSVID with the JWT key in SoftHSM2");
    r.bullet(&format!("Token: {}.", b8.softhsm));
    let mut raw_k = None;
    match &b8.raw {
        Ok(raw) => {
            let mut t = Table::new([
                "threads (one session each)",
                "raw P-256 signatures/s: median (range, runs)",
                "CPU-µs per signature",
            ]);
            for x in raw {
                let Some(rep) = Repeated::of(&x.rates()) else {
                    continue;
                };
                if x.threads == b8.hsm_sessions {
                    raw_k = Some(rep.median);
                }
                t.row([
                    x.threads.to_string(),
                    rep.fmt_count(),
                    Repeated::of(&x.cpu())
                        .map(|c| format!("{:.0}", c.median))
                        .unwrap_or_default(),
                ]);
            }
            r.table(&t);
        }
        Err(e) => failed(r, "SoftHSM2 raw signing rate", e),
    }
    match &b8.hsm {
        Ok(node) => {
            r.bullet(&format!(
                "`[key_manager.pkcs11] sessions = {}`.",
                b8.hsm_sessions
            ));
            node_table(r, node, plan, nproc);
            match (best(node), raw_k) {
                (Some((_, conns, rep)), Some(raw)) => {
                    let share = rep.median / raw;
                    r.bullet(&format!(
                        "**Goal (≥ {} of SoftHSM2's raw rate): {}** — {} tokens/s ({conns} connection(s)) / {} raw signatures/s on {} threads = {}.",
                        fmt_pct(GOAL_HSM_SHARE),
                        if share >= GOAL_HSM_SHARE { "met" } else { "not met" },
                        fmt_count(rep.median),
                        fmt_count(raw),
                        b8.hsm_sessions,
                        fmt_pct(share)
                    ));
                }
                _ => {
                    r.bullet("No ratio: the raw rate or the node API figure is missing.");
                }
            }
        }
        Err(e) => failed(r, "NewJWTSVID with the key in SoftHSM2", e),
    }

    r.heading(3, "Agent: FetchJWTSVID on new connections");
    match &b8.agent {
        Ok(AgentFetch::Measured { cached, uncached }) => {
            let mut t = Table::new([
                "case",
                "calls",
                "p50",
                "p99",
                "max",
                "agent CPU-µs per call",
                "server CPU-µs per call",
                "errors",
            ]);
            for (label, l) in [
                ("cached (same audience)", cached),
                ("uncached (new audience: one NewJWTSVID)", uncached),
            ] {
                let s = Summary::of_durations_us(&l.latencies);
                let per = |d: Duration| {
                    fmt_cpu_us(d.as_secs_f64() * 1e6 / l.latencies.len().max(1) as f64)
                };
                t.row([
                    label.to_owned(),
                    fmt_count(l.latencies.len() as f64),
                    s.map(|s| fmt_us(s.p50)).unwrap_or_default(),
                    s.map(|s| fmt_us(s.p99)).unwrap_or_default(),
                    s.map(|s| fmt_us(s.max)).unwrap_or_default(),
                    per(l.agent_cpu),
                    per(l.server_cpu),
                    match &l.first_error {
                        Some(e) if l.errors > 0 => format!("{} (first: {e})", l.errors),
                        _ => l.errors.to_string(),
                    },
                ]);
            }
            r.table(&t);
            let p99 = Summary::of_durations_us(&cached.latencies).map(|s| s.p99);
            r.bullet(&format!(
                "**Goal (cached FetchJWTSVID p99 < {} on a new connection): {}**.",
                fmt_us(GOAL_CACHED_P99_US),
                match p99 {
                    Some(p) if p < GOAL_CACHED_P99_US && cached.errors == 0 =>
                        format!("met ({})", fmt_us(p)),
                    Some(p) => format!("not met ({})", fmt_us(p)),
                    None => "not measured".into(),
                }
            ));
        }
        Ok(AgentFetch::NotAvailable(why)) => {
            r.para(&format!(
                "Not measured: {why}. This part measures as soon as the agent's JWT Workload API is in the build (no change to the benchmark)."
            ));
        }
        Err(e) => failed(r, "agent FetchJWTSVID", e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_ceiling_signs_tokens_that_verify_with_the_bundle() {
        let plan = JwtPlan {
            ceiling_tokens: 40,
            ceiling_tokens_rsa: 4,
            ceiling_runs: 1,
            ..JwtPlan::new(true)
        };
        let c = measure_ceiling(&plan, 2).await.unwrap();
        assert_eq!(
            c.iter().map(|c| (c.alg, c.threads)).collect::<Vec<_>>(),
            vec![
                (Algorithm::ES256, 1),
                (Algorithm::ES256, 2),
                (Algorithm::RS256, 1),
                (Algorithm::RS256, 2)
            ]
        );
        assert!(c.iter().all(|c| c.rates.len() == 1 && c.rates[0] > 0.0));
    }

    #[tokio::test]
    async fn a_token_fails_with_another_audience_sub_or_key() {
        let ca = inproc::bench_ca(KeyType::EcP256).await.unwrap();
        let slot = ca.jwt_active().unwrap();
        let reqs = requests(2).unwrap();
        let t = jwt_keys::sign(&slot, &reqs[1], carapace_core::clock::unix_now()).unwrap();
        let bundle = ca.bundle().borrow().clone();
        let keys = jwt_keys_of(&bundle.to_spiffe_json().unwrap(), Algorithm::ES256).unwrap();
        let sub = workload_id(1);
        verify_token(&t.token, &keys, Algorithm::ES256, AUDIENCE, &sub).unwrap();
        assert!(verify_token(&t.token, &keys, Algorithm::ES256, "other", &sub).is_err());
        assert!(
            verify_token(&t.token, &keys, Algorithm::ES256, AUDIENCE, &workload_id(0)).is_err()
        );
        let other = inproc::bench_ca(KeyType::EcP256).await.unwrap();
        let b2 = other.bundle().borrow().clone();
        let k2 = jwt_keys_of(&b2.to_spiffe_json().unwrap(), Algorithm::ES256).unwrap();
        assert!(verify_token(&t.token, &k2, Algorithm::ES256, AUDIENCE, &sub).is_err());
        // An RS256-only reader finds no key in an ES256 bundle.
        assert!(jwt_keys_of(&bundle.to_spiffe_json().unwrap(), Algorithm::RS256).is_err());
    }

    fn run_of(tokens: usize, rate: f64, server_us: f64) -> NodeRun {
        let wall = Duration::from_secs_f64(tokens as f64 / rate);
        NodeRun {
            signed: tokens,
            errors: 0,
            first_error: None,
            wall,
            latencies: vec![Duration::from_micros(400), Duration::from_micros(900)],
            server_cpu: Duration::from_secs_f64(server_us * tokens as f64 / 1e6),
            client_cpu: wall / 4,
            machine_idle: wall / 10,
            server_rss: 20 << 20,
        }
    }

    fn node(entries: &[(usize, f64, f64)]) -> JwtNode {
        JwtNode {
            by_entries: entries
                .iter()
                .map(|&(entries, rate, us)| NodeResult {
                    by_connections: vec![(1, vec![run_of(2_000, rate, us)])],
                    entries,
                    entry_create: Duration::from_millis(10),
                    server_rss_idle: 10 << 20,
                    server_rss_peak: 20 << 20,
                })
                .collect(),
        }
    }

    #[test]
    fn the_report_judges_each_goal() {
        let b8 = B8 {
            loadavg: "0.10 0.20 0.30".into(),
            ceiling: Ok(vec![SignRate {
                alg: Algorithm::ES256,
                threads: 2,
                tokens: 2_000,
                rates: vec![50_000.0],
            }]),
            soft: Ok(node(&[(10, 30_000.0, 40.0), (200, 25_000.0, 60.0)])),
            softhsm: "SoftHSM2 2.6.1".into(),
            raw: Ok(vec![RawRate {
                threads: 2,
                runs: vec![crate::pkcs11::RawRun {
                    rate: 30_000.0,
                    cpu_us_per_sig: 60.0,
                    idle_cores: 0.0,
                }],
            }]),
            hsm_sessions: 2,
            hsm: Ok(node(&[(10, 15_000.0, 120.0)])),
            agent: Ok(AgentFetch::NotAvailable("Unimplemented".into())),
        };
        let mut r = Report::new();
        section(&mut r, &b8, &JwtPlan::new(true), 2);
        let text = r.finish();
        // 30,000 tokens/s at 40 server CPU-µs each: 25,000 per core of server CPU.
        assert!(
            text.contains("**Goal (≥ 20,000 tokens/s per core with a software ES256 key): met**"),
            "{text}"
        );
        assert!(text.contains("25,000 per core of server CPU"), "{text}");
        assert!(text.contains("30,000 / 50,000 = 60.0 %"), "{text}");
        assert!(
            text.contains("40.0 µs with 10 entries, 60.0 µs with 200 (+20.0 µs"),
            "{text}"
        );
        assert!(
            text.contains("**Goal (≥ 70.0 % of SoftHSM2's raw rate): not met** — 15,000 tokens/s"),
            "{text}"
        );
        assert!(text.contains("= 50.0 %"), "{text}");
        assert!(text.contains("Not measured: Unimplemented"), "{text}");
        assert!(b8.into_errors().is_empty());

        let failed = B8 {
            loadavg: String::new(),
            ceiling: Err(anyhow!("no key")),
            soft: Err(anyhow!("server did not start")),
            softhsm: "missing".into(),
            raw: Err(anyhow!("{NEEDS_SOFTHSM}")),
            hsm_sessions: 2,
            hsm: Err(anyhow!("{NEEDS_SOFTHSM}")),
            agent: Ok(AgentFetch::Measured {
                cached: FetchLevel {
                    latencies: vec![Duration::from_micros(1_500); 10],
                    ..FetchLevel::default()
                },
                uncached: FetchLevel::default(),
            }),
        };
        let mut r = Report::new();
        section(&mut r, &failed, &JwtPlan::new(true), 2);
        let text = r.finish();
        assert!(text.contains("server did not start"), "{text}");
        assert!(text.contains("apt-get install -y softhsm2"), "{text}");
        assert!(
            text.contains(
                "**Goal (cached FetchJWTSVID p99 < 1.00 ms on a new connection): not met"
            ),
            "{text}"
        );
        assert_eq!(failed.into_errors().len(), 4);
    }
}
