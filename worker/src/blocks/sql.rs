//! `sql`: one parameterised statement through sqlx's typed drivers (SQLite or
//! PostgreSQL), read-only unless the step says `write: true` and the worker
//! allows writes. The span carries the query with its literals replaced,
//! never parameter values.
//!
//! A step runs exactly one statement ([`statement::parse`]) of an allowed kind.
//! Reads are read-only where the database enforces it: on SQLite a fresh
//! `read_only` connection per step (no ATTACH, temp table or pragma outlives
//! the step), on PostgreSQL `BEGIN READ ONLY`. Every step is bounded by
//! `WORKER_SQL_TIMEOUT_MS`: PostgreSQL gets it as `statement_timeout` and
//! `idle_in_transaction_session_timeout`, SQLite as a progress handler that
//! interrupts the statement, and the worker stops waiting after it. A
//! PostgreSQL connection is reset (`DISCARD ALL`) before it goes back to the
//! pool, so no session state passes from one step (or tenant) to the next.
//!
//! Column values become JSON by their database type, see [`pg_value`] and
//! [`sqlite_value`] (README "sql step output").

mod statement;

use std::str::FromStr;
use std::time::Duration;

use futures::TryStreamExt;
use serde_json::{Map, Value, json};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgValueFormat, PgValueRef};
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteValueRef};
use sqlx::{Column, ConnectOptions, Connection, Decode, Postgres, Row, Sqlite, TypeInfo, ValueRef};
use tokio::sync::{OnceCell, Semaphore};
use tokio::time::Instant;
use tracing::Instrument;
use tracing::field::Empty;
use wire::step::SqlInput;

pub use statement::{Dialect, Kind, Statement, StatementError};

use super::StepOutcome;

/// How long past its deadline the worker waits for the database to give up
/// by itself (its own timeout answers with a clearer error).
const GRACE: Duration = Duration::from_millis(500);

enum Backend {
    Sqlite {
        options: SqliteConnectOptions,
        /// Steps on SQLite at once (each with its own connection).
        permits: Semaphore,
    },
    Postgres {
        options: PgConnectOptions,
        pool: OnceCell<PgPool>,
        max_connections: u32,
    },
}

/// The `sql` step's settings (`WORKER_DATABASE_URL`, `WORKER_SQL_*`).
#[derive(Debug, Clone)]
pub struct SqlSettings {
    pub url: String,
    pub allow_writes: bool,
    pub max_rows: usize,
    /// The longest a step may wait for and hold a connection, each.
    pub timeout: Duration,
    /// PostgreSQL pool size / concurrent SQLite steps.
    pub max_connections: u32,
}

pub struct SqlBlock {
    backend: Backend,
    allow_writes: bool,
    max_rows: usize,
    timeout: Duration,
}

/// What a statement did: rows of a read (each converted or not, and whether
/// more were left out), or the rows a write affected.
enum Done {
    Rows(Vec<Result<Value, Failure>>, bool),
    Affected(u64),
}

/// Why a step's SQL did not run or failed.
struct Failure {
    code: &'static str,
    message: String,
    retryable: bool,
}

impl Failure {
    fn new(code: &'static str, message: impl Into<String>, retryable: bool) -> Self {
        Self {
            code,
            message: message.into(),
            retryable,
        }
    }
}

impl SqlBlock {
    /// Parses the URL; nothing connects until the first step.
    pub fn new(settings: &SqlSettings) -> Result<Self, sqlx::Error> {
        let backend = if settings.url.starts_with("postgres") {
            Backend::Postgres {
                // The step's SQL is logged by its span (sanitized), not by sqlx.
                options: PgConnectOptions::from_str(&settings.url)?.disable_statement_logging(),
                pool: OnceCell::new(),
                max_connections: settings.max_connections.max(1),
            }
        } else {
            Backend::Sqlite {
                options: SqliteConnectOptions::from_str(&settings.url)?
                    .disable_statement_logging()
                    .statement_cache_capacity(0),
                permits: Semaphore::new(settings.max_connections.max(1) as usize),
            }
        };
        Ok(Self {
            backend,
            allow_writes: settings.allow_writes,
            max_rows: settings.max_rows,
            timeout: settings.timeout,
        })
    }

