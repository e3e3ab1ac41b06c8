-- Schema version 6: several servers share one database (PostgreSQL). Each server keeps
-- its own CA journal and publishes its own part of the trust bundle; the trust domain's
-- bundle (`bundles`) is the union of those parts. Agent writes are logged as entry writes
-- are, so that every server follows both.

-- The CA journal of each server, by the server's id (`server-id` in its data directory).
CREATE TABLE server_ca_journals (
    server_id  TEXT    NOT NULL PRIMARY KEY,
    data       BYTEA   NOT NULL,
    updated_at BIGINT  NOT NULL
);
-- The journal of the one server that used the database before: kept under the empty id,
-- and claimed by the first server that starts without a journal of its own.
INSERT INTO server_ca_journals (server_id, data, updated_at)
    SELECT '', data, updated_at FROM ca_journal;
DROP TABLE ca_journal;

-- Each server's part of the trust bundle (its CAs and JWT keys), in SPIFFE bundle JSON,
-- with its JWT keys' expiries as `bundles.jwt_key_expiries`, and what an operator tainted
-- (`taints`: JSON, the indexes of tainted X.509 authorities and the tainted JWT kids; the
-- SPIFFE format has no member for either). `bundles` keeps the union, taints included.
CREATE TABLE server_bundles (
    server_id        TEXT    NOT NULL PRIMARY KEY,
    data             TEXT    NOT NULL,
    jwt_key_expiries TEXT    NOT NULL DEFAULT '[]',
    taints           TEXT    NOT NULL DEFAULT '{}',
    updated_at       BIGINT  NOT NULL
);
ALTER TABLE bundles ADD COLUMN taints TEXT NOT NULL DEFAULT '{}';

-- Change log of agent writes (attestation, renewal, ban, refusal, eviction), one row per
-- write in the write's transaction; ids only grow, as `entry_events`'.
CREATE TABLE agent_events (
    id        BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    spiffe_id TEXT    NOT NULL,
    at        BIGINT  NOT NULL
);
