//! B4: `tpm` node attestation against swtpm, in this process: the agent half
//! ([`TpmAttestorClient`]: `payload()`, `answer()`) and the server half ([`TpmAttestor`]:
//! `begin()`, `session.respond()`) driven directly, as `attestor-tpm/tests/attestor.rs`
//! does, with an in-memory [`NodeStateStore`] ([`MemoryStateStore`]).
//!
//! - [`Lab::start`]: swtpms, each manufactured by its own lab vendor (carapace-hsm-sim's
//!   [`TpmManufacturer`]: its own EK CA and its own EKs; two copies of one manufactured
//!   state would share their EK, and the server keeps one quote clock per EK), and a
//!   server configuration trusting every vendor's root;
//! - [`attest_timed`] / [`attest_run`]: whole attestations, each phase timed (wall time
//!   of the agent's TPM work; wall and thread CPU time of the server's calls, see
//!   [`CpuTimed`]), sequentially on one swtpm or concurrently on several, one server;
//! - [`capture`] and [`server_rates`]: the server's pieces alone on one captured
//!   attestation: quote verification, software MakeCredential for the RSA-2048 and the
//!   P-384 EK, the EK certificate chain;
//! - [`tpm_ops`]: the agent's TPM commands one by one through [`TpmDevice`];
//! - [`sign_latency`]: a raw TPM2_Sign with a P-256 signing primary (stand-in for the
//!   agent key in the TPM, which is not built yet).
//!
//! swtpm is a software TPM on the same CPU as everything else; a discrete TPM takes
//! 100–700 ms per signature or quote.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::str::FromStr as _;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, anyhow, bail};
use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK};
use tss_esapi::handles::KeyHandle;
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    Digest, EccScheme, HashScheme, HashcheckTicket, Public, Signature, SignatureScheme,
};
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;
use tss_esapi::utils::create_unrestricted_signing_ecc_public;
use tss_esapi::{Context, TctiNameConf};

use carapace_attestor_tpm::agent::{TpmAgentConfig, TpmAttestorClient};
use carapace_attestor_tpm::credential::make_credential;
use carapace_attestor_tpm::device::{EkAlgorithm, TpmDevice};
use carapace_attestor_tpm::server::{DEFAULT_PCRS, TpmAttestor, TpmServerConfig};
use carapace_attestor_tpm::verify::{self, EkPolicy};
use carapace_attestor_tpm::wire::{self, Challenge, Payload, Response};
use carapace_core::plugin::{
    AttestationContext, AttestationStep, MemoryStateStore, NodeAttestor as _,
    NodeAttestorClient as _,
};
use hsm_sim::swtpm::{SWTPM_PACKAGES, Swtpm, TPM2_TOOLS_PACKAGE, TpmManufacturer};

use crate::procfs;

/// Sizes of B4.
#[derive(Debug, Clone, PartialEq)]
pub struct TpmPlan {
    /// Sequential attestations on one swtpm for the latency figures.
    pub attestations: usize,
    /// Attestations per swtpm in one throughput run.
    pub per_tpm: usize,
    /// Throughput runs per swtpm count.
    pub runs: usize,
    /// swtpms attesting concurrently in the parallel throughput runs.
    pub parallel: usize,
    /// Length of one server-alone rate run, in seconds.
    pub rate_seconds: f64,
    /// Server-alone rate runs per operation and thread count.
    pub rate_runs: usize,
    /// Repetitions of the agent's TPM commands one by one.
    pub op_reps: usize,
    /// Timed TPM2_Sign calls.
    pub signs: usize,
}

impl TpmPlan {
    /// The full run, or the reduced `--quick` one.
    pub fn new(quick: bool) -> TpmPlan {
        if quick {
            TpmPlan {
                attestations: 10,
                per_tpm: 5,
                runs: 1,
                parallel: 2,
                rate_seconds: 0.2,
                rate_runs: 1,
                op_reps: 5,
                signs: 100,
            }
        } else {
            TpmPlan {
                attestations: 50,
                per_tpm: 20,
                runs: 3,
                parallel: 2,
                rate_seconds: 0.5,
                rate_runs: 3,
                op_reps: 20,
                signs: 500,
            }
        }
    }
}

/// What B4 needs installed, with the apt-get line: the context of a failed setup.
pub fn install_hint() -> String {
    format!(
        "B4 needs swtpm and tpm2-tools (apt-get install -y {SWTPM_PACKAGES} {TPM2_TOOLS_PACKAGE})"
    )
}

