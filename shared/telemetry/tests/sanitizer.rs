//! The sanitizer against the outside suite's findings: every leaked example
//! (issue 11 item 8) is redacted, and nothing that is not a secret changes —
//! above all no id (issue 10 item 9: 1–1.5 % of UUIDv7 run ids were masked as
//! card numbers).

use telemetry::sanitize::Sanitizer;

fn sanitizer() -> Sanitizer {
    Sanitizer::new(&[], &[]).expect("the built-in rules compile")
}

/// A small deterministic generator (xorshift64*): the id test must be
/// reproducible, and a failure names the seed-derived id.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        for chunk in out.chunks_mut(8) {
            let word = self.next().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
        out
    }

    /// `len` hex digits; with `decimal`, digits 0–9 only (still valid hex, and
    /// the shape a card scanner is most likely to mistake).
    fn hex(&mut self, len: usize, decimal: bool) -> String {
        (0..len)
            .map(|_| {
                let n = self.next() >> 33;
                if decimal {
                    char::from(b'0' + (n % 10) as u8)
                } else {
                    char::from_digit((n % 16) as u32, 16).expect("hex digit")
                }
            })
            .collect()
    }
}

/// A UUIDv7: mostly `now_v7()`, the rest with timestamps from 1970 to 2200
/// and random bits, some of them forced to decimal digits.
fn run_id(rng: &mut Rng, i: usize) -> String {
    match i % 4 {
        0 => uuid::Uuid::now_v7().to_string(),
        1 => {
            let millis = rng.next() % 7_258_118_400_000;
            uuid::Builder::from_unix_timestamp_millis(millis, &rng.bytes::<10>())
                .into_uuid()
                .to_string()
        }
        _ => {
            // Random bits whose hex is all decimal digits: the worst case.
            let millis = 1_600_000_000_000 + rng.next() % 200_000_000_000;
            let mut random = [0u8; 10];
            for byte in &mut random {
                let hi = (rng.next() % 10) as u8;
                let lo = (rng.next() % 10) as u8;
                *byte = (hi << 4) | lo;
            }
            uuid::Builder::from_unix_timestamp_millis(millis, &random)
                .into_uuid()
                .to_string()
        }
    }
}

