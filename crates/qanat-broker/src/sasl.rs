//! SASL authentication of one connection (SaslHandshake v0–1, SaslAuthenticate v0–2), with
//! PLAIN and SCRAM-SHA-256/512 checked against the [`CredentialStore`].
//!
//! Invariant: on a SASL listener, a connection that has not authenticated is served
//! ApiVersions, SaslHandshake and SaslAuthenticate only; any other request closes it (as
//! Kafka does). A failed authentication is answered with SASL_AUTHENTICATION_FAILED after a
//! delay that grows with the failures from the same address ([`FailureDelay`]), and the
//! connection is closed.
//!
//! PLAIN is checked against the user's SCRAM credential (the password derived with its salt
//! and iteration count must give the StoredKey), so PLAIN needs no stored password either.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::credentials::CredentialStore;
use crate::scram::{ClientFirst, ScramError, ScramMechanism, ScramServer};

/// Mechanisms this broker implements, in the order SaslHandshake lists them.
pub const MECHANISMS: &[&str] = &["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"];

/// Most bytes of one SASL token accepted (the messages are a few hundred bytes).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mechanism {
    Plain,
    Scram(ScramMechanism),
}

#[derive(Debug)]
enum State {
    AwaitHandshake,
    Chosen(Mechanism),
    ScramStarted(Box<ScramServer>),
    Finished,
}

/// What one authentication token led to.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Send these bytes back and wait for the next token.
    Continue(Vec<u8>),
    /// Authenticated as `principal`; send `token` back (empty for PLAIN).
    Authenticated { principal: String, token: Vec<u8> },
    /// Refused: `message` goes to the client, `reason` to the log.
    Failed { message: String, reason: String },
}

/// The SASL state of one connection.
#[derive(Debug)]
pub struct SaslExchange {
    state: State,
}

impl Default for SaslExchange {
    fn default() -> Self {
        Self {
            state: State::AwaitHandshake,
        }
    }
}

impl SaslExchange {
    /// Whether a handshake has chosen a mechanism and authentication is under way.
    pub fn expects_token(&self) -> bool {
        matches!(self.state, State::Chosen(_) | State::ScramStarted(_))
    }

    pub fn finished(&self) -> bool {
        matches!(self.state, State::Finished)
    }

    /// SaslHandshake: choose `mechanism` among `enabled`. Err: the handshake is out of place
    /// (ILLEGAL_SASL_STATE) or the mechanism not enabled (UNSUPPORTED_SASL_MECHANISM).
    pub fn handshake(&mut self, mechanism: &str, enabled: &[String]) -> Result<(), HandshakeError> {
        if !matches!(self.state, State::AwaitHandshake) {
            return Err(HandshakeError::IllegalState);
        }
        if !enabled.iter().any(|m| m == mechanism) {
            return Err(HandshakeError::Unsupported);
        }
        self.state = State::Chosen(match mechanism {
            "PLAIN" => Mechanism::Plain,
            other => match ScramMechanism::from_name(other) {
                Some(m) => Mechanism::Scram(m),
                None => return Err(HandshakeError::Unsupported),
            },
        });
        Ok(())
    }