/// Running swtpms, each from its own lab manufacturer, and a server configuration that
/// trusts all of them by their EK certificate chains. Dropping it stops the swtpms and
/// removes every directory.
#[derive(Debug)]
pub struct Lab {
    // Field order: the swtpms stop before their manufacturers' directories go.
    tpms: Vec<Swtpm>,
    _manufacturers: Vec<TpmManufacturer>,
    server_config: TpmServerConfig,
}

impl Lab {
    /// Manufactures `n` TPMs (EK CA, RSA-2048 and P-384 EKs with certificates) and starts
    /// a swtpm for each. Blocks (swtpm_setup runs for a second or more per TPM).
    pub fn start(n: usize) -> Result<Lab> {
        let needs = install_hint();
        let mut manufacturers = Vec::new();
        let mut tpms = Vec::new();
        let mut ek_ca_files = Vec::new();
        for i in 0..n.max(1) {
            let m = TpmManufacturer::new()
                .with_context(|| format!("manufacturing lab TPM {}", i + 1))
                .context(needs.clone())?;
            let tpm = Swtpm::start(&m)
                .with_context(|| format!("starting swtpm {}", i + 1))
                .context(needs.clone())?;
            ek_ca_files.push(m.ek_ca_root());
            ek_ca_files.push(m.ek_ca_intermediate());
            manufacturers.push(m);
            tpms.push(tpm);
        }
        Ok(Lab {
            tpms,
            _manufacturers: manufacturers,
            server_config: TpmServerConfig {
                ek_ca_files,
                pcrs: DEFAULT_PCRS.to_vec(),
                ..TpmServerConfig::default()
            },
        })
    }

    /// The swtpms.
    pub fn tpms(&self) -> &[Swtpm] {
        &self.tpms
    }

    /// The server's `[node_attestor.tpm]` settings: every vendor's root and
    /// intermediate in `ek_ca_files`, PCRs 0–7, no PCR policy.
    pub fn server_config(&self) -> &TpmServerConfig {
        &self.server_config
    }

    /// A server half with its own empty store.
    pub fn server(&self) -> Result<TpmAttestor> {
        TpmAttestor::new(
            &self.server_config,
            Path::new("/"),
            Arc::new(MemoryStateStore::default()),
        )
        .context("building the server's TpmAttestor")
    }

    /// The EK policy the server builds from [`Lab::server_config`] (self-signed
    /// certificates are roots, the others intermediates), for [`server_rates`].
    pub fn ek_policy(&self) -> Result<EkPolicy> {
        let mut roots = Vec::new();
        let mut intermediates = Vec::new();
        for file in &self.server_config.ek_ca_files {
            let bytes =
                std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
            for der in verify::certificates_from_pem_or_der(&bytes)? {
                if verify::is_self_signed(&der) {
                    roots.push(der);
                } else {
                    intermediates.push(der);
                }
            }
        }
        Ok(EkPolicy::new(roots, intermediates, Vec::new())?)
    }
}

/// `swtpm --version`'s first line up to the copyright: `TPM emulator version 0.7.1`.
pub fn swtpm_version() -> String {
    std::process::Command::new("swtpm")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            let out = String::from_utf8_lossy(&o.stdout).into_owned();
            let line = out.lines().next()?.split(',').next()?.trim().to_owned();
            (!line.is_empty()).then_some(line)
        })
        .unwrap_or_else(|| "swtpm (version unknown)".into())
}

/// A future with the CPU time its polls took on whichever threads polled it
/// (`CLOCK_THREAD_CPUTIME_ID` around each poll): exactly the work of the call, without
/// waiting or other threads' work.
#[derive(Debug)]
pub struct CpuTimed<F> {
    fut: Pin<Box<F>>,
    cpu: Duration,
}

impl<F: Future> CpuTimed<F> {
    /// Wraps `fut`.
    pub fn new(fut: F) -> Self {
        CpuTimed {
            fut: Box::pin(fut),
            cpu: Duration::ZERO,
        }
    }
}

impl<F: Future> Future for CpuTimed<F> {
    type Output = (F::Output, Duration);

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let before = procfs::thread_cpu_time();
        let polled = this.fut.as_mut().poll(cx);
        this.cpu += procfs::thread_cpu_time().saturating_sub(before);
        polled.map(|out| (out, this.cpu))
    }
}

