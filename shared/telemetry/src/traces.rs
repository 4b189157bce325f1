//! The OTLP/gRPC tracer provider.
//!
//! Endpoint, headers, timeout, sampler and batch sizes come from the standard
//! `OTEL_*` variables, read by the SDK and the exporter themselves.

use std::time::Duration;

use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;

use crate::ServiceInfo;
use crate::env::{self, EnvError};

pub(crate) const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

const ENDPOINT_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
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
    Ok(())
}

pub(crate) fn provider(info: &ServiceInfo) -> anyhow::Result<SdkTracerProvider> {
    let mut exporter = SpanExporter::builder().with_tonic();
    // The exporter reads OTEL_EXPORTER_OTLP_TRACES_ENDPOINT itself; the
    // generic variable is given explicitly so both spellings work.
    if env::raw(ENDPOINT_VARS[0]).is_none()
        && let Some(endpoint) = env::raw(ENDPOINT_VARS[1])
    {
        exporter = exporter.with_endpoint(endpoint);
    }
    let exporter = exporter.build()?;

    let mut resource = Resource::builder();
    // OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES win over the component name.
    let named_by_env = env::raw("OTEL_SERVICE_NAME").is_some()
        || env::raw("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|a| a.contains("service.name="));
    if !named_by_env {
        resource = resource.with_service_name(info.component);
    }
    let resource = resource
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            info.version,
        ))
        .build();

    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}
