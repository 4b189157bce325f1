//! `GET /openapi.json`: the OpenAPI 3.1 document, generated from the handlers'
//! annotations (utoipa), so it cannot drift from the routes.

use axum::Json;
use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

pub const PATH: &str = "/openapi.json";

/// Every error: `{"error": {"code", "message"}}`.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable snake_case code, e.g. `invalid_field`, `rate_limited`.
    code: String,
    /// A human sentence; for `invalid_field` it names the field.
    message: String,
}

/// Optional body of approve/reject.
#[derive(Serialize, ToSchema)]
pub struct DecisionBodySchema {
    /// At most 1000 characters.
    comment: Option<String>,
}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Beamline gateway", description = "Submit runs, follow them, decide approvals."),
    paths(
        crate::routes::runs::create,
        crate::routes::runs::list,
        crate::routes::runs::get,
        crate::routes::approvals::approve,
        crate::routes::approvals::reject,
        document,
    ),
    components(schemas(ErrorBody, ErrorDetail, DecisionBodySchema, crate::routes::runs::CreateRunBody,
        crate::routes::runs::Accepted, crate::routes::runs::RunView, crate::routes::runs::RunList)),
    modifiers(&BearerAuth),
)]
pub struct ApiDoc;

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "meta", responses((status = 200, description = "The OpenAPI 3.1 document")))]
pub async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
