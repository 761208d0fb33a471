//! SaslHandshake and SaslAuthenticate: the answers for one connection's [`SaslExchange`].
//! Executed by the connection's reader itself (not as a task), since they change what the
//! connection may do next; see [`crate::sasl`].

use std::ops::RangeInclusive;

use bytes::Bytes;
use kafka_protocol::messages::{
    SaslAuthenticateRequest, SaslAuthenticateResponse, SaslHandshakeRequest, SaslHandshakeResponse,
};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError;

use crate::credentials::CredentialStore;
use crate::sasl::{HandshakeError, Outcome, SaslExchange};

/// v0 is followed by unframed SASL tokens (the reader switches to them); v1 by
/// SaslAuthenticate requests.
pub const HANDSHAKE_VERSIONS: RangeInclusive<i16> = 0..=1;
pub const AUTHENTICATE_VERSIONS: RangeInclusive<i16> = 0..=2;

pub fn handshake(
    exchange: &mut SaslExchange,
    req: &SaslHandshakeRequest,
    enabled: &[String],
) -> SaslHandshakeResponse {
    let error_code = match exchange.handshake(req.mechanism.as_str(), enabled) {
        Ok(()) => 0,
        Err(HandshakeError::IllegalState) => ResponseError::IllegalSaslState.code(),
        Err(HandshakeError::Unsupported) => ResponseError::UnsupportedSaslMechanism.code(),
    };
    SaslHandshakeResponse::default()
        .with_error_code(error_code)
        .with_mechanisms(
            enabled
                .iter()
                .map(|m| StrBytes::from_string(m.clone()))
                .collect(),
        )
}

/// The response, the outcome's principal when authenticated, and the failure reason to log.
pub fn authenticate(
    exchange: &mut SaslExchange,
    store: &CredentialStore,
    req: &SaslAuthenticateRequest,
) -> (SaslAuthenticateResponse, Result<Option<String>, String>) {
    match exchange.authenticate(store, &req.auth_bytes) {
        Outcome::Continue(token) => (
            SaslAuthenticateResponse::default().with_auth_bytes(Bytes::from(token)),
            Ok(None),
        ),
        Outcome::Authenticated { principal, token } => (
            SaslAuthenticateResponse::default().with_auth_bytes(Bytes::from(token)),
            Ok(Some(principal)),
        ),
        Outcome::Failed { message, reason } => (
            SaslAuthenticateResponse::default()
                .with_error_code(ResponseError::SaslAuthenticationFailed.code())
                .with_error_message(Some(StrBytes::from_string(message))),
            Err(reason),
        ),
    }
}

/// SaslHandshake on a connection that may not (or need not) authenticate.
pub fn illegal_handshake(enabled: &[String]) -> SaslHandshakeResponse {
    SaslHandshakeResponse::default()
        .with_error_code(ResponseError::IllegalSaslState.code())
        .with_mechanisms(
            enabled
                .iter()
                .map(|m| StrBytes::from_string(m.clone()))
                .collect(),
        )
}

pub fn illegal_authenticate() -> SaslAuthenticateResponse {
    SaslAuthenticateResponse::default()
        .with_error_code(ResponseError::IllegalSaslState.code())
        .with_error_message(Some(StrBytes::from_static_str(
            "SaslAuthenticate outside a SASL exchange",
        )))
}
