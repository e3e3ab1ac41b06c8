//! B4: `tpm` node attestation against swtpm, in this process: the agent half
//! ([`TpmAttestorClient`]: `payload()`, `answer()`) and the server half ([`TpmAttestor`]:
//! `begin()`, `session.respond()`) driven directly, as `attestor-tpm/tests/attestor.rs`
//! does, with an in-memory [`NodeStateStore`] ([`MemoryStateStore`]).
//!
//! - [`Lab::start`]: swtpms, each manufactured by its own lab vendor (carapace-hsm-sim's
//!   [`TpmManufacturer`]: its own EK CA and its own EKs; two copies of one manufactured
//!   state would share their EK, and the server keeps one quote clock per EK), each
//!   "booted" with a typical UEFI event log ([`LogBuilder::typical_uefi`], ~100 records,
//!   extended into its PCRs and written where its agent reads it), and a server
//!   configuration trusting every vendor's root with a measured-boot policy approving that
//!   boot;
//! - [`attest_timed`] / [`attest_run`]: whole attestations, each phase timed (wall time
//!   of the agent's TPM work; wall and thread CPU time of the server's calls, see
//!   [`CpuTimed`]), sequentially on one swtpm or concurrently on several, one server;
//! - [`capture`] and [`server_rates`]: the server's pieces alone on one captured
//!   attestation: quote verification, software MakeCredential for the RSA-2048 and the
//!   P-384 EK, the EK certificate chain (checked, and from the cache), the event log
//!   (parse, replay, policy, selectors);
//! - [`tpm_ops`]: the agent's TPM commands one by one through [`TpmDevice`];
//! - [`sign_latency`]: a raw TPM2_Sign with a P-256 signing primary (stand-in for the
//!   agent key in the TPM, which is not built yet).
//!
//! swtpm is a software TPM on the same CPU as everything else; a discrete TPM takes
//! 100–700 ms per signature or quote.
//!
//! [`run`] runs the parts above, each failing on its own, and [`section`] writes the
//! report's section.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr as _;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

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
use carapace_attestor_tpm::eventlog::policy::{MeasuredBootConfig, MeasuredBootPolicy};
use carapace_attestor_tpm::eventlog::{self, ALG_SHA256};
use carapace_attestor_tpm::server::{DEFAULT_PCRS, TpmAttestor, TpmServerConfig};
use carapace_attestor_tpm::verify::{self, EkPolicy};
use carapace_attestor_tpm::wire::{self, Challenge, Payload, Response};
use carapace_core::plugin::{
    AttestationContext, AttestationStep, MemoryStateStore, NodeAttestor as _,
    NodeAttestorClient as _, PluginContext,
};
use hsm_sim::eventlog::LogBuilder;
use hsm_sim::swtpm::{SWTPM_PACKAGES, Swtpm, TPM2_TOOLS_PACKAGE, TpmManufacturer};

use crate::process::{self, loadavg_now};
use crate::report::{Report, Table, failed};
use crate::stats::{Repeated, Summary, fmt_count, fmt_pct, fmt_secs, fmt_us, lat_cells};

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
        let boot = LogBuilder::typical_uefi(true, BENCH_KERNEL);
        for i in 0..n.max(1) {
            let m = TpmManufacturer::new()
                .with_context(|| format!("manufacturing lab TPM {}", i + 1))
                .context(needs.clone())?;
            let tpm = Swtpm::start(&m)
                .with_context(|| format!("starting swtpm {}", i + 1))
                .context(needs.clone())?;
            boot.extend(&tpm)
                .with_context(|| format!("booting swtpm {} (its PCRs)", i + 1))?;
            std::fs::write(event_log_path(&tpm), boot.to_bytes())
                .with_context(|| format!("writing swtpm {}'s event log", i + 1))?;
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
                measured_boot: Some(measured_boot(&boot)),
                ..TpmServerConfig::default()
            },
        })
    }

    /// The swtpms.
    pub fn tpms(&self) -> &[Swtpm] {
        &self.tpms
    }

    /// The server's `[node_attestor.tpm]` settings: every vendor's root and
    /// intermediate in `ek_ca_files`, PCRs 0–7, no PCR policy, a measured-boot policy
    /// requiring Secure Boot and the typical boot's applications.
    pub fn server_config(&self) -> &TpmServerConfig {
        &self.server_config
    }

    /// A server half with its own empty store.
    pub fn server(&self) -> Result<TpmAttestor> {
        TpmAttestor::new(
            &self.server_config,
            &PluginContext::for_tests("/"),
            Arc::new(MemoryStateStore::default()),
        )
        .context("building the server's TpmAttestor")
    }

    /// What [`server_rates`] needs: the server's EK policy, an empty EK cache, the
    /// measured-boot policy.
    pub fn server_work(&self) -> Result<ServerWork> {
        let measured_boot = self
            .server_config
            .measured_boot
            .as_ref()
            .map(MeasuredBootPolicy::from_config)
            .transpose()?
            .unwrap_or_default();
        Ok(ServerWork {
            ek_policy: self.ek_policy()?,
            ek_cache: verify::EkCache::default(),
            measured_boot,
        })
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
        let before = process::thread_cpu_time();
        let polled = this.fut.as_mut().poll(cx);
        this.cpu += process::thread_cpu_time().saturating_sub(before);
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

/// The kernel every bench swtpm "booted".
const BENCH_KERNEL: &[u8] = b"vmlinuz-6.1.0-bench";

/// Where a bench swtpm's event log is written, and its agent reads it.
fn event_log_path(tpm: &Swtpm) -> std::path::PathBuf {
    tpm.dir().join("binary_bios_measurements")
}

/// The measured-boot policy approving `boot`: Secure Boot on, its boot applications.
fn measured_boot(boot: &LogBuilder) -> MeasuredBootConfig {
    MeasuredBootConfig {
        secure_boot: true,
        boot_applications: Some(
            boot.boot_application_digests()
                .iter()
                .map(hex::encode)
                .collect(),
        ),
        ..MeasuredBootConfig::default()
    }
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
        event_log: Some(event_log_path(tpm)),
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
            .map(|&p| process::cpu_time(p).context("swtpm CPU time"))
            .sum()
    };
    let (cpu0, tpm0, idle0) = (
        process::cpu_time(me)?,
        swtpm_cpu()?,
        process::machine_idle()?,
    );
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
        process_cpu: process::cpu_time(me)?.saturating_sub(cpu0),
        swtpm_cpu: swtpm_cpu()?.saturating_sub(tpm0),
        idle: process::machine_idle()?.saturating_sub(idle0),
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
    /// The quote's qualifying data: the server's nonce bound to the connection
    /// (`wire::qualifying_data`).
    pub nonce: Vec<u8>,
    /// The boot event log the agent sent.
    pub event_log: Vec<u8>,
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
        nonce: wire::qualifying_data(challenge.version, &challenge.nonce, &ctx.tls_exporter),
        event_log: answer.event_log.context("the agent sent no event log")?,
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
    /// `verify::EkCache::verify` with the chain already verified: a TPM attesting again.
    VerifyEkCached,
    /// The event log: parse, replay against the quoted PCRs, the measured-boot policy,
    /// the selectors.
    EventLog,
}

