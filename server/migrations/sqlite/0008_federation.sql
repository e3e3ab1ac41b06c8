-- Schema version 8: SPIFFE federation. The relationships with other trust domains (each
-- with what the refresh loop last saw of it), and the bundles of those trust domains.
-- The local trust domain's bundle stays in `bundles`; a foreign one is never there.

-- One row per federated trust domain: its bundle endpoint, how the endpoint is
-- authenticated (`https_web`: Web PKI, against `web_roots_pem` when set, else the
-- system's roots; `https_spiffe`: the endpoint's SPIFFE ID), and where the relationship
-- was defined (`config`: the config file, rewritten at every start; `api`: the admin
-- API). The last four columns are its status (unix seconds), written by the refresh loop.
CREATE TABLE federation_relationships (
    trust_domain       TEXT   NOT NULL PRIMARY KEY,
    url                TEXT   NOT NULL,
    profile            TEXT   NOT NULL CHECK (profile IN ('https_web', 'https_spiffe')),
    endpoint_spiffe_id TEXT,
    web_roots_pem      TEXT,
    source             TEXT   NOT NULL CHECK (source IN ('config', 'api')),
    created_at         BIGINT NOT NULL,
    updated_at         BIGINT NOT NULL,
    last_success_at    BIGINT,
    last_error         TEXT,
    last_error_at      BIGINT,
    next_refresh_at    BIGINT,
    CHECK ((profile = 'https_spiffe' AND endpoint_spiffe_id IS NOT NULL AND web_roots_pem IS NULL)
        OR (profile = 'https_web' AND endpoint_spiffe_id IS NULL))
);

-- The bundle of each foreign trust domain, in SPIFFE bundle JSON (`spiffe_sequence` and
-- `spiffe_refresh_hint` included). `sequence` repeats the JSON's (saturated at the
-- largest BIGINT). `origin`: `fetched` from the relationship's endpoint, or `static`, set
-- by an operator. A bundle may exist without a relationship (a static bundle of an
-- air-gapped peer).
CREATE TABLE federated_bundles (
    trust_domain TEXT   NOT NULL PRIMARY KEY,
    data         TEXT   NOT NULL,
    sequence     BIGINT NOT NULL,
    origin       TEXT   NOT NULL CHECK (origin IN ('fetched', 'static')),
    updated_at   BIGINT NOT NULL
);
