//! The run store, through sqlx: SQLite by default, PostgreSQL when
//! `DATABASE_URL` says `postgres://`. One code path for both (the `Any`
//! driver, portable SQL, `$n` placeholders which both accept).

use anyhow::Context as _;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use wire::events::RunEvent;
use wire::ids::{FlowId, RunId, TenantId};
use wire::run::{RunStatus, StepResult};
use wire::step::StepSpec;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
}

/// A run as the store knows it.
#[derive(Debug, Clone)]
pub struct RunRecord {
    pub run_id: RunId,
    pub tenant_id: TenantId,
    pub flow_id: FlowId,
    pub status: RunStatus,
    pub steps: Vec<StepSpec>,
    pub results: Vec<StepResult>,
    pub provider: Option<String>,
    pub error: Option<String>,
    pub trace_id: Option<String>,
    /// The client's provider hint, kept to publish the run again.
    pub provider_hint: Option<String>,
    /// JSON map of the request span's propagation fields, so a republished
    /// run stays in its trace.
    pub trace_context: Option<String>,
    /// When JetStream acknowledged the hand-off; `None` while the run is
    /// only in the outbox.
    pub handed_off_at: Option<OffsetDateTime>,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

impl Store {
    /// Connects and runs the migrations.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        sqlx::any::install_default_drivers();
        let pool = AnyPoolOptions::new()
            .max_connections(if url.starts_with("sqlite:") { 4 } else { 10 })
            .acquire_timeout(std::time::Duration::from_secs(5))
            .connect(url)
            .await
            .with_context(|| format!("connecting to the run store at {}", redact(url)))?;
        MIGRATOR
            .run(&pool)
            .await
            .context("running the run store migrations")?;
        Ok(Self { pool })
    }

    /// Cheap liveness query for readiness.
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    /// Stores a new run. With `idempotency_key`, the caller's claim on it
    /// (tenant, key, run id) is completed in the same transaction: the key
    /// stands for the run exactly when the run exists. `Ok(false)`: the claim
    /// was no longer ours (taken over after its lease), nothing was stored.
    pub async fn insert(
        &self,
        run: &RunRecord,
        idempotency_key: Option<&str>,
    ) -> anyhow::Result<bool> {
        let mut tx = self.pool.begin().await.context("starting a transaction")?;
        if let Some(key) = idempotency_key {
            let completed = sqlx::query(
                "UPDATE idempotency_keys SET status_code = $1, lease_until = NULL \
                 WHERE tenant_id = $2 AND idem_key = $3 AND run_id = $4 AND status_code IS NULL",
            )
            .bind(i64::from(ACCEPTED))
            .bind(run.tenant_id.as_str())
            .bind(key)
            .bind(run.run_id.as_str())
            .execute(&mut *tx)
            .await
            .context("completing an idempotency key")?;
            if completed.rows_affected() == 0 {
                tx.rollback().await.context("rolling back")?;
                return Ok(false);
            }
        }
        sqlx::query(
            "INSERT INTO runs (run_id, tenant_id, flow_id, status, status_rank, steps, results, \
             provider, error, trace_id, provider_hint, trace_context, handed_off_at, \
             created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
        )
        .bind(run.run_id.as_str())
        .bind(run.tenant_id.as_str())
        .bind(run.flow_id.as_str())
        .bind(run.status.as_str())
        .bind(run.status.rank())
        .bind(serde_json::to_string(&run.steps)?)
        .bind(serde_json::to_string(&run.results)?)
        .bind(run.provider.clone())
        .bind(run.error.clone())
        .bind(run.trace_id.clone())
        .bind(run.provider_hint.clone())
        .bind(run.trace_context.clone())
        .bind(run.handed_off_at.map(timestamp))
        .bind(timestamp(run.created_at))
        .bind(timestamp(run.updated_at))
        .execute(&mut *tx)
        .await
        .context("inserting a run")?;
        tx.commit().await.context("committing a new run")?;
        Ok(true)
    }

