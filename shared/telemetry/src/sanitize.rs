//! Sanitization, failing closed: nothing secret or personal leaves a process
//! through a log line, a span attribute or event, or a metric label.
//!
//! Two rules: a value under a sensitive *name* (password, token, api key,
//! authorization, cookie, … plus `TELEMETRY_REDACT_FIELDS`) is replaced whole;
//! any other value is scanned for sensitive *shapes* (bearer tokens, known key
//! formats, `secret=…` pairs and URL parameters, emails, Luhn-valid card
//! numbers, plus `TELEMETRY_REDACT_PATTERNS`). JSON inside a value is walked
//! by key. A value too large to scan is replaced, never passed through.

use std::borrow::Cow;
use std::sync::OnceLock;

use regex::{Captures, Regex};
use serde_json::Value;

pub const REDACTED: &str = "[REDACTED]";
/// What replaces a value the sanitizer will not scan.
pub const UNPROCESSABLE: &str = "[REDACTED:unprocessable]";
/// Values longer than this are not scanned but replaced.
pub const MAX_SCAN_BYTES: usize = 64 * 1024;

/// Name fragments that mark a field, header, label or JSON key as sensitive.
const SENSITIVE_NAMES: &[&str] = &[
    "password",
    "passwd",
    "pwd",
    "secret",
    "token",
    "api_key",
    "apikey",
    "api-key",
    "authorization",
    "cookie",
    "credential",
    "private_key",
    "session",
    "signature",
    "access_key",
];

pub struct Sanitizer {
    names: Vec<String>,
    bearer: Regex,
    key_shapes: Regex,
    pairs: Regex,
    email: Regex,
    digits: Regex,
    custom: Vec<Regex>,
    /// Every pattern above in one automaton: one pass says whether a value
    /// needs any replacement at all (most values do not).
    screen: regex::RegexSet,
}

