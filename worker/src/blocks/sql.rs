//! `sql`: a parameterised query through sqlx (SQLite or PostgreSQL), read-only
//! unless the step says `write: true` and the worker allows writes. The span
//! carries the query with its literals replaced, never parameter values.

use futures::TryStreamExt;
use serde_json::{Map, Value, json};
use sqlx::any::{AnyArguments, AnyPoolOptions, AnyRow};
use sqlx::query::Query;
use sqlx::{Any, AnyPool, Column, Row};
use tokio::sync::OnceCell;
use tracing::Instrument;
use tracing::field::Empty;
use wire::step::SqlInput;

use super::StepOutcome;

pub struct SqlBlock {
    url: String,
    pool: OnceCell<AnyPool>,
    allow_writes: bool,
    max_rows: usize,
}

impl SqlBlock {
    pub fn new(url: String, allow_writes: bool, max_rows: usize) -> Self {
        Self {
            url,
            pool: OnceCell::new(),
            allow_writes,
            max_rows,
        }
    }

    fn system(&self) -> &'static str {
        if self.url.starts_with("postgres") {
            "postgresql"
        } else {
            "sqlite"
        }
    }

    async fn pool(&self) -> Result<&AnyPool, sqlx::Error> {
        self.pool
            .get_or_try_init(|| async {
                sqlx::any::install_default_drivers();
                AnyPoolOptions::new()
                    .max_connections(4)
                    .acquire_timeout(std::time::Duration::from_secs(5))
                    .connect(&self.url)
                    .await
            })
            .await
    }

    pub async fn execute(&self, input: &SqlInput) -> StepOutcome {
        let operation = operation(&input.query);
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
        let outcome = self
            .run(input, is_read(&operation))
            .instrument(span.clone())
            .await;
        if let StepOutcome::Failed { code, message, .. } = &outcome {
            telemetry::spans::record_error(&span, code, message);
        }
        outcome
    }

    async fn run(&self, input: &SqlInput, read: bool) -> StepOutcome {
        if !read && !input.write {
            return StepOutcome::failed(
                "write_not_requested",
                "the query is not a read; set \"write\": true to run it",
                false,
            );
        }
        if input.write && !self.allow_writes {
            return StepOutcome::failed(
                "writes_disabled",
                "this worker does not allow writes (WORKER_SQL_ALLOW_WRITES)",
                false,
            );
        }
        let pool = match self.pool().await {
            Ok(pool) => pool,
            Err(e) => {
                return StepOutcome::failed(
                    "db_unavailable",
                    format!("cannot connect to the database: {e}"),
                    true,
                );
            }
        };
        match self.query(pool, input).await {
            Ok(output) => StepOutcome::Succeeded(output),
            Err(e) => {
                let retryable = matches!(
                    e,
                    sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed
                );
                StepOutcome::failed(
                    if retryable {
                        "db_unavailable"
                    } else {
                        "db_error"
                    },
                    e.to_string(),
                    retryable,
                )
            }
        }
    }

    async fn query(&self, pool: &AnyPool, input: &SqlInput) -> Result<Value, sqlx::Error> {
        let mut tx = pool.begin().await?;
        // Running the step's own SQL is this block's purpose; its values come
        // in as bind parameters, and reads are rolled back below.
        let query = bind(
            sqlx::query(sqlx::AssertSqlSafe(input.query.as_str())),
            &input.params,
        );
        if input.write {
            let done = query.execute(&mut *tx).await?;
            tx.commit().await?;
            tracing::Span::current().record("db.response.returned_rows", 0);
            return Ok(json!({"rows_affected": done.rows_affected()}));
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
                rows.push(row_json(&row));
            }
        }
        // A read never changes anything, whatever the statement hides.
        tx.rollback().await?;
        tracing::Span::current().record("db.response.returned_rows", rows.len() as u64);
        Ok(json!({"rows": rows, "row_count": rows.len(), "truncated": truncated}))
    }
}

fn bind<'q>(
    mut query: Query<'q, Any, AnyArguments>,
    params: &'q [Value],
) -> Query<'q, Any, AnyArguments> {
    for param in params {
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
}

fn row_json(row: &AnyRow) -> Value {
    let mut object = Map::new();
    for (i, column) in row.columns().iter().enumerate() {
        let value = if let Ok(v) = row.try_get::<Option<i64>, _>(i) {
            v.map(Value::from).unwrap_or(Value::Null)
        } else if let Ok(v) = row.try_get::<Option<f64>, _>(i) {
            v.map(Value::from).unwrap_or(Value::Null)
        } else if let Ok(v) = row.try_get::<Option<String>, _>(i) {
            v.map(Value::from).unwrap_or(Value::Null)
        } else if let Ok(v) = row.try_get::<Option<bool>, _>(i) {
            v.map(Value::from).unwrap_or(Value::Null)
        } else {
            Value::Null
        };
        object.insert(column.name().to_owned(), value);
    }
    Value::Object(object)
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

fn is_read(operation: &str) -> bool {
    matches!(operation, "SELECT" | "WITH" | "VALUES" | "EXPLAIN" | "SHOW")
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
        assert!(is_read("WITH") && is_read("SELECT") && !is_read("DELETE"));
    }
}
