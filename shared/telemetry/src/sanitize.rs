//! Sanitization, failing closed: nothing secret or personal leaves a process
//! through a log line, a span attribute or event, or a metric label.
//!
//! Two rules: a value under a sensitive *name* (password, token, api key,
//! authorization, cookie, pin, cvv, ssn, … plus `TELEMETRY_REDACT_FIELDS`) is
//! replaced whole; any other value is scanned for sensitive *shapes* (bearer
//! tokens, known key formats, `secret=…` pairs in their `=`, `:` and `=>`
//! forms, every query value of a URL, credentials in connection strings,
//! emails, Luhn-valid card numbers, plus `TELEMETRY_REDACT_PATTERNS`). JSON
//! inside a value is walked by key. A value too large to scan is replaced,
//! never passed through.
//!
//! Ids are never altered: UUIDs, traceparents, hex ids and values under an id
//! name (`run.id`, `span_id`, `traceId`, …) are not card-scanned.

use std::borrow::Cow;
use std::ops::Range;
use std::sync::OnceLock;

use aho_corasick::AhoCorasick;
use regex::{Captures, Regex};
use serde_json::Value;

pub const REDACTED: &str = "[REDACTED]";
/// What replaces a value the sanitizer will not scan.
pub const UNPROCESSABLE: &str = "[REDACTED:unprocessable]";
/// Values longer than this are not scanned but replaced.
pub const MAX_SCAN_BYTES: usize = 64 * 1024;

/// Name fragments that mark a field, header, label or JSON key as sensitive
/// wherever they occur in it (`db.password`, `clientSecret`, `X-Api-Key`).
/// Compared after folding case and `-`/`.` to `_`.
const SENSITIVE_NAMES: &[&str] = &[
    "password",
    "passwd",
    "pwd",
    "secret",
    "token",
    "api_key",
    "apikey",
    "authorization",
    "cookie",
    "credential",
    "private_key",
    "session",
    "signature",
    "access_key",
];

/// Short names that are sensitive only as a whole component of a name
/// (`pin`, `user_pin`, `userPin`, `auth.pass`) — as fragments they would hit
/// `mapping`, `author` and `passed`.
const SENSITIVE_COMPONENTS: &[&str] = &["pass", "auth", "pin", "cvv", "cvc", "ssn", "sig"];

/// Longest name folded on the stack; longer ones (none in practice) are
/// folded on the heap.
const NAME_BUF: usize = 128;

pub struct Sanitizer {
    /// `SENSITIVE_NAMES` plus the configured names, folded, in one automaton.
    names: AhoCorasick,
    bearer: Regex,
    key_shapes: Regex,
    /// Every query (and `k=v` fragment) of a URL, absolute or a bare path.
    urls: Regex,
    /// `scheme://user:password@host`.
    url_credentials: Regex,
    /// `user:password@host` without a scheme (MySQL/Go DSNs).
    dsn_credentials: Regex,
    pairs: Regex,
    email: Regex,
    /// Shapes a card scan must skip: UUIDs, traceparents, id-labelled values.
    ids: Regex,
    custom: Vec<Regex>,
    /// Every pattern above that redacts, in one automaton: one pass says
    /// whether a value needs any regex replacement at all (most do not).
    screen: regex::RegexSet,
}

