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
                Err(Failure(body_error(&e.body_text())))
            }
        }
    }
}

/// The reference's code for a request parameter that is missing or of the
/// wrong type, by the parameter's name (its error code table).
const FIELD_CODES: &[(&str, &str)] = &[
    ("phone_id", "CPS.0004"),
    ("phone_ids", "CPS.0080"),
    ("status", "CPS.0010"),
    ("count", "CPS.0024"),
    ("phone_name", "CPS.0025"),
    ("phone_model_name", "CPS.0028"),
    ("image_id", "CPS.0030"),
    ("band_width", "CPS.0031"),
    ("band_width_id", "CPS.0033"),
    ("band_width_share_type", "CPS.0034"),
    ("band_width_charge_mode", "CPS.0035"),
    ("band_width_size", "CPS.0036"),
    ("ports", "CPS.0037"),
    ("listen_port", "CPS.0040"),
    ("extend_param", "CPS.0055"),
    ("charging_mode", "CPS.0056"),
    ("period_type", "CPS.0057"),
    ("period_num", "CPS.0058"),
    ("is_auto_renew", "CPS.0059"),
    ("is_auto_pay", "CPS.0060"),
    ("keypair_name", "CPS.0068"),
    ("phones", "CPS.0077"),
    ("property", "CPS.0078"),
    ("server_name", "CPS.0087"),
    ("server_model_name", "CPS.0089"),
    ("internet_accessible", "CPS.0093"),
    ("server_ids", "CPS.0094"),
    ("server_id", "CPS.0097"),
    ("type", "CPS.0116"),
    ("command", "CPS.0117"),
    ("content", "CPS.0118"),
    ("bucket_name", "CPS.0134"),
    ("object_path", "CPS.0135"),
    ("image_label", "CPS.0142"),
    ("image_name", "CPS.0162"),
    ("storage_infos", "CPS.0167"),
    ("include_files", "CPS.0168"),
    ("exclude_files", "CPS.0169"),
    ("restore_infos", "CPS.0171"),
    ("package_name", "CPS.0173"),
    ("traffic_type", "CPS.0207"),
    ("availability_zone", "CPS.0211"),
    ("tenant_vpc_id", "CPS.0223"),
    ("subnet_id", "CPS.0224"),
    ("ip_address", "CPS.0225"),
    ("nics", "CPS.0226"),
    ("source_phone_id", "CPS.0232"),
    ("target_phone_id", "CPS.0233"),
    ("migrate_infos", "CPS.0234"),
];

/// A body axum could not read into its type: the code of the parameter
/// at fault where the reference has one (`missing field `command``, or the
/// path `phones[0].property: invalid type ...`), else `BadBody`.
fn body_error(text: &str) -> ApiError {
    let detail = text
        .split_once("target type: ")
        .map_or(text, |(_, d)| d)
        .to_string();
    let name = match detail.split_once("missing field `") {
        Some((_, rest)) => rest.split('`').next().unwrap_or(""),
        None => detail
            .split_once(": ")
            .map_or("", |(path, _)| path)
            .rsplit('.')
            .next()
            .unwrap_or("")
            .split('[')
            .next()
            .unwrap_or(""),
    };
    match FIELD_CODES.iter().find(|(n, _)| *n == name) {
        Some((n, code)) => ApiError::BadField {
            name: n.to_string(),
            code,
            detail: detail.to_lowercase(),
        },
        None => ApiError::BadBody(text.to_lowercase()),
    }
}

#[cfg(test)]
mod tests {
    use super::body_error;
    use crate::api::ApiError;

    fn code(text: &str) -> &'static str {
        body_error(text).status_and_code().1
    }

    #[test]
    fn body_errors_name_the_parameter() {
        let prefix = "Failed to deserialize the JSON body into the target type: ";
        let cases = [
            ("missing field `command` at line 1 column 2", "CPS.0117"),
            (
                "migrate_infos[0]: missing field `target_phone_id` at line 1 column 40",
                "CPS.0233",
            ),
            (
                "phones[0].property: invalid type: integer `1`, expected a string at line 1 column 9",
                "CPS.0078",
            ),
            (
                "phone_ids[2]: invalid type: integer `7`, expected a string at line 1 column 9",
                "CPS.0080",
            ),
            ("missing field `traffic_type` at line 1 column 2", "CPS.0207"),
            ("no_such: invalid type: null at line 1 column 2", "CPS.0001"),
            ("expected value at line 1 column 1", "CPS.0001"),
        ];
        for (text, want) in cases {
            assert_eq!(code(&format!("{prefix}{text}")), want, "{text}");
        }
        let e = body_error(&format!(
            "{prefix}missing field `command` at line 1 column 2"
        ));
        assert!(
            matches!(&e, ApiError::BadField { name, .. } if name == "command"),
            "{e}"
        );
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
