-- The outbox. A run is stored first and handed off to JetStream after;
-- `handed_off_at` is NULL until JetStream has acknowledged it (or a report
-- about it proves the router has it). The gateway republishes runs still
-- NULL with the same Nats-Msg-Id, so a publish whose ack was lost is
-- deduplicated by the stream.
ALTER TABLE runs ADD COLUMN handed_off_at TEXT;
-- The client's provider hint, needed to publish the run again.
ALTER TABLE runs ADD COLUMN provider_hint TEXT;
-- JSON: the propagation fields of the request span, so a republished run
-- stays in its trace.
ALTER TABLE runs ADD COLUMN trace_context TEXT;
-- Rows a worker has reported on were handed off. Rows still `accepted` may be
-- debris of a crash: they are published again (deduplicated if they were in
-- the stream already).
UPDATE runs SET handed_off_at = updated_at WHERE status <> 'accepted';
CREATE INDEX IF NOT EXISTS runs_pending_hand_off ON runs (created_at) WHERE handed_off_at IS NULL;

-- An in-flight claim (status_code NULL) holds the key until `lease_until`;
-- after that another request may take it over. NULL: a claim from before
-- leases, taken over at once.
ALTER TABLE idempotency_keys ADD COLUMN lease_until TEXT;
