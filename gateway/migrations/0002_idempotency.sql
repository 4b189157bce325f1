-- Idempotency keys: one row per (tenant, key). `status_code` is NULL while the
-- first request holding the key is still being processed.
CREATE TABLE IF NOT EXISTS idempotency_keys (
    tenant_id    TEXT NOT NULL,
    idem_key     TEXT NOT NULL,
    body_hash    TEXT NOT NULL,
    run_id       TEXT NOT NULL,
    status_code  BIGINT,
    created_at   TEXT NOT NULL,
    PRIMARY KEY (tenant_id, idem_key)
);

CREATE INDEX IF NOT EXISTS idempotency_keys_created ON idempotency_keys (created_at);