/// One whole attestation, phase by phase.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Phases {
    /// Agent `payload()`: open the TPM, EK (CreatePrimary, certificate from NV), AK
    /// (Create, Load): wall time.
    pub payload: Duration,
    /// Server `begin()`: EK certificate chain, AK checks, MakeCredential: wall time.
    pub begin: Duration,
    /// The CPU time of `begin()`.
    pub begin_cpu: Duration,
    /// Agent `answer()`: ActivateCredential, PCR reads, Quote, flushes: wall time.
    pub answer: Duration,
    /// Server `respond()`: credential check, quote verification, clock, store,
    /// selectors: wall time.
    pub respond: Duration,
    /// The CPU time of `respond()`.
    pub respond_cpu: Duration,
    /// The whole attestation, wall time.
    pub total: Duration,
}

impl Phases {
    /// The server's CPU time: `begin()` + `respond()`.
    pub fn server_cpu(&self) -> Duration {
        self.begin_cpu + self.respond_cpu
    }
}

/// What both halves are told besides the evidence: a fresh P-256 agent key's
/// SubjectPublicKeyInfo, as the agent generates one for its SVID (the `tpm` attestor does
/// not bind it yet).
pub fn agent_context() -> Result<AttestationContext> {
    let key = rcgen::KeyPair::generate().context("generating a P-256 agent key")?;
    Ok(AttestationContext {
        agent_public_key: rcgen::PublicKeyData::subject_public_key_info(&key),
        tls_exporter: vec![0x5a; 32],
    })
}

/// One attestation of `client`'s TPM by `server`, timed.
pub async fn attest_timed(
    server: &TpmAttestor,
    client: &TpmAttestorClient,
    ctx: &AttestationContext,
) -> Result<Phases> {
    let start = Instant::now();
    let payload = client.payload(ctx).await.context("agent payload()")?;
    let t1 = Instant::now();
    let (step, begin_cpu) = CpuTimed::new(server.begin(&payload, ctx)).await;
    let t2 = Instant::now();
    let AttestationStep::Challenge { challenge, session } = step.context("server begin()")? else {
        bail!("server begin() finished without a challenge");
    };
    let answer = client
        .answer(&challenge, ctx)
        .await
        .context("agent answer()")?;
    let t3 = Instant::now();
    let (done, respond_cpu) = CpuTimed::new(session.respond(&answer)).await;
    let end = Instant::now();
    match done.context("server respond()")? {
        AttestationStep::Done(_) => Ok(Phases {
            payload: t1 - start,
            begin: t2 - t1,
            begin_cpu,
            answer: t3 - t2,
            respond: end - t3,
            respond_cpu,
            total: end - start,
        }),
        AttestationStep::Challenge { .. } => bail!("server respond() sent a second challenge"),
    }
}

/// Attestations on some swtpms against one server.
#[derive(Debug, Clone, PartialEq)]
pub struct AttestRun {
    /// swtpms attesting concurrently (one agent client each).
    pub tpms: usize,
    /// Every attestation's phases.
    pub samples: Vec<Phases>,
    /// From the first attestation's start to the last one's end.
    pub wall: Duration,
    /// This process's CPU time over the run (the server calls, the agent's ESAPI side,
    /// the runtime).
    pub process_cpu: Duration,
    /// The swtpm processes' CPU time over the run.
    pub swtpm_cpu: Duration,
    /// Idle time of all cores together over the run (`/proc/stat`).
    pub idle: Duration,
}

impl AttestRun {
    /// Attestations per second.
    pub fn rate(&self) -> f64 {
        self.samples.len() as f64 / self.wall.as_secs_f64().max(f64::EPSILON)
    }

    fn per_attestation(&self, d: Duration) -> Duration {
        d / u32::try_from(self.samples.len().max(1)).unwrap_or(u32::MAX)
    }

    /// swtpm CPU per attestation.
    pub fn swtpm_cpu_per_attestation(&self) -> Duration {
        self.per_attestation(self.swtpm_cpu)
    }

    /// This process's CPU per attestation.
    pub fn process_cpu_per_attestation(&self) -> Duration {
        self.per_attestation(self.process_cpu)
    }

    /// The server calls' CPU per attestation (mean).
    pub fn server_cpu_per_attestation(&self) -> Duration {
        self.per_attestation(self.samples.iter().map(Phases::server_cpu).sum())
    }

    /// Average cores used: (swtpms + this process, idle, others and steal), out of
    /// `nproc`.
    pub fn cores(&self, nproc: usize) -> (f64, f64, f64) {
        let wall = self.wall.as_secs_f64().max(f64::EPSILON);
        let ours = (self.process_cpu + self.swtpm_cpu).as_secs_f64() / wall;
        let idle = self.idle.as_secs_f64() / wall;
        (ours, idle, (nproc as f64 - ours - idle).max(0.0))
    }
}

/// A client for `tpm`.
fn client(tpm: &Swtpm) -> TpmAttestorClient {
    TpmAttestorClient::new(&TpmAgentConfig {
        tcti: Some(tpm.tcti()),
    })
}

