//! ApiVersions: the APIs and version ranges in [`crate::protocol::SUPPORTED_APIS`], nothing more.
//! A version strom does not know gets `UNSUPPORTED_VERSION` in the v0 layout with the ranges.

use anyhow::Result;
use bytes::Bytes;
use kafka_protocol::messages::api_versions_response::ApiVersion;
use kafka_protocol::messages::{ApiKey, ApiVersionsResponse};

use crate::model::ErrorCode;
use crate::protocol::{encode_response, SUPPORTED_APIS};

pub fn handle() -> ApiVersionsResponse {
    let mut response = ApiVersionsResponse::default();
    response.api_keys = SUPPORTED_APIS
        .iter()
        .map(|(key, min, max)| {
            let mut v = ApiVersion::default();
            v.api_key = *key as i16;
            v.min_version = *min;
            v.max_version = *max;
            v
        })
        .collect();
    response
}

pub fn unsupported_version(correlation_id: i32) -> Result<Bytes> {
    let mut response = handle();
    response.error_code = ErrorCode::UNSUPPORTED_VERSION.0;
    encode_response(ApiKey::ApiVersions, 0, correlation_id, &response)
}
