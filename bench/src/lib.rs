//! The Carapace benchmark harness, run by `scripts/bench.sh` (scenarios B1 to B10; each
//! figure, its goal and its latest value are in BENCHMARKS.md's table). The `carapace-bench`
//! binary (`main.rs`) parses its arguments, picks the [`scenario::Plan`] and runs the
//! scenarios in turn; everything else lives here.
//!
//! The shape: one module per scenario under [`scenario`], each holding its measuring code,
//! its report section and their tests together; below them, shared helpers that know no
//! scenario and import none (no module here imports a scenario module except `scenario`'s
//! own children, and the helpers import only one another):
//!
//! - [`scenario`]: B1–B10 (see its table), and the [`scenario::Plan`] of sizes;
//! - [`process`]: child processes stopped by pid on drop, this executable run again as a
//!   measuring child, `/proc` counters and CPU clocks, the machine's description;
//! - [`harness`]: the real `carapace-server` and `carapace-agent`, started and driven
//!   through their admin API, CLI and logs;
//! - [`node_load`]: this process attested as an agent to the real server, its mTLS node
//!   clients and entries, and measured runs of calls over them (B1, B3, B8);
//! - [`inproc`]: the server's CA in this process and work split over threads, for the
//!   crypto ceilings (B1, B8);
//! - [`pkcs11`]: SoftHSM2's raw signing rate in a child process, and the server's
//!   `[key_manager.pkcs11]` config (B3, B8);
//! - [`attest`]: one timed challenge/response round of a node attestor's two halves
//!   (B5, B7);
//! - [`stats`], [`report`]: percentiles and number formats, and the Markdown report
//!   (pure helpers, unit-tested).
#![forbid(unsafe_code)]

pub mod attest;
pub mod harness;
pub mod inproc;
pub mod node_load;
pub mod pkcs11;
pub mod process;
pub mod report;
pub mod scenario;
pub mod stats;