    /// SaslAuthenticate: one client token.
    pub fn authenticate(&mut self, store: &CredentialStore, token: &[u8]) -> Outcome {
        let state = std::mem::replace(&mut self.state, State::Finished);
        let failed = |mechanism: &str, reason: String| {
            Outcome::Failed {
            message: format!(
                "Authentication failed during authentication due to invalid credentials with SASL mechanism {mechanism}"
            ),
            reason,
        }
        };
        if token.len() > MAX_TOKEN_BYTES {
            return failed("?", format!("token of {} bytes", token.len()));
        }
        match state {
            State::AwaitHandshake | State::Finished => Outcome::Failed {
                message: "SaslAuthenticate without a SaslHandshake".into(),
                reason: "authenticate out of order".into(),
            },
            State::Chosen(Mechanism::Plain) => match check_plain(store, token) {
                Ok(user) => Outcome::Authenticated {
                    principal: format!("User:{user}"),
                    token: Vec::new(),
                },
                Err(reason) => failed("PLAIN", reason),
            },
            State::Chosen(Mechanism::Scram(m)) => {
                let first = match ClientFirst::parse(token) {
                    Ok(f) => f,
                    Err(e) => return failed(m.name(), e.to_string()),
                };
                let Some(credential) = store.get(&first.user, m) else {
                    return failed(m.name(), format!("unknown user {:?}", first.user));
                };
                let server = ScramServer::start(m, first, credential, &ScramServer::random_nonce());
                let reply = server.server_first().as_bytes().to_vec();
                self.state = State::ScramStarted(Box::new(server));
                Outcome::Continue(reply)
            }
            State::ScramStarted(server) => {
                let m = server.mechanism();
                match server.finish(token) {
                    Ok(last) => Outcome::Authenticated {
                        principal: format!("User:{}", server.user()),
                        token: last.into_bytes(),
                    },
                    Err(e @ ScramError::InvalidProof) => {
                        failed(m.name(), format!("user {:?}: {e}", server.user()))
                    }
                    Err(e) => failed(m.name(), e.to_string()),
                }
            }
        }
    }
}

/// Why a SaslHandshake is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum HandshakeError {
    IllegalState,
    Unsupported,
}

/// Whether `password` is `user`'s (checked against the user's SCRAM keys, as PLAIN is).
pub fn check_user_password(store: &CredentialStore, user: &str, password: &str) -> bool {
    let mut token = Vec::with_capacity(user.len() + password.len() + 2);
    token.push(0);
    token.extend_from_slice(user.as_bytes());
    token.push(0);
    token.extend_from_slice(password.as_bytes());
    check_plain(store, &token).is_ok()
}

/// `[authzid] NUL authcid NUL passwd` (RFC 4616); the user on success.
fn check_plain(store: &CredentialStore, token: &[u8]) -> Result<String, String> {
    let mut parts = token.split(|b| *b == 0);
    let (Some(authzid), Some(user), Some(password), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("malformed PLAIN message".into());
    };
    let user = std::str::from_utf8(user).map_err(|_| "user name is not UTF-8".to_string())?;
    if user.is_empty() || (!authzid.is_empty() && authzid != user.as_bytes()) {
        return Err("empty user or authorization id other than the user".into());
    }
    let credentials = store.all_of(user);
    if credentials.is_empty() {
        return Err(format!("unknown user {user:?}"));
    }
    // The strongest credential the user has.
    let (mechanism, credential) = credentials
        .into_iter()
        .max_by_key(|(m, _)| *m)
        .ok_or_else(|| format!("unknown user {user:?}"))?;
    if credential.verify_password(mechanism, password) {
        Ok(user.to_string())
    } else {
        Err(format!("user {user:?}: wrong password"))
    }
}

/// Failed logins per source address, to slow down password guessing: the n-th failure in a
/// row waits `base * 2^(n-1)`, at most `max`; a success or ten quiet minutes reset it.
#[derive(Debug)]
pub struct FailureDelay {
    base: Duration,
    max: Duration,
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

const FAILURE_MEMORY: Duration = Duration::from_secs(600);
const FAILURE_TABLE_MAX: usize = 100_000;

impl FailureDelay {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Count a failure from `ip`; how long to wait before answering it.
    pub fn failed(&self, ip: IpAddr) -> Duration {
        let now = Instant::now();
        let mut table = self.failures.lock();
        if table.len() >= FAILURE_TABLE_MAX {
            table.retain(|_, (_, at)| now.duration_since(*at) < FAILURE_MEMORY);
        }
        let entry = table.entry(ip).or_insert((0, now));
        if now.duration_since(entry.1) >= FAILURE_MEMORY {
            entry.0 = 0;
        }
        entry.0 = entry.0.saturating_add(1);
        entry.1 = now;
        let doublings = entry.0.saturating_sub(1).min(20);
        self.base.saturating_mul(1 << doublings).min(self.max)
    }

    /// The delay of a first failure.
    pub fn base(&self) -> Duration {
        self.base
    }

