//! Extractors whose rejections are API errors: malformed JSON, wrong types
//! and over-limit bodies answer 400/413 with a CPS body, never 500.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::{ApiError, Failure};

/// JSON body extractor.
pub struct Json<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = Failure;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Json(v)),
            Err(JsonRejection::BytesRejection(e)) if e.status().as_u16() == 413 => {
                Err(Failure(ApiError::BodyTooLarge))
            }
            Err(JsonRejection::MissingJsonContentType(_)) => Err(Failure(ApiError::BadBody(
                "content-type must be application/json".into(),
            ))),
            Err(e) => {
                if e.status().as_u16() == 413 {
                    return Err(Failure(ApiError::BodyTooLarge));
                }
                Err(Failure(ApiError::BadBody(e.body_text().to_lowercase())))
            }
        }
    }
}

/// Query extractor; unknown parameters are ignored by the target types.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = Failure;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Query(v)),
            Err(e @ QueryRejection::FailedToDeserializeQueryString(_)) => {
                Err(Failure(ApiError::BadBody(e.body_text().to_lowercase())))
            }
            Err(e) => Err(Failure(ApiError::BadBody(e.body_text().to_lowercase()))),
        }
    }
}

/// Raw `offset`/`limit` query values, checked by [`page`].
#[derive(Debug, Default, serde::Deserialize)]
pub struct PageQuery {
    pub offset: Option<String>,
    pub limit: Option<String>,
}

/// Validates offset (>= 0, default 0) and limit (1..=100, default 100): CPS.0002.
pub fn page(offset: Option<&str>, limit: Option<&str>) -> Result<(u32, u32), ApiError> {
    let offset = match offset {
        None | Some("") => 0,
        Some(s) => s.parse::<u32>().map_err(|_| ApiError::OffsetLimit)?,
    };
    Ok((offset, page_limit(limit, 100)? as u32))
}

/// Validates a page's limit: 1..=`max`, 100 when absent (CPS.0002).
pub fn page_limit(limit: Option<&str>, max: usize) -> Result<usize, ApiError> {
    let limit = match limit {
        None | Some("") => 100,
        Some(s) => s.parse::<usize>().map_err(|_| ApiError::OffsetLimit)?,
    };
    if !(1..=max).contains(&limit) {
        return Err(ApiError::OffsetLimit);
    }
    Ok(limit)
}