    /// Records that JetStream has the run.
    pub async fn mark_handed_off(&self, run_id: &RunId) -> anyhow::Result<()> {
        sqlx::query(
            "UPDATE runs SET handed_off_at = $1 WHERE run_id = $2 AND handed_off_at IS NULL",
        )
        .bind(timestamp(OffsetDateTime::now_utc()))
        .bind(run_id.as_str())
        .execute(&self.pool)
        .await
        .context("marking a run handed off")?;
        Ok(())
    }

    /// The outbox: runs stored before `before` that JetStream has not
    /// acknowledged yet, oldest first.
    pub async fn pending_hand_offs(
        &self,
        before: OffsetDateTime,
        limit: u32,
    ) -> anyhow::Result<Vec<RunRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM runs WHERE handed_off_at IS NULL AND created_at < $1 \
             ORDER BY created_at LIMIT $2",
        )
        .bind(timestamp(before))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .context("reading the outbox")?;
        rows.iter().map(decode_row).collect()
    }

    /// How many runs wait in the outbox.
    pub async fn pending_count(&self) -> anyhow::Result<i64> {
        sqlx::query_scalar("SELECT COUNT(*) FROM runs WHERE handed_off_at IS NULL")
            .fetch_one(&self.pool)
            .await
            .context("counting the outbox")
    }

    /// Whether the tenant's run exists.
    pub async fn exists(&self, tenant: &TenantId, run_id: &RunId) -> anyhow::Result<bool> {
        let row = sqlx::query("SELECT 1 FROM runs WHERE run_id = $1 AND tenant_id = $2")
            .bind(run_id.as_str())
            .bind(tenant.as_str())
            .fetch_optional(&self.pool)
            .await
            .context("looking a run up")?;
        Ok(row.is_some())
    }

    /// The tenant's run, or `None` when it does not exist or is another tenant's.
    pub async fn get(
        &self,
        tenant: &TenantId,
        run_id: &RunId,
    ) -> anyhow::Result<Option<RunRecord>> {
        let row = sqlx::query("SELECT * FROM runs WHERE run_id = $1 AND tenant_id = $2")
            .bind(run_id.as_str())
            .bind(tenant.as_str())
            .fetch_optional(&self.pool)
            .await
            .context("reading a run")?;
        row.map(|row| decode_row(&row)).transpose()
    }

    /// Applies a worker's report. Only moves a run forward: to a higher
    /// [`RunStatus::rank`], or within the non-terminal rank to a later event
    /// (`running ⇄ awaiting_approval`); returns whether anything changed.
    /// A report also proves the run was handed off: it leaves the outbox.
    pub async fn apply_event(&self, event: &RunEvent) -> anyhow::Result<bool> {
        let result = sqlx::query(
            "UPDATE runs SET status = $1, status_rank = $2, results = $3, \
             provider = COALESCE($4, provider), error = $5, updated_at = $6, \
             handed_off_at = COALESCE(handed_off_at, $6) \
             WHERE run_id = $7 AND tenant_id = $8 \
             AND (status_rank < $2 OR (status_rank = $2 AND $2 < 3 AND updated_at < $6))",
        )
        .bind(event.status.as_str())
        .bind(event.status.rank())
        .bind(serde_json::to_string(&event.steps)?)
        .bind(event.provider.as_ref().map(|p| p.to_string()))
        .bind(event.error.clone())
        .bind(timestamp(event.at))
        .bind(event.run_id.as_str())
        .bind(event.tenant_id.as_str())
        .execute(&self.pool)
        .await
        .context("applying a run event")?;
        Ok(result.rows_affected() > 0)
    }
}

/// One page of a tenant's runs, newest first.
pub struct Page {
    pub runs: Vec<RunRecord>,
    /// Where the next page starts, when there is one.
    pub next: Option<Cursor>,
}

/// A position in the newest-first order: the last run of a page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub created_at: String,
    pub run_id: String,
}

/// The status code a completed key records: the run was stored (202).
const ACCEPTED: u16 = 202;

/// The outcome of [`Store::claim_idempotency_key`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claimed {
    /// The key is ours until the lease ends: store the run.
    Ours,
    /// Another request has it, finished or in flight.
    Taken(IdempotencyRecord),
}

