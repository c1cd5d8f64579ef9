//! Certificate pinning for rustls: the source accepts only the target whose fingerprint it was
//! configured with, the target accepts only sources listed in its peers.
//!
//! Pinning replaces the CA chain and the host name check, not the handshake signature check:
//! every TLS 1.3 CertificateVerify is still verified with the ring provider's algorithms, so a
//! peer must hold the private key of the pinned certificate, not merely replay the certificate.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use super::identity::Fingerprint;

/// A source the target accepts: the name the operator gave it and its pinned fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Peer {
    pub name: String,
    pub fingerprint: Fingerprint,
}

/// The ring provider, built explicitly: the process-wide default is never relied on, because
/// with aws-lc-rs also compiled in rustls cannot pick one and panics (see REFERENCE.md).
///
/// Cipher suites are ordered AES-128-GCM first: both ends are Ferry, 128-bit keys are ample,
/// and AES-128 needs 10 AES rounds per block against AES-256's 14, which shows at Gbit/s rates
/// where one core encrypts everything.
pub fn ring_provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::ring::default_provider()
    })
}

/// Installs ring as the process-wide rustls provider if none is installed yet, so that any
/// code path that still asks for the default (quinn's helpers) finds ring.
pub fn install_ring_provider() {
    // An error only means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// What the source's verifier saw, so that `connect` can report a mismatch as a typed error
/// rather than as an opaque TLS alert.
#[derive(Debug, Default)]
pub(crate) struct ServerCertObservation {
    pub presented: Option<Fingerprint>,
}

/// Source side: the target must present exactly the pinned certificate.
#[derive(Debug)]
pub(crate) struct PinnedTargetVerifier {
    pinned: Fingerprint,
    target_address: SocketAddr,
    algorithms: WebPkiSupportedAlgorithms,
    observation: Arc<Mutex<ServerCertObservation>>,
}

impl PinnedTargetVerifier {
    pub(crate) fn new(
        pinned: Fingerprint,
        target_address: SocketAddr,
        provider: &CryptoProvider,
        observation: Arc<Mutex<ServerCertObservation>>,
    ) -> PinnedTargetVerifier {
        PinnedTargetVerifier {
            pinned,
            target_address,
            algorithms: provider.signature_verification_algorithms,
            observation,
        }
    }
}

impl ServerCertVerifier for PinnedTargetVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = Fingerprint::of_certificate(end_entity);
        if let Ok(mut observation) = self.observation.lock() {
            observation.presented = Some(presented);
        }
        if presented == self.pinned {
            Ok(ServerCertVerified::assertion())
        } else {
            tracing::error!(
                target_address = %self.target_address,
                "target fingerprint mismatch: expected {} got {presented}",
                self.pinned
            );
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // QUIC is TLS 1.3 only; a TLS 1.2 signature here would mean a broken peer.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Target side: the source's client certificate must match one of the configured peers.
#[derive(Debug)]
pub(crate) struct PinnedSourceVerifier {
    peers: Arc<[Peer]>,
    source_address: SocketAddr,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PinnedSourceVerifier {
    pub(crate) fn new(
        peers: Arc<[Peer]>,
        source_address: SocketAddr,
        provider: &CryptoProvider,
    ) -> PinnedSourceVerifier {
        PinnedSourceVerifier {
            peers,
            source_address,
            algorithms: provider.signature_verification_algorithms,
        }
    }
}

/// The configured peer with this fingerprint, if any.
pub(crate) fn find_peer<'a>(peers: &'a [Peer], fingerprint: &Fingerprint) -> Option<&'a Peer> {
    peers.iter().find(|peer| peer.fingerprint == *fingerprint)
}

impl ClientCertVerifier for PinnedSourceVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let presented = Fingerprint::of_certificate(end_entity);
        match find_peer(&self.peers, &presented) {
            Some(peer) => {
                tracing::debug!(source = %peer.name, source_address = %self.source_address, "source certificate matches its pin");
                Ok(ClientCertVerified::assertion())
            }
            None => {
                tracing::error!(
                    source_address = %self.source_address,
                    "refused unknown source {presented}: it is not among the {} configured peers",
                    self.peers.len()
                );
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::ApplicationVerificationFailure,
                ))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