impl Sanitizer {
    /// The built-in rules plus `extra_names` and `extra_patterns`.
    pub fn new(extra_names: &[String], extra_patterns: &[String]) -> Result<Self, String> {
        let mut names: Vec<String> = SENSITIVE_NAMES.iter().map(|s| (*s).to_owned()).collect();
        names.extend(
            extra_names
                .iter()
                .map(|n| String::from_utf8(fold_name(n.trim().as_bytes())).unwrap_or_default())
                .filter(|n| !n.is_empty()),
        );
        let custom = extra_patterns
            .iter()
            .map(|p| Regex::new(p).map_err(|e| format!("pattern {p:?}: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let name_alternation = names
            .iter()
            .map(|n| regex::escape(n).replace('_', "[_.-]?"))
            .collect::<Vec<_>>()
            .join("|");
        let component_alternation = SENSITIVE_COMPONENTS.join("|");
        let compile = |re: &str| Regex::new(re).map_err(|e| e.to_string());
        let mut sanitizer = Self {
            names: AhoCorasick::new(&names).map_err(|e| e.to_string())?,
            bearer: compile(r"(?i)\b(bearer|basic|token)\s+[A-Za-z0-9._~+/=-]{6,}")?,
            key_shapes: compile(concat!(
                // AWS access key ids: long-term (AKIA) and temporary (ASIA), and
                // the other IAM unique-id prefixes.
                r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA|APKA)[0-9A-Z]{16}\b",
                r"|\b(?:sk|pk|rk)_(?:live|test)_[0-9A-Za-z]{8,}",
                // OpenAI/Anthropic-style keys (`sk-proj-…`, `sk-ant-…`, `sk-…`).
                r"|\bsk-[A-Za-z0-9_-]{20,}",
                r"|\bgh[pousr]_[A-Za-z0-9]{20,}|\bgithub_pat_[A-Za-z0-9_]{20,}",
                r"|\bglpat-[A-Za-z0-9_-]{16,}",
                r"|\bAIza[0-9A-Za-z_-]{30,}",
                r"|\bnpm_[A-Za-z0-9]{30,}",
                r"|\bxox[abprs]-[A-Za-z0-9-]{10,}",
                // JWTs, unsigned ones (`alg: none`, empty third segment) too.
                r"|\beyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*",
                r"|-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)",
            ))?,
            urls: compile(
                r#"(\b[A-Za-z][A-Za-z0-9+.-]*://[^\s?#"'<>()]*|(?:^|[\s"'(=\[])/[^\s?#"'<>()]*)([?#][^\s"'<>()]*)"#,
            )?,
            url_credentials: compile(
                r#"\b([A-Za-z][A-Za-z0-9+.-]*://[^\s/?#@:"']*):[^\s/?#@"']+@"#,
            )?,
            dsn_credentials: compile(
                r#"(^|[\s"'=(,])([A-Za-z0-9_.%+-]+):[^\s@/:"']+@([A-Za-z0-9\[(])"#,
            )?,
            // `name=value`, `name: value`, `name => value`, `"name": "value"`
            // and URL parameters; quoted values whole.
            pairs: compile(&format!(
                r#"(?i)((?:[A-Za-z0-9_.-]*(?:{name_alternation})[A-Za-z0-9_.-]*|(?:\b|[_.-])(?:{component_alternation})(?:[_.-][A-Za-z0-9_.-]*)?)["']?\s*(?:=>|[=:])\s*)('[^'\n]*'|"[^"\n]*"|[^\s&,;"'}}]+)"#
            ))?,
            email: compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")?,
            ids: compile(concat!(
                r"\b[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}\b",
                r"|\b[0-9a-fA-F]{2}-[0-9a-fA-F]{32}-[0-9a-fA-F]{16}-[0-9a-fA-F]{2}\b",
                r#"|(?:(?:\b|[_.-])[iI][dD]|[a-z]I[dD])["']?\s*[=:]\s*["']?[0-9A-Za-z-]+"#,
            ))?,
            custom,
            screen: regex::RegexSet::empty(),
        };
        let patterns = [
            &sanitizer.bearer,
            &sanitizer.key_shapes,
            &sanitizer.urls,
            &sanitizer.url_credentials,
            &sanitizer.dsn_credentials,
            &sanitizer.pairs,
            &sanitizer.email,
        ]
        .into_iter()
        .chain(sanitizer.custom.iter())
        .map(Regex::as_str)
        .collect::<Vec<_>>();
        sanitizer.screen = regex::RegexSet::new(patterns).map_err(|e| e.to_string())?;
        Ok(sanitizer)
    }

    /// Whether a field/header/key name is sensitive. Allocation-free: this
    /// runs for every log field, span attribute and JSON key.
    pub fn is_sensitive_name(&self, name: &str) -> bool {
        let bytes = name.as_bytes();
        let fragment = if bytes.len() <= NAME_BUF {
            let mut buf = [0u8; NAME_BUF];
            for (slot, byte) in buf.iter_mut().zip(bytes) {
                *slot = fold_byte(*byte);
            }
            self.names.is_match(&buf[..bytes.len()])
        } else {
            self.names.is_match(&fold_name(bytes))
        };
        fragment
            || components(name).any(|c| {
                SENSITIVE_COMPONENTS
                    .iter()
                    .any(|s| c.eq_ignore_ascii_case(s.as_bytes()))
            })
    }

    /// The value of field `name`, sanitized.
    pub fn field<'a>(&self, name: &str, value: &'a str) -> Cow<'a, str> {
        if self.is_sensitive_name(name) && !value.is_empty() {
            Cow::Borrowed(REDACTED)
        } else {
            self.scrub_as(value, Cards::unless_id(name))
        }
    }