    fn dialect(&self) -> Dialect {
        match self.backend {
            Backend::Sqlite { .. } => Dialect::Sqlite,
            Backend::Postgres { .. } => Dialect::Postgres,
        }
    }

    fn system(&self) -> &'static str {
        match self.dialect() {
            Dialect::Postgres => "postgresql",
            Dialect::Sqlite => "sqlite",
        }
    }

    pub async fn execute(&self, input: &SqlInput) -> StepOutcome {
        let parsed = statement::parse(&input.query, self.dialect());
        let operation = match &parsed {
            Ok(statement) => statement.keyword.clone(),
            Err(_) => operation(&input.query),
        };
        let collection = collection(&input.query);
        let name = match &collection {
            Some(table) => format!("{operation} {table}"),
            None => operation.clone(),
        };
        let span = tracing::info_span!(
            "db.client",
            otel.name = name,
            otel.kind = "client",
            otel.status_code = Empty,
            error.type = Empty,
            db.system.name = self.system(),
            db.operation.name = operation.as_str(),
            db.collection.name = collection.as_deref(),
            db.query.text = sanitize(&input.query),
            db.response.returned_rows = Empty,
        );
        let result = match parsed {
            Ok(statement) => {
                self.checked(input, statement)
                    .instrument(span.clone())
                    .await
            }
            Err(e) => Err(refusal(&e)),
        };
        match result {
            Ok(output) => StepOutcome::Succeeded(output),
            Err(Failure {
                code,
                message,
                retryable,
            }) => {
                telemetry::spans::record_error(&span, code, &message);
                StepOutcome::failed(code, message, retryable)
            }
        }
    }

    async fn checked(&self, input: &SqlInput, statement: Statement<'_>) -> Result<Value, Failure> {
        if statement.kind == Kind::Write && !input.write {
            return Err(Failure::new(
                "write_not_requested",
                format!(
                    "the query is a write ({}); set \"write\": true to run it",
                    statement.keyword
                ),
                false,
            ));
        }
        if input.write && !self.allow_writes {
            return Err(Failure::new(
                "writes_disabled",
                "this worker does not allow writes (WORKER_SQL_ALLOW_WRITES)",
                false,
            ));
        }
        let deadline = Instant::now() + self.timeout;
        let run = async {
            match &self.backend {
                Backend::Sqlite { options, permits } => {
                    self.sqlite(options, permits, input, statement.text, deadline)
                        .await
                }
                Backend::Postgres {
                    options,
                    pool,
                    max_connections,
                } => {
                    let pool = pool
                        .get_or_try_init(|| pg_pool(options, *max_connections, self.timeout))
                        .await
                        .map_err(|e| db_failure(&e, self.timeout))?;
                    self.postgres(pool, input, statement.text, deadline).await
                }
            }
        };
        match tokio::time::timeout_at(deadline + self.timeout + GRACE, run).await {
            Ok(result) => result,
            Err(_) => Err(timed_out(self.timeout)),
        }
    }

    async fn sqlite(
        &self,
        options: &SqliteConnectOptions,
        permits: &Semaphore,
        input: &SqlInput,
        text: &str,
        deadline: Instant,
    ) -> Result<Value, Failure> {
        let _permit = match tokio::time::timeout_at(deadline, permits.acquire()).await {
            Ok(Ok(permit)) => permit,
            _ => return Err(busy(self.timeout)),
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        // A connection of its own: nothing a step does to its session
        // (ATTACH, temp tables, pragmas) can reach another step.
        let options = options
            .clone()
            .read_only(!input.write)
            .busy_timeout(remaining);
        let mut conn = SqliteConnection::connect_with(&options)
            .await
            .map_err(|e| db_failure(&e, self.timeout))?;
        let stop_at = std::time::Instant::now() + remaining;
        conn.lock_handle()
            .await
            .map_err(|e| db_failure(&e, self.timeout))?
            .set_progress_handler(1_000, move || std::time::Instant::now() < stop_at);
        let result = async {
            let query = bind_sqlite(sqlx::query(sqlx::AssertSqlSafe(text)), &input.params);
            if input.write {
                let mut tx = conn.begin().await?;
                let done = query.execute(&mut *tx).await?;
                tx.commit().await?;
                return Ok(Done::Affected(done.rows_affected()));
            }
            let mut rows = Vec::new();
            let mut truncated = false;
            let mut stream = query.fetch(&mut conn);
            while let Some(row) = stream.try_next().await? {
                if rows.len() == self.max_rows {
                    truncated = true;
                    break;
                }
                rows.push(row_json(&row, sqlite_value));
            }
            Ok(Done::Rows(rows, truncated))
        }
        .await;
        let _ = conn.close().await;
        self.output(result)
    }

    async fn postgres(
        &self,
        pool: &PgPool,
        input: &SqlInput,
        text: &str,
        deadline: Instant,
    ) -> Result<Value, Failure> {
        let mut conn = match tokio::time::timeout_at(deadline, pool.acquire()).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(db_failure(&e, self.timeout)),
            Err(_) => return Err(busy(self.timeout)),
        };
        let result = async {
            let mut tx = if input.write {
                conn.begin().await?
            } else {
                conn.begin_with("BEGIN READ ONLY").await?
            };
            // The server ends the statement (and an idle transaction) itself,
            // so the connection is free again when the step's time is up.
            let ms = deadline
                .saturating_duration_since(Instant::now())
                .as_millis()
                .max(1);
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "SET LOCAL statement_timeout = {ms}; SET LOCAL idle_in_transaction_session_timeout = {ms}"
            )))
            .execute(&mut *tx)
            .await?;
            // Not prepared for reuse: a step's SQL is not cached on the connection.
            let query = bind_pg(sqlx::query(sqlx::AssertSqlSafe(text)), &input.params).persistent(false);
            if input.write {
                let done = query.execute(&mut *tx).await?;
                tx.commit().await?;
                return Ok(Done::Affected(done.rows_affected()));
            }
            let mut rows = Vec::new();
            let mut truncated = false;
            {
                let mut stream = query.fetch(&mut *tx);
                while let Some(row) = stream.try_next().await? {
                    if rows.len() == self.max_rows {
                        truncated = true;
                        break;
                    }
                    rows.push(row_json(&row, pg_value));
                }
            }
            tx.rollback().await?;
            Ok(Done::Rows(rows, truncated))
        }
        .await;
        self.output(result)
    }

    /// The step output.
    fn output(&self, result: Result<Done, sqlx::Error>) -> Result<Value, Failure> {
        match result.map_err(|e| db_failure(&e, self.timeout))? {
            Done::Affected(affected) => {
                tracing::Span::current().record("db.response.returned_rows", 0);
                Ok(json!({"rows_affected": affected}))
            }
            Done::Rows(rows, truncated) => {
                let rows = rows.into_iter().collect::<Result<Vec<_>, _>>()?;
                tracing::Span::current().record("db.response.returned_rows", rows.len() as u64);
                Ok(json!({"rows": rows, "row_count": rows.len(), "truncated": truncated}))
            }
        }
    }
}