#[test]
fn no_run_trace_or_span_id_is_ever_altered() {
    let s = sanitizer();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut altered = Vec::new();
    for i in 0..100_000 {
        let run = run_id(&mut rng, i);
        // One in five trace/span ids is all decimal digits.
        let decimal = i % 5 == 0;
        let trace = rng.hex(32, decimal);
        let span = rng.hex(16, decimal);
        let traceparent = format!("00-{trace}-{span}-01");
        let sentence = format!(
            "run {run} finished after 3 steps in 1234 ms (trace_id={trace} span_id={span}); \
             traceparent: {traceparent}"
        );
        let checks: [(&str, &str, std::borrow::Cow<'_, str>); 10] = [
            ("run.id", &run, s.field("run.id", &run)),
            ("run_id", &run, s.field("run_id", &run)),
            ("scrub(run)", &run, s.scrub(&run)),
            ("trace_id", &trace, s.field("trace_id", &trace)),
            ("scrub(trace)", &trace, s.scrub(&trace)),
            ("span_id", &span, s.field("span_id", &span)),
            ("parent_span_id", &span, s.field("parent_span_id", &span)),
            (
                "traceparent",
                &traceparent,
                s.field("traceparent", &traceparent),
            ),
            ("scrub(traceparent)", &traceparent, s.scrub(&traceparent)),
            ("message", &sentence, s.scrub(&sentence)),
        ];
        for (what, input, output) in checks {
            if output != input {
                altered.push(format!("{what}: {input} -> {output}"));
            }
        }
    }
    assert!(
        altered.is_empty(),
        "{} ids altered, e.g. {:#?}",
        altered.len(),
        &altered[..altered.len().min(10)]
    );
}

/// Each leaked example, and the secret text that must be gone from the output.
const LEAKS: &[(&str, &[&str])] = &[
    // Cards next to other digits, an expiry, and with every separator.
    (
        "paid with 4242 4242 4242 4242 12/27 cvc",
        &["4242 4242 4242 4242"],
    ),
    ("qty 2 4000056655665556", &["4000056655665556"]),
    (
        "card 4000-0566-5566-5556 declined",
        &["4000-0566-5566-5556"],
    ),
    (
        "card 4242.4242.4242.4242 declined",
        &["4242.4242.4242.4242"],
    ),
    ("amex 3782 822463 10005 ok", &["3782 822463 10005"]),
    ("pan:5555555555554444,exp:1227", &["5555555555554444"]),
    (
        "order 17 card 6011111111111117 2 items",
        &["6011111111111117"],
    ),
    // Query strings in http error text: every value goes.
    (
        "error sending request for url (https://api.example.com/v1/charge?sig=abc123XYZ&key=k3yV4lue&auth=s3cr3tAuth&page=2)",
        &["abc123XYZ", "k3yV4lue", "s3cr3tAuth", "page=2"],
    ),
    (
        "GET /v1/export?X-Amz-Signature=f00dfeed&X-Amz-Credential=AKIDEXAMPLE%2F20261201 503",
        &["f00dfeed", "AKIDEXAMPLE"],
    ),
    (
        "redirect to https://app.example.com/cb#access_token=tok3nValue&state=xyz",
        &["tok3nValue"],
    ),
    // Pairs in the forms the suite found.
    ("password: 'hunter2'", &["hunter2"]),
    ("password: \"hunter two\"", &["hunter", "two"]),
    ("{:password => hunter2}", &["hunter2"]),
    ("password => 'hunter2'", &["hunter2"]),
    ("login pass=hunter2 user=bob", &["hunter2"]),
    ("auth=s3cr3tAuth", &["s3cr3tAuth"]),
    ("pin=4321 accepted", &["4321"]),
    ("cvv=123", &["cvv=123"]),
    ("ssn=123-45-6789", &["123-45-6789"]),
    ("user_pin: 9876", &["9876"]),
    // Raw SQL as sqlx's slow-statement warning logs it.
    (
        "\n\nUPDATE users SET password = 'hunter2', card = '4242 4242 4242 4242' WHERE id = 1\n",
        &["hunter2", "4242 4242"],
    ),
    (
        "INSERT INTO creds (user_name, passwd) VALUES ('bob', 'hunter2')",
        &[],
    ),
    // Key formats.
    (
        "OPENAI_API=sk-proj-AbCdEf0123456789_ghIJklMNopQRstuvWXyz",
        &["sk-proj-AbCdEf0123456789"],
    ),
    (
        "token glpat-xYz0123456789AbCdEfGh",
        &["glpat-xYz0123456789AbCdEfGh"],
    ),
    (
        "maps key AIzaSyA1b2C3d4E5f6G7h8I9j0KlMnOpQrStUvW set",
        &["AIzaSyA1b2C3d4E5f6G7h8I9j0KlMnOpQrStUvW"],
    ),
    (
        "registry npm_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8 used",
        &["npm_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"],
    ),
    ("aws ASIAIOSFODNN7EXAMPLE temp", &["ASIAIOSFODNN7EXAMPLE"]),
    // An unsigned JWT (`alg: none`): two segments and a trailing dot.
    (
        "jwt eyJhbGciOiJub25lIn0.eyJzdWIiOiJhZG1pbiJ9. accepted",
        &["eyJzdWIiOiJhZG1pbiJ9"],
    ),
    // Credentials in connection strings.
    (
        "connecting to postgres://app:s3cretPw@db.internal:5432/beamline failed",
        &["s3cretPw"],
    ),
    ("redis://:r3disPw@cache:6379/0", &["r3disPw"]),
    ("DSN app_user:Pa55word@tcp(db:3306)/app", &["Pa55word"]),
];

#[test]
fn every_leaked_example_is_redacted() {
    let s = sanitizer();
    let mut leaked = Vec::new();
    for (input, secrets) in LEAKS {
        let out = s.scrub(input);
        let mut secrets = secrets.to_vec();
        if secrets.is_empty() {
            // Values far from their column name are not shapes the sanitizer
            // can see; it must at least not break the statement.
            assert!(out.contains("VALUES"), "{out}");
            continue;
        }
        secrets.retain(|secret| out.contains(secret));
        if !secrets.is_empty() || !out.contains("REDACTED") {
            leaked.push(format!("{input:?} -> {out:?} (still has {secrets:?})"));
        }
    }
    assert!(
        leaked.is_empty(),
        "{} leaks:\n{}",
        leaked.len(),
        leaked.join("\n")
    );
}

/// Values that must come out byte for byte as they went in.
const UNCHANGED: &[&str] = &[
    // Ids.
    "0193a5b2-7c1e-7f3a-9b2d-4e5f6a7b8c9d",
    "01936123-4567-7890-8123-123456789012",
    "run 01936123-4567-7890-8123-123456789012 accepted",
    "4bf92f3577b34da6a3ce929d0e0e4736",
    "00f067aa0ba902b7",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "00-12345678901234567890123456789012-4111111111111111-01",
    "trace_id=12345678901234567890123456789012 span_id=4111111111111111",
    "step step-1 of flow flow_42 for tenant acme",
    // Hex.
    "sha256 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "0xdeadbeef 0x1234567890123456",
    // Times.
    "2026-12-01T22:28:04.031621229Z",
    "2026-12-01T22:28:04+01:00",
    "2026-12-01T22:28:04.123456789+00:00",
    "2026-12-01 22:28:04.123456",
    "at 1733097600123 ms, 1733097600123456 us, 1733097600123456789 ns",
    "took 3.5634040000000002 ms",
    "elapsed=1.5s elapsed_secs=1.5234567890123456",
    // Addresses and ports.
    "listening on 127.0.0.1:5432 and [::1]:4222",
    "peer 192.168.100.200 via 10.0.0.1:8080",
    "fe80::1ff:fe23:4567:890a",
    "GET http://127.0.0.1:8080/v1/runs/0193a5b2-7c1e-7f3a-9b2d-4e5f6a7b8c9d",
    // HTTP status lines.
    "HTTP/1.1 200 OK",
    "HTTP/2 503 Service Unavailable",
    // Prose and ordinary numbers.
    "processed 1234 of 5678 items, 12 345 678 bytes",
    "order 1234567890123",
    "the user passed the test; bypass=false, author=alice",
    "shipping address updated, mapping reloaded, ping=12ms, spinner on",
    "rows_affected=1 rows_returned=0",
    "version 1.2.3 (v0.34.0), build 20261201",
    "phone +1 415 555 2671",
    "no healthy provider; the run is queued",
];

#[test]
fn values_that_are_not_secrets_are_unchanged() {
    let s = sanitizer();
    let changed: Vec<String> = UNCHANGED
        .iter()
        .filter_map(|input| {
            let out = s.scrub(input);
            (out != *input).then(|| format!("{input:?} -> {out:?}"))
        })
        .collect();
    assert!(
        changed.is_empty(),
        "{} changed:\n{}",
        changed.len(),
        changed.join("\n")
    );
}
