//! TLS for the SSL and SASL_SSL listeners, with `rustls` (ring provider).
//!
//! The server certificate and key come from PEM files. They are held behind a lock by
//! [`ReloadingCert`], the config's certificate resolver, so [`Tls::reload`] (on SIGHUP)
//! swaps them for new handshakes while established connections keep theirs. A reload that
//! fails (missing file, key not matching) keeps the previous pair and says why.
//!
//! With `client_auth = "requested"` or `"required"`, client certificates are verified against
//! `client_ca_file`; a verified client's principal is `User:` followed by its certificate
//! subject in RFC 2253 order (`User:CN=alice,O=Example`), as Kafka's default principal builder.
//!
//! The server's cipher suite order wins over the client's: AES-128-GCM first, then
//! AES-256-GCM, then ChaCha20-Poly1305 ([`suite_preference`]). Clients such as OpenSSL list
//! AES-256-GCM first; AES-128 does 10 rounds instead of 14, and with AES-NI on both ends it is
//! the cheapest of the three for both.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{CipherSuite, RootCertStore, ServerConfig};
use serde::Deserialize;
use tokio_rustls::TlsAcceptor;

/// `[tls]`: the certificate of the TLS listeners.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM file: the server certificate, then its chain.
    pub cert_file: PathBuf,
    /// PEM file: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// Whether clients present a certificate: `none` (default), `requested` or `required`.
    #[serde(default)]
    pub client_auth: ClientAuth,
    /// PEM file of the CAs client certificates must chain to.
    pub client_ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    #[default]
    None,
    Requested,
    Required,
}

/// Errors loading certificates and keys.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("tls.client_ca_file is needed when tls.client_auth is not \"none\"")]
    NoClientCa,
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(String),
}

fn file_error(path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no CERTIFICATE in the file"));
    }
    Ok(certs)
}

fn load_key(
    provider: &CryptoProvider,
    cert: &Path,
    key: &Path,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let certs = load_certs(cert)?;
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| file_error(key, e))?;
    let signing = provider
        .key_provider
        .load_private_key(der)
        .map_err(|e| file_error(key, e))?;
    let certified = CertifiedKey::new(certs, signing);
    certified
        .keys_match()
        .map_err(|e| file_error(key, format!("does not match {}: {e}", cert.display())))?;
    Ok(Arc::new(certified))
}

/// The server certificate, swappable while the server runs.
#[derive(Debug)]
struct ReloadingCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().clone())
    }
}

/// The TLS side of the broker: an acceptor and the reloadable certificate behind it.
pub struct Tls {
    settings: TlsSettings,
    provider: Arc<CryptoProvider>,
    cert: Arc<ReloadingCert>,
    acceptor: TlsAcceptor,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("settings", &self.settings)
            .finish()
    }
}

