//! Authentication failures and their HTTP answer.
//!
//! Huawei's API gateway answers every failed authentication with 401 and
//! `{"error_code": "APIG.0301", "error_msg": "Incorrect IAM authentication information: <why>",
//! "request_id": ...}`; the SDK turns that into `ClientRequestException(401, "APIG.0301")`.
//! The caller must also send the same `request_id` in the `X-Request-Id` header.

use serde::Serialize;

use super::signing::SigningError;

/// The gateway's error code for bad credentials.
pub const APIG_AUTH_CODE: &str = "APIG.0301";

/// Why a caller could not be authenticated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(transparent)]
    Signing(#[from] SigningError),
    #[error("no authorization header or x-auth-token")]
    MissingCredentials,
    #[error("the token is unknown")]
    UnknownToken,
    #[error("the token has expired")]
    TokenExpired,
    #[error("the user name or password is wrong")]
    BadPassword,
    #[error("the credentials are not allowed to use project {0}")]
    ProjectNotAllowed(String),
}

/// The JSON body of a 401 answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuthErrorBody {
    pub error_code: String,
    pub error_msg: String,
    pub request_id: String,
}

impl AuthError {
    /// HTTP status of the answer (always 401 for authentication).
    pub fn status(&self) -> u16 {
        match self {
            AuthError::Signing(_)
            | AuthError::MissingCredentials
            | AuthError::UnknownToken
            | AuthError::TokenExpired
            | AuthError::BadPassword
            | AuthError::ProjectNotAllowed(_) => 401,
        }
    }

    /// The body the SDK parses into `error_code`/`error_msg`.
    pub fn body(&self, request_id: &str) -> AuthErrorBody {
        AuthErrorBody {
            error_code: APIG_AUTH_CODE.to_string(),
            error_msg: format!("Incorrect IAM authentication information: {self}"),
            request_id: request_id.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_the_fields_the_sdk_reads() {
        let e = AuthError::from(SigningError::Mismatch);
        assert_eq!(e.status(), 401);
        let v = serde_json::to_value(e.body("rid-1")).expect("json");
        assert_eq!(v["error_code"], "APIG.0301");
        assert_eq!(v["request_id"], "rid-1");
        assert_eq!(
            v["error_msg"],
            "Incorrect IAM authentication information: the signature does not match"
        );
    }
}