/// `per_tpm` attestations on each of `tpms` (one task and agent client per swtpm, each
/// attesting sequentially), all against `server`, after one untimed warm-up attestation
/// per swtpm.
pub async fn attest_run(
    server: &Arc<TpmAttestor>,
    tpms: &[&Swtpm],
    per_tpm: usize,
) -> Result<AttestRun> {
    let ctx = Arc::new(agent_context()?);
    let clients: Vec<Arc<TpmAttestorClient>> = tpms.iter().map(|t| Arc::new(client(t))).collect();
    for c in &clients {
        attest_timed(server, c, &ctx)
            .await
            .context("warm-up attestation")?;
    }
    let me = std::process::id();
    let pids: Vec<u32> = tpms.iter().map(|t| t.pid()).collect();
    let swtpm_cpu = || -> Result<Duration> {
        pids.iter()
            .map(|&p| procfs::cpu_time(p).context("swtpm CPU time"))
            .sum()
    };
    let (cpu0, tpm0, idle0) = (procfs::cpu_time(me)?, swtpm_cpu()?, procfs::machine_idle()?);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in &clients {
        let (server, c, ctx) = (server.clone(), c.clone(), ctx.clone());
        tasks.spawn(async move {
            let mut out = Vec::with_capacity(per_tpm);
            for _ in 0..per_tpm {
                out.push(attest_timed(&server, &c, &ctx).await?);
            }
            Ok::<_, anyhow::Error>(out)
        });
    }
    let mut samples = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        samples.extend(joined.context("attestation task")??);
    }
    let wall = start.elapsed();
    Ok(AttestRun {
        tpms: tpms.len(),
        samples,
        wall,
        process_cpu: procfs::cpu_time(me)?.saturating_sub(cpu0),
        swtpm_cpu: swtpm_cpu()?.saturating_sub(tpm0),
        idle: procfs::machine_idle()?.saturating_sub(idle0),
    })
}

/// One real attestation's evidence, kept to replay the server's work alone.
#[derive(Debug, Clone)]
pub struct Captured {
    /// The EK the agent attested with (what [`TpmDevice::ek`] chose).
    pub ek_algorithm: EkAlgorithm,
    /// Its marshalled public area.
    pub ek_public: Vec<u8>,
    /// Its public area, parsed.
    pub ek_parsed: Public,
    /// Its certificate (DER).
    pub ek_cert: Vec<u8>,
    /// EK chain certificates from NV.
    pub ek_intermediates: Vec<Vec<u8>>,
    /// The P-384 EK's marshalled public area ([`TpmDevice::ek_of`]).
    pub ek_p384_public: Vec<u8>,
    /// The AK's public area, parsed.
    pub ak_public: Public,
    /// The AK's Name.
    pub ak_name: Vec<u8>,
    /// The quote (TPMS_ATTEST).
    pub attest: Vec<u8>,
    /// Its signature (TPMT_SIGNATURE).
    pub signature: Vec<u8>,
    /// The server's nonce.
    pub nonce: Vec<u8>,
    /// The quoted PCRs.
    pub pcrs: Vec<u8>,
    /// Their values.
    pub pcr_values: BTreeMap<u8, Vec<u8>>,
}

/// Runs one attestation of `tpm` against `server`, keeping the messages (the server
/// must accept it), and reads the TPM's default and P-384 EKs.
pub async fn capture(server: &TpmAttestor, tpm: &Swtpm) -> Result<Captured> {
    let c = client(tpm);
    let ctx = agent_context()?;
    let payload_bytes = c.payload(&ctx).await.context("agent payload()")?;
    let AttestationStep::Challenge { challenge, session } = server
        .begin(&payload_bytes, &ctx)
        .await
        .context("server begin()")?
    else {
        bail!("server begin() finished without a challenge");
    };
    let answer_bytes = c.answer(&challenge, &ctx).await.context("agent answer()")?;
    let AttestationStep::Done(_) = session
        .respond(&answer_bytes)
        .await
        .context("server respond()")?
    else {
        bail!("server respond() sent a second challenge");
    };
    let payload: Payload = wire::decode("payload", &payload_bytes)?;
    let challenge: Challenge = wire::decode("challenge", &challenge)?;
    let answer: Response = wire::decode("response", &answer_bytes)?;
    let tcti = tpm.tcti();
    let (ek_algorithm, ek_default, ek_p384_public) =
        tokio::task::spawn_blocking(move || -> Result<(EkAlgorithm, Vec<u8>, Vec<u8>)> {
            let mut dev = TpmDevice::open(&tcti)?;
            let ek = dev.ek()?;
            let (alg, public) = (ek.algorithm, ek.public.clone());
            dev.flush_ek(ek)?;
            let p384 = dev.ek_of(EkAlgorithm::EccP384)?;
            let p384_public = p384.public.clone();
            dev.flush_ek(p384)?;
            Ok((alg, public, p384_public))
        })
        .await
        .context("reading the EKs")??;
    if ek_default != payload.ek_public {
        bail!("the agent's EK is not the {ek_algorithm} EK TpmDevice::ek() returns");
    }
    let ak_public = verify::parse_public(&payload.ak_public)?;
    Ok(Captured {
        ek_algorithm,
        ek_parsed: verify::parse_public(&payload.ek_public)?,
        ek_public: payload.ek_public,
        ek_cert: payload.ek_cert,
        ek_intermediates: payload.ek_intermediates,
        ek_p384_public,
        ak_name: verify::name_of(&ak_public)?,
        ak_public,
        attest: answer.quote,
        signature: answer.quote_signature,
        nonce: challenge.nonce,
        pcrs: challenge.pcr_selection.pcrs,
        pcr_values: verify::parse_pcr_values(&answer.pcr_values)?,
    })
}

