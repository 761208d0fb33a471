//! Feed arbitrary SASL tokens to the broker's authentication: the PLAIN message parser, and the
//! SCRAM client-first and client-final parsers (through the connection's exchange, and
//! directly against a server started with a fixed nonce, so the client-final parser is reached
//! past the nonce check). Input: a selector byte, then the first and the second token
//! separated by the first 0xFF byte.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use qanat_broker::credentials::CredentialStore;
use qanat_broker::sasl::{Outcome, SaslExchange, MECHANISMS};
use qanat_broker::scram::{ClientFirst, ScramCredential, ScramMechanism, ScramServer, MIN_ITERATIONS};

const USER: &str = "u";
const PASSWORD: &[u8] = b"secret";

/// A credential store with user `u` under every SCRAM mechanism, in a directory kept for the
/// whole run.
fn store() -> &'static CredentialStore {
    static STORE: OnceLock<(tempfile::TempDir, CredentialStore)> = OnceLock::new();
    let (_, store) = STORE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temporary directory");
        let store = CredentialStore::open(dir.path()).expect("credential store");
        let users = [ScramMechanism::Sha256, ScramMechanism::Sha512]
            .into_iter()
            .map(|m| {
                let c = ScramCredential::new(m, PASSWORD, MIN_ITERATIONS).expect("credential");
                (USER.to_string(), m, c)
            })
            .collect();
        store.upsert(users).expect("add user");
        (dir, store)
    });
    store
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let (first, second) = match rest.iter().position(|&b| b == 0xff) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let mechanism = MECHANISMS[usize::from(selector) % MECHANISMS.len()];
    let enabled: Vec<String> = MECHANISMS.iter().map(|m| m.to_string()).collect();

    let mut exchange = SaslExchange::default();
    if exchange.handshake(mechanism, &enabled).is_err() {
        return;
    }
    if let Outcome::Continue(_) = exchange.authenticate(store(), first) {
        let _ = exchange.authenticate(store(), second);
    }

    if let (Some(m), Ok(client_first)) = (
        ScramMechanism::from_name(mechanism),
        ClientFirst::parse(first),
    ) {
        if let Some(credential) = store().get(USER, m) {
            let server = ScramServer::start(m, client_first, credential, "fixednonce");
            let _ = server.finish(second);
        }
    }
});
