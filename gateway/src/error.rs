//! API errors: one enum, mapped to a status and `{"error":{"code","message"}}`
//! in one place.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use telemetry::events::ComponentError;
use wire::step::FieldError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing or unknown API key; send `Authorization: Bearer <key>`")]
    Unauthorized,
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("this route does not take that method")]
    MethodNotAllowed,
    #[error("request body is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("{0}")]
    InvalidField(#[from] FieldError),
    #[error("request body must be JSON (`content-type: application/json`)")]
    UnsupportedMediaType,
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("the message broker is unavailable; nothing was recorded, retry later")]
    BrokerUnavailable,
    #[error("the run store is unavailable; retry later")]
    StoreUnavailable(#[source] anyhow::Error),
    #[error("too many requests for this tenant; retry after {0} s")]
    RateLimited(u64),
    #[error("this Idempotency-Key was used with a different request body")]
    IdempotencyKeyReused,
    #[error("a request with this Idempotency-Key is still being processed; retry shortly")]
    IdempotencyInFlight,
    #[error("that step is not awaiting approval")]
    NotAwaitingApproval,
    #[error("a decision was already made for that step")]
    AlreadyDecided,
    #[error("internal error")]
    Unexpected(anyhow::Error),
}

impl From<anyhow::Error> for ApiError {
    /// A store that is down or locked for a moment is a retryable 503; any
    /// other failure is a 500.
    fn from(err: anyhow::Error) -> Self {
        if crate::store::is_unavailable(&err) {
            Self::StoreUnavailable(err)
        } else {
            Self::Unexpected(err)
        }
    }
}

/// Seconds a client should wait before retrying a 503.
const RETRY_AFTER_SECS: &str = "2";

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::MalformedJson(_) | Self::InvalidField(_) => StatusCode::BAD_REQUEST,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BrokerUnavailable | Self::StoreUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::NotAwaitingApproval | Self::AlreadyDecided | Self::IdempotencyInFlight => {
                StatusCode::CONFLICT
            }
            Self::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Unexpected(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable, snake_case error code clients branch on.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unauthorized => "unauthorized",
            Self::NotFound(_) => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::MalformedJson(_) => "malformed_json",
            Self::InvalidField(_) => "invalid_field",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::PayloadTooLarge(_) => "payload_too_large",
            Self::BrokerUnavailable => "broker_unavailable",
            Self::StoreUnavailable(_) => "store_unavailable",
            Self::NotAwaitingApproval => "not_awaiting_approval",
            Self::RateLimited(_) => "rate_limited",
            Self::IdempotencyKeyReused => "idempotency_key_reused",
            Self::IdempotencyInFlight => "idempotency_key_in_flight",
            Self::AlreadyDecided => "already_decided",
            Self::Unexpected(_) => "internal",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self {
            Self::Unexpected(err) => ComponentError {
                code: "internal",
                message: &format!("{err:#}"),
            }
            .emit(),
            Self::StoreUnavailable(err) => ComponentError {
                code: "store_unavailable",
                message: &format!("{err:#}"),
            }
            .emit(),
            _ => {}
        }
        let status = self.status();
        let body = json!({"error": {"code": self.code(), "message": self.to_string()}});
        let mut response = (status, Json(body)).into_response();
        let retry_after = match &self {
            Self::RateLimited(secs) => Some(HeaderValue::from(*secs)),
            Self::BrokerUnavailable | Self::StoreUnavailable(_) | Self::IdempotencyInFlight => {
                Some(HeaderValue::from_static(RETRY_AFTER_SECS))
            }
            _ => None,
        };
        if let Some(value) = retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        response
    }
}