/// What an idempotency key already stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyRecord {
    pub body_hash: String,
    pub run_id: RunId,
    /// `None` while the first request is still in flight.
    pub status_code: Option<u16>,
    pub created_at: OffsetDateTime,
    /// Until when an in-flight claim holds the key (`None`: completed, or a
    /// claim from before leases).
    pub lease_until: Option<OffsetDateTime>,
}

impl Store {
    /// The tenant's runs, newest first, optionally of one status.
    pub async fn list(
        &self,
        tenant: &TenantId,
        status: Option<RunStatus>,
        limit: u32,
        after: Option<&Cursor>,
    ) -> anyhow::Result<Page> {
        // One query shape for every combination: unused filters compare to
        // themselves. Row-value comparison works on SQLite and PostgreSQL.
        let rows = sqlx::query(
            "SELECT * FROM runs WHERE tenant_id = $1 \
             AND ($2 = '' OR status = $2) \
             AND ($3 = '' OR (created_at, run_id) < ($3, $4)) \
             ORDER BY created_at DESC, run_id DESC LIMIT $5",
        )
        .bind(tenant.as_str())
        .bind(status.map(RunStatus::as_str).unwrap_or(""))
        .bind(after.map(|c| c.created_at.as_str()).unwrap_or(""))
        .bind(after.map(|c| c.run_id.as_str()).unwrap_or(""))
        .bind(i64::from(limit) + 1)
        .fetch_all(&self.pool)
        .await
        .context("listing runs")?;
        let mut runs = rows
            .iter()
            .map(decode_row)
            .collect::<anyhow::Result<Vec<_>>>()?;
        let next = if runs.len() > limit as usize {
            runs.truncate(limit as usize);
            runs.last().map(|r| Cursor {
                created_at: timestamp(r.created_at),
                run_id: r.run_id.to_string(),
            })
        } else {
            None
        };
        Ok(Page { runs, next })
    }

