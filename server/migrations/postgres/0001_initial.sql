-- Carapace server datastore, schema version 1 (PostgreSQL; mirrors ../sqlite/).
--
-- The same schema as the SQLite set, version for version: `BLOB` -> `BYTEA`, every
-- integer `BIGINT` (the datastore reads 64-bit integers), the AUTOINCREMENT key -> an
-- identity column. Times are unix seconds.

-- Registration entries. Selectors and DNS names live in child tables that cascade.
CREATE TABLE entries (
    id            TEXT    NOT NULL PRIMARY KEY,
    spiffe_id     TEXT    NOT NULL,
    parent_id     TEXT    NOT NULL,
    x509_svid_ttl BIGINT  NULL,             -- seconds; NULL = server default
    hint          TEXT    NOT NULL DEFAULT '',
    admin         BOOLEAN NOT NULL DEFAULT FALSE,
    downstream    BOOLEAN NOT NULL DEFAULT FALSE,
    expires_at    BIGINT  NULL,             -- NULL = never pruned
    revision      BIGINT  NOT NULL DEFAULT 0,
    created_at    BIGINT  NOT NULL
);
-- (spiffe_id, parent_id) serves lookups by SPIFFE ID and the similar-entry check.
CREATE INDEX entries_spiffe_id_parent_id ON entries (spiffe_id, parent_id);
CREATE INDEX entries_parent_id ON entries (parent_id);
CREATE INDEX entries_expires_at ON entries (expires_at);

CREATE TABLE entry_selectors (
    entry_id TEXT NOT NULL REFERENCES entries (id) ON DELETE CASCADE,
    type     TEXT NOT NULL,
    value    TEXT NOT NULL,
    PRIMARY KEY (entry_id, type, value)
);
CREATE INDEX entry_selectors_type_value ON entry_selectors (type, value);

CREATE TABLE entry_dns_names (
    entry_id TEXT    NOT NULL REFERENCES entries (id) ON DELETE CASCADE,
    position BIGINT NOT NULL,
    name     TEXT    NOT NULL,
    PRIMARY KEY (entry_id, position)
);

-- Change log of entry writes, one row per create/update/delete, written in the same
-- transaction as the write itself. Ids only grow (an identity never reuses an id),
-- so a reader can follow the log by remembering the last id it saw. No foreign key:
-- the events of a deleted entry outlive it.
CREATE TABLE entry_events (
    id       BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    entry_id TEXT    NOT NULL,
    kind     TEXT    NOT NULL CHECK (kind IN ('create', 'update', 'delete')),
    at       BIGINT  NOT NULL
);

-- Agents that completed node attestation.
CREATE TABLE attested_agents (
    spiffe_id    TEXT    NOT NULL PRIMARY KEY,
    attestor     TEXT    NOT NULL,
    serial       TEXT    NOT NULL,          -- hex serial of the agent's current SVID
    new_serial   TEXT    NULL,              -- serial of a renewed SVID not yet used
    expires_at   BIGINT  NOT NULL,
    banned       BOOLEAN NOT NULL DEFAULT FALSE,
    reattestable BOOLEAN NOT NULL DEFAULT FALSE,
    attested_at  BIGINT  NOT NULL
);

CREATE TABLE node_selectors (
    spiffe_id TEXT NOT NULL REFERENCES attested_agents (spiffe_id) ON DELETE CASCADE,
    type      TEXT NOT NULL,
    value     TEXT NOT NULL,
    PRIMARY KEY (spiffe_id, type, value)
);
CREATE INDEX node_selectors_type_value ON node_selectors (type, value);

-- Trust bundles in SPIFFE bundle JSON. The SPIFFE format has no member for a JWT
-- key's expiry, so `jwt_key_expiries` keeps them: a JSON array aligned with the
-- bundle's JWT keys in order, each a unix time or null.
CREATE TABLE bundles (
    trust_domain     TEXT NOT NULL PRIMARY KEY,
    data             TEXT NOT NULL,
    jwt_key_expiries TEXT NOT NULL DEFAULT '[]'
);

-- Join tokens (`<id>.<secret>`): the public id, and the SHA-256 of the secret only.
-- Neither the token nor the secret is ever stored.
CREATE TABLE join_tokens (
    id          TEXT   NOT NULL PRIMARY KEY,
    secret_hash BYTEA  NOT NULL,
    expires_at  BIGINT NOT NULL,
    created_at  BIGINT NOT NULL
);
CREATE INDEX join_tokens_expires_at ON join_tokens (expires_at);

-- The CA's journal (opaque bytes owned by the CA module), a single row.
CREATE TABLE ca_journal (
    id         BIGINT  NOT NULL PRIMARY KEY CHECK (id = 1),
    data       BYTEA   NOT NULL,
    updated_at BIGINT  NOT NULL
);
