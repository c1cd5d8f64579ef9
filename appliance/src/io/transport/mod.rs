//! QUIC transport with mutual TLS and certificate-fingerprint pinning (quinn, rustls, rcgen).
