//! The OTLP/gRPC tracer provider.
//!
//! Endpoint, headers and timeout come from the standard `OTEL_EXPORTER_OTLP_*`
//! variables, read by the exporter itself; the sampler (`OTEL_TRACES_SAMPLER`,
//! [`crate::sampling`]), the batch settings (`OTEL_BSP_*`, [`crate::export`])
//! and the collector's CA (`OTEL_EXPORTER_OTLP_CERTIFICATE`) are read here, so
//! a bad value stops the process at start.
//!
//! The pipeline: sampler → [`CountingProcessor`] (the SDK's batch processor,
//! every drop counted) → [`exporter`] (OTLP/gRPC, TLS for an `https://`
//! endpoint).

use std::time::Duration;

use anyhow::Context as _;
use opentelemetry_otlp::tonic_types::transport::{Certificate, ClientTlsConfig};
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanExporter};

use crate::ServiceInfo;
use crate::env::{self, EnvError};
use crate::export::{BatchSettings, CountingProcessor};

pub(crate) const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

const ENDPOINT_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

/// PEM file of the CA that signed the collector's certificate (a private CA);
/// without it an `https://` endpoint is verified against the system's roots.
const CERTIFICATE_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_CERTIFICATE",
];

/// Fails on an endpoint that is not an `http(s)://` URL, so a typo stops the
/// process at start instead of silently exporting nowhere.
pub(crate) fn validate_env() -> Result<(), EnvError> {
    for var in ENDPOINT_VARS {
        if let Some(value) = env::raw(var) {
            let uri: http::Uri = value.parse().map_err(|e| EnvError::new(var, &value, e))?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                return Err(EnvError::new(
                    var,
                    &value,
                    "expected an http:// or https:// URL",
                ));
            }
        }
    }
    for var in CERTIFICATE_VARS {
        if let Some(path) = env::raw(var) {
            let pem = std::fs::read(&path).map_err(|e| EnvError::new(var, &path, e))?;
            if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                return Err(EnvError::new(var, &path, "expected a PEM certificate file"));
            }
        }
    }
    crate::sampling::from_env()?;
    BatchSettings::from_env()?;
    Ok(())
}

/// The endpoint the exporter will use (`None`: the exporter's default).
fn endpoint() -> Option<String> {
    ENDPOINT_VARS.iter().find_map(|var| env::raw(var))
}

/// The span exporter: the one place it is built (wrappers go here).
pub(crate) fn exporter() -> anyhow::Result<impl SpanExporter + 'static> {
    let mut builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
    // The exporter reads OTEL_EXPORTER_OTLP_TRACES_ENDPOINT itself; the
    // generic variable is given explicitly so both spellings work.
    if env::raw(ENDPOINT_VARS[0]).is_none()
        && let Some(endpoint) = env::raw(ENDPOINT_VARS[1])
    {
        builder = builder.with_endpoint(endpoint);
    }
    if endpoint().is_some_and(|e| e.starts_with("https://")) {
        // A private CA when one is given, else the system's roots.
        let tls = match CERTIFICATE_VARS
            .iter()
            .find_map(|var| env::raw(var).map(|path| (var, path)))
        {
            Some((var, path)) => {
                let pem = std::fs::read(&path).with_context(|| format!("{var}={path:?}"))?;
                ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem))
            }
            None => ClientTlsConfig::new().with_enabled_roots(),
        };
        builder = builder.with_tls_config(tls);
    }
    // Every exported span passes the sanitizer (fails closed, see sanitize.rs).
    Ok(crate::span_sanitizer::SanitizingExporter::new(
        builder.build()?,
    ))
}

/// Must run inside the Tokio runtime: the export task is spawned on it.
pub(crate) fn provider(info: &ServiceInfo) -> anyhow::Result<SdkTracerProvider> {
    let processor = CountingProcessor::new(
        exporter()?,
        BatchSettings::from_env()?,
        &tokio::runtime::Handle::try_current()?,
    );

    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(crate::sampling::from_env()?)
        .with_resource(resource(info))
        .build())
}

/// `service.name` (the component), `service.version` (the crate's),
/// `vcs.ref.head.revision` (the git revision) and `service.instance.id` (a
/// random UUID v4 for this process, as semconv recommends), each unless
/// `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES` set it (the builder reads
/// both).
pub(crate) fn resource(info: &ServiceInfo) -> Resource {
    use opentelemetry::KeyValue;
    use opentelemetry_semantic_conventions::resource as semconv;

    let from_env = env::raw("OTEL_RESOURCE_ATTRIBUTES").unwrap_or_default();
    let set_by_env = |key: &str| {
        from_env
            .split(',')
            .any(|pair| pair.split('=').next().is_some_and(|k| k.trim() == key))
    };
    let mut resource = Resource::builder();
    if env::raw("OTEL_SERVICE_NAME").is_none() && !set_by_env(semconv::SERVICE_NAME) {
        resource = resource.with_service_name(info.component);
    }
    for (key, value) in [
        (semconv::SERVICE_VERSION, info.version.to_owned()),
        (
            semconv::VCS_REF_HEAD_REVISION,
            crate::metrics::BUILD_REVISION.to_owned(),
        ),
        (
            semconv::SERVICE_INSTANCE_ID,
            uuid::Uuid::new_v4().to_string(),
        ),
    ] {
        if !set_by_env(key) {
            resource = resource.with_attribute(KeyValue::new(key, value));
        }
    }
    resource.build()
}
