//! What a step's SQL is, found by a tokenizer that knows the dialect's
//! quotes and comments: exactly one statement, and which kind.
//!
//! A `;` split or a first-keyword check is fooled by `SELECT 1; COMMIT; DELETE …`
//! or by a `;` inside a string, comment or `$$`-quoted body. Here strings
//! (`'…'` with `''`, PostgreSQL's `E'…'` with backslash escapes and
//! `$tag$…$tag$`), quoted identifiers (`"…"`, SQLite's `` `…` `` and `[…]`) and
//! comments (`--`, `/* */`, nested on PostgreSQL) are skipped, and anything
//! but whitespace, comments or more `;` after the first statement's `;` is
//! refused. Anything unterminated is refused too: the tokenizer fails closed.
//! Which statements may run at all is an allowlist ([`Kind`]).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// What a statement does, from its leading keyword.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `SELECT`, `WITH`, `VALUES`, `EXPLAIN`; PostgreSQL also `TABLE`, `SHOW`.
    /// (A `WITH` that modifies data is stopped by the read-only connection or
    /// transaction, not here.)
    Read,
    /// `INSERT`, `UPDATE`, `DELETE`, `CREATE`, `ALTER`, `DROP`; SQLite also
    /// `REPLACE`, PostgreSQL also `MERGE`, `TRUNCATE`.
    Write,
}

/// One statement, ready to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement<'q> {
    pub kind: Kind,
    /// The statement's leading keyword, upper-cased.
    pub keyword: String,
    /// The statement without the trailing `;`, comments and whitespace.
    pub text: &'q str,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StatementError {
    #[error("the query is empty")]
    Empty,
    #[error("a step runs exactly one statement; found more after the first `;` (at byte {0})")]
    Multiple(usize),
    #[error("the query has an unterminated {0}")]
    Unterminated(&'static str),
    #[error(
        "{0} statements are not allowed in sql steps (only SELECT/WITH/VALUES/EXPLAIN reads and INSERT/UPDATE/DELETE/CREATE/ALTER/DROP writes; no ATTACH, PRAGMA, VACUUM, COPY, SET, DO or transaction control)"
    )]
    NotAllowed(String),
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80
}

/// Splits off the one statement of `query` and classifies it.
pub fn parse(query: &str, dialect: Dialect) -> Result<Statement<'_>, StatementError> {
    let bytes = query.as_bytes();
    let mut i = 0;
    let mut first_word: Option<(usize, usize)> = None;
    // Where the statement's last meaningful token ends.
    let mut end = 0;
    let mut statement_over = false;
    while i < bytes.len() {
        let c = bytes[i];
        let start = i;
        // Whitespace and comments separate tokens and may follow the `;`.
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if c == b'-' && bytes.get(i + 1) == Some(&b'-') {
            while i < bytes.len() && bytes[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        if c == b'/' && bytes.get(i + 1) == Some(&b'*') {
            i = skip_block_comment(bytes, i, dialect)?;
            continue;
        }
        if c == b';' {
            statement_over = true;
            i += 1;
            continue;
        }
        if statement_over {
            return Err(StatementError::Multiple(start));
        }
        match c {
            b'\'' => {
                let backslash = dialect == Dialect::Postgres
                    && start > 0
                    && bytes[start - 1].eq_ignore_ascii_case(&b'e')
                    && (start < 2 || !is_ident(bytes[start - 2]));
                i = skip_quoted(bytes, i, b'\'', backslash, "string literal")?;
            }
            b'"' => i = skip_quoted(bytes, i, b'"', false, "quoted identifier")?,
            b'`' if dialect == Dialect::Sqlite => {
                i = skip_quoted(bytes, i, b'`', false, "quoted identifier")?;
            }
            b'[' if dialect == Dialect::Sqlite => {
                i = match bytes[i + 1..].iter().position(|b| *b == b']') {
                    Some(at) => i + 1 + at + 1,
                    None => return Err(StatementError::Unterminated("[identifier]")),
                };
            }
            b'$' if dialect == Dialect::Postgres && (start == 0 || !is_ident(bytes[start - 1])) => {
                i = skip_dollar(bytes, i)?;
            }
            c if is_ident(c) => {
                while i < bytes.len() && (is_ident(bytes[i]) || bytes[i] == b'$') {
                    i += 1;
                }
                if first_word.is_none() {
                    first_word = Some((start, i));
                }
            }
            _ => i += 1,
        }
        end = i;
    }
    let Some((from, to)) = first_word else {
        return Err(if end == 0 {
            StatementError::Empty
        } else {
            StatementError::NotAllowed(query[..end].trim().chars().take(20).collect())
        });
    };
    let keyword = query[from..to].to_ascii_uppercase();
    let kind =
        classify(&keyword, dialect).ok_or_else(|| StatementError::NotAllowed(keyword.clone()))?;
    Ok(Statement {
        kind,
        keyword,
        text: query[..end].trim_start(),
    })
}

fn classify(keyword: &str, dialect: Dialect) -> Option<Kind> {
    match (keyword, dialect) {
        ("SELECT" | "WITH" | "VALUES" | "EXPLAIN", _) => Some(Kind::Read),
        ("TABLE" | "SHOW", Dialect::Postgres) => Some(Kind::Read),
        ("INSERT" | "UPDATE" | "DELETE" | "CREATE" | "ALTER" | "DROP", _) => Some(Kind::Write),
        ("REPLACE", Dialect::Sqlite) => Some(Kind::Write),
        ("MERGE" | "TRUNCATE", Dialect::Postgres) => Some(Kind::Write),
        _ => None,
    }
}

/// Past a `/* … */` comment starting at `i`; PostgreSQL's nest.
fn skip_block_comment(
    bytes: &[u8],
    mut i: usize,
    dialect: Dialect,
) -> Result<usize, StatementError> {
    let mut depth = 0;
    while i < bytes.len() {
        if bytes[i] == b'/' && bytes.get(i + 1) == Some(&b'*') {
            if depth == 0 || dialect == Dialect::Postgres {
                depth += 1;
            }
            i += 2;
        } else if bytes[i] == b'*' && bytes.get(i + 1) == Some(&b'/') {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return Ok(i);
            }
        } else {
            i += 1;
        }
    }
    Err(StatementError::Unterminated("/* comment"))
}

