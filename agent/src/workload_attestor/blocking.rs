//! The built-in workload attestors read `/proc` and the cgroup file system: blocking
//! calls, made on a blocking thread so that a stuck read cannot hold an async worker and
//! the request's time bound holds. [`BlockingGroup`] runs all of them on one blocking
//! thread per request: one hand-off instead of one per attestor (measured in
//! BENCHMARKS.md B6).

use std::fmt;
use std::sync::Arc;

use carapace_core::Error as CoreError;
use carapace_core::Selector;
use carapace_core::plugin::{Caller, WorkloadAttestor};

/// A workload attestor whose work is synchronous file reads.
pub trait BlockingAttestor: Send + Sync + fmt::Debug {
    /// The plugin name and selector type.
    fn name(&self) -> &str;
    /// The selectors of `caller`; blocking.
    fn attest_blocking(&self, caller: &Caller) -> Result<Vec<Selector>, CoreError>;
}

/// Several [`BlockingAttestor`]s as one [`WorkloadAttestor`]: every one must succeed, in
/// order, on one blocking thread; the first error ends the request.
#[derive(Clone)]
pub struct BlockingGroup {
    members: Arc<[Arc<dyn BlockingAttestor>]>,
    name: String,
}

impl fmt::Debug for BlockingGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockingGroup")
            .field("members", &self.name)
            .finish()
    }
}

impl BlockingGroup {
    /// The group of `members`; its name lists theirs (`unix+cgroups`).
    pub fn new(members: Vec<Arc<dyn BlockingAttestor>>) -> Self {
        let name = members
            .iter()
            .map(|m| m.name().to_owned())
            .collect::<Vec<_>>()
            .join("+");
        BlockingGroup {
            members: members.into(),
            name,
        }
    }
}

impl BlockingAttestor for BlockingGroup {
    fn name(&self) -> &str {
        &self.name
    }

    fn attest_blocking(&self, caller: &Caller) -> Result<Vec<Selector>, CoreError> {
        let mut out = Vec::new();
        for m in self.members.iter() {
            out.extend(
                m.attest_blocking(caller)
                    .map_err(|e| CoreError::WorkloadAttestation(format!("{}: {e}", m.name())))?,
            );
        }
        Ok(out)
    }
}

#[async_trait::async_trait]
impl WorkloadAttestor for BlockingGroup {
    fn name(&self) -> &str {
        &self.name
    }

    async fn attest(&self, caller: &Caller) -> Result<Vec<Selector>, CoreError> {
        on_blocking_thread(self.clone(), caller.clone()).await
    }
}

/// Runs `attestor`'s blocking work on a blocking thread: how each built-in attestor, and
/// a group of them, serves as a [`WorkloadAttestor`].
pub(crate) async fn on_blocking_thread<A>(
    attestor: A,
    caller: Caller,
) -> Result<Vec<Selector>, CoreError>
where
    A: BlockingAttestor + 'static,
{
    tokio::task::spawn_blocking(move || attestor.attest_blocking(&caller))
        .await
        .map_err(|e| CoreError::WorkloadAttestation(format!("attestor task failed: {e}")))?
}
