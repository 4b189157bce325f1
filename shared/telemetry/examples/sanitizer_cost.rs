//! What the sanitizer costs per call on the hot paths (issue 12, 3.5): the
//! name check every log field, span attribute and JSON key goes through, and
//! a whole log line's fields. Prints ns per call; run it under callgrind for
//! instruction and allocation counts that do not depend on the machine's load:
//!
//! ```text
//! cargo run --release -p telemetry --example sanitizer_cost
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out \
//!     target/release/examples/sanitizer_cost 20000
//! callgrind_annotate --inclusive=yes /tmp/cg.out | grep is_sensitive_name
//! valgrind --tool=dhat --dhat-out-file=/dev/null \
//!     target/release/examples/sanitizer_cost 20000   # "Total: … in N blocks"
//! ```
//!
//! Run it with 10 and with 20 010 iterations and subtract: what is left is
//! the calls, without building the sanitizer.

// Printing the numbers is what this program is for.
#![allow(clippy::print_stdout)]

use std::hint::black_box;
use std::time::Instant;

use telemetry::sanitize::Sanitizer;

/// Field names as they occur: ours, OpenTelemetry's, third-party crates'.
const NAMES: &[&str] = &[
    "message",
    "run.id",
    "tenant.id",
    "step.id",
    "http.request.method",
    "http.response.status_code",
    "url.path",
    "messaging.destination.name",
    "error",
    "elapsed_secs",
    "db.statement",
    "rows_affected",
    "otel.kind",
    "X-Api-Key",
    "refresh_token",
    "Authorization",
];

/// One log line's fields (name, value).
const LINE: &[(&str, &str)] = &[
    ("message", "run accepted"),
    ("run.id", "0193a5b2-7c1e-7f3a-9b2d-4e5f6a7b8c9d"),
    ("tenant.id", "acme"),
    ("flow.id", "checkout"),
    ("http.response.status_code", "202"),
    ("elapsed_ms", "12"),
];

fn main() {
    let iterations: u64 = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000_000);
    let sanitizer = Sanitizer::new(&["ssn".to_owned()], &[]).expect("sanitizer");

    let start = Instant::now();
    let mut sensitive = 0u64;
    for i in 0..iterations {
        let name = NAMES[(i as usize) % NAMES.len()];
        sensitive += u64::from(sanitizer.is_sensitive_name(black_box(name)));
    }
    let per_name = start.elapsed().as_nanos() as f64 / iterations as f64;
    black_box(sensitive);

    let lines = (iterations / 10).max(1);
    let start = Instant::now();
    for _ in 0..lines {
        for (name, value) in LINE {
            black_box(sanitizer.field(black_box(name), black_box(value)));
        }
    }
    let per_line = start.elapsed().as_nanos() as f64 / lines as f64;

    println!("is_sensitive_name: {per_name:.1} ns/call over {iterations} calls");
    println!(
        "field() x {} (one log line): {per_line:.1} ns/line over {lines} lines",
        LINE.len()
    );
}