impl Sanitizer {
    /// The built-in rules plus `extra_names` and `extra_patterns`.
    pub fn new(extra_names: &[String], extra_patterns: &[String]) -> Result<Self, String> {
        let mut names: Vec<String> = SENSITIVE_NAMES.iter().map(|s| (*s).to_owned()).collect();
        names.extend(
            extra_names
                .iter()
                .map(|n| n.trim().to_ascii_lowercase())
                .filter(|n| !n.is_empty()),
        );
        let custom = extra_patterns
            .iter()
            .map(|p| Regex::new(p).map_err(|e| format!("pattern {p:?}: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let name_alternation = names
            .iter()
            .map(|n| regex::escape(n).replace("_", "[_-]?"))
            .collect::<Vec<_>>()
            .join("|");
        let compile = |re: &str| Regex::new(re).map_err(|e| e.to_string());
        let mut sanitizer = Self {
            bearer: compile(r"(?i)\b(bearer|basic|token)\s+[A-Za-z0-9._~+/=-]{6,}")?,
            key_shapes: compile(concat!(
                r"\bAKIA[0-9A-Z]{16}\b",
                r"|\b(?:sk|pk|rk)_(?:live|test)_[0-9A-Za-z]{8,}",
                r"|\bgh[pousr]_[A-Za-z0-9]{20,}",
                r"|\bxox[abprs]-[A-Za-z0-9-]{10,}",
                r"|\beyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]+",
                r"|-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)",
            ))?,
            // `name=value`, `name: value`, `"name": "value"` and URL parameters.
            pairs: compile(&format!(
                r#"(?i)((?:[A-Za-z0-9_.-]*(?:{name_alternation})[A-Za-z0-9_.-]*)"?\s*[=:]\s*"?)([^\s&,;"'}}]+)"#
            ))?,
            email: compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")?,
            // Not after a digit or `.`: the fraction of a float is no card.
            digits: compile(r"(^|[^0-9.])(\d(?:[ -]?\d){12,18})\b")?,
            names,
            custom,
            screen: regex::RegexSet::empty(),
        };
        let patterns = [
            &sanitizer.bearer,
            &sanitizer.key_shapes,
            &sanitizer.pairs,
            &sanitizer.email,
            &sanitizer.digits,
        ]
        .into_iter()
        .chain(sanitizer.custom.iter())
        .map(Regex::as_str)
        .collect::<Vec<_>>();
        sanitizer.screen = regex::RegexSet::new(patterns).map_err(|e| e.to_string())?;
        Ok(sanitizer)
    }

    /// Whether a field/header/key name is sensitive.
    pub fn is_sensitive_name(&self, name: &str) -> bool {
        let lower = name.to_ascii_lowercase();
        let squashed = lower.replace(['-', '.'], "_");
        self.names
            .iter()
            .any(|n| lower.contains(n.as_str()) || squashed.contains(&n.replace('-', "_")))
    }

    /// The value of field `name`, sanitized.
    pub fn field<'a>(&self, name: &str, value: &'a str) -> Cow<'a, str> {
        if self.is_sensitive_name(name) && !value.is_empty() {
            Cow::Borrowed(REDACTED)
        } else {
            self.scrub(value)
        }
    }

    /// A value of unknown meaning, with every sensitive shape replaced.
    pub fn scrub<'a>(&self, value: &'a str) -> Cow<'a, str> {
        if value.len() > MAX_SCAN_BYTES {
            return Cow::Borrowed(UNPROCESSABLE);
        }
        let trimmed = value.trim_start();
        if (trimmed.starts_with('{') || trimmed.starts_with('['))
            && let Ok(mut json) = serde_json::from_str::<Value>(value)
        {
            self.json(&mut json);
            return Cow::Owned(json.to_string());
        }
        self.scrub_text(value)
    }

    /// Sanitizes a JSON value in place, by key.
    pub fn json(&self, value: &mut Value) {
        match value {
            Value::Object(map) => {
                for (key, item) in map.iter_mut() {
                    if self.is_sensitive_name(key) && !item.is_null() {
                        *item = Value::String(REDACTED.to_owned());
                    } else {
                        self.json(item);
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|item| self.json(item)),
            Value::String(text) => {
                if let Cow::Owned(clean) = self.scrub_text(text) {
                    *text = clean;
                }
            }
            Value::Number(n) if n.to_string().len() >= 13 => {
                if let Cow::Owned(clean) = self.scrub_text(&n.to_string()) {
                    *value = Value::String(clean);
                }
            }
            _ => {}
        }
    }

    fn scrub_text<'a>(&self, value: &'a str) -> Cow<'a, str> {
        if !self.screen.is_match(value) {
            return Cow::Borrowed(value);
        }
        let mut out = Cow::Borrowed(value);
        let mut apply = |re: &Regex, replace: &dyn Fn(&Captures) -> String| {
            if re.is_match(&out) {
                let replaced = re.replace_all(&out, |c: &Captures| replace(c)).into_owned();
                out = Cow::Owned(replaced);
            }
        };
        apply(&self.key_shapes, &|_| REDACTED.to_owned());
        apply(&self.bearer, &|c| format!("{} {REDACTED}", &c[1]));
        apply(&self.pairs, &|c| format!("{}{REDACTED}", &c[1]));
        apply(&self.email, &|_| "[REDACTED:email]".to_owned());
        apply(&self.digits, &|c| format!("{}{}", &c[1], mask_card(&c[2])));
        for custom in &self.custom {
            apply(custom, &|_| REDACTED.to_owned());
        }
        out
    }
}

/// A Luhn-valid 13–19 digit number masked to its last four; anything else as is.
fn mask_card(candidate: &str) -> String {
    let digits: Vec<u32> = candidate.chars().filter_map(|c| c.to_digit(10)).collect();
    if !(13..=19).contains(&digits.len()) || !luhn(&digits) {
        return candidate.to_owned();
    }
    let last4: String = digits[digits.len() - 4..]
        .iter()
        .map(|d| char::from(b'0' + *d as u8))
        .collect();
    format!("[REDACTED:card ****{last4}]")
}

fn luhn(digits: &[u32]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, d)| {
            if i % 2 == 1 {
                if d * 2 > 9 { d * 2 - 9 } else { d * 2 }
            } else {
                *d
            }
        })
        .sum();
    sum % 10 == 0
}

static GLOBAL: OnceLock<Sanitizer> = OnceLock::new();

/// The process-wide sanitizer (the built-in rules until `init` installs the
/// configured one).
pub fn global() -> &'static Sanitizer {
    GLOBAL.get_or_init(|| Sanitizer::new(&[], &[]).expect("the built-in patterns compile"))
}

