//! The benchmark scenarios, one module each, named after what it measures. A scenario's
//! module holds all of it: the sizes it runs at, the measuring code (servers and agents
//! started, calls timed, children run), the section it writes into the report, and the
//! tests of both. `main.rs` only chooses the plan and calls each scenario in turn.
//!
//! | scenario | module | what it measures |
//! |---|---|---|
//! | B1 (S1) | [`issuance`] | X509-SVID issuance: the crypto ceiling with the server's own functions, and `BatchNewX509SVID` over the node API of the real `carapace-server` |
//! | B2 (S2) | [`workload_api`] | Workload API first-response latency, agent memory per cached SVID and entry propagation, against the real `carapace-agent` |
//! | B3 | [`issuance_hsm`] | issuance with the CA key in a SoftHSM2 token, beside the token's raw signing rate |
//! | B4 | [`attest_tpm`] | `tpm` node attestation against swtpm, both plugin halves in process |
//! | B5 | [`attest_kerberos`] | `kerberos` node attestation against the lab's MIT KDC, both halves in a child process |
//! | B6 | [`workload_attest`] | the agent's workload attestors on real callers, and Workload API connections per second |
//! | B7 | [`attest_cloud_ssh`] | the server's cost per `sshpop`, `aws_iid`, `gcp_iit` and `azure_msi` attestation |
//! | B8 (S7) | [`jwt_mint`] | JWT-SVID mint: the signing ceiling in process, `NewJWTSVID` over the node API with a software key and with the key in SoftHSM2 beside its raw rate, and the agent's `FetchJWTSVID` cached and uncached |
//! | B9 | [`ha_propagation`] | propagation across servers: two real servers on one real PostgreSQL, an entry created on one reaching a workload of an agent on the other (p50/p99/max, and where the time goes from the logs) |
//! | B10 (S5) | [`rotation_storm`] | a rotation storm: one agent holding 10,000 SVIDs renews them all after `localauthority x509 taint` of the old CA (time until the workload holds them all, CPU) |
//! | B11 (S4) | [`scale`] | a trust domain of 1,000,000 entries over 10,000 agents on SQLite and PostgreSQL: creation through `entry create --data`, server RSS per entry, restart to serving, per-agent `SyncAuthorized` latency |
//! | B12 | [`sds`] | Envoy's SDS on the agent: `StreamSecrets` first response on new streams (new and reused connections), and the real Envoy serving a rotated certificate, timed from the agent's cache update (its log) to `/certs` |
//! | B13 | [`federation`] | federation: a bundle change on one trust domain's server reaching a federated workload of another (two servers, an agent), and 500 relationships on one server (refresh CPU, an agent entitled to all of them) |
//! | B14 | [`nested`] | nested servers: `sign_downstream_ca` latency in process (software key and SoftHSM2), `localauthority x509 prepare` on a downstream server through the root, and the downstream's `BatchNewX509SVID` rate beside the root's in the same run |
//! | B15 | [`agent_floor`] | the agent's Workload API beside the floor (a bare tonic server answering a cached `FetchX509SVID` message): first response with 1 and `nproc` clients, new connections per second, cached `FetchJWTSVID` and SDS first responses, idle RSS, RSS per cached SVID and after a burst of 2,000 open streams (issue 22) |
//!
//! Each module has the shape of B7's: `run` measures and returns the figures (each part a
//! `Result` of its own where parts can fail apart), and `section` writes them into the
//! [`Report`](crate::report::Report). B1 has two parts, each with its own section: the
//! crypto ceiling ([`issuance::measure`], [`issuance::ceiling_section`]) and the node API
//! ([`issuance::run`], [`issuance::node_section`]). What scenarios share comes from the
//! crate's other modules (the node API load of B1, B3 and B8 from `node_load`, the
//! in-process CA from `inproc`, SoftHSM2 from `pkcs11`), never from one another, except
//! that B3 drives B1's node API run with the CA key in the token, and B14 drives B1's
//! runs on a root and a downstream server.

use crate::scenario::agent_floor::B15Plan;
use crate::scenario::attest_cloud_ssh::B7Plan;
use crate::scenario::attest_kerberos::KrbPlan;
use crate::scenario::attest_tpm::TpmPlan;
use crate::scenario::federation::B13Plan;
use crate::scenario::ha_propagation::B9Plan;
use crate::scenario::issuance::NodeConfig;
use crate::scenario::jwt_mint::JwtPlan;
use crate::scenario::nested::B14Plan;
use crate::scenario::rotation_storm::B10Plan;
use crate::scenario::scale::B11Plan;
use crate::scenario::sds::B12Plan;
use crate::scenario::workload_api::WorkloadConfig;
use crate::scenario::workload_attest::AttestPlan;