/// The PostgreSQL pool: waits for a connection at most the step timeout, and
/// resets every connection before another step gets it.
async fn pg_pool(
    options: &PgConnectOptions,
    max_connections: u32,
    timeout: Duration,
) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(timeout)
        .after_release(|conn, _| {
            Box::pin(async move {
                // DISCARD ALL drops prepared statements, temp tables, session
                // settings, advisory locks and LISTENs; sqlx must forget its
                // cached statements with them. An error closes the connection.
                conn.clear_cached_statements().await?;
                sqlx::raw_sql("DISCARD ALL").execute(&mut *conn).await?;
                Ok(true)
            })
        })
        .connect_with(options.clone())
        .await
}

fn refusal(e: &StatementError) -> Failure {
    let code = match e {
        StatementError::NotAllowed(_) => "statement_not_allowed",
        _ => "invalid_query",
    };
    Failure::new(code, e.to_string(), false)
}

fn timed_out(timeout: Duration) -> Failure {
    Failure::new(
        "timeout",
        format!(
            "the query did not finish within WORKER_SQL_TIMEOUT_MS ({} ms)",
            timeout.as_millis()
        ),
        true,
    )
}

fn busy(timeout: Duration) -> Failure {
    Failure::new(
        "db_busy",
        format!(
            "no database connection was free within WORKER_SQL_TIMEOUT_MS ({} ms)",
            timeout.as_millis()
        ),
        true,
    )
}

