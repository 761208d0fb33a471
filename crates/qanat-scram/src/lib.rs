//! SCRAM-SHA-256 and SCRAM-SHA-512 (RFC 5802, RFC 7677) shared by the broker (server side,
//! `qanat_broker::scram`) and the agent's native producer (client side, [`ScramClient`]):
//! the hash of each mechanism, its HMAC and PBKDF2, and the client's messages.
//!
//! Hand-written over the `hmac`, `sha2` and `pbkdf2` primitives: the SCRAM crates on crates.io
//! are client-first or SHA-256 only, and Kafka needs both hashes.
//!
//! Server messages are untrusted bytes; the client's parser returns an error rather than
//! panicking (see the garbage tests).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256, Sha512};

/// Fewest iterations accepted for a credential (Kafka's minimum).
pub const MIN_ITERATIONS: u32 = 4096;
/// Most iterations accepted (Kafka's maximum): bounds the work of one login.
pub const MAX_ITERATIONS: u32 = 16384;

/// Errors of a SCRAM exchange or credential.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("channel binding is not supported")]
    ChannelBinding,
    #[error("delegation tokens are not supported")]
    TokenAuth,
    #[error("unknown user")]
    UnknownUser,
    #[error("invalid proof")]
    InvalidProof,
    #[error("nonce does not continue the exchange")]
    NonceMismatch,
    #[error("iterations must be within {MIN_ITERATIONS}..={MAX_ITERATIONS}")]
    Iterations,
    #[error("the server refused the login: {0}")]
    ServerError(String),
    #[error("the server's signature is wrong: it does not know this password")]
    ServerSignature,
}

/// The hash of a SCRAM mechanism.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ScramMechanism {
    #[serde(rename = "SCRAM-SHA-256")]
    Sha256,
    #[serde(rename = "SCRAM-SHA-512")]
    Sha512,
}

impl ScramMechanism {
    pub const ALL: [ScramMechanism; 2] = [ScramMechanism::Sha256, ScramMechanism::Sha512];

    pub fn name(self) -> &'static str {
        match self {
            Self::Sha256 => "SCRAM-SHA-256",
            Self::Sha512 => "SCRAM-SHA-512",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    /// Kafka's numeric code in the user SCRAM credential APIs.
    pub fn kafka_code(self) -> i8 {
        match self {
            Self::Sha256 => 1,
            Self::Sha512 => 2,
        }
    }

    pub fn from_kafka_code(code: i8) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.kafka_code() == code)
    }

    /// `HMAC(key, data)` with the mechanism's hash.
    pub fn hmac(self, key: &[u8], data: &[u8]) -> Vec<u8> {
        // new_from_slice accepts keys of any length for HMAC; the error case cannot happen.
        match self {
            Self::Sha256 => Hmac::<Sha256>::new_from_slice(key)
                .map(|mut m| {
                    m.update(data);
                    m.finalize().into_bytes().to_vec()
                })
                .unwrap_or_default(),
            Self::Sha512 => Hmac::<Sha512>::new_from_slice(key)
                .map(|mut m| {
                    m.update(data);
                    m.finalize().into_bytes().to_vec()
                })
                .unwrap_or_default(),
        }
    }

    /// `H(data)` with the mechanism's hash.
    pub fn hash(self, data: &[u8]) -> Vec<u8> {
        match self {
            Self::Sha256 => Sha256::digest(data).to_vec(),
            Self::Sha512 => Sha512::digest(data).to_vec(),
        }
    }

    /// PBKDF2 of the password (`SaltedPassword`), as AlterUserScramCredentials carries it.
    pub fn salted_password(self, password: &[u8], salt: &[u8], iterations: u32) -> Vec<u8> {
        match self {
            Self::Sha256 => {
                pbkdf2::pbkdf2_hmac_array::<Sha256, 32>(password, salt, iterations).to_vec()
            }
            Self::Sha512 => {
                pbkdf2::pbkdf2_hmac_array::<Sha512, 64>(password, salt, iterations).to_vec()
            }
        }
    }
}