pub(crate) fn install(sanitizer: Sanitizer) {
    let _ = GLOBAL.set(sanitizer);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn s() -> Sanitizer {
        Sanitizer::new(&["ssn".to_owned()], &[r"ACME-\d{6}".to_owned()]).expect("sanitizer")
    }

    #[test]
    fn sensitive_names_are_replaced_whole() {
        let s = s();
        for name in [
            "password",
            "db.password",
            "X-Api-Key",
            "Authorization",
            "set-cookie",
            "refresh_token",
            "ssn",
            "clientSecret",
        ] {
            assert_eq!(s.field(name, "anything at all"), REDACTED, "{name}");
        }
        assert_eq!(s.field("flow_id", "hello"), "hello");
    }

    #[test]
    fn bearer_tokens_and_key_shapes_anywhere() {
        let s = s();
        let out = s.scrub("sent Authorization: Bearer abc.def-ghi_123 to upstream");
        assert!(!out.contains("abc.def-ghi_123"), "{out}");
        for secret in [
            "AKIAIOSFODNN7EXAMPLE",
            "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
            "ghp_16C7e42F292c6912E7710c838347Ae178B4a",
            "xoxb-123456789012-abcdefghij",
            "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
        ] {
            let input = format!("value {secret} end");
            let out = s.scrub(&input);
            assert!(!out.contains(secret), "{secret}: {out}");
            assert!(out.starts_with("value ") && out.ends_with(" end"), "{out}");
        }
        let pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----";
        assert!(!s.scrub(pem).contains("MIIEow"));
    }

    #[test]
    fn pairs_and_url_parameters() {
        let s = s();
        let out = s.scrub("login failed: password=hunter2 user=bob");
        assert_eq!(out, "login failed: password=[REDACTED] user=bob");
        let out = s.scrub("GET http://api.local/v1?api_key=supersecret123&page=2 failed");
        assert_eq!(
            out,
            "GET http://api.local/v1?api_key=[REDACTED]&page=2 failed"
        );
        let out = s.scrub(r#"{"note": "client_secret: s3cr3t!"}"#);
        assert!(!out.contains("s3cr3t"), "{out}");
    }

    #[test]
    fn emails_and_cards() {
        let s = s();
        assert_eq!(
            s.scrub("mail alice.smith@example.co.uk now"),
            "mail [REDACTED:email] now"
        );
        assert_eq!(
            s.scrub("card 4111 1111 1111 1111."),
            "card [REDACTED:card ****1111]."
        );
        assert_eq!(
            s.scrub("card 4111-1111-1111-1111"),
            "card [REDACTED:card ****1111]"
        );
        assert_eq!(
            s.scrub("pan=5500005555555559"),
            "pan=[REDACTED:card ****5559]"
        );
        // Not Luhn-valid: an order number stays.
        assert_eq!(s.scrub("order 1234567890123"), "order 1234567890123");
        // Digits after a decimal point are no card number.
        assert_eq!(
            s.scrub("took 3.5634040000000002 ms"),
            "took 3.5634040000000002 ms"
        );
        assert_eq!(s.scrub("4111111111111111"), "[REDACTED:card ****1111]");
    }

    #[test]
    fn nested_json_is_walked_by_key() {
        let s = s();
        let raw = json!({
            "user": {"email": "bob@example.com", "password": "pw", "profile": {"ssn": "123-45-6789"}},
            "headers": [{"Authorization": "Bearer xyz123456"}],
            "note": "ref ACME-123456",
            "card": 4111111111111111u64,
        })
        .to_string();
        let out = s.scrub(&raw);
        for leaked in [
            "bob@example.com",
            "\"pw\"",
            "123-45-6789",
            "xyz123456",
            "ACME-123456",
            "4111111111111111",
        ] {
            assert!(!out.contains(leaked), "{leaked} in {out}");
        }
        let parsed: Value = serde_json::from_str(&out).expect("still JSON");
        assert_eq!(parsed["user"]["password"], REDACTED);
        assert_eq!(parsed["card"], "[REDACTED:card ****1111]");
    }

    #[test]
    fn what_cannot_be_scanned_is_replaced() {
        let s = s();
        let huge = "a".repeat(MAX_SCAN_BYTES + 1);
        assert_eq!(s.scrub(&huge), UNPROCESSABLE);
    }

    #[test]
    fn bad_custom_patterns_are_refused() {
        assert!(Sanitizer::new(&[], &["(".to_owned()]).is_err());
    }
}
