//! Who may call `Decide`: a bearer token (`ROUTER_GRPC_TOKEN`) in the
//! `authorization` metadata, compared in constant time, or nobody checks at
//! all (`ROUTER_GRPC_ALLOW_UNAUTHENTICATED=true`, local development only).

use sha2::{Digest as _, Sha256};

/// The gRPC port's authentication. `Debug` never shows the token.
#[derive(Clone, PartialEq, Eq)]
pub enum GrpcAuth {
    /// The SHA-256 of the token: comparing digests of fixed length leaks
    /// neither a matching prefix nor the token's length through timing.
    Token([u8; 32]),
    /// Anyone who reaches the port may call `Decide`.
    Open,
}

impl std::fmt::Debug for GrpcAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl GrpcAuth {
    pub fn token(token: &str) -> Self {
        Self::Token(Sha256::digest(token.as_bytes()).into())
    }

    /// `token` or `open`, for the start-up log line.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Token(_) => "token",
            Self::Open => "open",
        }
    }

    /// Accepts `authorization: Bearer <token>`; the refusal names neither
    /// the expected nor the presented token.
    pub fn check(&self, metadata: &tonic::metadata::MetadataMap) -> Result<(), tonic::Status> {
        let Self::Token(expected) = self else {
            return Ok(());
        };
        let presented = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            });
        let Some(presented) = presented else {
            return Err(tonic::Status::unauthenticated(
                "authorization: expected `Bearer <ROUTER_GRPC_TOKEN>`",
            ));
        };
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let diff = digest
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff == 0 {
            Ok(())
        } else {
            Err(tonic::Status::unauthenticated("authorization: wrong token"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(value: &str) -> tonic::metadata::MetadataMap {
        let mut map = tonic::metadata::MetadataMap::new();
        map.insert("authorization", value.parse().expect("metadata"));
        map
    }

    #[test]
    fn only_the_bearer_token_passes() {
        let auth = GrpcAuth::token("0123456789abcdef");
        assert!(auth.check(&with("Bearer 0123456789abcdef")).is_ok());
        assert!(auth.check(&with("bearer  0123456789abcdef ")).is_ok());
        for bad in [
            "Bearer 0123456789abcdeF",
            "Bearer 0123456789abcde",
            "Basic 0123456789abcdef",
            "0123456789abcdef",
            "Bearer ",
        ] {
            let err = auth.check(&with(bad)).expect_err(bad);
            assert_eq!(err.code(), tonic::Code::Unauthenticated, "{bad}");
            assert!(!err.message().contains("0123456789abcdef"), "{bad}");
        }
        let err = auth
            .check(&tonic::metadata::MetadataMap::new())
            .expect_err("none");
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(
            GrpcAuth::Open
                .check(&tonic::metadata::MetadataMap::new())
                .is_ok()
        );
        assert_eq!(format!("{auth:?}"), "token");
    }
}
