//! Trust on first use: a cloud identity document is not bound to a server nonce, so one
//! that leaked could be presented again. Each instance therefore attests once; its record
//! in the server's datastore (`attestation_state`) outlives restarts and is shared by every
//! server of the trust domain. `allow_reattestation = true` lets an instance attest again
//! (and records when it last did).

use serde::{Deserialize, Serialize};

use carapace_core::Error;
use carapace_core::clock::Clock;
use carapace_core::plugin::NodeStateStore;

/// The key of an instance's record: its agent path (the part of the agent ID after
/// `/spire/agent/<plugin>/`). Each cloud attestor names it in
/// [`NodeAttestor::forget_on_eviction`](carapace_core::plugin::NodeAttestor::forget_on_eviction),
/// so evicting the agent on the server deletes the record too, which is how an operator
/// lets the instance attest again.
pub fn record_key(agent_path: &str) -> String {
    agent_path.to_owned()
}

/// What is kept of an instance's attestation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The agent path the instance attested as.
    pub agent_path: String,
    /// When (Unix seconds).
    pub attested_at: u64,
}

/// Records that the instance `key` attested now (on `clock`); refuses a second
/// attestation unless `allow_reattestation`. Call it last, after every check passed: a
/// rejected attempt must not burn the instance's one attestation.
pub async fn record_attestation(
    store: &dyn NodeStateStore,
    key: &str,
    agent_path: &str,
    allow_reattestation: bool,
    clock: &dyn Clock,
) -> Result<(), Error> {
    let record = Record {
        agent_path: agent_path.to_owned(),
        // A clock never reads before the epoch: the conversion is exact.
        attested_at: clock.unix_now().unsigned_abs(),
    };
    let data = serde_json::to_vec(&record)
        .map_err(|e| Error::Unavailable(format!("encoding the attestation record: {e}")))?;
    if allow_reattestation {
        store.save(key, &data).await
    } else if store.save_new(key, &data).await? {
        Ok(())
    } else {
        tracing::warn!(
            instance = key,
            "refused a second attestation of an instance (trust on first use; set \
             allow_reattestation = true to allow it, or delete the agent and its record)"
        );
        Err(Error::AttestationReplay(
            "this instance's identity (trust on first use: it attested before)",
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use carapace_core::clock::{ManualClock, SystemClock};
    use carapace_core::plugin::MemoryStateStore;
    use std::time::Duration;

    #[tokio::test]
    async fn an_instance_attests_once_unless_reattestation_is_allowed() {
        let store = MemoryStateStore::default();
        record_attestation(&store, "i-1", "a/b/i-1", false, &SystemClock)
            .await
            .unwrap();
        let err = record_attestation(&store, "i-1", "a/b/i-1", false, &SystemClock)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::AttestationReplay(_)), "{err}");
        record_attestation(&store, "i-2", "a/b/i-2", false, &SystemClock)
            .await
            .unwrap();
        record_attestation(&store, "i-1", "a/b/i-1", true, &SystemClock)
            .await
            .unwrap();
        record_attestation(&store, "i-1", "a/b/i-1", true, &SystemClock)
            .await
            .unwrap();
        let rec: Record =
            serde_json::from_slice(&store.load("i-1").await.unwrap().unwrap()).unwrap();
        assert_eq!(rec.agent_path, "a/b/i-1");
    }

    async fn read(store: &MemoryStateStore) -> Record {
        serde_json::from_slice(&store.load("i-1").await.unwrap().unwrap()).unwrap()
    }

    #[tokio::test]
    async fn the_record_holds_the_clocks_time_and_a_reattestation_moves_it() {
        let store = MemoryStateStore::default();
        let clock = ManualClock::at_unix(1_700_000_000);
        record_attestation(&store, "i-1", "a/b/i-1", true, &clock)
            .await
            .unwrap();
        assert_eq!(read(&store).await.attested_at, 1_700_000_000);
        clock.advance(Duration::from_secs(3_600));
        record_attestation(&store, "i-1", "a/b/i-1", true, &clock)
            .await
            .unwrap();
        assert_eq!(read(&store).await.attested_at, 1_700_003_600);
        // Refused: the record keeps the first attestation's time.
        clock.advance(Duration::from_secs(60));
        record_attestation(&store, "i-1", "a/b/i-1", false, &clock)
            .await
            .unwrap_err();
        assert_eq!(read(&store).await.attested_at, 1_700_003_600);
    }
}
