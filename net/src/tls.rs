//! rustls configurations for kd's three kinds of TLS sessions.
//!
//! | session | server proves | client proves |
//! |---|---|---|
//! | agent → coordinator | certificate pinned by SHA-256 (`kd.pin`) | one-time token, in `Hello` |
//! | child → parent agent | deployment certificate, pinned by the fingerprint in the plan | deployment certificate, in the parent's allowed set |
//!
//! All sessions are TLS 1.3 with ALPN `kd/1`, ring as the only crypto provider.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};

use crate::cert_sha256;

/// A TLS configuration that could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rustls refused the configuration (bad key, bad certificate).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// quinn refused the rustls configuration.
    #[error("QUIC TLS configuration: {0}")]
    Quic(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The handshake-signature half of a verifier, the same for every kd verifier: checked with
/// the provider's algorithms (only the certificate check differs between verifiers).
macro_rules! handshake_signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls12_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

/// Checks the server's certificate by its SHA-256 fingerprint, and its handshake signature.
#[derive(Debug)]
pub struct PinnedServer {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl PinnedServer {
    /// Accepts exactly the certificate whose SHA-256 is `pin`.
    pub fn new(pin: [u8; 32]) -> Arc<Self> {
        Arc::new(Self {
            pin,
            provider: provider(),
        })
    }
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if cert_sha256(end_entity) == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "server certificate SHA-256 {} does not match the pinned {}",
                kd_proto::manifest::hex(&cert_sha256(end_entity)),
                kd_proto::manifest::hex(&self.pin)
            )))
        }
    }

    handshake_signature_checks!();
}

/// The children a parent agent accepts: certificate fingerprint → node name. Shared with the
/// agent, which adds children when the coordinator re-attaches orphans.
#[derive(Debug, Default, Clone)]
pub struct AllowedPeers(Arc<RwLock<HashMap<[u8; 32], String>>>);

impl AllowedPeers {
    /// Allows the certificate with this fingerprint, as `node`.
    pub fn allow(&self, fingerprint: [u8; 32], node: String) {
        if let Ok(mut m) = self.0.write() {
            m.insert(fingerprint, node);
        }
    }

    /// The node a certificate belongs to, if allowed.
    pub fn node_of(&self, cert: &[u8]) -> Option<String> {
        self.0.read().ok()?.get(&cert_sha256(cert)).cloned()
    }
}

#[derive(Debug)]
struct AllowedClients {
    allowed: AllowedPeers,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for AllowedClients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if self.allowed.node_of(end_entity).is_some() {
            Ok(ClientCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "client certificate is not one of this node's children".into(),
            ))
        }
    }

    handshake_signature_checks!();
}

fn quic_server(
    mut cfg: rustls::ServerConfig,
    keep_alive: std::time::Duration,
) -> Result<quinn::ServerConfig, TlsError> {
    cfg.alpn_protocols = vec![kd_proto::ALPN.to_vec()];
    cfg.max_early_data_size = 0;
    let q = quinn::crypto::rustls::QuicServerConfig::try_from(cfg)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(q));
    sc.transport_config(crate::endpoint::transport_with(keep_alive));
    Ok(sc)
}

fn quic_client(
    mut cfg: rustls::ClientConfig,
    keep_alive: std::time::Duration,
) -> Result<quinn::ClientConfig, TlsError> {
    cfg.alpn_protocols = vec![kd_proto::ALPN.to_vec()];
    let q = quinn::crypto::rustls::QuicClientConfig::try_from(cfg)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut cc = quinn::ClientConfig::new(Arc::new(q));
    cc.transport_config(crate::endpoint::transport_with(keep_alive));
    Ok(cc)
}

/// The coordinator's server side: its long-lived certificate, no client certificates.
pub fn coordinator_server(
    cert_der: Vec<u8>,
    key_der: Vec<u8>,
) -> Result<quinn::ServerConfig, TlsError> {
    quic_server(
        coordinator_tls(cert_der, key_der)?,
        crate::endpoint::KEEP_ALIVE,
    )
}

/// The coordinator's certificate, TLS 1.3, no client certificates.
fn coordinator_tls(cert_der: Vec<u8>, key_der: Vec<u8>) -> Result<rustls::ServerConfig, TlsError> {
    Ok(rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert_der)],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der)),
        )?)
}

/// TLS 1.3 towards the coordinator, its certificate pinned, no client certificate.
fn pinned_to_coordinator(pin: [u8; 32]) -> Result<rustls::ClientConfig, TlsError> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(PinnedServer::new(pin))
        .with_no_client_auth())
}

/// An agent's client side towards the coordinator (pinned, no client certificate).
pub fn agent_to_coordinator(pin: [u8; 32]) -> Result<quinn::ClientConfig, TlsError> {
    quic_client(pinned_to_coordinator(pin)?, crate::endpoint::KEEP_ALIVE)
}

/// A parent agent's server side: its deployment certificate; only allowed children get in.
pub fn parent_server(
    cert_der: Vec<u8>,
    key_der: Vec<u8>,
    allowed: AllowedPeers,
) -> Result<quinn::ServerConfig, TlsError> {
    let verifier = Arc::new(AllowedClients {
        allowed,
        provider: provider(),
    });
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from(cert_der)],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der)),
        )?;
    quic_server(cfg, crate::endpoint::DATA_KEEP_ALIVE)
}

/// A child agent's client side towards its parent: the parent's certificate pinned, its own
/// deployment certificate presented.
pub fn child_to_parent(
    parent_pin: [u8; 32],
    cert_der: Vec<u8>,
    key_der: Vec<u8>,
) -> Result<quinn::ClientConfig, TlsError> {
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(PinnedServer::new(parent_pin))
        .with_client_auth_cert(
            vec![CertificateDer::from(cert_der)],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der)),
        )?;
    quic_client(cfg, crate::endpoint::DATA_KEEP_ALIVE)
}

/// The certificate a peer presented on a connection, if any.
pub fn peer_cert(conn: &quinn::Connection) -> Option<Vec<u8>> {
    let id = conn.peer_identity()?;
    let certs = id.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    certs.first().map(|c| c.to_vec())
}

/// The daemon's HTTPS API, server side: the coordinator's certificate (the one agents pin),
/// TLS 1.3, ALPN `http/1.1`, no client certificate (callers prove a bearer token).
pub fn api_server(cert_der: Vec<u8>, key_der: Vec<u8>) -> Result<rustls::ServerConfig, TlsError> {
    let mut cfg = coordinator_tls(cert_der, key_der)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// The CLI's side of the HTTPS API: the daemon's certificate pinned by SHA-256 (`kd-coord
/// pin` prints it), as agents pin it.
pub fn api_client(pin: [u8; 32]) -> Result<rustls::ClientConfig, TlsError> {
    let mut cfg = pinned_to_coordinator(pin)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}
