-- State node attestors keep between attestations of the same node, by attestor and key:
-- the TPM attestor keeps each EK's last quote clock (resetCount, restartCount, clock) so a
-- rolled-back or replayed TPM state is refused; cloud attestors will keep instance ids.
CREATE TABLE attestation_state (
    attestor   TEXT    NOT NULL,
    node_key   TEXT    NOT NULL,
    data       BLOB    NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (attestor, node_key)
);