    pub fn succeeded(&self, ip: IpAddr) {
        self.failures.lock().remove(&ip);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::scram::{client_final, ScramCredential, MIN_ITERATIONS};
    use proptest::prelude::*;

    fn store() -> (tempfile::TempDir, CredentialStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = CredentialStore::open(dir.path()).unwrap();
        store
            .upsert(vec![(
                "alice".into(),
                ScramMechanism::Sha256,
                ScramCredential::new(ScramMechanism::Sha256, b"pw", MIN_ITERATIONS).unwrap(),
            )])
            .unwrap();
        (dir, store)
    }

    fn enabled() -> Vec<String> {
        MECHANISMS.iter().map(|m| m.to_string()).collect()
    }

    #[test]
    fn plain_accepts_the_password_and_refuses_others() {
        let (_d, store) = store();
        let mut ok = SaslExchange::default();
        ok.handshake("PLAIN", &enabled()).unwrap();
        assert_eq!(
            ok.authenticate(&store, b"\0alice\0pw"),
            Outcome::Authenticated {
                principal: "User:alice".into(),
                token: vec![]
            }
        );
        for token in [
            &b"\0alice\0pW"[..],
            b"\0bob\0pw",
            b"bob\0alice\0pw",
            b"alice",
        ] {
            let mut x = SaslExchange::default();
            x.handshake("PLAIN", &enabled()).unwrap();
            assert!(matches!(
                x.authenticate(&store, token),
                Outcome::Failed { .. }
            ));
        }
    }

    #[test]
    fn scram_exchange_and_state_errors() {
        let (_d, store) = store();
        let mut x = SaslExchange::default();
        assert_eq!(
            x.handshake("GSSAPI", &enabled()),
            Err(HandshakeError::Unsupported)
        );
        x.handshake("SCRAM-SHA-256", &enabled()).unwrap();
        assert_eq!(
            x.handshake("PLAIN", &enabled()),
            Err(HandshakeError::IllegalState)
        );
        let Outcome::Continue(server_first) = x.authenticate(&store, b"n,,n=alice,r=cn") else {
            panic!("no server-first")
        };
        let server_first = String::from_utf8(server_first).unwrap();
        let last = client_final(ScramMechanism::Sha256, b"pw", "n=alice,r=cn", &server_first);
        assert!(matches!(
            x.authenticate(&store, last.as_bytes()),
            Outcome::Authenticated { principal, .. } if principal == "User:alice"
        ));
        assert!(x.finished());
        // No SHA-512 credential for alice: refused at the first message.
        let mut y = SaslExchange::default();
        y.handshake("SCRAM-SHA-512", &enabled()).unwrap();
        assert!(matches!(
            y.authenticate(&store, b"n,,n=alice,r=cn"),
            Outcome::Failed { .. }
        ));
    }

    #[test]
    fn failure_delay_doubles_up_to_the_cap_and_resets_on_success() {
        let d = FailureDelay::new(Duration::from_millis(100), Duration::from_millis(350));
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(d.failed(ip), Duration::from_millis(100));
        assert_eq!(d.failed(ip), Duration::from_millis(200));
        assert_eq!(d.failed(ip), Duration::from_millis(350));
        assert_eq!(d.failed(other), Duration::from_millis(100));
        d.succeeded(ip);
        assert_eq!(d.failed(ip), Duration::from_millis(100));
    }

    proptest! {
        #[test]
        fn garbage_tokens_never_panic(
            mechanism in prop::sample::select(MECHANISMS.to_vec()),
            first in proptest::collection::vec(any::<u8>(), 0..128),
            second in proptest::collection::vec(any::<u8>(), 0..128),
        ) {
            let (_d, store) = store();
            let mut x = SaslExchange::default();
            x.handshake(mechanism, &enabled()).unwrap();
            let outcome = x.authenticate(&store, &first);
            let first_ok = matches!(outcome, Outcome::Authenticated { .. });
            prop_assert!(!first_ok);
            if let Outcome::Continue(_) = outcome {
                let second_ok = matches!(x.authenticate(&store, &second), Outcome::Authenticated { .. });
                prop_assert!(!second_ok);
            }
        }
    }
}