fn db_failure(e: &sqlx::Error, timeout: Duration) -> Failure {
    match e {
        sqlx::Error::PoolTimedOut => busy(timeout),
        sqlx::Error::Io(_) | sqlx::Error::PoolClosed | sqlx::Error::Tls(_) => Failure::new(
            "db_unavailable",
            format!("cannot reach the database: {e}"),
            true,
        ),
        sqlx::Error::Database(db) => {
            // 57014: PostgreSQL's statement_timeout; SQLite: the progress handler.
            let cancelled =
                db.code().as_deref() == Some("57014") || db.message().contains("interrupted");
            if cancelled {
                timed_out(timeout)
            } else {
                Failure::new("db_error", e.to_string(), false)
            }
        }
        other => Failure::new("db_error", other.to_string(), false),
    }
}

macro_rules! bind_params {
    ($query:expr, $params:expr) => {{
        let mut query = $query;
        for param in $params {
            query = match param {
                Value::Null => query.bind(Option::<String>::None),
                Value::Bool(b) => query.bind(*b),
                Value::Number(n) => match n.as_i64() {
                    Some(i) => query.bind(i),
                    None => query.bind(n.as_f64().unwrap_or(0.0)),
                },
                Value::String(s) => query.bind(s.as_str()),
                other => query.bind(other.to_string()),
            };
        }
        query
    }};
}

type SqliteQuery<'q> = sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments>;
type PgQuery<'q> = sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>;

fn bind_sqlite<'q>(query: SqliteQuery<'q>, params: &'q [Value]) -> SqliteQuery<'q> {
    bind_params!(query, params)
}

fn bind_pg<'q>(query: PgQuery<'q>, params: &'q [Value]) -> PgQuery<'q> {
    bind_params!(query, params)
}

