//! Errors as OpenAI clients expect them: an HTTP status plus the body
//! `{"error": {"message", "type", "param", "code"}}`, with `Retry-After` on
//! 429; and the bounded [`Outcome`] each status counts as in metrics.
//!
//! Statuses: 400 invalid request, 404 unknown model, 413 body too large,
//! 429 overloaded, 503 unavailable, 500 failed.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::types::{ErrorBody, ErrorDetail};
use crate::generate::GenerateError;

/// How a request ended, as the `outcome` label of
/// `rackscale_frontend_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered 2xx and, when streamed, ran to `[DONE]` without error.
    Ok,
    /// Refused as invalid, unknown model or too large (4xx but 429).
    ClientError,
    /// Refused with 429.
    Overloaded,
    /// Refused with 503, or ended by an unavailable worker mid-stream.
    Unavailable,
    /// 500, or a failure mid-stream.
    ServerError,
    /// The client went away before the end.
    Cancelled,
}

impl Outcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::ClientError => "client_error",
            Self::Overloaded => "overloaded",
            Self::Unavailable => "unavailable",
            Self::ServerError => "server_error",
            Self::Cancelled => "cancelled",
        }
    }

    /// Every label value, for pre-registering series.
    pub const ALL: [Outcome; 6] = [
        Self::Ok,
        Self::ClientError,
        Self::Overloaded,
        Self::Unavailable,
        Self::ServerError,
        Self::Cancelled,
    ];
}

/// An error response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    /// The OpenAI error `type`.
    pub kind: &'static str,
    pub message: String,
    /// The request parameter at fault.
    pub param: Option<&'static str>,
    /// A machine-readable `code`.
    pub code: Option<&'static str>,
    /// Seconds for the `Retry-After` header (429).
    pub retry_after_s: Option<u32>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            param: None,
            code: None,
            retry_after_s: None,
        }
    }

    /// 400 about `param`.
    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    /// 400 not tied to one parameter (malformed JSON).
    pub fn bad_body(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 for a prompt (plus output) past the context.
    pub fn context_length(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            code: Some("context_length_exceeded"),
            ..Self::invalid(param, message)
        }
    }

    /// 404 `model_not_found`.
    pub fn unknown_model(model: &str) -> Self {
        Self {
            param: Some("model"),
            code: Some("model_not_found"),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("The model `{model}` does not exist."),
            )
        }
    }

    /// 413.
    pub fn too_large(limit: usize) -> Self {
        Self {
            code: Some("request_too_large"),
            ..Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!("The request body is larger than {limit} bytes."),
            )
        }
    }

    /// 408: the client stopped sending its request body.
    pub fn body_timeout(idle: std::time::Duration) -> Self {
        Self {
            code: Some("request_timeout"),
            ..Self::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                format!(
                    "The request body was not received: nothing arrived for {} s.",
                    idle.as_secs_f64()
                ),
            )
        }
    }

    /// 429 with `Retry-After`.
    pub fn overloaded(message: impl Into<String>, retry_after_s: u32) -> Self {
        Self {
            code: Some("overloaded"),
            retry_after_s: Some(retry_after_s),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
        }
    }

    /// 503.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            code: Some("unavailable"),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
        }
    }

    /// 500.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// The metrics outcome of answering with this error.
    pub fn outcome(&self) -> Outcome {
        match self.status {
            StatusCode::TOO_MANY_REQUESTS => Outcome::Overloaded,
            StatusCode::SERVICE_UNAVAILABLE => Outcome::Unavailable,
            s if s.is_client_error() => Outcome::ClientError,
            _ => Outcome::ServerError,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: self.message.clone(),
                kind: self.kind.to_owned(),
                param: self.param.map(str::to_owned),
                code: self.code.map(str::to_owned),
            },
        }
    }
}

impl From<GenerateError> for ApiError {
    fn from(e: GenerateError) -> Self {
        let message = e.to_string();
        match e {
            GenerateError::Invalid(_) => Self::bad_body(message),
            GenerateError::UnknownModel(model) => Self::unknown_model(&model),
            GenerateError::Overloaded { retry_after_s, .. } => {
                Self::overloaded(message, retry_after_s)
            }
            GenerateError::Unavailable(_) => Self::unavailable(message),
            GenerateError::Failed(_) => Self::internal(message),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after_s {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_errors_map_to_statuses_and_outcomes() {
        let cases = [
            (
                GenerateError::Invalid("x".into()),
                400,
                Outcome::ClientError,
            ),
            (
                GenerateError::UnknownModel("m".into()),
                404,
                Outcome::ClientError,
            ),
            (
                GenerateError::Overloaded {
                    reason: "queue".into(),
                    retry_after_s: 3,
                },
                429,
                Outcome::Overloaded,
            ),
            (
                GenerateError::Unavailable("draining".into()),
                503,
                Outcome::Unavailable,
            ),
            (
                GenerateError::Failed("boom".into()),
                500,
                Outcome::ServerError,
            ),
        ];
        for (e, status, outcome) in cases {
            let api = ApiError::from(e);
            assert_eq!(api.status.as_u16(), status);
            assert_eq!(api.outcome(), outcome);
        }
    }

    #[test]
    fn overload_sets_retry_after_and_the_openai_body() {
        let r = ApiError::overloaded("busy", 2).into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
        let body = serde_json::to_value(ApiError::unknown_model("nope").body()).expect("json");
        assert_eq!(
            body,
            serde_json::json!({"error": {
                "message": "The model `nope` does not exist.",
                "type": "invalid_request_error",
                "param": "model",
                "code": "model_not_found",
            }})
        );
    }
}