/// A piece of the server's work, replayed on [`Captured`] evidence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerOp {
    /// `verify::verify_quote`: AK signature (ECDSA P-256), nonce, PCR selection and
    /// digest.
    VerifyQuote,
    /// `credential::make_credential` for the RSA-2048 EK (RSA-OAEP, KDFa, AES, HMAC).
    MakeCredentialRsa,
    /// `credential::make_credential` for the P-384 EK (ephemeral ECDH, KDFe, ...).
    MakeCredentialP384,
    /// `verify::verify_ek`: the EK certificate matches the key and chains to a root.
    VerifyEk,
}

impl ServerOp {
    /// Every operation, in report order.
    pub const ALL: [ServerOp; 4] = [
        ServerOp::VerifyQuote,
        ServerOp::MakeCredentialRsa,
        ServerOp::MakeCredentialP384,
        ServerOp::VerifyEk,
    ];

    /// How the report names it.
    pub fn label(self) -> &'static str {
        match self {
            ServerOp::VerifyQuote => "`verify::verify_quote` (ECDSA P-256 AK, PCRs 0–7)",
            ServerOp::MakeCredentialRsa => "`credential::make_credential`, RSA-2048 EK",
            ServerOp::MakeCredentialP384 => "`credential::make_credential`, P-384 EK",
            ServerOp::VerifyEk => "`verify::verify_ek`, RSA-2048 EK certificate chain",
        }
    }

    fn run(self, c: &Captured, policy: &EkPolicy, now: i64) -> Result<()> {
        const SECRET: [u8; 32] = [0x5a; 32];
        match self {
            ServerOp::VerifyQuote => {
                verify::verify_quote(
                    &c.ak_public,
                    &c.attest,
                    &c.signature,
                    &c.nonce,
                    &c.pcrs,
                    &c.pcr_values,
                )?;
            }
            ServerOp::MakeCredentialRsa => {
                make_credential(&c.ek_public, &c.ak_name, &SECRET)?;
            }
            ServerOp::MakeCredentialP384 => {
                make_credential(&c.ek_p384_public, &c.ak_name, &SECRET)?;
            }
            ServerOp::VerifyEk => {
                verify::verify_ek(
                    policy,
                    &c.ek_parsed,
                    Some(&c.ek_cert),
                    &c.ek_intermediates,
                    now,
                )?;
            }
        }
        Ok(())
    }
}

/// One rate run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateRun {
    /// Operations per second.
    pub rate: f64,
    /// CPU time per operation (the measuring threads' `CLOCK_THREAD_CPUTIME_ID`), µs.
    pub cpu_us_per_op: f64,
    /// Average idle cores during the run.
    pub idle_cores: f64,
}

/// The rate of one server operation at one thread count.
#[derive(Debug, Clone, PartialEq)]
pub struct OpRate {
    /// The operation.
    pub op: ServerOp,
    /// Threads running it.
    pub threads: usize,
    /// The runs.
    pub runs: Vec<RateRun>,
}

impl OpRate {
    /// Operations/s of each run.
    pub fn rates(&self) -> Vec<f64> {
        self.runs.iter().map(|r| r.rate).collect()
    }

    /// CPU-µs per operation of each run.
    pub fn cpu(&self) -> Vec<f64> {
        self.runs.iter().map(|r| r.cpu_us_per_op).collect()
    }
}