/// Comparison whose time does not depend on where the inputs differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A fresh nonce: random printable characters without `,`.
pub fn random_nonce() -> String {
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    B64.encode(bytes)
}

/// `saslname` encoding (RFC 5802 §5.1): `,` is `=2C` and `=` is `=3D`.
fn encode_saslname(name: &str) -> String {
    name.replace('=', "=3D").replace(',', "=2C")
}

/// The client half of one exchange: client-first, then client-final from the server-first,
/// then the check of the server-final (which proves the server knows the password's keys).
#[derive(Debug)]
pub struct ScramClient {
    mechanism: ScramMechanism,
    password: Vec<u8>,
    nonce: String,
    first_bare: String,
}

/// What the client expects of the server-final message.
#[derive(Debug)]
pub struct ServerFinalCheck {
    server_signature: Vec<u8>,
}

impl ScramClient {
    /// An exchange for `user` with a fresh nonce.
    pub fn new(mechanism: ScramMechanism, user: &str, password: &[u8]) -> Self {
        Self::with_nonce(mechanism, user, password, &random_nonce())
    }

    /// An exchange with a chosen nonce (tests and test vectors).
    pub fn with_nonce(mechanism: ScramMechanism, user: &str, password: &[u8], nonce: &str) -> Self {
        Self {
            mechanism,
            password: password.to_vec(),
            nonce: nonce.to_string(),
            first_bare: format!("n={},r={nonce}", encode_saslname(user)),
        }
    }

    /// The client-first message without its GS2 header.
    pub fn first_bare(&self) -> &str {
        &self.first_bare
    }

    /// The client-first message: no channel binding, no authorization identity.
    pub fn client_first(&self) -> String {
        format!("n,,{}", self.first_bare)
    }