    /// A value of unknown meaning, with every sensitive shape replaced.
    pub fn scrub<'a>(&self, value: &'a str) -> Cow<'a, str> {
        self.scrub_as(value, Cards::Mask)
    }

    fn scrub_as<'a>(&self, value: &'a str, cards: Cards) -> Cow<'a, str> {
        if value.len() > MAX_SCAN_BYTES {
            return Cow::Borrowed(UNPROCESSABLE);
        }
        let trimmed = value.trim_start();
        if (trimmed.starts_with('{') || trimmed.starts_with('['))
            && let Ok(mut json) = serde_json::from_str::<Value>(value)
        {
            self.json_as(&mut json, cards);
            return Cow::Owned(json.to_string());
        }
        self.scrub_text(value, cards)
    }

    /// Sanitizes a JSON value in place, by key.
    pub fn json(&self, value: &mut Value) {
        self.json_as(value, Cards::Mask);
    }

    fn json_as(&self, value: &mut Value, cards: Cards) {
        match value {
            Value::Object(map) => {
                for (key, item) in map.iter_mut() {
                    if self.is_sensitive_name(key) && !item.is_null() {
                        *item = Value::String(REDACTED.to_owned());
                    } else {
                        self.json_as(item, Cards::unless_id(key));
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|item| self.json_as(item, cards)),
            Value::String(text) => {
                if let Cow::Owned(clean) = self.scrub_text(text, cards) {
                    *text = clean;
                }
            }
            Value::Number(n) if cards == Cards::Mask && (n.is_u64() || n.is_i64()) => {
                let digits = n.to_string();
                if digits.len() >= 13
                    && let Cow::Owned(clean) = self.scrub_text(&digits, cards)
                {
                    *value = Value::String(clean);
                }
            }
            _ => {}
        }
    }

    fn scrub_text<'a>(&self, value: &'a str, cards: Cards) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(value);
        if self.screen.is_match(value) {
            let mut apply = |re: &Regex, replace: &dyn Fn(&Captures) -> String| {
                if re.is_match(&out) {
                    let replaced = re.replace_all(&out, |c: &Captures| replace(c)).into_owned();
                    out = Cow::Owned(replaced);
                }
            };
            apply(&self.key_shapes, &|_| REDACTED.to_owned());
            apply(&self.bearer, &|c| format!("{} {REDACTED}", &c[1]));
            apply(&self.url_credentials, &|c| format!("{}:{REDACTED}@", &c[1]));
            apply(&self.dsn_credentials, &|c| {
                format!("{}{}:{REDACTED}@{}", &c[1], &c[2], &c[3])
            });
            apply(&self.urls, &|c| format!("{}{}", &c[1], redact_query(&c[2])));
            apply(&self.pairs, &|c| {
                let value = &c[2];
                match value.chars().next() {
                    Some(q @ ('\'' | '"')) => format!("{}{q}{REDACTED}{q}", &c[1]),
                    _ => format!("{}{REDACTED}", &c[1]),
                }
            });
            apply(&self.email, &|_| "[REDACTED:email]".to_owned());
            for custom in &self.custom {
                apply(custom, &|_| REDACTED.to_owned());
            }
        }
        if cards == Cards::Mask
            && let Some(masked) = self.mask_cards(&out)
        {
            out = Cow::Owned(masked);
        }
        out
    }

    /// `text` with every card number masked to its last four, or `None` when
    /// it holds none.
    fn mask_cards(&self, text: &str) -> Option<String> {
        // Most values have too few digits to hold a card: no further work.
        if text.bytes().filter(u8::is_ascii_digit).count() < 13 {
            return None;
        }
        let protected: Vec<Range<usize>> = self.ids.find_iter(text).map(|m| m.range()).collect();
        let cards = find_cards(text, &protected);
        if cards.is_empty() {
            return None;
        }
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for card in cards {
            out.push_str(&text[at..card.start]);
            let digits: Vec<u8> = text[card.clone()]
                .bytes()
                .filter(u8::is_ascii_digit)
                .collect();
            let last4 = String::from_utf8_lossy(&digits[digits.len() - 4..]).into_owned();
            out.push_str(&format!("[REDACTED:card ****{last4}]"));
            at = card.end;
        }
        out.push_str(&text[at..]);
        Some(out)
    }
}

/// Whether a value is card-scanned: not when it is an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cards {
    Mask,
    /// The value is an id (`run.id`, `span_id`, `traceparent`): a run of
    /// digits in it is never a card number.
    Keep,
}