/// Runs `op` on `threads` threads until `run_for` has passed.
fn measure_rate(
    threads: usize,
    run_for: Duration,
    op: &(dyn Fn() -> Result<()> + Sync),
) -> Result<RateRun> {
    let idle0 = procfs::machine_idle()?;
    let start = Instant::now();
    let deadline = start + run_for;
    let (total, cpu) = std::thread::scope(|s| -> Result<(u64, Duration)> {
        let handles: Vec<_> = (0..threads.max(1))
            .map(|_| {
                s.spawn(|| -> Result<(u64, Duration)> {
                    let cpu0 = procfs::thread_cpu_time();
                    let mut n = 0;
                    loop {
                        op()?;
                        n += 1;
                        if Instant::now() >= deadline {
                            return Ok((n, procfs::thread_cpu_time().saturating_sub(cpu0)));
                        }
                    }
                })
            })
            .collect();
        let (mut total, mut cpu) = (0, Duration::ZERO);
        for h in handles {
            let (n, c) = h.join().map_err(|_| anyhow!("rate thread panicked"))??;
            total += n;
            cpu += c;
        }
        Ok((total, cpu))
    })?;
    let wall = start.elapsed().as_secs_f64().max(f64::EPSILON);
    let idle = procfs::machine_idle()?.saturating_sub(idle0);
    Ok(RateRun {
        rate: total as f64 / wall,
        cpu_us_per_op: cpu.as_secs_f64() * 1e6 / (total.max(1) as f64),
        idle_cores: idle.as_secs_f64() / wall,
    })
}

/// The server operations alone on `c`, at each of `counts` threads, `runs` times each
/// (alternating), after a warm-up. Blocks for about
/// `4 × counts.len() × runs × seconds`.
pub fn server_rates(
    c: &Captured,
    policy: &EkPolicy,
    counts: &[usize],
    runs: usize,
    seconds: f64,
) -> Result<Vec<OpRate>> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    let run_for = Duration::from_secs_f64(seconds.clamp(0.01, 600.0));
    let mut out = Vec::new();
    for op in ServerOp::ALL {
        let f = || op.run(c, policy, now);
        f().with_context(|| format!("{} on the captured attestation", op.label()))?;
        measure_rate(1, run_for.min(Duration::from_millis(100)), &f)?;
        let mut rates: Vec<OpRate> = counts
            .iter()
            .map(|&threads| OpRate {
                op,
                threads,
                runs: Vec::new(),
            })
            .collect();
        for _ in 0..runs.max(1) {
            for r in &mut rates {
                r.runs.push(measure_rate(r.threads, run_for, &f)?);
            }
        }
        out.extend(rates);
    }
    Ok(out)
}

/// One agent-side TPM command's latencies.
#[derive(Debug, Clone, PartialEq)]
pub struct OpSamples {
    /// What was timed.
    pub label: &'static str,
    /// Wall time, one per repetition.
    pub samples: Vec<Duration>,
    /// CPU time of this (the calling) thread: the ESAPI side, one per repetition.
    pub cpu: Vec<Duration>,
}

