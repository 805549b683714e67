//! Request bodies of the admin API and how they are read.
//!
//! What must hold: a body is read up to `api.max_body_bytes` (413 beyond); it must be a JSON
//! object; unknown fields and wrong types are `webhooks.invalid_request` naming the field;
//! ids that are not UUIDs are `webhooks.invalid_id`. An empty body reads as `{}`.

use serde::de::DeserializeOwned;
use serde::Deserialize;
use uuid::Uuid;

use super::error::ApiError;

/// Parses a JSON object body into `T`, naming the field of any error.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) { b"{}" } else { body };
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::InvalidRequest(format!("request body is not valid JSON ({e})")))?;
    if !value.is_object() {
        return Err(ApiError::InvalidRequest("request body must be a JSON object".into()));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if path == "." {
            ApiError::InvalidRequest(inner)
        } else {
            ApiError::InvalidRequest(format!("{path}: {inner}"))
        }
    })
}

/// An optional integer field, as JSON Schema counts integers: `16` and `16.0` alike; `null`
/// is absent.
pub(super) fn integer<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else { return Ok(None) };
    if let Some(i) = n.as_i64() {
        return Ok(Some(i));
    }
    match n.as_f64() {
        Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(Some(f as i64)),
        _ => Err(serde::de::Error::custom(format!("expected an integer, not {n}"))),
    }
}

/// An RFC 3339 time field (`required`: refused when absent).
pub fn time_field(name: &str, value: Option<&str>) -> Result<Option<chrono::DateTime<chrono::Utc>>, ApiError> {
    let Some(value) = value else { return Ok(None) };
    chrono::DateTime::parse_from_rfc3339(value)
        .map(|t| Some(t.with_timezone(&chrono::Utc)))
        .map_err(|_| ApiError::InvalidRequest(format!("{name} must be an RFC 3339 time, e.g. 2025-06-15T14:30:00Z")))
}

/// A required UUID field.
pub fn uuid_field(name: &str, value: Option<&str>) -> Result<Uuid, ApiError> {
    let value = value.ok_or_else(|| ApiError::InvalidRequest(format!("{name} is required")))?;
    // The hyphenated form only (the document's `format: uuid`): not braced, `urn:uuid:` or
    // bare hex.
    let hyphenated = value.len() == 36 && [8, 13, 18, 23].iter().all(|&i| value.as_bytes()[i] == b'-');
    match Uuid::parse_str(value) {
        Ok(id) if hyphenated => Ok(id),
        _ => Err(ApiError::InvalidId(format!("{name} must be a UUID"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::api::endpoint_ops::{CreateRequest, ListRequest, UpdateRequest};

    #[test]
    fn errors_name_the_field() {
        let e = parse::<CreateRequest>(br#"{"url": "https://x", "events": ["a", 5]}"#).unwrap_err();
        assert!(matches!(&e, ApiError::InvalidRequest(m) if m.starts_with("events[1]")), "{e:?}");
        let e = parse::<CreateRequest>(br#"{"url": "https://x", "colour": 1}"#).unwrap_err();
        assert!(matches!(&e, ApiError::InvalidRequest(m) if m.contains("colour")), "{e:?}");
        let e = parse::<UpdateRequest>(br#"{"id": "x", "is_active": "yes"}"#).unwrap_err();
        assert!(matches!(&e, ApiError::InvalidRequest(m) if m.starts_with("is_active")), "{e:?}");
        assert!(matches!(parse::<ListRequest>(b"[]"), Err(ApiError::InvalidRequest(_))));
        assert!(matches!(parse::<ListRequest>(b"{"), Err(ApiError::InvalidRequest(_))));
        assert!(parse::<ListRequest>(b"").is_ok());
    }

    #[test]
    fn a_limit_is_an_integer_as_json_schema_counts_them() {
        assert_eq!(parse::<ListRequest>(br#"{"limit": 16.0}"#).unwrap().limit, Some(16));
        assert_eq!(parse::<ListRequest>(br#"{"limit": 16}"#).unwrap().limit, Some(16));
        assert_eq!(parse::<ListRequest>(br#"{"limit": null}"#).unwrap().limit, None);
        for bad in [r#"{"limit": 16.5}"#, r#"{"limit": "16"}"#, r#"{"limit": 1e300}"#] {
            let e = parse::<ListRequest>(bad.as_bytes()).unwrap_err();
            assert!(matches!(&e, ApiError::InvalidRequest(m) if m.starts_with("limit")), "{bad}: {e:?}");
        }
    }

    #[test]
    fn ids_must_be_uuids() {
        assert!(matches!(uuid_field("id", Some("nope")), Err(ApiError::InvalidId(_))));
        assert!(matches!(uuid_field("id", None), Err(ApiError::InvalidRequest(_))));
        assert!(uuid_field("id", Some("aaaa0000-0000-4000-8000-000000000001")).is_ok());
        assert!(uuid_field("id", Some("AAAA0000-0000-4000-8000-000000000001")).is_ok());
        for other_form in [
            "{aaaa0000-0000-4000-8000-000000000001}",
            "urn:uuid:aaaa0000-0000-4000-8000-000000000001",
            "aaaa0000000040008000000000000001",
        ] {
            assert!(matches!(uuid_field("id", Some(other_form)), Err(ApiError::InvalidId(_))), "{other_form}");
        }
    }
}
