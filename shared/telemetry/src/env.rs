//! Reading settings from the environment.
//!
//! Every service reads its settings through these helpers so that a missing or
//! malformed value always fails the same way: one line naming the variable.

use std::fmt::Display;
use std::str::FromStr;

/// A setting that is missing or cannot be parsed. Its `Display` is the one line
/// a process prints before it exits.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting {var}={value:?}: {reason}")]
pub struct EnvError {
    pub var: String,
    pub value: String,
    pub reason: String,
}

impl EnvError {
    pub fn new(var: &str, value: &str, reason: impl Display) -> Self {
        Self {
            var: var.to_owned(),
            value: value.to_owned(),
            reason: reason.to_string(),
        }
    }

    pub fn missing(var: &str) -> Self {
        Self::new(var, "", "required but not set")
    }
}

/// The raw value of `var`, `None` when unset or empty.
pub fn raw(var: &str) -> Option<String> {
    std::env::var(var).ok().filter(|v| !v.trim().is_empty())
}

/// `var` parsed with `FromStr`, or `default` when unset.
pub fn parse_or<T>(var: &str, default: T) -> Result<T, EnvError>
where
    T: FromStr,
    T::Err: Display,
{
    match raw(var) {
        None => Ok(default),
        Some(value) => value
            .trim()
            .parse()
            .map_err(|e| EnvError::new(var, &value, e)),
    }
}

/// `var` as a string, or `default` when unset.
pub fn string_or(var: &str, default: &str) -> String {
    raw(var).unwrap_or_else(|| default.to_owned())
}

/// A boolean flag: `true/false`, `1/0`, `yes/no`, `on/off` (any case).
pub fn flag(var: &str, default: bool) -> Result<bool, EnvError> {
    match raw(var) {
        None => Ok(default),
        Some(value) => match value.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            _ => Err(EnvError::new(var, &value, "expected true or false")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_names_the_variable() {
        let err = EnvError::new(
            "GATEWAY_LISTEN_ADDR",
            "nope",
            "invalid socket address syntax",
        );
        assert_eq!(
            err.to_string(),
            "invalid setting GATEWAY_LISTEN_ADDR=\"nope\": invalid socket address syntax"
        );
    }
}