/// The agent's TPM commands one by one through [`TpmDevice`], `reps` times, as the
/// agent half runs them (credential made in software for the AK's Name).
pub fn tpm_ops(tcti: &str, reps: usize) -> Result<Vec<OpSamples>> {
    const LABELS: [&str; 8] = [
        "open (ESAPI context over the swtpm TCTI, flush leaked handles)",
        "EK: `TpmDevice::ek()` (RSA-2048 CreatePrimary, ReadPublic, certificate from NV)",
        "AK: `create_ak` (ECDSA P-256: Create, Load, ReadPublic)",
        "`activate_credential` (HMAC + policy sessions, PolicySecret, ActivateCredential)",
        "`pcr_read_sha256` (PCRs 0–7)",
        "`quote` (PCRs 0–7, 32-byte nonce)",
        "flush AK and EK",
        "P-384 EK: `ek_of(EccP384)` (CreatePrimary, ReadPublic, certificate), not used by default",
    ];
    let mut out: Vec<OpSamples> = LABELS
        .iter()
        .map(|&label| OpSamples {
            label,
            samples: Vec::with_capacity(reps),
            cpu: Vec::with_capacity(reps),
        })
        .collect();
    let pcrs = DEFAULT_PCRS;
    let secret = [0xa5u8; 32];
    let nonce = [0x3cu8; 32];
    for _ in 0..reps.max(1) {
        let mut times = [(Duration::ZERO, Duration::ZERO); LABELS.len()];
        let mut t = (Instant::now(), procfs::thread_cpu_time());
        let mut lap = |i: usize, t: &mut (Instant, Duration)| {
            let cpu = procfs::thread_cpu_time();
            times[i] = (t.0.elapsed(), cpu.saturating_sub(t.1));
            *t = (Instant::now(), cpu);
        };
        let mut dev = TpmDevice::open(tcti)?;
        lap(0, &mut t);
        let ek = dev.ek()?;
        lap(1, &mut t);
        let ak = dev.create_ak(&ek)?;
        lap(2, &mut t);
        let made = make_credential(&ek.public, &ak.name, &secret)?;
        t = (Instant::now(), procfs::thread_cpu_time());
        let got =
            dev.activate_credential(&ak, &ek, &made.credential_blob, &made.encrypted_secret)?;
        lap(3, &mut t);
        if got != secret {
            bail!("ActivateCredential recovered another secret");
        }
        dev.pcr_read_sha256(&pcrs)?;
        lap(4, &mut t);
        dev.quote(&ak, &nonce, &pcrs)?;
        lap(5, &mut t);
        dev.flush_ak(ak)?;
        dev.flush_ek(ek)?;
        lap(6, &mut t);
        let p384 = dev.ek_of(EkAlgorithm::EccP384)?;
        lap(7, &mut t);
        dev.flush_ek(p384)?;
        for (o, (wall, cpu)) in out.iter_mut().zip(times) {
            o.samples.push(wall);
            o.cpu.push(cpu);
        }
    }
    Ok(out)
}

/// TPM2_Sign latency with a P-256 signing primary.
#[derive(Debug, Clone, PartialEq)]
pub struct SignLatency {
    /// CreatePrimary of the unrestricted P-256 ECDSA signing key (owner hierarchy).
    pub create_primary: Duration,
    /// One per signature.
    pub samples: Vec<Duration>,
    /// All the signatures, wall time.
    pub wall: Duration,
    /// The signing thread's CPU time (ESAPI, marshalling, TCP), all signatures.
    pub client_cpu: Duration,
    /// swtpm's CPU time, all signatures.
    pub swtpm_cpu: Duration,
}

impl SignLatency {
    /// Signatures per second, one after the other.
    pub fn rate(&self) -> f64 {
        self.samples.len() as f64 / self.wall.as_secs_f64().max(f64::EPSILON)
    }
}

/// Creates an unrestricted P-256 ECDSA signing primary in the owner hierarchy (as
/// LAB.md §3.2 item 7), then times `n` TPM2_Sign of a SHA-256 digest with a password
/// session (no HMAC session), after a warm-up; the key is flushed on every path.
pub fn sign_latency(tcti: &str, swtpm_pid: u32, n: usize) -> Result<SignLatency> {
    // Flushes whatever an earlier step left loaded (swtpm has three object slots).
    drop(TpmDevice::open(tcti)?);
    let conf = TctiNameConf::from_str(tcti).with_context(|| format!("TCTI {tcti}"))?;
    let mut ctx = Context::new(conf).with_context(|| format!("opening {tcti}"))?;
    let template = create_unrestricted_signing_ecc_public(
        EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)),
        EccCurve::NistP256,
    )?;
    let t = Instant::now();
    let key = ctx
        .execute_with_session(Some(AuthSession::Password), |c| {
            c.create_primary(Hierarchy::Owner, template, None, None, None, None)
        })
        .context("CreatePrimary (P-256 signing key)")?
        .key_handle;
    let create_primary = t.elapsed();
    let signed = sign_loop(&mut ctx, key, swtpm_pid, n);
    let flushed = ctx
        .flush_context(key.into())
        .context("flushing the signing key");
    let mut out = signed?;
    flushed?;
    out.create_primary = create_primary;
    Ok(out)
}

