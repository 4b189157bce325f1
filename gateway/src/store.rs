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

    pub async fn insert(&self, run: &RunRecord) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO runs (run_id, tenant_id, flow_id, status, status_rank, steps, results, \
             provider, error, trace_id, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
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
        .bind(timestamp(run.created_at))
        .bind(timestamp(run.updated_at))
        .execute(&self.pool)
        .await
        .context("inserting a run")?;
        Ok(())
    }

    /// Removes a run that was never handed off (its publish failed).
    pub async fn delete(&self, run_id: &RunId) -> anyhow::Result<()> {
        sqlx::query("DELETE FROM runs WHERE run_id = $1")
            .bind(run_id.as_str())
            .execute(&self.pool)
            .await
            .context("deleting a run")?;
        Ok(())
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
    pub async fn apply_event(&self, event: &RunEvent) -> anyhow::Result<bool> {
        let result = sqlx::query(
            "UPDATE runs SET status = $1, status_rank = $2, results = $3, \
             provider = COALESCE($4, provider), error = $5, updated_at = $6 \
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

/// What an idempotency key already stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyRecord {
    pub body_hash: String,
    pub run_id: RunId,
    /// `None` while the first request is still in flight.
    pub status_code: Option<u16>,
    pub created_at: OffsetDateTime,
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

    /// Claims `key` for a new run. `Ok(None)`: claimed, go on; `Ok(Some(_))`:
    /// the key is taken (by a finished or in-flight request). An expired
    /// record is replaced.
    pub async fn claim_idempotency_key(
        &self,
        tenant: &TenantId,
        key: &str,
        body_hash: &str,
        run_id: &RunId,
        ttl: std::time::Duration,
    ) -> anyhow::Result<Option<IdempotencyRecord>> {
        let now = OffsetDateTime::now_utc();
        let expired_before = timestamp(now - ttl);
        sqlx::query("DELETE FROM idempotency_keys WHERE tenant_id = $1 AND idem_key = $2 AND created_at < $3")
            .bind(tenant.as_str())
            .bind(key)
            .bind(&expired_before)
            .execute(&self.pool)
            .await
            .context("expiring an idempotency key")?;
        let inserted = sqlx::query(
            "INSERT INTO idempotency_keys (tenant_id, idem_key, body_hash, run_id, status_code, created_at) \
             VALUES ($1, $2, $3, $4, NULL, $5) ON CONFLICT (tenant_id, idem_key) DO NOTHING",
        )
        .bind(tenant.as_str())
        .bind(key)
        .bind(body_hash)
        .bind(run_id.as_str())
        .bind(timestamp(now))
        .execute(&self.pool)
        .await
        .context("claiming an idempotency key")?;
        if inserted.rows_affected() == 1 {
            return Ok(None);
        }
        self.idempotency_record(tenant, key).await
    }

    pub async fn idempotency_record(
        &self,
        tenant: &TenantId,
        key: &str,
    ) -> anyhow::Result<Option<IdempotencyRecord>> {
        let row = sqlx::query(
            "SELECT body_hash, run_id, status_code, created_at FROM idempotency_keys WHERE tenant_id = $1 AND idem_key = $2",
        )
        .bind(tenant.as_str())
        .bind(key)
        .fetch_optional(&self.pool)
        .await
        .context("reading an idempotency key")?;
        row.map(|row| -> anyhow::Result<IdempotencyRecord> {
            Ok(IdempotencyRecord {
                body_hash: row.try_get("body_hash")?,
                run_id: RunId::parse(row.try_get::<String, _>("run_id")?)
                    .map_err(anyhow::Error::msg)?,
                status_code: row
                    .try_get::<Option<i64>, _>("status_code")?
                    .and_then(|c| u16::try_from(c).ok()),
                created_at: OffsetDateTime::parse(
                    &row.try_get::<String, _>("created_at")?,
                    &Rfc3339,
                )?,
            })
        })
        .transpose()
    }

    /// Records the answer given for a claimed key.
    pub async fn complete_idempotency_key(
        &self,
        tenant: &TenantId,
        key: &str,
        status_code: u16,
    ) -> anyhow::Result<()> {
        sqlx::query(
            "UPDATE idempotency_keys SET status_code = $1 WHERE tenant_id = $2 AND idem_key = $3",
        )
        .bind(i64::from(status_code))
        .bind(tenant.as_str())
        .bind(key)
        .execute(&self.pool)
        .await
        .context("completing an idempotency key")?;
        Ok(())
    }

    /// Releases a claimed key whose request failed, so a retry can use it.
    pub async fn release_idempotency_key(
        &self,
        tenant: &TenantId,
        key: &str,
    ) -> anyhow::Result<()> {
        sqlx::query("DELETE FROM idempotency_keys WHERE tenant_id = $1 AND idem_key = $2 AND status_code IS NULL")
            .bind(tenant.as_str())
            .bind(key)
            .execute(&self.pool)
            .await
            .context("releasing an idempotency key")?;
        Ok(())
    }

    /// Deletes keys older than `ttl`; returns how many.
    pub async fn expire_idempotency_keys(&self, ttl: std::time::Duration) -> anyhow::Result<u64> {
        let before = timestamp(OffsetDateTime::now_utc() - ttl);
        let done = sqlx::query(
            "DELETE FROM idempotency_keys WHERE created_at < $1 AND status_code IS NOT NULL",
        )
        .bind(before)
        .execute(&self.pool)
        .await
        .context("expiring idempotency keys")?;
        Ok(done.rows_affected())
    }
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
