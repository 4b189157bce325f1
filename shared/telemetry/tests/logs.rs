//! Every log record from every crate passes the sanitizer (issue 11 item 8):
//! events emitted under third-party targets (sqlx's slow-statement warning
//! with its raw SQL, hyper, async-nats, tonic, a crate we have never heard
//! of) and `log`-crate records, through the same layer `init` installs, in
//! both formats.

use std::sync::{Arc, Mutex, Once};

use telemetry::LogFormat;
use tracing_subscriber::layer::SubscriberExt;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("capture").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = Capture;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// What `emit` logs through the layer `init` would install for `format`.
fn capture(format: LogFormat, emit: impl FnOnce()) -> String {
    static LOG_BRIDGE: Once = Once::new();
    // `init` installs the same bridge (tracing-subscriber's `try_init`).
    LOG_BRIDGE.call_once(|| tracing_log::LogTracer::init().expect("log bridge"));
    let out = Capture::default();
    let subscriber =
        tracing_subscriber::registry().with(telemetry::logs::layer(format, "trace", out.clone()));
    tracing::subscriber::with_default(subscriber, emit);
    let bytes = out.0.lock().expect("capture").clone();
    String::from_utf8(bytes).expect("utf-8 log output")
}

const SQL: &str = "\n\nUPDATE users SET password = 'hunter2', card = '4242 4242 4242 4242' \
                   WHERE email = 'bob@example.com'\n";
const HTTP_ERROR: &str = "error sending request for url \
     (https://api.example.com/v1/charge?sig=abc123XYZ&key=k3yV4lue&auth=s3cr3tAuth&page=2)";

/// The secrets the events below carry; none may reach the output.
const SECRETS: &[&str] = &[
    "hunter2",
    "4242 4242",
    "bob@example.com",
    "abc123XYZ",
    "k3yV4lue",
    "s3cr3tAuth",
    "two words secret",
    "9876",
    "s3cretPw",
];

/// One sqlx-shaped slow-statement warning and one error event per target.
macro_rules! emit_as {
    ($($target:literal),+) => {{
        $(
            let summary = "UPDATE users SET …".to_owned();
            let sql = SQL.to_owned();
            let elapsed = std::time::Duration::from_millis(1500);
            tracing::warn!(
                target: $target,
                summary,
                db.statement = sql,
                rows_affected = 1u64,
                rows_returned = 0u64,
                ?elapsed,
                elapsed_secs = elapsed.as_secs_f64(),
                "slow statement: execution time exceeded alert threshold"
            );
            tracing::error!(
                target: $target,
                error = HTTP_ERROR,
                password = "two words secret",
                user_pin = 9876u64,
                url = "postgres://app:s3cretPw@db.internal:5432/beamline",
                "request failed: {HTTP_ERROR}"
            );
        )+
    }};
}

fn emit_everywhere() {
    emit_as!(
        "sqlx::query",
        "hyper::proto::h1::conn",
        "hyper_util::client::legacy",
        "async_nats::connector",
        "tonic::transport::server",
        "h2::codec",
        "some_crate::deep::module"
    );
    log::warn!(target: "sqlx::query", "slow statement: {SQL}");
    log::error!(target: "reqwest::connect", "{HTTP_ERROR} password=hunter2");
}

fn assert_clean(format: LogFormat, out: &str) {
    let leaked: Vec<&str> = SECRETS
        .iter()
        .copied()
        .filter(|s| out.contains(s))
        .collect();
    assert!(leaked.is_empty(), "{format:?} leaked {leaked:?}:\n{out}");
    // Each target's events arrived (a filter that drops them proves nothing).
    for target in [
        "sqlx::query",
        "hyper::proto::h1::conn",
        "tonic::transport::server",
        "some_crate::deep::module",
    ] {
        assert!(
            out.contains(target),
            "{format:?}: nothing from {target}:\n{out}"
        );
    }
    assert!(out.contains("slow statement"), "{format:?}:\n{out}");
    assert!(out.contains("[REDACTED"), "{format:?}:\n{out}");
}

#[test]
fn json_lines_from_every_crate_are_sanitized() {
    let out = capture(LogFormat::Json, emit_everywhere);
    for line in out.lines() {
        serde_json::from_str::<serde_json::Value>(line).expect("each line is JSON");
    }
    assert_eq!(out.lines().count(), 7 * 2 + 2, "{out}");
    assert_clean(LogFormat::Json, &out);
}

#[test]
fn pretty_lines_from_every_crate_are_sanitized() {
    let out = capture(LogFormat::Pretty, emit_everywhere);
    assert_clean(LogFormat::Pretty, &out);
}

#[test]
fn span_fields_in_pretty_lines_are_sanitized_and_ids_kept() {
    let run_id = "01936123-4567-7890-8123-123456789012";
    let out = capture(LogFormat::Pretty, || {
        let span = tracing::info_span!("request", run.id = run_id, api_key = "k3y v4lue");
        let _entered = span.enter();
        tracing::info!(target: "hyper::server", "served");
    });
    assert!(!out.contains("k3y v4lue"), "{out}");
    assert!(out.contains(run_id), "{out}");
}
