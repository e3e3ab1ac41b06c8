use std::fmt;
use std::sync::Arc;

use crate::error::Error;
use crate::selector::Selector;

/// The calling process of a Workload API connection, as the kernel reported it
/// (SO_PEERCRED), never as the caller claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Process id at connect time. The agent holds a pidfd for it and checks after
    /// attestation that the same process is still alive, so a recycled PID cannot be
    /// attested as another process.
    pub pid: i32,
    /// Effective user id at connect time.
    pub uid: u32,
    /// Effective group id at connect time.
    pub gid: u32,
    /// Supplementary group ids at connect time (`SO_PEERGROUPS`), when the kernel gave
    /// them with the connection; `None` for a caller known only by PID, whose groups an
    /// attestor reads from `/proc/<pid>/status` instead.
    pub groups: Option<Arc<[u32]>>,
}

impl Caller {
    /// A caller known by PID and credentials, its supplementary groups not given.
    pub fn new(pid: i32, uid: u32, gid: u32) -> Self {
        Caller {
            pid,
            uid,
            gid,
            groups: None,
        }
    }

    /// This caller with the supplementary groups the kernel reported at connect time.
    #[must_use]
    pub fn with_groups(mut self, groups: impl Into<Arc<[u32]>>) -> Self {
        self.groups = Some(groups.into());
        self
    }
}

/// Turns a caller into selectors (`unix:uid:1000`, ...).
///
/// Contract:
/// 1. selectors come only from the kernel (`Caller`, /proc, cgroups), never from
///    anything the workload sends;
/// 2. a process that cannot be inspected is an [`Error::WorkloadAttestation`], not an
///    empty selector list that could match by accident;
/// 3. every selector has the attestor's name as its type.
#[async_trait::async_trait]
pub trait WorkloadAttestor: Send + Sync + fmt::Debug {
    /// The plugin name and selector type (`unix`).
    fn name(&self) -> &str;
    /// The selectors of `caller`.
    async fn attest(&self, caller: &Caller) -> Result<Vec<Selector>, Error>;
}
