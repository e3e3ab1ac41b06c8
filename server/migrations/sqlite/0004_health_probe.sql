-- One row the readiness check rewrites (at most once a second) to prove that the
-- datastore accepts writes: a full disk or a lock held by another process shows here
-- before an agent's write fails.
CREATE TABLE health_probe (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    probed_at BIGINT NOT NULL
);
