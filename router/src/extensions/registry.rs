//! The extension registry: resolves an extension id to its settings, from a
//! YAML file (`ROUTER_EXTENSIONS_FILE`) read again at most every TTL.
//!
//! ```yaml
//! extensions:
//!   - id: pii-guard
//!     type: validator              # pre | validator | post
//!     subject: ext.pii-guard       # default ext.<id>
//!     timeout_ms: 500              # per attempt
//!     retries: 2                   # attempts after the first
//!     backoff_ms: 50               # doubled per retry, with jitter
//!     max_backoff_ms: 1000
//!     failure_policy: fail_closed  # or fail_open
//!     breaker: {failures: 5, window_secs: 30, cooldown_secs: 15}
//! ```

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::time::Instant;
use tracing::Instrument as _;
use tracing::field::Empty;
use wire::extensions::ExtensionType;
use wire::ids::ProviderId;

use crate::breaker::BreakerConfig;
use crate::events::{RegistryLoaded, RegistryLookup};
use crate::policy::{BreakerDoc, NonZero, PolicyError};

/// What the router does when an extension cannot give an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// Carry on as if it had allowed the run.
    FailOpen,
    /// Reject the run.
    FailClosed,
}

impl FailurePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FailOpen => "fail_open",
            Self::FailClosed => "fail_closed",
        }
    }
}