fn sign_loop(ctx: &mut Context, key: KeyHandle, swtpm_pid: u32, n: usize) -> Result<SignLatency> {
    let digest = Digest::try_from(vec![0x42u8; 32])?;
    let ticket = HashcheckTicket::try_from(TPMT_TK_HASHCHECK {
        tag: TPM2_ST_HASHCHECK,
        hierarchy: TPM2_RH_NULL,
        digest: Default::default(),
    })?;
    let sign = |ctx: &mut Context| -> Result<()> {
        let sig = ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.sign(key, digest.clone(), SignatureScheme::Null, ticket.clone())
            })
            .context("TPM2_Sign")?;
        match sig {
            Signature::EcDsa(_) => Ok(()),
            other => bail!("TPM2_Sign returned {:?}, not ECDSA", other.algorithm()),
        }
    };
    for _ in 0..5 {
        sign(ctx)?;
    }
    let mut samples = Vec::with_capacity(n);
    let (cpu0, tpm0) = (procfs::thread_cpu_time(), procfs::cpu_time(swtpm_pid)?);
    let start = Instant::now();
    for _ in 0..n.max(1) {
        let t = Instant::now();
        sign(ctx)?;
        samples.push(t.elapsed());
    }
    Ok(SignLatency {
        create_primary: Duration::ZERO,
        samples,
        wall: start.elapsed(),
        client_cpu: procfs::thread_cpu_time().saturating_sub(cpu0),
        swtpm_cpu: procfs::cpu_time(swtpm_pid)?.saturating_sub(tpm0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_plans_are_smaller() {
        let (q, f) = (TpmPlan::new(true), TpmPlan::new(false));
        assert!(q.attestations < f.attestations && q.per_tpm < f.per_tpm);
        assert!(q.signs < f.signs && q.op_reps < f.op_reps);
        assert_eq!(f.attestations, 50);
        assert_eq!(q.attestations, 10);
        assert_eq!((q.parallel, f.parallel), (2, 2));
    }

    #[test]
    fn cpu_timed_sums_the_cpu_of_every_poll() {
        fn spin(cpu: Duration) {
            let start = procfs::thread_cpu_time();
            let mut x = 0u64;
            while procfs::thread_cpu_time().saturating_sub(start) < cpu {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let ((), cpu) = rt.block_on(CpuTimed::new(async {
            spin(Duration::from_millis(10));
            // Pending here: the rest runs in a second poll.
            tokio::time::sleep(Duration::from_millis(30)).await;
            spin(Duration::from_millis(10));
        }));
        assert!(cpu >= Duration::from_millis(20), "both polls: {cpu:?}");
        assert!(cpu < Duration::from_millis(40), "no sleeping: {cpu:?}");
    }

    #[test]
    fn runs_report_rates_and_cores() {
        let p = Phases {
            begin_cpu: Duration::from_micros(300),
            respond_cpu: Duration::from_micros(200),
            ..Phases::default()
        };
        let run = AttestRun {
            tpms: 2,
            samples: vec![p; 10],
            wall: Duration::from_secs(2),
            process_cpu: Duration::from_millis(400),
            swtpm_cpu: Duration::from_millis(1600),
            idle: Duration::from_millis(1000),
        };
        assert_eq!(run.rate(), 5.0);
        assert_eq!(run.server_cpu_per_attestation(), Duration::from_micros(500));
        assert_eq!(run.swtpm_cpu_per_attestation(), Duration::from_millis(160));
        assert_eq!(run.process_cpu_per_attestation(), Duration::from_millis(40));
        let (ours, idle, others) = run.cores(2);
        assert!((ours - 1.0).abs() < 1e-9 && (idle - 0.5).abs() < 1e-9);
        assert!((others - 0.5).abs() < 1e-9);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn b4_pieces_run_against_swtpm() {
        let lab = Lab::start(2).unwrap();
        let server = Arc::new(lab.server().unwrap());
        let tpms: Vec<&Swtpm> = lab.tpms().iter().collect();
        let c = capture(&server, tpms[0]).await.unwrap();
        assert_eq!(c.ek_algorithm, EkAlgorithm::Rsa2048);
        let run = attest_run(&server, &tpms, 2).await.unwrap();
        assert_eq!((run.tpms, run.samples.len()), (2, 4));
        assert!(run.samples.iter().all(|p| p.total >= p.payload + p.answer));
        assert!(run.samples.iter().all(|p| p.server_cpu() > Duration::ZERO));
        let policy = lab.ek_policy().unwrap();
        let rates =
            tokio::task::spawn_blocking(move || server_rates(&c, &policy, &[1, 2], 1, 0.02))
                .await
                .unwrap()
                .unwrap();
        assert_eq!(rates.len(), 8);
        assert!(
            rates
                .iter()
                .all(|r| r.runs.len() == 1 && r.runs[0].rate > 0.0)
        );
        let tcti = tpms[0].tcti();
        let pid = tpms[0].pid();
        let (ops, sign) = tokio::task::spawn_blocking(move || {
            (
                tpm_ops(&tcti, 1).unwrap(),
                sign_latency(&tcti, pid, 3).unwrap(),
            )
        })
        .await
        .unwrap();
        assert_eq!(ops.len(), 8);
        assert!(ops.iter().all(|o| o.samples.len() == 1));
        assert_eq!(sign.samples.len(), 3);
        assert!(sign.rate() > 0.0);
    }
}