fn row_json<R: Row>(
    row: &R,
    value: impl Fn(<R::Database as sqlx::Database>::ValueRef<'_>) -> Result<Value, String>,
) -> Result<Value, Failure>
where
    usize: sqlx::ColumnIndex<R>,
{
    let mut object = Map::new();
    for (i, column) in row.columns().iter().enumerate() {
        let raw = row
            .try_get_raw(i)
            .map_err(|e| Failure::new("db_error", e.to_string(), false))?;
        let json = value(raw).map_err(|reason| {
            Failure::new(
                "unsupported_column_type",
                format!(
                    "column {:?}: {reason}; cast it in the query (e.g. {}::text)",
                    column.name(),
                    column.name()
                ),
                false,
            )
        })?;
        object.insert(column.name().to_owned(), json);
    }
    Ok(Value::Object(object))
}

/// A SQLite value as JSON, by its storage class: INTEGER and REAL are numbers,
/// TEXT a string, BLOB a lowercase hex string, NULL null.
pub fn sqlite_value(raw: SqliteValueRef<'_>) -> Result<Value, String> {
    if raw.is_null() {
        return Ok(Value::Null);
    }
    let type_name = raw.type_info().name().to_owned();
    let decoded = match type_name.as_str() {
        "INTEGER" => <i64 as Decode<Sqlite>>::decode(raw).map(Value::from),
        "REAL" => <f64 as Decode<Sqlite>>::decode(raw).map(float),
        "BLOB" => <Vec<u8> as Decode<Sqlite>>::decode(raw)
            .map(|bytes| Value::String(bytes.iter().map(|b| format!("{b:02x}")).collect())),
        _ => <String as Decode<Sqlite>>::decode(raw).map(Value::String),
    };
    decoded.map_err(|e| format!("cannot read a {type_name} value: {e}"))
}

fn float(f: f64) -> Value {
    serde_json::Number::from_f64(f).map_or_else(|| Value::String(f.to_string()), Value::Number)
}

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_UNIX_SECS: i64 = 946_684_800;

/// A PostgreSQL value as JSON, by its type: integers and floats are numbers,
/// `numeric` an exact decimal string (`"12.50"`), `timestamptz` an RFC 3339
/// UTC string, `timestamp` the same without `Z`, `date` `YYYY-MM-DD`, `time`
/// `HH:MM:SS[.ffffff]`, `uuid` its hyphenated form, `json`/`jsonb` the JSON
/// itself, `void` null, text types (`text`, `varchar`, `char`, `name`, …) strings. Other
/// types are refused with a hint to cast them.
pub fn pg_value(raw: PgValueRef<'_>) -> Result<Value, String> {
    if raw.is_null() {
        return Ok(Value::Null);
    }
    let type_name = raw.type_info().name().to_owned();
    let fail = |e: sqlx::error::BoxDynError| format!("cannot read a {type_name} value: {e}");
    let value = match type_name.as_str() {
        // A function called for its effect (`pg_advisory_lock`, `pg_sleep`).
        "VOID" => Value::Null,
        "BOOL" => Value::from(<bool as Decode<Postgres>>::decode(raw).map_err(fail)?),
        "INT2" => Value::from(<i16 as Decode<Postgres>>::decode(raw).map_err(fail)?),
        "INT4" => Value::from(<i32 as Decode<Postgres>>::decode(raw).map_err(fail)?),
        "INT8" => Value::from(<i64 as Decode<Postgres>>::decode(raw).map_err(fail)?),
        "OID" => Value::from(
            <sqlx::postgres::types::Oid as Decode<Postgres>>::decode(raw)
                .map_err(fail)?
                .0,
        ),
        "FLOAT4" => float(f64::from(
            <f32 as Decode<Postgres>>::decode(raw).map_err(fail)?,
        )),
        "FLOAT8" => float(<f64 as Decode<Postgres>>::decode(raw).map_err(fail)?),
        "TEXT" | "VARCHAR" | "BPCHAR" | "CHAR" | "NAME" | "CITEXT" | "UNKNOWN" => {
            Value::String(<String as Decode<Postgres>>::decode(raw).map_err(fail)?)
        }
        _ if raw.format() == PgValueFormat::Text => {
            let text = raw.as_str().map_err(fail)?;
            match type_name.as_str() {
                "JSON" | "JSONB" => serde_json::from_str(text).map_err(|e| e.to_string())?,
                _ => Value::String(text.to_owned()),
            }
        }
        other => pg_binary(other, raw.as_bytes().map_err(fail)?)
            .ok_or_else(|| format!("sql steps do not convert {other} values"))?,
    };
    Ok(value)
}

/// The binary wire formats of the types sqlx has no feature enabled for here.
fn pg_binary(type_name: &str, bytes: &[u8]) -> Option<Value> {
    let be_i64 = |b: &[u8]| b.try_into().ok().map(i64::from_be_bytes);
    Some(match type_name {
        "NUMERIC" => Value::String(pg_numeric(bytes)?),
        "TIMESTAMPTZ" => Value::String(pg_timestamp(be_i64(bytes)?, true)?),
        "TIMESTAMP" => Value::String(pg_timestamp(be_i64(bytes)?, false)?),
        "DATE" => {
            let days = i32::from_be_bytes(bytes.try_into().ok()?);
            Value::String(match days {
                i32::MAX => "infinity".to_owned(),
                i32::MIN => "-infinity".to_owned(),
                days => {
                    let secs = PG_EPOCH_UNIX_SECS + i64::from(days) * 86_400;
                    time::OffsetDateTime::from_unix_timestamp(secs)
                        .ok()?
                        .date()
                        .to_string()
                }
            })
        }
        "TIME" => {
            let micros = be_i64(bytes)?;
            let (secs, micro) = (micros / 1_000_000, micros % 1_000_000);
            let mut text = format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60);
            if micro != 0 {
                text.push_str(format!(".{micro:06}").trim_end_matches('0'));
            }
            Value::String(text)
        }
        "UUID" => Value::String(uuid::Uuid::from_slice(bytes).ok()?.to_string()),
        // jsonb's binary form is a version byte (1) and the JSON text.
        "JSONB" => serde_json::from_slice(bytes.strip_prefix(&[1])?).ok()?,
        "JSON" => serde_json::from_slice(bytes).ok()?,
        _ => return None,
    })
}