impl Cards {
    fn unless_id(name: &str) -> Self {
        if is_id_name(name) {
            Self::Keep
        } else {
            Self::Mask
        }
    }
}

/// `run.id`, `run_id`, `runId`, `id`, `traceparent`: a name whose last
/// component is `id`.
fn is_id_name(name: &str) -> bool {
    name.eq_ignore_ascii_case("traceparent")
        || components(name)
            .last()
            .is_some_and(|last| last.eq_ignore_ascii_case(b"id"))
}

/// The components of a name: split at every non-alphanumeric byte and where
/// camelCase goes from lower to upper (`userPin` → `user`, `Pin`). Bytes,
/// not `&str`: a non-ASCII name splits inside a character.
fn components(name: &str) -> impl Iterator<Item = &[u8]> {
    let bytes = name.as_bytes();
    let mut start = 0;
    let mut i = 0;
    std::iter::from_fn(move || {
        while i <= bytes.len() {
            let at = i;
            i += 1;
            let boundary = at == bytes.len()
                || !bytes[at].is_ascii_alphanumeric()
                || (at > start
                    && bytes[at].is_ascii_uppercase()
                    && bytes[at - 1].is_ascii_lowercase());
            if boundary {
                let piece = &bytes[start..at];
                start = if at < bytes.len() && bytes[at].is_ascii_alphanumeric() {
                    at
                } else {
                    at + 1
                };
                if !piece.is_empty() {
                    return Some(piece);
                }
            }
        }
        None
    })
}

fn fold_byte(byte: u8) -> u8 {
    match byte {
        b'-' | b'.' => b'_',
        other => other.to_ascii_lowercase(),
    }
}

fn fold_name(name: &[u8]) -> Vec<u8> {
    name.iter().copied().map(fold_byte).collect()
}