    /// The client-final message answering `server_first`, and what the server-final must be.
    pub fn client_final(
        &self,
        server_first: &[u8],
    ) -> Result<(String, ServerFinalCheck), ScramError> {
        let text =
            std::str::from_utf8(server_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        if let Some(e) = text.strip_prefix("e=") {
            return Err(ScramError::ServerError(e.to_string()));
        }
        let mut nonce = None;
        let mut salt = None;
        let mut iterations = None;
        for (i, attr) in text.split(',').enumerate() {
            match (i, attr.split_at_checked(2)) {
                (0, Some(("r=", v))) => nonce = Some(v),
                (1, Some(("s=", v))) => {
                    salt = Some(
                        B64.decode(v)
                            .map_err(|_| ScramError::Malformed("salt is not base64"))?,
                    )
                }
                (2, Some(("i=", v))) => {
                    iterations = Some(
                        v.parse::<u32>()
                            .map_err(|_| ScramError::Malformed("iterations are not a number"))?,
                    )
                }
                (0..=2, _) => return Err(ScramError::Malformed("r=, s= and i= must come first")),
                (_, Some(("m=", _))) => return Err(ScramError::Malformed("m= is not supported")),
                _ => {} // extensions are ignored
            }
        }
        let (Some(nonce), Some(salt), Some(iterations)) = (nonce, salt, iterations) else {
            return Err(ScramError::Malformed("r=, s= and i= are required"));
        };
        // The server's nonce continues ours and adds to it.
        if nonce.len() <= self.nonce.len() || !nonce.starts_with(self.nonce.as_str()) {
            return Err(ScramError::NonceMismatch);
        }
        if !nonce.bytes().all(|b| b.is_ascii_graphic() && b != b',') {
            return Err(ScramError::Malformed("bad nonce"));
        }
        // An iteration count outside Kafka's bounds is a server making the client work
        // (or weak keys): refused.
        if !(MIN_ITERATIONS..=MAX_ITERATIONS).contains(&iterations) {
            return Err(ScramError::Iterations);
        }
        let m = self.mechanism;
        let salted = m.salted_password(&self.password, &salt, iterations);
        let client_key = m.hmac(&salted, b"Client Key");
        let stored_key = m.hash(&client_key);
        // c=biws: base64 of the GS2 header "n,,".
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{text},{without_proof}", self.first_bare);
        let client_signature = m.hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(&client_signature)
            .map(|(a, b)| a ^ b)
            .collect();
        let server_key = m.hmac(&salted, b"Server Key");
        let check = ServerFinalCheck {
            server_signature: m.hmac(&server_key, auth_message.as_bytes()),
        };
        Ok((format!("{without_proof},p={}", B64.encode(proof)), check))
    }
}

impl ServerFinalCheck {
    /// Check the server-final message (`v=` signature, or `e=` error).
    pub fn verify(&self, server_final: &[u8]) -> Result<(), ScramError> {
        let text =
            std::str::from_utf8(server_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        if let Some(e) = text.strip_prefix("e=") {
            return Err(ScramError::ServerError(e.to_string()));
        }
        let signature = text
            .split(',')
            .next()
            .and_then(|v| v.strip_prefix("v="))
            .ok_or(ScramError::Malformed("no server signature"))?;
        let signature = B64
            .decode(signature)
            .map_err(|_| ScramError::Malformed("server signature is not base64"))?;
        if constant_time_eq(&signature, &self.server_signature) {
            Ok(())
        } else {
            Err(ScramError::ServerSignature)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    /// RFC 7677 §3: the client side of the SCRAM-SHA-256 example, byte for byte.
    #[test]
    fn rfc7677_sha256_client() {
        let client = ScramClient::with_nonce(
            ScramMechanism::Sha256,
            "user",
            b"pencil",
            "rOprNGfwEbeRWgbNEkqO",
        );
        assert_eq!(client.client_first(), "n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        let (last, check) = client
            .client_final(b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
            .unwrap();
        assert_eq!(
            last,
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        check
            .verify(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .unwrap();
        assert_eq!(
            check.verify(b"v=7rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="),
            Err(ScramError::ServerSignature)
        );
        assert_eq!(
            check.verify(b"e=invalid-proof"),
            Err(ScramError::ServerError("invalid-proof".into()))
        );
    }

    #[test]
    fn server_first_must_continue_the_nonce_and_bound_iterations() {
        let client = ScramClient::with_nonce(ScramMechanism::Sha512, "a,b=c", b"p", "abc");
        assert_eq!(client.first_bare(), "n=a=2Cb=3Dc,r=abc");
        for bad in [
            &b"r=xyz123,s=AAAA,i=4096"[..],
            b"r=abc,s=AAAA,i=4096",
            b"r=abcd,s=AAAA,i=100",
            b"r=abcd,s=AAAA,i=99999999",
            b"s=AAAA,r=abcd,i=4096",
            b"r=abcd,s=!!,i=4096",
            b"",
        ] {
            assert!(client.client_final(bad).is_err(), "{bad:?}");
        }
        assert!(client.client_final(b"r=abcd,s=AAAA,i=4096").is_ok());
    }

    proptest! {
        #[test]
        fn garbage_server_messages_are_errors_not_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let client = ScramClient::with_nonce(ScramMechanism::Sha256, "u", b"p", "n1");
            // Garbage is refused; what parses still has to carry the client's nonce.
            if let Ok((last, check)) = client.client_final(&bytes) {
                prop_assert!(last.starts_with("c=biws,r=n1"));
                prop_assert!(check.verify(&bytes).is_err());
            }
        }

        #[test]
        fn garbage_after_valid_prefixes_never_panics(tail in "[ -~]{0,64}") {
            let client = ScramClient::with_nonce(ScramMechanism::Sha512, "u", b"p", "n1");
            let _ = client.client_final(format!("r=n1{tail}").as_bytes());
            let _ = client.client_final(format!("r=n1x,s={tail}").as_bytes());
            let _ = client.client_final(format!("r=n1x,s=AAAA,i={tail}").as_bytes());
        }
    }
}
