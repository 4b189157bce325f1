-- The least-privilege PostgreSQL role for Beamline's worker (`sql` steps).
-- Run as a superuser or the database owner, in the database the steps query
-- (here `app`, schema `public`), then set
--   WORKER_DATABASE_URL=postgres://beamline_worker:<password>@host/app
-- See docs/step-security.md for why each line is there.
-- Checked with PostgreSQL 15: `psql -v ON_ERROR_STOP=1 -f docs/worker-database-role.sql`.

-- Not a superuser, cannot create roles or databases, no replication, a
-- bounded number of sessions (WORKER_SQL_MAX_CONNECTIONS per worker replica).
CREATE ROLE beamline_worker LOGIN PASSWORD 'change-me'
    NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
    CONNECTION LIMIT 16;

-- Server-side limits that hold even if a step's SET LOCAL were bypassed.
ALTER ROLE beamline_worker SET statement_timeout = '10s';
ALTER ROLE beamline_worker SET idle_in_transaction_session_timeout = '10s';
ALTER ROLE beamline_worker SET lock_timeout = '5s';

-- Only this database, only this schema; nothing to create in it.
REVOKE ALL ON DATABASE app FROM PUBLIC;
GRANT CONNECT ON DATABASE app TO beamline_worker;
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO beamline_worker;

-- Reads of the tables steps may see. For write steps (WORKER_SQL_ALLOW_WRITES)
-- grant INSERT/UPDATE/DELETE on the tables they may change, nothing wider.
GRANT SELECT ON ALL TABLES IN SCHEMA public TO beamline_worker;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO beamline_worker;
-- No sequences: nextval() is not granted (and is refused in read-only steps).

-- Functions a superuser-connected worker could call in the review
-- (pg_read_file, pg_terminate_backend, advisory locks). A non-superuser
-- without pg_read_server_files / pg_signal_backend cannot read server files
-- or end other sessions; advisory locks and large objects are withdrawn too.
REVOKE EXECUTE ON FUNCTION pg_advisory_lock(bigint), pg_advisory_lock(integer, integer),
    pg_advisory_xact_lock(bigint), pg_advisory_xact_lock(integer, integer),
    pg_try_advisory_lock(bigint), pg_try_advisory_lock(integer, integer),
    pg_advisory_lock_shared(bigint), pg_advisory_lock_shared(integer, integer)
    FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION lo_import(text), lo_import(text, oid), lo_export(oid, text) FROM PUBLIC;
