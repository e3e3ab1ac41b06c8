-- Schema version 7: the change logs are pruned. `change_log_horizon` keeps, per log, the
-- highest event id pruned: a server whose cursor is below it has missed events and
-- reloads its whole index instead of following.
CREATE TABLE change_log_horizon (
    log            TEXT   NOT NULL PRIMARY KEY CHECK (log IN ('entry_events', 'agent_events')),
    pruned_through BIGINT NOT NULL
);
CREATE INDEX entry_events_at ON entry_events (at);
CREATE INDEX agent_events_at ON agent_events (at);