pub mod agent_floor;
pub mod attest_cloud_ssh;
pub mod attest_kerberos;
pub mod attest_tpm;
pub mod federation;
pub mod ha_propagation;
pub mod issuance;
pub mod issuance_hsm;
pub mod jwt_mint;
pub mod nested;
pub mod rotation_storm;
pub mod scale;
pub mod sds;
pub mod workload_api;
pub mod workload_attest;

/// Sizes of one benchmark run: every scenario's, quick or full.
#[derive(Debug, Clone)]
pub struct Plan {
    /// B1 and B3: P-256 CSRs generated up front and sent over the node API.
    pub csrs: usize,
    /// B1: runs of the crypto ceiling per thread count.
    pub ceiling_runs: usize,
    /// B1 and B3: the node API runs.
    pub node: NodeConfig,
    /// B2's sizes.
    pub workload: WorkloadConfig,
    /// B3: runs of the raw token rate per thread count, and seconds per run (B3's node
    /// API runs use `node`, like B1).
    pub raw_runs: usize,
    /// See [`Plan::raw_runs`].
    pub raw_seconds: f64,
    /// B4's sizes.
    pub tpm: TpmPlan,
    /// B5's sizes.
    pub krb: KrbPlan,
    /// B6's sizes.
    pub attest: AttestPlan,
    /// B7's sizes.
    pub b7: B7Plan,
    /// B8's sizes.
    pub jwt: JwtPlan,
    /// B9's sizes.
    pub b9: B9Plan,
    /// B10's sizes.
    pub b10: B10Plan,
    /// B11's sizes.
    pub b11: B11Plan,
    /// B12's sizes.
    pub b12: B12Plan,
    /// B13's sizes.
    pub b13: B13Plan,
    /// B14's sizes.
    pub b14: B14Plan,
    /// B15's sizes.
    pub b15: B15Plan,
}

impl Plan {
    /// The reduced sizes of a smoke run (`--quick`), or the full ones.
    pub fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                csrs: 2_000,
                ceiling_runs: 1,
                node: NodeConfig {
                    entries: 200,
                    svids_per_run: 2_000,
                    batch: 500,
                    runs: 1,
                    connections: vec![1, 2],
                },
                workload: WorkloadConfig {
                    levels: vec![(1, 50), (100, 3)],
                    fetches_with_bulk: 50,
                    bulk_entries: 200,
                    new_entry_reps: 3,
                },
                raw_runs: 1,
                raw_seconds: 0.5,
                tpm: TpmPlan::new(true),
                krb: KrbPlan::new(true),
                attest: AttestPlan::new(true),
                b7: B7Plan::new(true),
                jwt: JwtPlan::new(true),
                b9: B9Plan::new(true),
                b10: B10Plan::new(true),
                b11: B11Plan::new(true),
                b12: B12Plan::new(true),
                b13: B13Plan::new(true),
                b14: B14Plan::new(true),
                b15: B15Plan::new(true),
            }
        } else {
            Plan {
                csrs: 10_000,
                ceiling_runs: 3,
                node: NodeConfig {
                    entries: 1_000,
                    svids_per_run: 10_000,
                    batch: 500,
                    runs: 3,
                    connections: vec![1, 2],
                },
                workload: WorkloadConfig {
                    levels: vec![(1, 200), (100, 10), (1_000, 3)],
                    fetches_with_bulk: 200,
                    bulk_entries: 1_000,
                    new_entry_reps: 10,
                },
                raw_runs: 3,
                raw_seconds: 2.0,
                tpm: TpmPlan::new(false),
                krb: KrbPlan::new(false),
                attest: AttestPlan::new(false),
                b7: B7Plan::new(false),
                jwt: JwtPlan::new(false),
                b9: B9Plan::new(false),
                b10: B10Plan::new(false),
                b11: B11Plan::new(false),
                b12: B12Plan::new(false),
                b13: B13Plan::new(false),
                b14: B14Plan::new(false),
                b15: B15Plan::new(false),
            }
        }
    }
}