/// One registered extension.
#[derive(Debug, Clone, PartialEq)]
pub struct ExtensionSpec {
    pub id: String,
    pub kind: ExtensionType,
    pub subject: String,
    pub timeout: Duration,
    pub retries: u32,
    pub backoff: Duration,
    pub max_backoff: Duration,
    pub failure_policy: FailurePolicy,
    pub breaker: BreakerConfig,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryFile {
    extensions: Vec<ExtensionDoc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExtensionDoc {
    /// Same rules as a provider id: it is part of a subject and a label value.
    id: ProviderId,
    #[serde(rename = "type")]
    kind: ExtensionType,
    #[serde(default)]
    subject: Option<String>,
    #[serde(default = "default_timeout_ms")]
    timeout_ms: NonZero,
    #[serde(default)]
    retries: u32,
    #[serde(default = "default_backoff_ms")]
    backoff_ms: NonZero,
    #[serde(default = "default_max_backoff_ms")]
    max_backoff_ms: NonZero,
    failure_policy: FailurePolicy,
    #[serde(default)]
    breaker: BreakerDoc,
}

fn default_timeout_ms() -> NonZero {
    NonZero(1000)
}
fn default_backoff_ms() -> NonZero {
    NonZero(50)
}
fn default_max_backoff_ms() -> NonZero {
    NonZero(1000)
}

/// The most retries an extension may ask for.
const MAX_RETRIES: u32 = 10;

/// Parses and validates a registry file.
pub fn parse(text: &str) -> Result<Vec<ExtensionSpec>, PolicyError> {
    let file: RegistryFile = serde_yaml_ng::from_str(text)?;
    let mut seen = HashSet::new();
    let mut specs = Vec::with_capacity(file.extensions.len());
    for (i, doc) in file.extensions.into_iter().enumerate() {
        let id = String::from(doc.id);
        let problem = if !seen.insert(id.clone()) {
            Some(format!("extension `{id}` is listed twice"))
        } else if doc.retries > MAX_RETRIES {
            Some(format!("retries must be at most {MAX_RETRIES}"))
        } else if doc.subject.as_deref().is_some_and(|s| !valid_subject(s)) {
            Some("subject must be a NATS subject without wildcards or spaces".to_owned())
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(PolicyError::Semantic(format!("extensions[{i}]: {problem}")));
        }
        specs.push(ExtensionSpec {
            subject: doc
                .subject
                .unwrap_or_else(|| wire::extensions::subject(&id)),
            id,
            kind: doc.kind,
            timeout: Duration::from_millis(u64::from(doc.timeout_ms.0)),
            retries: doc.retries,
            backoff: Duration::from_millis(u64::from(doc.backoff_ms.0)),
            max_backoff: Duration::from_millis(u64::from(doc.max_backoff_ms.0)),
            failure_policy: doc.failure_policy,
            breaker: doc.breaker.into(),
        });
    }
    Ok(specs)
}

fn valid_subject(subject: &str) -> bool {
    !subject.is_empty()
        && subject
            .split('.')
            .all(|token| !token.is_empty() && !token.contains(['*', '>', ' ', '\t']))
}

/// Reads and parses the registry file at `path`.
pub fn load(path: &Path) -> Result<Vec<ExtensionSpec>, PolicyError> {
    let text = std::fs::read_to_string(path).map_err(|e| PolicyError::Read(e.to_string()))?;
    parse(&text)
}

/// The answer of a lookup.
#[derive(Debug, Clone)]
pub enum Lookup {
    Found(Arc<ExtensionSpec>),
    NotFound,
    /// The registry could not be read and holds no entry for the id.
    Error,
}

struct Cache {
    entries: HashMap<String, Arc<ExtensionSpec>>,
    loaded_at: Instant,
}

/// Extension ids → settings, cached for `ttl`.
pub struct Registry {
    path: Option<PathBuf>,
    ttl: Duration,
    cache: tokio::sync::Mutex<Cache>,
}

/// `lookup.source` / `load_source` values.
const SOURCE_CACHE: &str = "cache";
const SOURCE_FILE: &str = "file";

impl Registry {
    /// A registry over the file at `path` (none: no extensions), starting
    /// from `initial` (what the file held when the settings were read).
    pub fn new(path: Option<PathBuf>, ttl: Duration, initial: Vec<ExtensionSpec>) -> Self {
        Self {
            path,
            ttl,
            cache: tokio::sync::Mutex::new(Cache {
                entries: initial
                    .into_iter()
                    .map(|spec| (spec.id.clone(), Arc::new(spec)))
                    .collect(),
                loaded_at: Instant::now(),
            }),
        }
    }

    /// The ids in the cache now.
    pub async fn ids(&self) -> HashSet<String> {
        self.cache.lock().await.entries.keys().cloned().collect()
    }

    /// The cached type of an extension, without a lookup (the decision uses
    /// it to know at which stage an extension runs).
    pub async fn kind_of(&self, id: &str) -> Option<ExtensionType> {
        self.cache.lock().await.entries.get(id).map(|s| s.kind)
    }

    /// Resolves `id` from the cache as it is: no span, no metric, no
    /// re-read (what a dry run uses, so it counts nowhere).
    pub async fn cached(&self, id: &str) -> Lookup {
        match self.cache.lock().await.entries.get(id) {
            Some(spec) => Lookup::Found(spec.clone()),
            None => Lookup::NotFound,
        }
    }

    /// Reads the file now (on SIGHUP), replacing the cache when it is valid.
    pub async fn reload(&self) -> Result<(), PolicyError> {
        let mut cache = self.cache.lock().await;
        self.load_into(&mut cache).await
    }

    async fn load_into(&self, cache: &mut Cache) -> Result<(), PolicyError> {
        let Some(path) = self.path.clone() else {
            cache.loaded_at = Instant::now();
            return Ok(());
        };
        let started = std::time::Instant::now();
        let loaded = tokio::task::spawn_blocking(move || load(&path))
            .await
            .unwrap_or_else(|e| Err(PolicyError::Read(e.to_string())));
        RegistryLoaded {
            source: SOURCE_FILE,
            elapsed: started.elapsed(),
            error: loaded.as_ref().err(),
        }
        .emit();
        // Also after a failure, so a broken file is not re-read on every lookup.
        cache.loaded_at = Instant::now();
        let specs = loaded?;
        cache.entries = specs
            .into_iter()
            .map(|spec| (spec.id.clone(), Arc::new(spec)))
            .collect();
        Ok(())
    }

    /// Resolves `id` inside a `router.extension.registry.lookup` span,
    /// re-reading the file when the cache is older than the TTL.
    pub async fn lookup(&self, id: &str) -> Lookup {
        let span = tracing::info_span!(
            "router.extension.registry.lookup",
            extension.id = id,
            lookup.status = Empty,
            lookup.source = Empty,
        );
        async {
            let mut cache = self.cache.lock().await;
            let fresh = cache.loaded_at.elapsed() < self.ttl;
            let mut failed = false;
            if !fresh {
                failed = self.load_into(&mut cache).await.is_err();
            }
            let source = if fresh { SOURCE_CACHE } else { SOURCE_FILE };
            let found = cache.entries.get(id).cloned();
            let lookup = match found {
                Some(spec) => Lookup::Found(spec),
                None if failed => Lookup::Error,
                None => Lookup::NotFound,
            };
            let status = match lookup {
                Lookup::Found(_) => "success",
                Lookup::NotFound => "not_found",
                Lookup::Error => "error",
            };
            let span = tracing::Span::current();
            span.record("lookup.status", status);
            span.record("lookup.source", source);
            RegistryLookup {
                status,
                cache_hit: fresh,
            }
            .emit();
            lookup
        }
        .instrument(span)
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
extensions:
  - id: pii-guard
    type: validator
    timeout_ms: 200
    retries: 2
    failure_policy: fail_closed
    breaker: {failures: 3, window_secs: 10, cooldown_secs: 2}
  - id: enrich
    type: pre
    subject: ext.enrich.v1
    failure_policy: fail_open
"#;

    #[test]
    fn a_registry_file_parses() {
        let specs = parse(FILE).expect("valid");
        assert_eq!(specs.len(), 2);
        let pii = &specs[0];
        assert_eq!(pii.id, "pii-guard");
        assert_eq!(pii.kind, ExtensionType::Validator);
        assert_eq!(pii.subject, "ext.pii-guard");
        assert_eq!(pii.timeout, Duration::from_millis(200));
        assert_eq!(pii.retries, 2);
        assert_eq!(pii.failure_policy, FailurePolicy::FailClosed);
        assert_eq!(pii.breaker.failure_threshold, 3);
        assert_eq!(pii.breaker.cooldown, Duration::from_secs(2));
        let enrich = &specs[1];
        assert_eq!(enrich.subject, "ext.enrich.v1");
        assert_eq!(enrich.timeout, Duration::from_millis(1000));
        assert_eq!(enrich.retries, 0);
    }

    #[test]
    fn bad_registry_files_are_refused_with_the_place() {
        let err = parse("extensions:\n  - {id: a, type: sideways, failure_policy: fail_open}\n")
            .expect_err("bad type")
            .to_string();
        assert!(
            err.contains("extensions[0].type") && err.contains("line 2"),
            "{err}"
        );
        let err = parse("extensions:\n  - {id: a, type: pre}\n")
            .expect_err("no policy")
            .to_string();
        assert!(err.contains("failure_policy"), "{err}");
        let err = parse(
            "extensions:\n  - {id: a, type: pre, failure_policy: fail_open}\n  - {id: a, type: post, failure_policy: fail_open}\n",
        )
        .expect_err("duplicate")
        .to_string();
        assert_eq!(err, "extensions[1]: extension `a` is listed twice");
        let err = parse(
            "extensions:\n  - {id: a, type: pre, failure_policy: fail_open, subject: 'ext.*'}\n",
        )
        .expect_err("wildcard")
        .to_string();
        assert!(err.contains("extensions[0]: subject"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn lookups_use_the_cache_until_the_ttl_then_reread_the_file() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("ext.yaml");
        std::fs::write(&path, FILE).expect("write");
        let registry = Registry::new(
            Some(path.clone()),
            Duration::from_secs(30),
            parse(FILE).expect("valid"),
        );
        assert!(matches!(
            registry.lookup("pii-guard").await,
            Lookup::Found(_)
        ));
        assert!(matches!(registry.lookup("audit").await, Lookup::NotFound));

        std::fs::write(
            &path,
            "extensions:\n  - {id: audit, type: post, failure_policy: fail_open}\n",
        )
        .expect("write");
        // Still cached.
        assert!(matches!(registry.lookup("audit").await, Lookup::NotFound));
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(matches!(registry.lookup("audit").await, Lookup::Found(_)));
        assert!(matches!(
            registry.lookup("pii-guard").await,
            Lookup::NotFound
        ));

        // A broken file keeps the last good entries.
        std::fs::write(&path, "extensions: [").expect("write");
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(matches!(registry.lookup("audit").await, Lookup::Found(_)));
        assert!(matches!(
            registry.lookup("pii-guard").await,
            Lookup::NotFound
        ));
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(matches!(registry.lookup("pii-guard").await, Lookup::Error));
        assert!(registry.reload().await.is_err());
    }
}