/// Past a `quote`-delimited token starting at `i` (a doubled quote is one
/// quote character; with `backslash`, `\x` escapes too).
fn skip_quoted(
    bytes: &[u8],
    mut i: usize,
    quote: u8,
    backslash: bool,
    what: &'static str,
) -> Result<usize, StatementError> {
    i += 1;
    while i < bytes.len() {
        if backslash && bytes[i] == b'\\' {
            i += 2;
            continue;
        }
        if bytes[i] == quote {
            if bytes.get(i + 1) == Some(&quote) {
                i += 2;
                continue;
            }
            return Ok(i + 1);
        }
        i += 1;
    }
    Err(StatementError::Unterminated(what))
}

/// Past `$tag$ … $tag$` at `i`, or past a `$1` parameter.
fn skip_dollar(bytes: &[u8], i: usize) -> Result<usize, StatementError> {
    let mut j = i + 1;
    if bytes.get(j).is_some_and(u8::is_ascii_digit) {
        while bytes.get(j).is_some_and(u8::is_ascii_digit) {
            j += 1;
        }
        return Ok(j);
    }
    while j < bytes.len() && is_ident(bytes[j]) {
        j += 1;
    }
    if bytes.get(j) != Some(&b'$') {
        // A lone `$`: not a quote; the server will judge it.
        return Ok(i + 1);
    }
    let delimiter = &bytes[i..=j];
    let body = j + 1;
    bytes[body..]
        .windows(delimiter.len())
        .position(|w| w == delimiter)
        .map(|at| body + at + delimiter.len())
        .ok_or(StatementError::Unterminated("$$-quoted string"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(query: &str, dialect: Dialect) -> Result<Kind, StatementError> {
        parse(query, dialect).map(|s| s.kind)
    }

    #[test]
    fn one_statement_with_a_trailing_semicolon_and_comments() {
        for dialect in [Dialect::Sqlite, Dialect::Postgres] {
            let s = parse("  select a from t where b = ';' ; -- done\n ;", dialect).expect("one");
            assert_eq!(s.kind, Kind::Read);
            assert_eq!(s.keyword, "SELECT");
            assert_eq!(s.text, "select a from t where b = ';'");
            assert_eq!(
                parse(
                    "/* c; */ INSERT INTO t VALUES ('a;b', \"x;\") /* ; */",
                    dialect
                )
                .expect("one")
                .kind,
                Kind::Write
            );
        }
    }

    #[test]
    fn stacked_statements_are_refused_in_both_dialects() {
        for dialect in [Dialect::Sqlite, Dialect::Postgres] {
            for query in [
                "SELECT 1; COMMIT; DELETE FROM items WHERE id = 1",
                "SELECT 1; COMMIT; ATTACH DATABASE '/tmp/x.db' AS z; CREATE TABLE z.t(x)",
                "SELECT 1;DELETE FROM t",
                "SELECT 'a'';' ; DROP TABLE t",
                "SELECT 1 /* ; */; UPDATE t SET a = 1",
                "SELECT \"a;\" FROM t; VACUUM",
            ] {
                assert!(
                    matches!(parse(query, dialect), Err(StatementError::Multiple(_))),
                    "{dialect:?}: {query}"
                );
            }
        }
    }

    #[test]
    fn postgres_quoting_is_understood() {
        let pg = Dialect::Postgres;
        // A `;` inside dollar quotes, E-strings and nested comments is text.
        assert_eq!(
            kind("SELECT $$a; DELETE$$, $x$;$x$ FROM t", pg),
            Ok(Kind::Read)
        );
        assert_eq!(kind("SELECT E'it\\'s; x' FROM t", pg), Ok(Kind::Read));
        assert_eq!(kind("SELECT /* a /* b; */ c; */ 1", pg), Ok(Kind::Read));
        assert_eq!(kind("SELECT * FROM t WHERE id = $1", pg), Ok(Kind::Read));
        // ... but the same text ends a statement where it is not quoted.
        assert!(matches!(
            parse("SELECT E'it\\'s'; DELETE FROM t", pg),
            Err(StatementError::Multiple(_))
        ));
        assert!(matches!(
            parse("SELECT $$x$$; DELETE FROM t", pg),
            Err(StatementError::Multiple(_))
        ));
        // On SQLite a backslash is no escape: `'\'` is a whole string.
        assert!(matches!(
            parse("SELECT '\\'; DELETE FROM t", Dialect::Sqlite),
            Err(StatementError::Multiple(_))
        ));
        assert_eq!(
            kind("SELECT [a;b], `c;d` FROM t", Dialect::Sqlite),
            Ok(Kind::Read)
        );
    }

    #[test]
    fn unterminated_input_fails_closed() {
        for (query, dialect) in [
            ("SELECT 'abc", Dialect::Sqlite),
            ("SELECT \"abc", Dialect::Postgres),
            ("SELECT 1 /* ; DELETE FROM t", Dialect::Postgres),
            ("SELECT $q$ ; DELETE FROM t", Dialect::Postgres),
            ("SELECT /* /* */ ; DELETE FROM t", Dialect::Postgres),
        ] {
            assert!(
                matches!(parse(query, dialect), Err(StatementError::Unterminated(_))),
                "{query}"
            );
        }
        assert_eq!(
            parse("  -- nothing\n", Dialect::Sqlite),
            Err(StatementError::Empty)
        );
    }

    #[test]
    fn only_reads_and_plain_writes_are_allowed() {
        for query in [
            "ATTACH DATABASE '/any/path.db' AS z",
            "DETACH z",
            "VACUUM INTO '/tmp/copy.db'",
            "PRAGMA writable_schema = 1",
            "BEGIN",
            "COMMIT",
            "ROLLBACK",
            "SAVEPOINT a",
            "RELEASE a",
            "REINDEX",
            "ANALYZE",
        ] {
            assert!(
                matches!(
                    kind(query, Dialect::Sqlite),
                    Err(StatementError::NotAllowed(_))
                ),
                "{query}"
            );
        }
        for query in [
            "COPY t TO PROGRAM 'id'",
            "SET statement_timeout = 0",
            "RESET ALL",
            "DO $$ BEGIN PERFORM 1; END $$",
            "CALL p()",
            "LISTEN x",
            "LOCK TABLE t",
            "GRANT ALL ON t TO public",
            "DISCARD ALL",
            "VACUUM",
            "COMMIT",
        ] {
            assert!(
                matches!(
                    kind(query, Dialect::Postgres),
                    Err(StatementError::NotAllowed(_))
                ),
                "{query}"
            );
        }
        assert_eq!(
            kind("(SELECT 1) UNION (SELECT 2)", Dialect::Postgres),
            Ok(Kind::Read)
        );
        assert_eq!(
            kind("WITH x AS (SELECT 1) SELECT * FROM x", Dialect::Sqlite),
            Ok(Kind::Read)
        );
        assert_eq!(kind("DELETE FROM t", Dialect::Sqlite), Ok(Kind::Write));
        assert!(kind("TRUNCATE t", Dialect::Sqlite).is_err());
    }
}
