//! The worker's integration tests: every block against real things (an HTTP
//! server in the test, SQLite and PostgreSQL, a sandbox on disk, approvals
//! through the gateway API), crash safety, dead letters and shutdown — with
//! the real three processes and a real nats-server.

mod approvals;
mod blocks;
mod crashes;
mod delivery;
mod support;
