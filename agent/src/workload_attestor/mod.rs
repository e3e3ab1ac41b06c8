//! The agent's built-in workload attestors: plugins that turn the kernel-identified
//! caller of a Workload API request ([`Caller`]: pid, uid and gid from `SO_PEERCRED`)
//! into selectors (`unix:uid:1000`, `cgroups:container_id:<id>`, ...). The Workload API
//! ([`crate::workload_api`]) runs every configured attestor on each request, unions their
//! selectors and matches them against the registration entries in the cache; it knows
//! them only as [`WorkloadAttestor`]s, and the catalog ([`crate::catalog`]) builds them
//! from `[workload_attestor.<name>]`.
//!
//! | config name | module | selectors |
//! |---|---|---|
//! | `unix` | [`unix`] | kernel credentials, `/etc/passwd` and `/etc/group` names, the executable's path and hash |
//! | `cgroups` | [`cgroups`] | cgroup path, container and pod facts |
//! | `systemd` | [`cgroups`] | systemd unit, slice and invocation ID |
//!
//! `cgroups` and `systemd` are one type, [`cgroups::CgroupWorkloadAttestor`]: both read
//! `/proc/<pid>/cgroup`, parsed by [`proc_cgroup`] (pure, no I/O), and when both are
//! configured one read serves both.
//!
//! All of them read `/proc` and the cgroup file system, blocking calls: they implement
//! [`blocking::BlockingAttestor`], and the catalog runs them together as one
//! [`blocking::BlockingGroup`], on one blocking thread per request.
//!
//! # Trust
//!
//! An attestor reads `/proc/<pid>` by number, which is sound only because the Workload
//! API checks the caller's pidfd after attestation ([`crate::workload_api::peer`]): if the
//! process has exited and its PID was reused, the request fails. A selector must name
//! only what the workload cannot choose for itself; each module says why its selectors
//! hold.
//!
//! # Adding one
//!
//! 1. A module `<name>.rs` here with the plugin's config struct
//!    (`#[serde(deny_unknown_fields)]`), its type, and a module doc with a table of the
//!    selectors it makes and why the workload cannot forge them.
//! 2. If its work is synchronous file reads, implement [`blocking::BlockingAttestor`]
//!    and, for use on its own, [`WorkloadAttestor`] through
//!    `blocking::on_blocking_thread`; anything else implements [`WorkloadAttestor`]
//!    directly and must keep within the request's `workload_attestation_timeout`.
//! 3. Register the name in `crate::catalog` (`WORKLOAD_ATTESTORS`, `check_one`,
//!    `build_workload_attestors`): the only place that names the type.
//! 4. Unit tests in the module, on a fake `/proc` root where it reads files.

pub mod blocking;
pub mod cgroups;
pub mod proc_cgroup;
pub mod unix;

#[cfg(doc)]
use carapace_core::plugin::{Caller, WorkloadAttestor};