impl ServerOp {
    /// Every operation, in report order.
    pub const ALL: [ServerOp; 6] = [
        ServerOp::VerifyQuote,
        ServerOp::MakeCredentialRsa,
        ServerOp::MakeCredentialP384,
        ServerOp::VerifyEk,
        ServerOp::VerifyEkCached,
        ServerOp::EventLog,
    ];

    /// How the report names it.
    pub fn label(self) -> &'static str {
        match self {
            ServerOp::VerifyQuote => "`verify::verify_quote` (ECDSA P-256 AK, PCRs 0–7)",
            ServerOp::MakeCredentialRsa => "`credential::make_credential`, RSA-2048 EK",
            ServerOp::MakeCredentialP384 => "`credential::make_credential`, P-384 EK",
            ServerOp::VerifyEk => "`verify::verify_ek`, RSA-2048 EK certificate chain",
            ServerOp::VerifyEkCached => "`verify::EkCache::verify`, the same chain again",
            ServerOp::EventLog => {
                "event log: `eventlog::parse`, `check_replay`, policy, selectors (~100 records)"
            }
        }
    }

    fn run(&self, c: &Captured, w: &ServerWork, now: i64) -> Result<()> {
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
                    &w.ek_policy,
                    &c.ek_parsed,
                    Some(&c.ek_cert),
                    &c.ek_intermediates,
                    now,
                )?;
            }
            ServerOp::VerifyEkCached => {
                w.ek_cache.verify(
                    &w.ek_policy,
                    &c.ek_public,
                    &c.ek_parsed,
                    Some(&c.ek_cert),
                    &c.ek_intermediates,
                    now,
                )?;
            }
            ServerOp::EventLog => {
                let log = eventlog::parse(&c.event_log)?;
                log.check_replay(ALG_SHA256, &c.pcr_values)?;
                w.measured_boot.check(&log)?;
                eventlog::policy::selectors(&log, &c.pcrs)?;
            }
        }
        Ok(())
    }
}

