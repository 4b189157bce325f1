//! The SERVER span of every call to the `Router` service, with the attributes
//! of the RPC semantic conventions of the pinned semconv version (the
//! `opentelemetry-semantic-conventions` constants). It wraps the service at
//! the HTTP level, so calls refused before `Decide` runs (authentication, the
//! request size limit, an unknown method) are traced with their real status
//! too, and the status is read from what the client is actually sent.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use opentelemetry_semantic_conventions::attribute as semconv;
use tonic::Code;
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Service, http};
use tonic::server::NamedService;
use tracing::Instrument as _;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The methods of the wrapped service; any other is `_OTHER`, per the
/// conventions (the method part of the path is the caller's to choose).
const METHODS: &[&str] = &["Decide"];

/// The longest `rpc.method_original` kept: it is caller-chosen text.
const MAX_ORIGINAL_METHOD: usize = 128;

/// `S` with a SERVER span around each call.
#[derive(Clone)]
pub struct Traced<S> {
    inner: S,
}

impl<S> Traced<S> {
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S: NamedService> NamedService for Traced<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<Body>> for Traced<S>
where
    S: Service<http::Request<Body>, Response = http::Response<B>, Error = Infallible>
        + NamedService
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // The service that was polled ready handles this call; a clone
        // takes its place for the next one (tower's usual dance).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let span = server_span::<S>(&request);
        Box::pin(async move {
            let response = match inner.call(request).instrument(span.clone()).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            Ok(with_status(response.map(Body::new), span))
        })
    }
}

fn server_span<S: NamedService>(request: &http::Request<Body>) -> tracing::Span {
    let path = request.uri().path();
    let full = path.strip_prefix('/').unwrap_or(path);
    let known = full
        .strip_prefix(S::NAME)
        .and_then(|m| m.strip_prefix('/'))
        .is_some_and(|m| METHODS.contains(&m));
    let method = if known { full } else { "_OTHER" };
    let span = tracing::info_span!(
        "grpc.server",
        otel.name = method,
        otel.kind = "server",
        otel.status_code = Empty,
        error.type = Empty,
        tenant.id = Empty,
        run.id = Empty,
        flow.id = Empty,
    );
    // Fails only when tracing is off: nothing to continue then.
    let _ = span.set_parent(telemetry::propagation::extract_http(request.headers()));
    span.set_attribute(semconv::RPC_SYSTEM_NAME, "grpc");
    span.set_attribute(semconv::RPC_METHOD, method.to_owned());
    if !known {
        let original: String = full.chars().take(MAX_ORIGINAL_METHOD).collect();
        span.set_attribute(semconv::RPC_METHOD_ORIGINAL, original);
    }
    if let Some(authority) = request.uri().authority() {
        span.set_attribute(semconv::SERVER_ADDRESS, authority.host().to_owned());
        if let Some(port) = authority.port_u16() {
            span.set_attribute(semconv::SERVER_PORT, i64::from(port));
        }
    }
    span
}

/// Records the call's status on `span`: from the headers of a
/// "trailers-only" answer (a call that failed before any message), else from
/// the trailers once the body has been sent.
fn with_status(response: http::Response<Body>, span: tracing::Span) -> http::Response<Body> {
    let (mut parts, body) = response.into_parts();
    match tonic::Status::from_header_map(&parts.headers) {
        Some(status) => {
            let mut code = status.code();
            // tonic's codec answers a request over `max_decoding_message_size`
            // with OUT_OF_RANGE; gRPC's status table says RESOURCE_EXHAUSTED
            // for it. `Decide` never returns OUT_OF_RANGE itself, so here it
            // can only be that limit.
            if code == Code::OutOfRange {
                code = Code::ResourceExhausted;
                parts
                    .headers
                    .insert("grpc-status", http::HeaderValue::from(code as i32));
            }
            finish(&span, code, status.message());
            http::Response::from_parts(parts, body)
        }
        None => http::Response::from_parts(
            parts,
            Body::new(StatusFromTrailers {
                inner: body,
                span: Some(span),
            }),
        ),
    }
}

/// Sets `rpc.response.status_code`; the codes the conventions count as
/// server errors also set status ERROR and `error.type`. A caller's mistake
/// (INVALID_ARGUMENT, UNAUTHENTICATED, RESOURCE_EXHAUSTED…) leaves the status
/// unset, as a 4xx does on the gateway's HTTP spans.
fn finish(span: &tracing::Span, code: Code, message: &str) {
    let name = code_name(code);
    span.set_attribute(semconv::RPC_RESPONSE_STATUS_CODE, name);
    if is_server_error(code) {
        telemetry::spans::record_error(span, name, message);
    }
}

/// The server-side error codes of the gRPC semantic conventions.
pub fn is_server_error(code: Code) -> bool {
    matches!(
        code,
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    )
}

/// The status code's name, as `rpc.response.status_code` wants it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The response body of a call that sent a message: the span ends when the
/// trailers (with `grpc-status`) go out, or as CANCELLED when the body is
/// dropped before that (the client went away).
struct StatusFromTrailers {
    inner: Body,
    span: Option<tracing::Span>,
}

impl StatusFromTrailers {
    fn end(&mut self, code: Code, message: &str) {
        if let Some(span) = self.span.take() {
            finish(&span, code, message);
        }
    }
}

impl http_body::Body for StatusFromTrailers {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(status) = frame
                    .trailers_ref()
                    .and_then(tonic::Status::from_header_map)
                {
                    self.end(status.code(), status.message());
                }
            }
            Poll::Ready(Some(Err(status))) => self.end(status.code(), status.message()),
            Poll::Ready(None) => self.end(Code::Unknown, "the answer ended without a status"),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for StatusFromTrailers {
    fn drop(&mut self) {
        self.end(
            Code::Cancelled,
            "the client went away before the call completed",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_server_side_codes_are_errors() {
        let errors: Vec<&str> = (0..=16)
            .map(Code::from_i32)
            .filter(|c| is_server_error(*c))
            .map(code_name)
            .collect();
        assert_eq!(
            errors,
            [
                "UNKNOWN",
                "DEADLINE_EXCEEDED",
                "UNIMPLEMENTED",
                "INTERNAL",
                "UNAVAILABLE",
                "DATA_LOSS"
            ]
        );
        assert_eq!(code_name(Code::from_i32(16)), "UNAUTHENTICATED");
    }
}