/// A URL's query (`?…`) or fragment (`#…`) with every value replaced: any
/// parameter can carry a signature or a key (`sig`, `key`, `X-Amz-…`).
/// A fragment without `k=v` pairs is an anchor and stays.
fn redact_query(part: &str) -> String {
    let (query, fragment) = match part.strip_prefix('?') {
        Some(rest) => match rest.split_once('#') {
            Some((q, f)) => (Some(q), Some(f)),
            None => (Some(rest), None),
        },
        None => (None, part.strip_prefix('#')),
    };
    let redact = |items: &str, bare_too: bool| -> String {
        items
            .split('&')
            .map(|item| match item.split_once('=') {
                Some((key, _)) => format!("{key}={REDACTED}"),
                None if bare_too && !item.is_empty() => REDACTED.to_owned(),
                None => item.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("&")
    };
    let mut out = String::with_capacity(part.len() + 16);
    if let Some(query) = query {
        out.push('?');
        out.push_str(&redact(query, true));
    }
    if let Some(fragment) = fragment {
        out.push('#');
        if fragment.contains('=') {
            out.push_str(&redact(fragment, false));
        } else {
            out.push_str(fragment);
        }
    }
    out
}

/// A run of digits standing alone (not part of a word such as a hex id).
#[derive(Debug, Clone, Copy)]
struct Group {
    start: usize,
    end: usize,
}

impl Group {
    fn len(&self) -> usize {
        self.end - self.start
    }
}

/// The byte ranges of card numbers in `text`: digit groups joined by single
/// separators (space, `-`, `.`), every window of whole groups with 13–19
/// digits checked for a card prefix and the Luhn sum. Groups inside
/// `protected` ranges (ids) are never part of one.
fn find_cards(text: &str, protected: &[Range<usize>]) -> Vec<Range<usize>> {
    let bytes = text.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    // Standalone digit groups, in order.
    let mut groups = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if !bytes[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        let alone =
            (start == 0 || !word(bytes[start - 1])) && (i == bytes.len() || !word(bytes[i]));
        let in_id = protected.iter().any(|r| r.start < i && start < r.end);
        if alone && !in_id {
            groups.push(Group { start, end: i });
        }
    }
    // Runs of groups joined by one separator each; dotted clusters decide
    // what they are first.
    let mut cards = Vec::new();
    let mut run: Vec<Group> = Vec::new();
    let mut k = 0;
    while k < groups.len() {
        // The dotted cluster starting at group k.
        let mut end = k;
        while end + 1 < groups.len()
            && groups[end + 1].start == groups[end].end + 1
            && bytes[groups[end].end] == b'.'
        {
            end += 1;
        }
        let dots = end - k;
        let joined_to_previous = run.last().is_some_and(|last| {
            groups[k].start == last.end + 1 && matches!(bytes[last.end], b' ' | b'-')
        });
        if !joined_to_previous {
            scan_windows(bytes, &run, &mut cards);
            run.clear();
        }
        match dots {
            0 => run.push(groups[k]),
            // `3.14`, `1.5234567890123456`: a decimal number, never a card,
            // and it joins nothing.
            1 => {
                scan_windows(bytes, &run, &mut cards);
                run.clear();
            }
            // `4242.4242.4242.4242` (or an IPv4 address, too short to be a
            // card): a card on its own, never joined to its neighbours.
            _ => {
                scan_windows(bytes, &run, &mut cards);
                run.clear();
                scan_windows(bytes, &groups[k..=end], &mut cards);
            }
        }
        k = end + 1;
    }
    scan_windows(bytes, &run, &mut cards);
    cards.sort_by_key(|r| r.start);
    cards
}

/// Every window of whole groups in `run` holding 13–19 digits, longest first
/// from each start; a window that is a card is taken and scanning resumes
/// after it.
fn scan_windows(bytes: &[u8], run: &[Group], cards: &mut Vec<Range<usize>>) {
    let mut i = 0;
    'start: while i < run.len() {
        let mut best = None;
        let mut digits = 0;
        for (j, group) in run.iter().enumerate().skip(i) {
            // Cards are written in groups of three or more (4-4-4-4, 4-6-5);
            // a window of several groups never includes a shorter one.
            if j > i && (group.len() < 3 || run[i].len() < 3) {
                break;
            }
            digits += group.len();
            if digits > 19 {
                break;
            }
            if digits >= 13 && is_card(bytes, &run[i..=j], digits) {
                best = Some(j);
            }
        }
        if let Some(j) = best {
            cards.push(run[i].start..run[j].end);
            i = j + 1;
            continue 'start;
        }
        i += 1;
    }
}

/// A card prefix and a valid Luhn sum. The prefix keeps timestamps out:
/// epoch milli/micro/nanoseconds start with 1, and so does only one card
/// scheme (UATP), whose numbers have 15 digits.
fn is_card(bytes: &[u8], groups: &[Group], len: usize) -> bool {
    let first = bytes[groups[0].start] - b'0';
    let prefix_ok = matches!(first, 2..=6 | 8) || (first == 1 && len == 15);
    prefix_ok
        && luhn(
            groups
                .iter()
                .rev()
                .flat_map(|g| bytes[g.start..g.end].iter().rev())
                .map(|b| u32::from(b - b'0')),
        )
}

/// The Luhn check over digits from the last to the first.
fn luhn(reversed: impl Iterator<Item = u32>) -> bool {
    let sum: u32 = reversed
        .enumerate()
        .map(|(i, d)| {
            if i % 2 == 1 {
                if d * 2 > 9 { d * 2 - 9 } else { d * 2 }
            } else {
                d
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
        // Every query value goes, not only those under sensitive names:
        // `sig`, `key`, `X-Amz-Signature` … are no closed set.
        assert_eq!(
            out,
            "GET http://api.local/v1?api_key=[REDACTED]&page=[REDACTED] failed"
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
    fn short_names_count_as_whole_components_only() {
        let s = s();
        for name in [
            "pin",
            "user_pin",
            "userPin",
            "auth",
            "auth.pass",
            "cvv",
            "card-cvc",
            "sig",
        ] {
            assert!(s.is_sensitive_name(name), "{name}");
        }
        for name in [
            "mapping", "author", "passed", "shipping", "signal", "spinner",
        ] {
            assert!(!s.is_sensitive_name(name), "{name}");
        }
        assert!(is_id_name("run.id") && is_id_name("traceId") && is_id_name("spanID"));
        assert!(!is_id_name("valid") && !is_id_name("idle"));
    }

    #[test]
    fn non_ascii_names_and_long_names_are_handled() {
        let s = s();
        // Component splitting works on bytes: no panic inside a character.
        assert_eq!(s.field("clé_é", "x"), "x");
        assert_eq!(s.field("пароль_pin", "1234"), REDACTED);
        assert!(!is_id_name("ünïcode"));
        let long = format!("{}_password", "a".repeat(300));
        assert!(s.is_sensitive_name(&long));
    }

    #[test]
    fn bad_custom_patterns_are_refused() {
        assert!(Sanitizer::new(&[], &["(".to_owned()]).is_err());
    }
}
