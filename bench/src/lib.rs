//! The Carapace benchmark harness, run by `scripts/bench.sh` (see PERFORMANCE.md §5,
//! scenarios S1 and S2, issue 3's B3, issue 4's B4, B5 and B6).
//!
//! - [`crypto`]: the crypto ceiling of X509-SVID issuance, with the server's own functions,
//!   in this process, on 1 thread and on every core;
//! - [`node`]: issuance throughput over the node API of the real `carapace-server`, this
//!   process attesting as an agent with the agent library;
//! - [`workload`]: Workload API first-response latency, agent memory per cached SVID and
//!   entry propagation, against the real `carapace-agent`;
//! - [`hsm`]: B3, issuance with the CA key in a SoftHSM2 token beside the token's raw
//!   signing rate (measured in a child process that has `SOFTHSM2_CONF`);
//! - [`tpm`]: B4, `tpm` node attestation against swtpm in this process (both halves of
//!   the plugin), the server's pieces alone, and the TPM's command and sign latencies;
//! - [`kerberos`]: B5, `kerberos` node attestation against the lab's MIT KDC (both halves
//!   of the plugin, in a child process that has the realm's `KRB5_CONFIG`);
//! - [`workload_attest`]: B6, the agent's workload attestors in process on real callers,
//!   and Workload API connections per second through the real `carapace-agent` (the
//!   clients in a child process, in a unit-like cgroup when this process may make one);
//! - [`attest`]: one timed challenge/response round of a node attestor's two halves
//!   (B5, B7);
//! - [`harness`]: starting and stopping the real binaries (stopped by pid on drop);
//! - [`procfs`], [`stats`], [`report`]: process counters, percentiles and the Markdown
//!   report (pure helpers, unit-tested).
#![forbid(unsafe_code)]

pub mod attest;
pub mod crypto;
pub mod harness;
pub mod hsm;
pub mod kerberos;
pub mod node;
pub mod procfs;
pub mod report;
pub mod stats;
pub mod tpm;
pub mod workload;
pub mod workload_attest;