fn pg_timestamp(micros: i64, with_zone: bool) -> Option<String> {
    match micros {
        i64::MAX => return Some("infinity".to_owned()),
        i64::MIN => return Some("-infinity".to_owned()),
        _ => {}
    }
    let nanos = (i128::from(PG_EPOCH_UNIX_SECS) * 1_000_000 + i128::from(micros)) * 1_000;
    let at = time::OffsetDateTime::from_unix_timestamp_nanos(nanos).ok()?;
    let text = at
        .format(&time::format_description::well_known::Rfc3339)
        .ok()?;
    Some(if with_zone {
        text
    } else {
        text.trim_end_matches('Z').to_owned()
    })
}

/// PostgreSQL's binary `numeric`: digit count, weight (of the first base-10000
/// digit), sign, display scale, then the base-10000 digits.
fn pg_numeric(bytes: &[u8]) -> Option<String> {
    let word = |i: usize| {
        bytes
            .get(i..i + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
    };
    let ndigits = usize::from(word(0)?);
    let weight = i64::from(word(2)? as i16);
    let sign = word(4)?;
    let dscale = usize::from(word(6)?);
    match sign {
        0xC000 => return Some("NaN".to_owned()),
        0xD000 => return Some("Infinity".to_owned()),
        0xF000 => return Some("-Infinity".to_owned()),
        _ => {}
    }
    let digits: Vec<u16> = (0..ndigits)
        .map(|k| word(8 + 2 * k))
        .collect::<Option<_>>()?;
    let digit = |k: i64| {
        usize::try_from(k)
            .ok()
            .and_then(|k| digits.get(k))
            .copied()
            .unwrap_or(0)
    };
    let mut text = String::new();
    if sign == 0x4000 {
        text.push('-');
    }
    if weight < 0 {
        text.push('0');
    } else {
        text.push_str(&digit(0).to_string());
        for k in 1..=weight {
            text.push_str(&format!("{:04}", digit(k)));
        }
    }
    if dscale > 0 {
        let mut fraction = String::new();
        let mut k = weight + 1;
        while fraction.len() < dscale {
            fraction.push_str(&format!("{:04}", digit(k)));
            k += 1;
        }
        fraction.truncate(dscale);
        text.push('.');
        text.push_str(&fraction);
    }
    Some(text)
}

/// The statement's first keyword, upper-cased (`SELECT`, `INSERT`, …).
pub fn operation(query: &str) -> String {
    sanitize(query)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .trim_start_matches('(')
        .to_ascii_uppercase()
}

/// The table a statement is about: the name after FROM, INTO, UPDATE or TABLE.
pub fn collection(query: &str) -> Option<String> {
    let sanitized = sanitize(query);
    let words: Vec<&str> = sanitized.split_whitespace().collect();
    words.windows(2).find_map(|pair| {
        let keyword = pair[0].to_ascii_uppercase();
        if matches!(keyword.as_str(), "FROM" | "INTO" | "UPDATE" | "TABLE")
            && !pair[1].starts_with('(')
        {
            let name: String = pair[1]
                .chars()
                .take_while(|c| c.is_alphanumeric() || matches!(c, '_' | '.' | '"'))
                .filter(|c| *c != '"')
                .collect();
            (!name.is_empty()).then_some(name)
        } else {
            None
        }
    })
}

/// The query with string and number literals replaced by `?` and comments
/// removed, so a span shows its shape but no data.
pub fn sanitize(query: &str) -> String {
    let chars: Vec<char> = query.chars().collect();
    let mut out = String::with_capacity(query.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let prev = if i > 0 { chars[i - 1] } else { ' ' };
        match c {
            '\'' => {
                // A string literal, with '' as an escaped quote.
                i += 1;
                while i < chars.len() {
                    if chars[i] == '\'' {
                        if chars.get(i + 1) == Some(&'\'') {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
                out.push('?');
                i += 1;
            }
            '-' if chars.get(i + 1) == Some(&'-') => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '/' if chars.get(i + 1) == Some(&'*') => {
                i += 2;
                while i + 1 < chars.len() && !(chars[i] == '*' && chars[i + 1] == '/') {
                    i += 1;
                }
                i += 2;
            }
            '0'..='9' if !(prev.is_alphanumeric() || matches!(prev, '_' | '$' | '"' | '.')) => {
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
                out.push('?');
            }
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_are_replaced_and_placeholders_kept() {
        assert_eq!(
            sanitize("SELECT * FROM users WHERE email = 'a@b.c' AND age > 42 AND id = $1"),
            "SELECT * FROM users WHERE email = ? AND age > ? AND id = $1"
        );
        assert_eq!(
            sanitize("select 'it''s', 3.14, x1 from t where y = ?"),
            "select ?, ?, x1 from t where y = ?"
        );
        assert_eq!(
            sanitize("SELECT 1 -- password 'hunter2'\nFROM t"),
            "SELECT ? FROM t"
        );
        assert_eq!(sanitize("SELECT /* secret */ a FROM t"), "SELECT a FROM t");
        assert_eq!(
            sanitize("INSERT INTO t VALUES ('x', -5)"),
            "INSERT INTO t VALUES (?, -?)"
        );
    }

    #[test]
    fn numeric_binary_form_is_exact() {
        // 12.50: ndigits 2, weight 0, +, dscale 2, digits [12, 5000].
        let n = |w: &[u16]| w.iter().flat_map(|x| x.to_be_bytes()).collect::<Vec<u8>>();
        assert_eq!(
            pg_numeric(&n(&[2, 0, 0, 2, 12, 5000])).as_deref(),
            Some("12.50")
        );
        // -0.000123: ndigits 2, weight -1, -, dscale 6, digits [1, 2300].
        assert_eq!(
            pg_numeric(&n(&[2, (-1i16) as u16, 0x4000, 6, 1, 2300])).as_deref(),
            Some("-0.000123")
        );
        // 123456789: weight 2, digits [1, 2345, 6789].
        assert_eq!(
            pg_numeric(&n(&[3, 2, 0, 0, 1, 2345, 6789])).as_deref(),
            Some("123456789")
        );
        // 10000: weight 1, digits [1] (trailing zero digits are left out).
        assert_eq!(pg_numeric(&n(&[1, 1, 0, 0, 1])).as_deref(), Some("10000"));
        assert_eq!(pg_numeric(&n(&[0, 0, 0xC000, 0])).as_deref(), Some("NaN"));
        assert_eq!(
            pg_timestamp(0, true).as_deref(),
            Some("2000-01-01T00:00:00Z")
        );
        assert_eq!(
            pg_timestamp(1_500_000, false).as_deref(),
            Some("2000-01-01T00:00:01.5")
        );
    }

    #[test]
    fn operation_and_collection() {
        assert_eq!(operation("  select a from b"), "SELECT");
        assert_eq!(
            collection("SELECT a FROM items WHERE x = 1").as_deref(),
            Some("items")
        );
        assert_eq!(
            collection("insert into public.orders (a) values (1)").as_deref(),
            Some("public.orders")
        );
        assert_eq!(collection("UPDATE \"T\" SET a = 1").as_deref(), Some("T"));
        assert_eq!(collection("SELECT 1"), None);
    }
}
