//! SCRAM-SHA-256 and SCRAM-SHA-512 (RFC 5802, RFC 7677), server side, and the derivation of
//! stored credentials.
//!
//! The hashes, HMAC and PBKDF2 of each mechanism are `qanat_scram`'s, shared with the native
//! producer's client side; the server messages are here, with Kafka's own handling of the
//! `tokenauth` extension (refused here: there are no delegation tokens). The server never
//! holds a password: a credential is salt, iteration count, StoredKey and ServerKey.
//!
//! Messages are untrusted bytes; every parser returns an error rather than panicking
//! (see the garbage tests).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rand::RngCore;
use serde::{Deserialize, Serialize};

pub use qanat_scram::{
    constant_time_eq, ScramError, ScramMechanism, MAX_ITERATIONS, MIN_ITERATIONS,
};

/// What the server stores for one user and mechanism (never the password).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScramCredential {
    #[serde(with = "b64")]
    pub salt: Vec<u8>,
    pub iterations: u32,
    #[serde(with = "b64")]
    pub stored_key: Vec<u8>,
    #[serde(with = "b64")]
    pub server_key: Vec<u8>,
}

mod b64 {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::B64.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        super::B64.decode(text).map_err(serde::de::Error::custom)
    }
}

impl ScramCredential {
    /// Derive the stored credential of `password` with a fresh random salt.
    pub fn new(
        mechanism: ScramMechanism,
        password: &[u8],
        iterations: u32,
    ) -> Result<Self, ScramError> {
        let mut salt = vec![0u8; 32];
        rand::rng().fill_bytes(&mut salt);
        Self::with_salt(mechanism, password, salt, iterations)
    }

    pub fn with_salt(
        mechanism: ScramMechanism,
        password: &[u8],
        salt: Vec<u8>,
        iterations: u32,
    ) -> Result<Self, ScramError> {
        if !(MIN_ITERATIONS..=MAX_ITERATIONS).contains(&iterations) {
            return Err(ScramError::Iterations);
        }
        let salted = mechanism.salted_password(password, &salt, iterations);
        Ok(Self::from_salted_password(
            mechanism, &salted, salt, iterations,
        ))
    }

    /// From a salted password as AlterUserScramCredentials carries it.
    pub fn from_salted_password(
        mechanism: ScramMechanism,
        salted: &[u8],
        salt: Vec<u8>,
        iterations: u32,
    ) -> Self {
        let client_key = mechanism.hmac(salted, b"Client Key");
        Self {
            salt,
            iterations,
            stored_key: mechanism.hash(&client_key),
            server_key: mechanism.hmac(salted, b"Server Key"),
        }
    }

    /// Whether `password` is the one this credential was derived from (for SASL/PLAIN).
    pub fn verify_password(&self, mechanism: ScramMechanism, password: &[u8]) -> bool {
        let salted = mechanism.salted_password(password, &self.salt, self.iterations);
        let client_key = mechanism.hmac(&salted, b"Client Key");
        constant_time_eq(&mechanism.hash(&client_key), &self.stored_key)
    }
}

