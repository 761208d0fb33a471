//! ApiVersions: the list of APIs and versions this broker serves, derived from
//! [`super::SUPPORTED`].

use std::ops::RangeInclusive;

use kafka_protocol::messages::api_versions_response::{ApiVersion, ApiVersionsResponse};

use super::SUPPORTED;

/// 0–3; a newer request is answered with v0 and UNSUPPORTED_VERSION (KIP-511).
pub const VERSIONS: RangeInclusive<i16> = 0..=3;

/// The ApiVersions answer, with `error_code` (0, or UNSUPPORTED_VERSION for a too-new request).
pub fn response(error_code: i16) -> ApiVersionsResponse {
    ApiVersionsResponse::default()
        .with_error_code(error_code)
        .with_api_keys(
            SUPPORTED
                .iter()
                .map(|(k, versions)| {
                    ApiVersion::default()
                        .with_api_key(*k as i16)
                        .with_min_version(*versions.start())
                        .with_max_version(*versions.end())
                })
                .collect(),
        )
}