    /// Claims `key` for the run `run_id` in one statement: inserts the
    /// claim, or takes over an expired record or an in-flight claim whose
    /// lease ran out (its holder died), or leaves the record as it is — and
    /// returns the row as it now stands. The claim is ours exactly when that
    /// row names our run id.
    pub async fn claim_idempotency_key(
        &self,
        tenant: &TenantId,
        key: &str,
        body_hash: &str,
        run_id: &RunId,
        ttl: std::time::Duration,
        lease: std::time::Duration,
    ) -> anyhow::Result<Claimed> {
        let now = OffsetDateTime::now_utc();
        // Every SET reads the row as it was, so all five columns switch together.
        const TAKE_OVER: &str = "(idempotency_keys.created_at < $7 OR \
             (idempotency_keys.status_code IS NULL AND \
              (idempotency_keys.lease_until IS NULL OR idempotency_keys.lease_until < $5)))";
        let sql = format!(
            "INSERT INTO idempotency_keys \
             (tenant_id, idem_key, body_hash, run_id, status_code, created_at, lease_until) \
             VALUES ($1, $2, $3, $4, NULL, $5, $6) \
             ON CONFLICT (tenant_id, idem_key) DO UPDATE SET \
             body_hash = CASE WHEN {TAKE_OVER} THEN excluded.body_hash ELSE idempotency_keys.body_hash END, \
             run_id = CASE WHEN {TAKE_OVER} THEN excluded.run_id ELSE idempotency_keys.run_id END, \
             status_code = CASE WHEN {TAKE_OVER} THEN NULL ELSE idempotency_keys.status_code END, \
             created_at = CASE WHEN {TAKE_OVER} THEN excluded.created_at ELSE idempotency_keys.created_at END, \
             lease_until = CASE WHEN {TAKE_OVER} THEN excluded.lease_until ELSE idempotency_keys.lease_until END \
             RETURNING body_hash, run_id, status_code, created_at, lease_until"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(tenant.as_str())
            .bind(key)
            .bind(body_hash)
            .bind(run_id.as_str())
            .bind(timestamp(now))
            .bind(timestamp(now + lease))
            .bind(timestamp(now - ttl))
            .fetch_one(&self.pool)
            .await
            .context("claiming an idempotency key")?;
        let record = decode_idempotency_row(&row)?;
        Ok(if &record.run_id == run_id {
            Claimed::Ours
        } else {
            Claimed::Taken(record)
        })
    }

    /// What `key` stands for now, read only: what a request waiting for an
    /// in-flight claim polls, so waiting takes no write lock.
    pub async fn idempotency_record(
        &self,
        tenant: &TenantId,
        key: &str,
    ) -> anyhow::Result<Option<IdempotencyRecord>> {
        let row = sqlx::query(
            "SELECT body_hash, run_id, status_code, created_at, lease_until \
             FROM idempotency_keys WHERE tenant_id = $1 AND idem_key = $2",
        )
        .bind(tenant.as_str())
        .bind(key)
        .fetch_optional(&self.pool)
        .await
        .context("reading an idempotency key")?;
        row.as_ref().map(decode_idempotency_row).transpose()
    }

    /// Gives up the caller's own in-flight claim (nothing was stored), so a
    /// retry can have the key at once. Another request's claim, or a
    /// completed key, is left alone.
    pub async fn release_idempotency_key(
        &self,
        tenant: &TenantId,
        key: &str,
        run_id: &RunId,
    ) -> anyhow::Result<bool> {
        let done = sqlx::query(
            "DELETE FROM idempotency_keys WHERE tenant_id = $1 AND idem_key = $2 \
             AND run_id = $3 AND status_code IS NULL",
        )
        .bind(tenant.as_str())
        .bind(key)
        .bind(run_id.as_str())
        .execute(&self.pool)
        .await
        .context("releasing an idempotency key")?;
        Ok(done.rows_affected() == 1)
    }

    /// Deletes keys older than `ttl` and abandoned claims whose lease ran
    /// out; returns how many.
    pub async fn expire_idempotency_keys(&self, ttl: std::time::Duration) -> anyhow::Result<u64> {
        let now = OffsetDateTime::now_utc();
        let done = sqlx::query(
            "DELETE FROM idempotency_keys WHERE \
             (status_code IS NOT NULL AND created_at < $1) OR \
             (status_code IS NULL AND (lease_until IS NULL OR lease_until < $2))",
        )
        .bind(timestamp(now - ttl))
        .bind(timestamp(now))
        .execute(&self.pool)
        .await
        .context("expiring idempotency keys")?;
        Ok(done.rows_affected())
    }
}

/// Whether `err` is the store being unavailable for a moment — a client may
/// retry — rather than a bug: no connection (refused, dropped, pool timed
/// out), the database locked or busy, the server shutting down or out of
/// resources, a serialization conflict.
pub fn is_unavailable(err: &anyhow::Error) -> bool {
    err.chain()
        .filter_map(|cause| cause.downcast_ref::<sqlx::Error>())
        .any(|err| match err {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::BeginFailed => true,
            sqlx::Error::Database(db) => {
                let sqlite = db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some();
                db.code().is_some_and(|code| transient_code(sqlite, &code))
            }
            _ => false,
        })
}

/// SQLite result codes (primary code: the low byte) and PostgreSQL SQLSTATEs
/// that say "not now" rather than "never".
fn transient_code(sqlite: bool, code: &str) -> bool {
    if sqlite {
        // BUSY, LOCKED, IOERR, FULL, CANTOPEN, PROTOCOL.
        return code
            .parse::<i64>()
            .is_ok_and(|code| matches!(code & 0xff, 5 | 6 | 10 | 13 | 14 | 15));
    }
    // Connection exceptions, insufficient resources, operator intervention
    // (admin/crash shutdown, cannot connect now), a database that refuses
    // connections or is gone, serialization failure and deadlock.
    code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("57P")
        || matches!(code, "55000" | "3D000" | "40001" | "40P01")
}

/// Fixed-width UTC RFC 3339, so text order is time order.
fn timestamp(at: OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        at.microsecond()
    )
}

