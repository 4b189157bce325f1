//! Validated identifiers. Each `parse` says what is wrong in a sentence that
//! can go straight into an API error message.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Checks an identifier: 1..=max characters, letters, digits and `punct`.
fn check_ident(value: &str, max: usize, punct: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if value.len() > max {
        return Err(format!("must be at most {max} characters"));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || punct.contains(*c)))
    {
        return Err(format!(
            "contains {c:?}; only letters, digits and `{punct}` are allowed"
        ));
    }
    // Ids are tokens of subjects and JetStream KV keys (`<run_id>.<step_id>`),
    // where a `.` separates tokens and an empty token is invalid.
    if punct.contains('.') && value.split('.').any(str::is_empty) {
        return Err(
            "must not start or end with `.` or contain `..` (dot-separated parts must not be empty)"
                .to_owned(),
        );
    }
    Ok(())
}

macro_rules! ident {
    ($(#[$doc:meta])* $name:ident, $max:expr, $punct:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn parse(value: impl Into<String>) -> Result<Self, String> {
                let value = value.into();
                check_ident(&value, $max, $punct)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(value: String) -> Result<Self, String> {
                Self::parse(value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

ident!(
    /// A run's id: a UUIDv7 assigned by the gateway (time-ordered). Part of
    /// JetStream KV keys, hence no `:` (KV keys allow `-/_=.` only).
    RunId, 64, "_-."
);
ident!(
    /// A tenant's id, from the API key configuration.
    TenantId, 64, "_-.:"
);
ident!(
    /// The client's name for the flow a run executes.
    FlowId, 128, "_-.:"
);
ident!(
    /// A step's id, unique within its run (also part of JetStream KV keys,
    /// hence no `:`).
    StepId, 64, "_-."
);
ident!(
    /// A provider: a worker pool, subject `work.<provider>` (so no `.` in it).
    ProviderId, 64, "_-"
);

impl RunId {
    /// A fresh time-ordered id.
    pub fn generate(uuid: impl fmt::Display) -> Self {
        Self(uuid.to_string())
    }
}

impl ProviderId {
    /// The provider every run goes to unless a policy says otherwise.
    pub fn default_provider() -> Self {
        Self("default".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idents_are_checked() {
        assert!(StepId::parse("fetch-1").is_ok());
        assert!(StepId::parse("").expect_err("invalid").contains("empty"));
        assert!(StepId::parse("a b").expect_err("invalid").contains("' '"));
        assert!(ProviderId::parse("a.b").is_err());
        assert!(
            StepId::parse("x".repeat(65))
                .expect_err("invalid")
                .contains("64")
        );
        assert!(serde_json::from_str::<StepId>("\"a/b\"").is_err());
    }

    /// What JetStream requires of a KV key (async-nats's `is_valid_key` plus
    /// the server's rule that no subject token is empty).
    fn valid_kv_key(key: &str) -> bool {
        !key.is_empty()
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-/_=.".contains(c))
            && key.split('.').all(|token| !token.is_empty())
    }

    #[test]
    fn ids_with_empty_dot_tokens_are_refused() {
        for bad in ["a.", ".a", "a..b", ".", "..", "a.b."] {
            for result in [
                StepId::parse(bad).map(|_| ()),
                RunId::parse(bad).map(|_| ()),
                TenantId::parse(bad).map(|_| ()),
                FlowId::parse(bad).map(|_| ()),
            ] {
                let message = result.expect_err(bad);
                assert!(message.contains("`..`"), "{bad:?}: {message}");
            }
        }
        assert!(StepId::parse("a.b-c_d").is_ok());
        assert!(RunId::parse("run:1").is_err());
    }

    proptest::proptest! {
        /// Every accepted run and step id makes a valid approval key and
        /// progress key: what the gateway accepts, JetStream takes.
        #[test]
        fn accepted_ids_make_valid_kv_keys(run in "[a-z0-9._:-]{1,12}", step in "[a-z0-9._:-]{1,12}") {
            if let (Ok(run), Ok(step)) = (RunId::parse(run), StepId::parse(step)) {
                let key = crate::approvals::key(&run, &step);
                proptest::prop_assert!(valid_kv_key(&key), "{}", key);
                proptest::prop_assert!(valid_kv_key(run.as_str()), "{}", run);
            }
        }
    }
}
