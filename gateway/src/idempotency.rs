//! `Idempotency-Key`: the key's rules and the request fingerprint.

use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};

/// How long an in-flight claim holds a key. Its holder only stores the run
/// (no broker round trip) before completing it, so this is a crash bound:
/// a request whose holder died takes the key over once the lease is out.
pub const CLAIM_LEASE: Duration = Duration::from_secs(10);

/// The header's value, checked: 1..=255 printable ASCII characters.
pub fn parse_key(value: &str) -> Result<String, String> {
    if value.is_empty() || value.len() > 255 {
        return Err("must be 1 to 255 characters".to_owned());
    }
    if !value.chars().all(|c| c.is_ascii_graphic() || c == ' ') {
        return Err("must be printable ASCII".to_owned());
    }
    Ok(value.to_owned())
}

/// A fingerprint of the request body that ignores formatting and key order,
/// so the same request sent twice matches.
pub fn fingerprint(body: &Value) -> String {
    let mut canonical = String::new();
    write_canonical(body, &mut canonical);
    let digest = Sha256::digest(canonical.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(&map[key], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_are_checked() {
        assert!(parse_key("order-42").is_ok());
        assert!(parse_key("").is_err());
        assert!(parse_key(&"k".repeat(256)).is_err());
        assert!(parse_key("tab\there").is_err());
        assert!(parse_key("ünïcode").is_err());
    }

    #[test]
    fn fingerprint_ignores_key_order_and_formatting() {
        let a: Value =
            serde_json::from_str(r#"{"flow_id":"f","steps":[{"id":"a","type":"noop"}]}"#)
                .expect("json");
        let b: Value =
            serde_json::from_str(r#"{ "steps": [ {"type": "noop", "id": "a"} ], "flow_id": "f" }"#)
                .expect("json");
        assert_eq!(fingerprint(&a), fingerprint(&b));
        assert_ne!(
            fingerprint(&a),
            fingerprint(&json!({"flow_id": "g", "steps": [{"id": "a", "type": "noop"}]}))
        );
        // Step order matters.
        assert_ne!(fingerprint(&json!([1, 2])), fingerprint(&json!([2, 1])));
    }
}