fn decode_idempotency_row(row: &AnyRow) -> anyhow::Result<IdempotencyRecord> {
    let time = |at: &str| OffsetDateTime::parse(at, &Rfc3339).context("idempotency key timestamp");
    Ok(IdempotencyRecord {
        body_hash: row.try_get("body_hash")?,
        run_id: RunId::parse(row.try_get::<String, _>("run_id")?).map_err(anyhow::Error::msg)?,
        status_code: row
            .try_get::<Option<i64>, _>("status_code")?
            .and_then(|c| u16::try_from(c).ok()),
        created_at: time(&row.try_get::<String, _>("created_at")?)?,
        lease_until: row
            .try_get::<Option<String>, _>("lease_until")?
            .map(|at| time(&at))
            .transpose()?,
    })
}

fn decode_row(row: &AnyRow) -> anyhow::Result<RunRecord> {
    let text = |name: &str| -> anyhow::Result<String> {
        row.try_get::<String, _>(name)
            .with_context(|| format!("column {name}"))
    };
    let opt = |name: &str| -> anyhow::Result<Option<String>> {
        row.try_get::<Option<String>, _>(name)
            .with_context(|| format!("column {name}"))
    };
    let time = |name: &str| -> anyhow::Result<OffsetDateTime> {
        OffsetDateTime::parse(&text(name)?, &Rfc3339).with_context(|| format!("column {name}"))
    };
    let status = text("status")?;
    Ok(RunRecord {
        run_id: RunId::parse(text("run_id")?).map_err(anyhow::Error::msg)?,
        tenant_id: TenantId::parse(text("tenant_id")?).map_err(anyhow::Error::msg)?,
        flow_id: FlowId::parse(text("flow_id")?).map_err(anyhow::Error::msg)?,
        status: RunStatus::parse(&status)
            .with_context(|| format!("unknown run status {status:?} in the store"))?,
        steps: serde_json::from_str(&text("steps")?).context("column steps")?,
        results: serde_json::from_str(&text("results")?).context("column results")?,
        provider: opt("provider")?,
        error: opt("error")?,
        trace_id: opt("trace_id")?,
        provider_hint: opt("provider_hint")?,
        trace_context: opt("trace_context")?,
        handed_off_at: opt("handed_off_at")?
            .map(|at| OffsetDateTime::parse(&at, &Rfc3339))
            .transpose()
            .context("column handed_off_at")?,
        created_at: time("created_at")?,
        updated_at: time("updated_at")?,
    })
}

/// The URL without its password, for error messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_store_errors_are_told_apart() {
        for code in ["5", "517", "6", "10"] {
            assert!(transient_code(true, code), "sqlite {code}");
        }
        for code in ["19", "2067", "1"] {
            assert!(!transient_code(true, code), "sqlite {code}");
        }
        for code in ["08006", "57P01", "53300", "40001", "3D000"] {
            assert!(transient_code(false, code), "postgres {code}");
        }
        for code in ["23505", "42601", "42P01", "22P02"] {
            assert!(!transient_code(false, code), "postgres {code}");
        }
        let timed_out = anyhow::Error::from(sqlx::Error::PoolTimedOut).context("reading a run");
        assert!(is_unavailable(&timed_out));
        let bug = anyhow::Error::from(sqlx::Error::RowNotFound).context("reading a run");
        assert!(!is_unavailable(&bug));
        assert!(!is_unavailable(&anyhow::anyhow!("no sqlx error at all")));
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact("postgres://u:secret@db/x"), "postgres://u:***@db/x");
        assert_eq!(redact("sqlite://a.db?mode=rwc"), "sqlite://a.db?mode=rwc");
    }

    #[test]
    fn timestamps_sort_as_text() {
        let a = OffsetDateTime::from_unix_timestamp(1_700_000_000).expect("t");
        let b = a + time::Duration::microseconds(5);
        assert!(timestamp(a) < timestamp(b));
        assert_eq!(
            OffsetDateTime::parse(&timestamp(b), &Rfc3339).expect("parse"),
            b
        );
    }
}