/// `saslname` decoding (RFC 5802 §5.1): `=2C` is `,` and `=3D` is `=`; any other `=` is an
/// error.
fn decode_saslname(raw: &str) -> Result<String, ScramError> {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(i) = rest.find('=') {
        out.push_str(&rest[..i]);
        match rest.get(i..i + 3) {
            Some("=2C") => out.push(','),
            Some("=3D") => out.push('='),
            _ => return Err(ScramError::Malformed("bad escape in user name")),
        }
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The parsed client-first message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFirst {
    pub user: String,
    pub nonce: String,
    gs2_header: String,
    bare: String,
}

impl ClientFirst {
    pub fn parse(message: &[u8]) -> Result<Self, ScramError> {
        let text = std::str::from_utf8(message).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        // gs2-header: cbind-flag "," [authzid] ","
        let mut parts = text.splitn(3, ',');
        let flag = parts.next().unwrap_or_default();
        let authzid = parts.next().ok_or(ScramError::Malformed("no gs2 header"))?;
        let bare = parts.next().ok_or(ScramError::Malformed("no gs2 header"))?;
        match flag {
            "n" | "y" => {}
            f if f.starts_with("p=") => return Err(ScramError::ChannelBinding),
            _ => return Err(ScramError::Malformed("bad channel binding flag")),
        }
        if !authzid.is_empty() && !authzid.starts_with("a=") {
            return Err(ScramError::Malformed("bad authzid"));
        }
        let mut user = None;
        let mut nonce = None;
        for (i, attr) in bare.split(',').enumerate() {
            match (i, attr.split_at_checked(2)) {
                (0, Some(("n=", v))) => user = Some(decode_saslname(v)?),
                (1, Some(("r=", v))) => nonce = Some(v.to_string()),
                (0 | 1, _) => return Err(ScramError::Malformed("n= and r= must come first")),
                (_, Some(("m=", _))) => return Err(ScramError::Malformed("m= is not supported")),
                _ if attr == "tokenauth=true" => return Err(ScramError::TokenAuth),
                _ => {} // other extensions are ignored
            }
        }
        let user = user.ok_or(ScramError::Malformed("no user"))?;
        let nonce = nonce.ok_or(ScramError::Malformed("no nonce"))?;
        if user.is_empty()
            || nonce.is_empty()
            || !nonce.bytes().all(|b| b.is_ascii_graphic() && b != b',')
        {
            return Err(ScramError::Malformed("empty user or bad nonce"));
        }
        let gs2_header = format!("{flag},{authzid},");
        Ok(Self {
            user,
            nonce,
            gs2_header,
            bare: bare.to_string(),
        })
    }
}

/// The server half of one exchange after the client-first message.
#[derive(Debug)]
pub struct ScramServer {
    mechanism: ScramMechanism,
    first: ClientFirst,
    credential: ScramCredential,
    server_first: String,
    nonce: String,
}

impl ScramServer {
    /// Start an exchange: `credential` is the user's (looked up from `first.user`),
    /// `server_nonce` random printable characters.
    pub fn start(
        mechanism: ScramMechanism,
        first: ClientFirst,
        credential: ScramCredential,
        server_nonce: &str,
    ) -> Self {
        let nonce = format!("{}{}", first.nonce, server_nonce);
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&credential.salt),
            credential.iterations
        );
        Self {
            mechanism,
            first,
            credential,
            server_first,
            nonce,
        }
    }

    /// A fresh server nonce.
    pub fn random_nonce() -> String {
        qanat_scram::random_nonce()
    }

    pub fn mechanism(&self) -> ScramMechanism {
        self.mechanism
    }

    pub fn user(&self) -> &str {
        &self.first.user
    }

    pub fn server_first(&self) -> &str {
        &self.server_first
    }

    /// Check the client-final message; on success, the server-final message.
    pub fn finish(&self, message: &[u8]) -> Result<String, ScramError> {
        let text = std::str::from_utf8(message).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let proof_at = text.rfind(",p=").ok_or(ScramError::Malformed("no proof"))?;
        let without_proof = &text[..proof_at];
        let proof = B64
            .decode(&text[proof_at + 3..])
            .map_err(|_| ScramError::Malformed("proof is not base64"))?;
        let mut channel = None;
        let mut nonce = None;
        for (i, attr) in without_proof.split(',').enumerate() {
            match (i, attr.split_at_checked(2)) {
                (0, Some(("c=", v))) => channel = Some(v),
                (1, Some(("r=", v))) => nonce = Some(v),
                (0 | 1, _) => return Err(ScramError::Malformed("c= and r= must come first")),
                _ => {}
            }
        }
        let channel = B64
            .decode(channel.ok_or(ScramError::Malformed("no channel binding"))?)
            .map_err(|_| ScramError::Malformed("channel binding is not base64"))?;
        if channel != self.first.gs2_header.as_bytes() {
            return Err(ScramError::ChannelBinding);
        }
        // As Kafka: the nonce must end with the server's. Some librdkafka releases send the
        // client nonce again in front of it; the proof (over the message as sent) still
        // binds the exchange.
        if !nonce.is_some_and(|n| n.ends_with(self.nonce.as_str())) {
            return Err(ScramError::NonceMismatch);
        }
        let auth_message = format!(
            "{},{},{}",
            self.first.bare, self.server_first, without_proof
        );
        let m = self.mechanism;
        let client_signature = m.hmac(&self.credential.stored_key, auth_message.as_bytes());
        if proof.len() != client_signature.len() {
            return Err(ScramError::InvalidProof);
        }
        let client_key: Vec<u8> = proof
            .iter()
            .zip(&client_signature)
            .map(|(a, b)| a ^ b)
            .collect();
        if !constant_time_eq(&m.hash(&client_key), &self.credential.stored_key) {
            return Err(ScramError::InvalidProof);
        }
        let server_signature = m.hmac(&self.credential.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

/// The client-final message for `password` (for tests), from the shared SCRAM client.
#[cfg(test)]
pub(crate) fn client_final(
    mechanism: ScramMechanism,
    password: &[u8],
    client_first_bare: &str,
    server_first: &str,
) -> String {
    let mut user = "";
    let mut nonce = "";
    for attr in client_first_bare.split(',') {
        match attr.split_at_checked(2) {
            Some(("n=", v)) => user = v,
            Some(("r=", v)) => nonce = v,
            _ => {}
        }
    }
    qanat_scram::ScramClient::with_nonce(mechanism, user, password, nonce)
        .client_final(server_first.as_bytes())
        .map(|(last, _)| last)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    /// RFC 7677 §3: the SCRAM-SHA-256 example exchange, byte for byte.
    #[test]
    fn rfc7677_sha256_exchange() {
        let credential = ScramCredential::with_salt(
            ScramMechanism::Sha256,
            b"pencil",
            B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap(),
            4096,
        )
        .unwrap();
        let first = ClientFirst::parse(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO").unwrap();
        assert_eq!(first.user, "user");
        let server = ScramServer::start(
            ScramMechanism::Sha256,
            first,
            credential.clone(),
            "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
        );
        assert_eq!(
            server.server_first(),
            "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
        );
        let final_message = server
            .finish(b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
            .unwrap();
        assert_eq!(
            final_message,
            "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
        // One bit of the proof changed: refused.
        assert_eq!(
            server.finish(b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVU="),
            Err(ScramError::InvalidProof)
        );
        assert!(credential.verify_password(ScramMechanism::Sha256, b"pencil"));
        assert!(!credential.verify_password(ScramMechanism::Sha256, b"pencil2"));
    }

    #[test]
    fn sha512_round_trip_and_wrong_password() {
        let credential =
            ScramCredential::new(ScramMechanism::Sha512, b"secret", MIN_ITERATIONS).unwrap();
        assert_eq!(credential.stored_key.len(), 64);
        let bare = "n=alice,r=abcdef";
        let start = || {
            ScramServer::start(
                ScramMechanism::Sha512,
                ClientFirst::parse(format!("n,,{bare}").as_bytes()).unwrap(),
                credential.clone(),
                &ScramServer::random_nonce(),
            )
        };
        let server = start();
        let good = client_final(
            ScramMechanism::Sha512,
            b"secret",
            bare,
            server.server_first(),
        );
        assert!(server.finish(good.as_bytes()).unwrap().starts_with("v="));
        let server = start();
        let bad = client_final(
            ScramMechanism::Sha512,
            b"secreT",
            bare,
            server.server_first(),
        );
        assert_eq!(server.finish(bad.as_bytes()), Err(ScramError::InvalidProof));
    }

    #[test]
    fn client_first_forms() {
        let f = ClientFirst::parse(b"n,,n=a=2Cb=3Dc,r=xyz,tokenauth=false").unwrap();
        assert_eq!(f.user, "a,b=c");
        assert_eq!(
            ClientFirst::parse(b"n,,n=u,r=x,tokenauth=true"),
            Err(ScramError::TokenAuth)
        );
        assert_eq!(
            ClientFirst::parse(b"p=tls-unique,,n=u,r=x"),
            Err(ScramError::ChannelBinding)
        );
        assert!(ClientFirst::parse(b"n,,n=a=2,r=x").is_err());
        assert!(ClientFirst::parse(b"n,,r=x,n=u").is_err());
        assert!(ClientFirst::parse(b"").is_err());
        assert!(ScramCredential::new(ScramMechanism::Sha256, b"p", 100).is_err());
    }

    proptest! {
        #[test]
        fn garbage_messages_are_errors_not_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = ClientFirst::parse(&bytes);
            let credential = ScramCredential::with_salt(ScramMechanism::Sha256, b"p", vec![1; 16], MIN_ITERATIONS).unwrap();
            let first = ClientFirst::parse(b"n,,n=u,r=n1").unwrap();
            let server = ScramServer::start(ScramMechanism::Sha256, first, credential, "n2");
            prop_assert!(server.finish(&bytes).is_err());
        }

        #[test]
        fn garbage_after_valid_prefixes_never_panics(tail in "[ -~]{0,64}") {
            let _ = ClientFirst::parse(format!("n,,n={tail}").as_bytes());
            let credential = ScramCredential::with_salt(ScramMechanism::Sha512, b"p", vec![1; 16], MIN_ITERATIONS).unwrap();
            let first = ClientFirst::parse(b"n,,n=u,r=n1").unwrap();
            let server = ScramServer::start(ScramMechanism::Sha512, first, credential, "n2");
            let message = format!("c=biws,r=n1n2,p={tail}");
            prop_assert!(server.finish(message.as_bytes()).is_err());
        }
    }
}
