-- The run store. Portable SQL: the same file runs on SQLite and PostgreSQL.
CREATE TABLE IF NOT EXISTS runs (
    run_id      TEXT PRIMARY KEY,
    tenant_id   TEXT NOT NULL,
    flow_id     TEXT NOT NULL,
    status      TEXT NOT NULL,
    -- RunStatus::rank: events only ever move a run forward.
    status_rank BIGINT NOT NULL,
    -- JSON: the parsed step specs, as submitted.
    steps       TEXT NOT NULL,
    -- JSON: the step results reported so far.
    results     TEXT NOT NULL,
    provider    TEXT,
    error       TEXT,
    trace_id    TEXT,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);

CREATE INDEX IF NOT EXISTS runs_tenant_created ON runs (tenant_id, created_at);