impl Tls {
    /// Load the certificate, key and client CAs named in `settings`.
    pub fn new(settings: TlsSettings) -> Result<Self, TlsError> {
        let mut provider = rustls::crypto::ring::default_provider();
        provider
            .cipher_suites
            .sort_by_key(|s| suite_preference(s.suite()));
        let provider = Arc::new(provider);
        let key = load_key(&provider, &settings.cert_file, &settings.key_file)?;
        let cert = Arc::new(ReloadingCert {
            current: RwLock::new(key),
        });
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let builder = match settings.client_auth {
            ClientAuth::None => builder.with_no_client_auth(),
            auth => {
                let path = settings
                    .client_ca_file
                    .as_ref()
                    .ok_or(TlsError::NoClientCa)?;
                let mut roots = RootCertStore::empty();
                for ca in load_certs(path)? {
                    roots.add(ca).map_err(|e| file_error(path, e))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
                let verifier = if auth == ClientAuth::Requested {
                    verifier.allow_unauthenticated()
                } else {
                    verifier
                };
                builder.with_client_cert_verifier(
                    verifier
                        .build()
                        .map_err(|e| TlsError::Verifier(e.to_string()))?,
                )
            }
        };
        let mut config = builder.with_cert_resolver(cert.clone());
        config.alpn_protocols.clear();
        config.ignore_client_order = true;
        Ok(Self {
            settings,
            provider,
            cert,
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// Read the certificate and key files again; new handshakes use them, established
    /// connections are untouched. On error the previous pair stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let key = load_key(
            &self.provider,
            &self.settings.cert_file,
            &self.settings.key_file,
        )?;
        *self.cert.current.write() = key;
        Ok(())
    }
}

/// Rank of a cipher suite in the server's order (lower first): AES-128-GCM, AES-256-GCM,
/// ChaCha20-Poly1305, then anything else. The sort is stable, so TLS 1.3 and 1.2 suites of
/// the same cipher keep the provider's order.
fn suite_preference(suite: CipherSuite) -> u8 {
    match suite {
        CipherSuite::TLS13_AES_128_GCM_SHA256
        | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        | CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 0,
        CipherSuite::TLS13_AES_256_GCM_SHA384
        | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
        | CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => 1,
        CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
        | CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
        | CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => 2,
        _ => 3,
    }
}

/// `User:` + the subject of a verified client certificate, most specific attribute first
/// (RFC 2253 order, as Java's `X500Principal.getName()` which Kafka uses).
pub fn principal_of_certificate(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let registry = x509_parser::objects::oid_registry();
    let mut parts = Vec::new();
    for rdn in cert.subject().iter().collect::<Vec<_>>().into_iter().rev() {
        for attr in rdn.iter() {
            let name = x509_parser::objects::oid2abbrev(attr.attr_type(), registry)
                .map(str::to_string)
                .unwrap_or_else(|_| attr.attr_type().to_id_string());
            let value = attr.as_str().ok()?;
            parts.push(format!("{name}={value}"));
        }
    }
    Some(format!("User:{}", parts.join(",")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn principal_is_the_subject_most_specific_first() {
        let mut params = rcgen::CertificateParams::new(vec!["client".into()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Example");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "alice");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(
            principal_of_certificate(cert.der()).as_deref(),
            Some("User:CN=alice,O=Example")
        );
        assert_eq!(principal_of_certificate(b"garbage"), None);
    }

    #[test]
    fn aes_128_gcm_comes_first_and_every_suite_is_kept() {
        let mut provider = rustls::crypto::ring::default_provider();
        let before = provider.cipher_suites.len();
        provider
            .cipher_suites
            .sort_by_key(|s| suite_preference(s.suite()));
        let order: Vec<_> = provider.cipher_suites.iter().map(|s| s.suite()).collect();
        assert_eq!(order.len(), before);
        assert_eq!(order[0], CipherSuite::TLS13_AES_128_GCM_SHA256);
        let rank = |s| order.iter().position(|o| *o == s).unwrap();
        assert!(
            rank(CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256)
                < rank(CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384)
        );
        assert!(
            rank(CipherSuite::TLS13_AES_256_GCM_SHA384)
                < rank(CipherSuite::TLS13_CHACHA20_POLY1305_SHA256)
        );
    }

    #[test]
    fn reload_swaps_the_certificate_and_a_bad_file_keeps_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec![name.into()])
                .unwrap()
                .self_signed(&key)
                .unwrap();
            std::fs::write(dir.path().join("cert.pem"), cert.pem()).unwrap();
            std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
            cert.der().to_vec()
        };
        let first = write("one");
        let tls = Tls::new(TlsSettings {
            cert_file: dir.path().join("cert.pem"),
            key_file: dir.path().join("key.pem"),
            client_auth: ClientAuth::None,
            client_ca_file: None,
        })
        .unwrap();
        assert_eq!(tls.cert.current.read().cert[0].as_ref(), &first[..]);
        let second = write("two");
        tls.reload().unwrap();
        assert_eq!(tls.cert.current.read().cert[0].as_ref(), &second[..]);
        std::fs::write(dir.path().join("key.pem"), "not a key").unwrap();
        assert!(tls.reload().is_err());
        assert_eq!(tls.cert.current.read().cert[0].as_ref(), &second[..]);
    }
}
