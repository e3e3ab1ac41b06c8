-- A refused re-attestation: when an attested agent comes back with evidence its node
-- attestor refuses (a PCR off policy, a deleted host principal, a lapsed host
-- certificate), the server records when and why. While set, every node-API call of the
-- agent is refused; a successful fresh attestation clears it.
ALTER TABLE attested_agents ADD COLUMN refused_at BIGINT NULL;
ALTER TABLE attested_agents ADD COLUMN refused_reason TEXT NULL;