/// What the server's pieces need besides the evidence: its EK policy, an EK cache, the
/// measured-boot policy.
#[derive(Debug)]
pub struct ServerWork {
    /// The EK policy.
    pub ek_policy: EkPolicy,
    /// The EK cache [`ServerOp::VerifyEkCached`] reads.
    pub ek_cache: verify::EkCache,
    /// The measured-boot policy.
    pub measured_boot: MeasuredBootPolicy,
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
    let idle0 = process::machine_idle()?;
    let start = Instant::now();
    let deadline = start + run_for;
    let (total, cpu) = std::thread::scope(|s| -> Result<(u64, Duration)> {
        let handles: Vec<_> = (0..threads.max(1))
            .map(|_| {
                s.spawn(|| -> Result<(u64, Duration)> {
                    let cpu0 = process::thread_cpu_time();
                    let mut n = 0;
                    loop {
                        op()?;
                        n += 1;
                        if Instant::now() >= deadline {
                            return Ok((n, process::thread_cpu_time().saturating_sub(cpu0)));
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
    let idle = process::machine_idle()?.saturating_sub(idle0);
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
    work: &ServerWork,
    counts: &[usize],
    runs: usize,
    seconds: f64,
) -> Result<Vec<OpRate>> {
    let now = carapace_core::clock::unix_now();
    let run_for = Duration::from_secs_f64(seconds.clamp(0.01, 600.0));
    let mut out = Vec::new();
    for op in ServerOp::ALL {
        let f = || op.run(c, work, now);
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
        let mut t = (Instant::now(), process::thread_cpu_time());
        let mut lap = |i: usize, t: &mut (Instant, Duration)| {
            let cpu = process::thread_cpu_time();
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
        t = (Instant::now(), process::thread_cpu_time());
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
/// the lab's raw-sign measurement), then times `n` TPM2_Sign of a SHA-256 digest with a password
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
    let (cpu0, tpm0) = (process::thread_cpu_time(), process::cpu_time(swtpm_pid)?);
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
        client_cpu: process::thread_cpu_time().saturating_sub(cpu0),
        swtpm_cpu: process::cpu_time(swtpm_pid)?.saturating_sub(tpm0),
    })
}

/// What B4 measured; each part may have failed on its own.
#[derive(Debug)]
pub struct B4 {
    /// `swtpm --version`.
    swtpm: String,
    /// `/proc/loadavg` when B4 started.
    loadavg: String,
    /// Manufacturing the lab TPMs and starting their swtpms.
    setup: Duration,
    /// The EK the agent attested with, once an attestation was captured.
    ek: Option<String>,
    /// Sequential attestations on one swtpm.
    latency: Result<AttestRun>,
    /// Throughput runs on 1 and `plan.parallel` swtpms.
    throughput: Result<Vec<AttestRun>>,
    /// The server's pieces alone on a captured attestation.
    server: Result<Vec<OpRate>>,
    /// The agent's TPM commands one by one.
    ops: Result<Vec<OpSamples>>,
    /// TPM2_Sign with a P-256 signing primary.
    sign: Result<SignLatency>,
}

impl B4 {
    /// The failed parts, as errors (for the exit status).
    pub fn into_errors(self) -> Vec<anyhow::Error> {
        [
            self.latency.err(),
            self.throughput.err(),
            self.server.err(),
            self.ops.err(),
            self.sign.err(),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

/// The thread counts of B4's server-alone rates: 1 and every core.
fn b4_counts(nproc: usize) -> Vec<usize> {
    if nproc > 1 { vec![1, nproc] } else { vec![1] }
}

/// Runs a blocking B4 step on tokio's blocking pool.
async fn b4_blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| anyhow!("{what}: task failed: {e}"))?
        .with_context(|| what.to_owned())
}

/// B4: lab TPMs and swtpms, one captured attestation, sequential attestations, the
/// throughput runs, the server's pieces alone, the TPM commands one by one, TPM2_Sign.
pub async fn run(plan: &TpmPlan, nproc: usize) -> Result<B4> {
    let swtpm = swtpm_version();
    let loadavg = loadavg_now();
    let parallel = plan.parallel.max(1);
    eprintln!("==> B4: manufacturing {parallel} lab TPMs and starting a swtpm for each");
    let t = Instant::now();
    let lab = b4_blocking("setting up the lab TPMs", move || Lab::start(parallel)).await?;
    let setup = t.elapsed();
    let server = Arc::new(lab.server()?);
    let tpms: Vec<&hsm_sim::swtpm::Swtpm> = lab.tpms().iter().collect();
    let first = *tpms
        .first()
        .ok_or_else(|| anyhow!("no swtpm was started"))?;

    eprintln!("==> B4: capturing one attestation");
    let captured = capture(&server, first)
        .await
        .context("capturing one attestation of swtpm 1");
    let ek = captured
        .as_ref()
        .ok()
        .map(|c| c.ek_algorithm.as_str().to_owned());

    eprintln!(
        "==> B4: {} sequential attestations on one swtpm",
        plan.attestations
    );
    let latency = attest_run(&server, &tpms[..1], plan.attestations).await;

    let mut counts = vec![1];
    if tpms.len() > 1 {
        counts.push(tpms.len());
    }
    eprintln!(
        "==> B4: throughput ({} attestations per swtpm, swtpms {counts:?}, {} runs)",
        plan.per_tpm, plan.runs
    );
    let throughput = async {
        let mut out = Vec::new();
        for _ in 0..plan.runs.max(1) {
            for &k in &counts {
                out.push(
                    attest_run(&server, &tpms[..k], plan.per_tpm)
                        .await
                        .with_context(|| format!("throughput run on {k} swtpm(s)"))?,
                );
            }
        }
        Ok::<_, anyhow::Error>(out)
    }
    .await;

    let threads = b4_counts(nproc);
    eprintln!(
        "==> B4: server alone (threads {threads:?}, {} runs of {} s)",
        plan.rate_runs, plan.rate_seconds
    );
    let server_rates = match (captured, lab.server_work()) {
        (Ok(c), Ok(work)) => {
            let (runs, seconds) = (plan.rate_runs, plan.rate_seconds);
            b4_blocking("server-alone rates", move || {
                server_rates(&c, &work, &threads, runs, seconds)
            })
            .await
        }
        (Err(e), _) => Err(e),
        (_, Err(e)) => Err(e.context("the server's EK policy")),
    };

    eprintln!(
        "==> B4: TPM commands one by one ({} reps) and TPM2_Sign ({} signatures)",
        plan.op_reps, plan.signs
    );
    let (tcti, pid) = (first.tcti(), first.pid());
    let reps = plan.op_reps;
    let ops = b4_blocking("TPM commands one by one", move || tpm_ops(&tcti, reps)).await;
    let (tcti, signs) = (first.tcti(), plan.signs);
    let sign = b4_blocking("TPM2_Sign with a P-256 signing primary", move || {
        sign_latency(&tcti, pid, signs)
    })
    .await;
    Ok(B4 {
        swtpm,
        loadavg,
        setup,
        ek,
        latency,
        throughput,
        server: server_rates,
        ops,
        sign,
    })
}

/// A duration in the report's latency format.
fn dur(d: Duration) -> String {
    fmt_us(d.as_secs_f64() * 1e6)
}

/// One figure of an attestation's phases.
type PhaseOf = fn(&Phases) -> Duration;

fn b4_latency(r: &mut Report, run: &AttestRun, ek: &str) {
    let col = |f: fn(&Phases) -> Duration| -> Vec<Duration> { run.samples.iter().map(f).collect() };
    let mut t = Table::new(["phase", "side", "what", "p50", "p99", "max", "mean"]);
    let rows: [(&str, &str, &str, PhaseOf); 9] = [
        (
            "`payload()`",
            "agent: TPM (wall)",
            "open the TPM, EK CreatePrimary + certificate from NV, AK Create + Load",
            |p| p.payload,
        ),
        ("`begin()`", "server (wall)", "", |p| p.begin),
        (
            "`begin()`",
            "server: **CPU**",
            "EK certificate chain, AK checks, software MakeCredential",
            |p| p.begin_cpu,
        ),
        (
            "`answer()`",
            "agent: TPM (wall)",
            "ActivateCredential, PCR_Read (before and after), Quote, flushes",
            |p| p.answer,
        ),
        ("`respond()`", "server (wall)", "", |p| p.respond),
        (
            "`respond()`",
            "server: **CPU**",
            "credential check, quote verification, clock check, store, selectors",
            |p| p.respond_cpu,
        ),
        (
            "agent total",
            "agent: TPM (wall)",
            "`payload()` + `answer()`",
            |p| p.payload + p.answer,
        ),
        (
            "server total",
            "server: **CPU**",
            "`begin()` + `respond()`",
            Phases::server_cpu,
        ),
        (
            "**whole attestation**",
            "wall",
            "payload → begin → answer → respond",
            |p| p.total,
        ),
    ];
    for (phase, side, what, f) in rows {
        let [p50, p99, max, mean] = lat_cells(&col(f));
        t.row([
            phase.to_owned(),
            side.to_owned(),
            what.to_owned(),
            p50,
            p99,
            max,
            mean,
        ]);
    }
    r.table(&t);
    let n = run.samples.len();
    let total: Duration = col(|p| p.total).iter().sum();
    let agent: Duration = col(|p| p.payload + p.answer).iter().sum();
    let server_wall: Duration = col(|p| p.begin + p.respond).iter().sum();
    let share = |d: Duration| fmt_pct(d.as_secs_f64() / total.as_secs_f64().max(f64::EPSILON));
    r.bullet(&format!(
        "{n} attestations one after the other in {} = **{:.1} attestations/s on one swtpm** ({ek} EK). Of the wall time, the agent's TPM work took {} and the server's calls {}.{}",
        fmt_secs(run.wall),
        run.rate(),
        share(agent),
        share(server_wall),
        if n < 100 {
            format!(" (p99 of {n} samples is the nearest rank: the maximum.)")
        } else {
            String::new()
        }
    ));
    let server_cpu = run.server_cpu_per_attestation();
    r.bullet(&format!(
        "CPU per attestation (averages over the run, /proc ticks of 10 ms): swtpm {}; this process {} — of which the server's calls {}, the rest the agent half's ESAPI side (marshalling, TCP to swtpm, HMAC and policy sessions in OpenSSL) and the runtime.",
        dur(run.swtpm_cpu_per_attestation()),
        dur(run.process_cpu_per_attestation()),
        dur(server_cpu),
    ));
}

fn b4_throughput(r: &mut Report, runs: &[AttestRun], plan: &TpmPlan, nproc: usize) {
    let mut counts: Vec<usize> = runs.iter().map(|x| x.tpms).collect();
    counts.sort_unstable();
    counts.dedup();
    let mut t = Table::new([
        "swtpms (one agent client each)",
        "attestations per run",
        "attestations/s: median (range, runs)",
        "latency p50",
        "p99",
        "server CPU-µs per attestation",
        "swtpm CPU per attestation",
        "this process CPU per attestation",
        "cores: swtpms + this process / idle / others (median)",
    ]);
    let mut medians = Vec::new();
    for &k in &counts {
        let of_k: Vec<&AttestRun> = runs.iter().filter(|x| x.tpms == k).collect();
        let med = |v: Vec<f64>| Repeated::of(&v).map_or(f64::NAN, |r| r.median);
        let rates = Repeated::of(&of_k.iter().map(|x| x.rate()).collect::<Vec<_>>());
        let lats: Vec<Duration> = of_k
            .iter()
            .flat_map(|x| x.samples.iter().map(|p| p.total))
            .collect();
        let [p50, p99, _, _] = lat_cells(&lats);
        let cores: Vec<(f64, f64, f64)> = of_k.iter().map(|x| x.cores(nproc)).collect();
        if let Some(r) = rates {
            medians.push((k, r.median));
        }
        t.row([
            k.to_string(),
            (k * plan.per_tpm).to_string(),
            rates
                .map(|r| {
                    format!(
                        "{:.1}{}",
                        r.median,
                        if r.runs > 1 {
                            format!(" ({:.1}–{:.1}, {} runs)", r.min, r.max, r.runs)
                        } else {
                            String::new()
                        }
                    )
                })
                .unwrap_or_default(),
            p50,
            p99,
            format!(
                "{:.0}",
                med(of_k
                    .iter()
                    .map(|x| x.server_cpu_per_attestation().as_secs_f64() * 1e6)
                    .collect())
            ),
            fmt_us(med(of_k
                .iter()
                .map(|x| x.swtpm_cpu_per_attestation().as_secs_f64() * 1e6)
                .collect())),
            fmt_us(med(of_k
                .iter()
                .map(|x| x.process_cpu_per_attestation().as_secs_f64() * 1e6)
                .collect())),
            format!(
                "{:.2} / {:.2} / {:.2}",
                med(cores.iter().map(|c| c.0).collect()),
                med(cores.iter().map(|c| c.1).collect()),
                med(cores.iter().map(|c| c.2).collect())
            ),
        ]);
    }
    r.table(&t);
    if let (Some(&(_, one)), Some(&(k, many))) = (medians.first(), medians.last())
        && k > 1
    {
        let of = |tpms: usize, f: &dyn Fn(&AttestRun) -> f64| {
            let v: Vec<f64> = runs.iter().filter(|x| x.tpms == tpms).map(f).collect();
            Repeated::of(&v).map_or(f64::NAN, |r| r.median)
        };
        // CPU per attestation, swtpms + this process, µs.
        let cpu = |x: &AttestRun| {
            (x.swtpm_cpu_per_attestation() + x.process_cpu_per_attestation()).as_secs_f64() * 1e6
        };
        let (c1, ck) = (of(1, &cpu), of(k, &cpu));
        let (idle, others) = (of(k, &|x| x.cores(nproc).1), of(k, &|x| x.cores(nproc).2));
        let ceiling = nproc as f64 * 1e6 / ck;
        let rise = if ck > 1.15 * c1 {
            format!(
                " — each attestation cost {} more CPU with {k} swtpms running (vCPUs sharing a physical core on the host, or caches)",
                fmt_pct(ck / c1 - 1.0)
            )
        } else {
            String::new()
        };
        let why = if idle < 0.25 * nproc as f64 {
            "The cores were busy: each swtpm is one single-threaded process doing its key operations in software on the same cores as the other swtpm, the agent clients' ESAPI work and the server."
        } else {
            "The rest is waiting: each swtpm executes one command at a time, and every agent command is a round trip to it and back through the ESAPI."
        };
        let mut text = format!(
            "{k} swtpms attest {:.2}× as fast as one (ideal {k}×): {many:.1} vs {one:.1} attestations/s. CPU per attestation (swtpms + this process): {} with one swtpm, {} with {k}{rise}. At that cost {nproc} cores allow at most {ceiling:.1} attestations/s; {k} swtpms reached {} of it, with {idle:.2} cores idle on average. {why} With discrete TPMs each agent's TPM works on its own chip and only the server's CPU (column \"server CPU-µs\") is shared.",
            many / one,
            fmt_us(c1),
            fmt_us(ck),
            fmt_pct(many / ceiling),
        );
        if others > 0.3 {
            text.push_str(&format!(
                " Other processes held {others:.2} cores on average meanwhile: rerun on a quiet machine for the scaling."
            ));
        }
        r.bullet(&text);
    }
}

fn b4_server(r: &mut Report, rates: &[OpRate], latency: Option<&AttestRun>, nproc: usize) {
    let mut t = Table::new([
        "operation",
        "threads",
        "operations/s: median (range, runs)",
        "CPU-µs per operation (median; threads' CPU clocks)",
    ]);
    for x in rates {
        t.row([
            x.op.label().to_owned(),
            x.threads.to_string(),
            Repeated::of(&x.rates())
                .map(|r| r.fmt_count())
                .unwrap_or_default(),
            Repeated::of(&x.cpu())
                .map(|c| format!("{:.0}", c.median))
                .unwrap_or_default(),
        ]);
    }
    r.table(&t);
    // CPU-µs per operation on one thread.
    let one = |op: ServerOp| {
        rates
            .iter()
            .find(|x| x.op == op && x.threads == 1)
            .and_then(|x| Repeated::of(&x.cpu()))
            .map(|r| r.median)
    };
    let (vq, mc_rsa, mc_p384, vek, log) = (
        one(ServerOp::VerifyQuote),
        one(ServerOp::MakeCredentialRsa),
        one(ServerOp::MakeCredentialP384),
        one(ServerOp::VerifyEkCached),
        one(ServerOp::EventLog),
    );
    if let (Some(run), Some(vq), Some(mc), Some(vek), Some(log)) = (latency, vq, mc_rsa, vek, log) {
        let med = |f: PhaseOf| {
            Summary::of_durations_us(&run.samples.iter().map(f).collect::<Vec<_>>())
                .map_or(f64::NAN, |s| s.p50)
        };
        let (begin, respond, both) = (
            med(|p| p.begin_cpu),
            med(|p| p.respond_cpu),
            med(Phases::server_cpu),
        );
        r.bullet(&format!(
            "**Server CPU per attestation** (`begin()` + `respond()`, median of the sequential run, the TPM attesting again as at every renewal): **{}** — `begin()` {} (EK chain from the cache ~{}, MakeCredential RSA-2048 ~{} by the 1-thread CPU above; the rest: JSON and TPMT_PUBLIC parsing, AK checks, Name, randomness), `respond()` {} (quote verification ~{}, event log ~{}; the rest: JSON, PCR values, clock record, selectors). Each piece costs more here than in its loop above: between two server calls the agent's TPM work (swtpm, ESAPI) runs on the same two cores and the server's code and data come back cold. At that cost one core serves ~{} attestations/s and {nproc} cores ~{}: far above what the TPMs deliver ({:.1}/s per swtpm here, a few per second or less per discrete TPM), so the server is not the bound of node attestation.",
            fmt_us(both),
            fmt_us(begin),
            fmt_us(vek),
            fmt_us(mc),
            fmt_us(respond),
            fmt_us(vq),
            fmt_us(log),
            fmt_count(1e6 / both),
            fmt_count(nproc as f64 * 1e6 / both),
            run.rate(),
        ));
    }
    if let (Some(rsa), Some(p384)) = (mc_rsa, mc_p384) {
        r.bullet(&format!(
            "MakeCredential for a P-384 EK costs {} against {} for the RSA-2048 EK ({:.1}×): an ephemeral P-384 key, ECDH and KDFe (SHA-384) instead of one RSA-OAEP encryption with the EK's public key.",
            fmt_us(p384),
            fmt_us(rsa),
            p384 / rsa
        ));
    }
}

fn b4_ops(r: &mut Report, ops: &[OpSamples], latency: Option<&AttestRun>) {
    let mut t = Table::new([
        "TPM command(s)",
        "samples",
        "p50",
        "p99",
        "max",
        "client CPU (ESAPI, this thread), median",
    ]);
    for o in ops {
        let [p50, p99, max, _] = lat_cells(&o.samples);
        t.row([
            o.label.to_owned(),
            o.samples.len().to_string(),
            p50,
            p99,
            max,
            Summary::of_durations_us(&o.cpu)
                .map(|s| fmt_us(s.p50))
                .unwrap_or_default(),
        ]);
    }
    r.table(&t);
    let p50 = |o: &OpSamples| Summary::of_durations_us(&o.samples).map_or(0.0, |s| s.p50);
    // Every command but the P-384 EK, which the agent half does not use.
    let used: Vec<&OpSamples> = ops
        .iter()
        .filter(|o| !o.label.starts_with("P-384"))
        .collect();
    let sum: f64 = used.iter().map(|o| p50(o)).sum();
    if let Some(run) = latency
        && let Some(agent) = Summary::of_durations_us(
            &run.samples
                .iter()
                .map(|p| p.payload + p.answer)
                .collect::<Vec<_>>(),
        )
    {
        r.bullet(&format!(
            "Sum of the p50s above (without the P-384 EK): {}; the agent half's `payload()` + `answer()` p50 in the sequential run: {} (it also reads the PCRs a second time to detect a race with the quote).",
            fmt_us(sum),
            fmt_us(agent.p50),
        ));
    }
    let cpu_p50 = |o: &OpSamples| Summary::of_durations_us(&o.cpu).map_or(0.0, |s| s.p50);
    let cpu_sum: f64 = used.iter().map(|o| cpu_p50(o)).sum();
    if let Some(top) = used.iter().max_by(|a, b| cpu_p50(a).total_cmp(&cpu_p50(b)))
        && sum > 0.0
    {
        let why = if top.label.starts_with("AK") {
            ": tss-esapi's `ak::create_ak_2` and `ak::load_ak` each start a policy session and run PolicySecret(endorsement) in a null-auth HMAC session, and the lab measured ~5 ms of client CPU per such session (OpenSSL 3 name and provider lookups)"
        } else {
            ""
        };
        r.bullet(&format!(
            "Client-side CPU (this process's ESAPI work, not the TPM's): {} of the {} above ({}); the most in {} ({} of {} wall){why}. On a discrete TPM this CPU is small beside the TPM's own time, but it is CPU the agent's host spends per attestation.",
            fmt_us(cpu_sum),
            fmt_us(sum),
            fmt_pct(cpu_sum / sum),
            top.label,
            fmt_us(cpu_p50(top)),
            fmt_us(p50(top)),
        ));
    }
}

fn b4_sign(r: &mut Report, s: &SignLatency) {
    let n = s.samples.len().max(1) as f64;
    let mut t = Table::new([
        "signatures",
        "p50",
        "p99",
        "max",
        "signatures/s (one after the other)",
        "client CPU-µs per signature (ESAPI, this thread)",
        "swtpm CPU-µs per signature",
        "CreatePrimary of the key",
    ]);
    let [p50, p99, max, _] = lat_cells(&s.samples);
    t.row([
        s.samples.len().to_string(),
        p50,
        p99,
        max,
        fmt_count(s.rate()),
        format!("{:.0}", s.client_cpu.as_secs_f64() * 1e6 / n),
        format!("{:.0}", s.swtpm_cpu.as_secs_f64() * 1e6 / n),
        dur(s.create_primary),
    ]);
    r.table(&t);
    r.bullet("Real TPMs take 100–700 ms per signature or quote (vendor data sheets): the figure above is swtpm's software ECDSA on this CPU plus a loopback TCP round trip, two to three orders of magnitude faster than a discrete TPM. The agent's TPM key should therefore sign attestation, CSRs and TLS handshakes to the server only, never anything per workload request.");
}

/// B4's report.
pub fn section(r: &mut Report, b4: &B4, plan: &TpmPlan, nproc: usize) {
    let ek = b4
        .ek
        .as_deref()
        .unwrap_or("unknown (no attestation was captured)");
    r.para(&format!(
        "{} (libtpms) on loopback TCP, started by carapace-hsm-sim: {} lab TPM(s), each manufactured by its own lab vendor (`TpmManufacturer`: its own EK CA, RSA-2048 and P-384 EKs with certificates in NV) and served by its own swtpm; setup took {}. Both halves of the `tpm` plugin run in this process, as in `attestor-tpm/tests/attestor.rs`: the agent half `TpmAttestorClient` (`payload()`, `answer()`; its TPM work runs on tokio's blocking threads over the `swtpm:` TCTI) and one server half `TpmAttestor` (`begin()`, `session.respond()`) with `ek_ca_files` = every vendor's root and intermediate, PCRs 0–7, no PCR policy, a `measured_boot` policy (Secure Boot, the boot's shim, grub and kernel approved), and an in-memory `NodeStateStore`; no gRPC between them. Every swtpm first \"boots\" a typical UEFI event log (`LogBuilder::typical_uefi`: 108 records, 16 KB), extended into its PCRs, which its agent sends with every quote. The agent attests with the EK `TpmDevice::ek()` picks: **{ek}**. Load average when B4 started: {}.",
        b4.swtpm,
        plan.parallel.max(1),
        fmt_secs(b4.setup),
        b4.loadavg,
    ));
    r.para("**swtpm is a software TPM on the same CPU as everything else here.** Its key operations are libtpms software crypto: a signature or quote takes about a millisecond below, where a discrete TPM takes 100–700 ms (vendor data sheets). On real hardware the agent-side (TPM) figures grow many-fold — a quote alone by two to three orders of magnitude — while the server-side CPU figures stay as measured.");
    r.para("The RSA-2048 EK is re-derived by CreatePrimary in every attestation, and a TPM derives a primary RSA key's primes from its hierarchy seed: the prime search, hence the EK's time, depends on the seed. Every run manufactures new TPMs (and swtpm 2 has other seeds than swtpm 1), so the agent-side figures move from run to run even on a quiet machine: compare figures within one run.");

    r.heading(
        3,
        &format!("Whole attestation, sequential (one swtpm, {ek} EK)"),
    );
    r.para(&format!(
        "{} attestations one after the other with one agent client on swtpm 1, after one untimed warm-up; each phase timed. Agent calls: wall time (TPM commands, the ESAPI work in this process, the hop to a blocking thread). Server calls: wall time and CPU time (`CLOCK_THREAD_CPUTIME_ID` around every poll of the call's future, so exactly the server's work).",
        plan.attestations
    ));
    match &b4.latency {
        Ok(run) => b4_latency(r, run, ek),
        Err(e) => failed(r, "sequential attestations", e),
    }

    r.heading(
        3,
        &format!(
            "Attestations per second: one swtpm and {} in parallel, one server",
            plan.parallel.max(1)
        ),
    );
    r.para(&format!(
        "Each run: one untimed warm-up attestation per swtpm, then {} attestations per swtpm, each swtpm with its own agent client attesting one after the other in its own tokio task, all against the same `TpmAttestor` and store. {} run(s) per swtpm count, alternating. Latency: the whole attestation. CPU: /proc/<pid>/stat of this process and of the swtpm processes (10 ms ticks); cores: average cores used by the swtpms and this process / idle (`/proc/stat`) / taken by other processes or hypervisor steal, out of {nproc}.",
        plan.per_tpm, plan.runs
    ));
    match &b4.throughput {
        Ok(runs) => b4_throughput(r, runs, plan, nproc),
        Err(e) => failed(r, "attestation throughput", e),
    }

    r.heading(3, "Server alone, on one captured attestation");
    r.para(&format!(
        "One attestation of swtpm 1 captured from its messages (the server accepted it), then each piece of the server's work run in a loop on std threads, {} s per run, {} run(s) per thread count, alternating, after a warm-up. MakeCredential: a 32-byte secret for the captured AK's Name; the P-384 EK's public area comes from `TpmDevice::ek_of(EkAlgorithm::EccP384)` on the same TPM (swtpm's ECC EK; `ek()` picks it when a TPM has no RSA EK certificate). `verify_ek` with the server's policy (roots and intermediates of both lab vendors). CPU: the measuring threads' `CLOCK_THREAD_CPUTIME_ID`.",
        plan.rate_seconds, plan.rate_runs
    ));
    match &b4.server {
        Ok(rates) => b4_server(r, rates, b4.latency.as_ref().ok(), nproc),
        Err(e) => failed(r, "server-alone rates", e),
    }

    r.heading(3, "Agent side: the TPM commands one by one (swtpm 1)");
    r.para(&format!(
        "{} repetitions of what the agent half does, through `TpmDevice` (carapace-attestor-tpm) on a fresh ESAPI context each time; MakeCredential runs in software between the AK and the activation, untimed.",
        plan.op_reps
    ));
    match &b4.ops {
        Ok(ops) => b4_ops(r, ops, b4.latency.as_ref().ok()),
        Err(e) => failed(r, "TPM commands one by one", e),
    }

    r.heading(
        3,
        "TPM sign latency (stand-in for the agent key in the TPM)",
    );
    r.para("The agent key plugin (the agent's own key in the TPM) is not built yet, so its sign latency is not measured; instead, a raw TPM2_Sign as the lab measured it, with tss-esapi directly on swtpm 1: CreatePrimary of an unrestricted ECDSA P-256 signing key in the owner hierarchy, then `sign` of a SHA-256 digest with `AuthSession::Password` (no HMAC session: the lab measured those ~10× slower), one after the other after 5 warm-up signatures; the key is flushed at the end.");
    match &b4.sign {
        Ok(s) => b4_sign(r, s),
        Err(e) => failed(r, "TPM2_Sign latency", e),
    }
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
            let start = process::thread_cpu_time();
            let mut x = 0u64;
            while process::thread_cpu_time().saturating_sub(start) < cpu {
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
        let work = lab.server_work().unwrap();
        let rates = tokio::task::spawn_blocking(move || server_rates(&c, &work, &[1, 2], 1, 0.02))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rates.len(), 12);
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

    fn sample_run(tpms: usize, n: usize, ms: u64) -> AttestRun {
        let p = Phases {
            payload: Duration::from_millis(ms * 9 / 10),
            begin: Duration::from_micros(450),
            begin_cpu: Duration::from_micros(440),
            answer: Duration::from_millis(ms / 10),
            respond: Duration::from_micros(350),
            respond_cpu: Duration::from_micros(340),
            total: Duration::from_millis(ms) + Duration::from_micros(800),
        };
        let wall = Duration::from_millis(ms * n as u64 / tpms as u64);
        AttestRun {
            tpms,
            samples: vec![p; n],
            wall,
            process_cpu: wall / 4,
            swtpm_cpu: wall / 2,
            idle: wall / 5,
        }
    }

    fn rate(op: ServerOp, threads: usize, rate: f64) -> OpRate {
        OpRate {
            op,
            threads,
            runs: vec![RateRun {
                rate,
                cpu_us_per_op: threads as f64 * 1e6 / rate,
                idle_cores: 0.0,
            }],
        }
    }

    #[test]
    fn b4_report_splits_the_attestation_and_names_real_tpm_latency() {
        let b4 = B4 {
            swtpm: "TPM emulator version 0.7.1".into(),
            loadavg: "0.10 0.20 0.30".into(),
            setup: Duration::from_secs(2),
            ek: Some("rsa2048".into()),
            latency: Ok(sample_run(1, 50, 100)),
            throughput: Ok(vec![sample_run(1, 20, 100), sample_run(2, 40, 140)]),
            server: Ok(ServerOp::ALL
                .iter()
                .flat_map(|&op| [rate(op, 1, 4_000.0), rate(op, 2, 7_000.0)])
                .collect()),
            ops: Ok(vec![OpSamples {
                label: "open",
                samples: vec![Duration::from_millis(2); 3],
                cpu: vec![Duration::from_micros(300); 3],
            }]),
            sign: Ok(SignLatency {
                create_primary: Duration::from_millis(2),
                samples: vec![Duration::from_micros(600); 100],
                wall: Duration::from_millis(60),
                client_cpu: Duration::from_millis(7),
                swtpm_cpu: Duration::from_millis(50),
            }),
        };
        let plan = TpmPlan::new(false);
        let mut r = Report::new();
        section(&mut r, &b4, &plan, 2);
        let text = r.finish();
        assert!(text.contains("**rsa2048**"), "{text}");
        assert!(text.contains("| `begin()` | server: **CPU** |"), "{text}");
        assert!(
            text.contains("| server total | server: **CPU** | `begin()` + `respond()` | 780 µs |"),
            "{text}"
        );
        assert!(
            text.contains("**10.0 attestations/s on one swtpm** (rsa2048 EK)"),
            "{text}"
        );
        assert!(
            text.contains("2 swtpms attest 1.43× as fast as one (ideal 2×)"),
            "{text}"
        );
        assert!(text.contains("**Server CPU per attestation**"), "{text}");
        assert!(text.contains("100–700 ms"), "{text}");
        assert!(
            text.contains("| 100 | 600 µs | 600 µs | 600 µs | 1,667 | 70 | 500 | 2.00 ms |"),
            "{text}"
        );
        assert!(!text.contains("FAILED"), "{text}");
        assert!(b4.into_errors().is_empty());

        let missing = B4 {
            swtpm: "swtpm (version unknown)".into(),
            loadavg: "1.00 1.00 1.00".into(),
            setup: Duration::ZERO,
            ek: None,
            latency: Err(anyhow!("no swtpm")),
            throughput: Err(anyhow!("no swtpm")),
            server: Err(anyhow!("capturing one attestation of swtpm 1")),
            ops: Err(anyhow!("no swtpm")),
            sign: Err(anyhow!("no swtpm")),
        };
        let mut r = Report::new();
        section(&mut r, &missing, &plan, 2);
        let text = r.finish();
        assert!(
            text.contains("**sequential attestations FAILED:**"),
            "{text}"
        );
        assert!(text.contains("**TPM2_Sign latency FAILED:**"), "{text}");
        assert_eq!(missing.into_errors().len(), 5);
    }

    #[test]
    fn b4_without_swtpm_fails_with_the_install_line() {
        let e = anyhow!("swtpm_setup not found").context(install_hint());
        let mut r = Report::new();
        failed(&mut r, "B4 (TPM node attestation against swtpm)", &e);
        let text = r.finish();
        assert!(
            text.contains("**B4 (TPM node attestation against swtpm) FAILED:**"),
            "{text}"
        );
        assert!(
            text.contains("apt-get install -y swtpm swtpm-tools tpm2-tools"),
            "{text}"
        );
        assert_eq!(b4_counts(1), vec![1]);
        assert_eq!(b4_counts(4), vec![1, 4]);
    }
}
