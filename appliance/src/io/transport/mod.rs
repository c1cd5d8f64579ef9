//! QUIC transport with mutual TLS and certificate-fingerprint pinning (quinn, rustls, rcgen).
//!
//! The source only dials ([`connect`], [`SourceDialer`]) and the target only listens
//! ([`TargetEndpoint`]), so a source needs no inbound connectivity. Both sides authenticate
//! with a self-signed [`Identity`] and pin the other's [`Fingerprint`]; after the handshake a
//! [`PeerConnection`] carries three streams ([`StreamClass`]: control, live, resync) of
//! length-prefixed frames, with strict priorities so that a resync never starves live writes.
//! The socket and quinn tuning lives in [`Tuning`]; kernel-notes/quic-udp.md explains it.

mod backoff;
pub mod bench;
mod compression;
mod endpoint;
mod frame;
mod identity;
mod limiter;
mod pinning;
mod socket;

use std::net::SocketAddr;
use std::time::Duration;

pub use backoff::Backoff;
pub use compression::{Compression, CompressionError};
pub use endpoint::{connect, ConnectionHandle, PeerConnection, SourceDialer, TargetEndpoint};
pub use frame::{FrameReceiver, FrameSender, FrameStream, StreamClass, FRAME_LENGTH_PREFIX_BYTES};
pub use identity::{
    Fingerprint, FingerprintParseError, Identity, IdentityError, CERT_FILE_NAME, KEY_FILE_NAME,
};
pub use limiter::{RateLimiter, TokenBucket};
pub use pinning::{install_ring_provider, Peer};

use crate::limits::{FRAME_BODY_BYTES_MAX, FRAME_HEADER_BYTES};

/// Largest transport frame by default: one replication protocol frame (`core::wire`), header
/// and largest body.
pub const FRAME_BYTES_MAX: usize = FRAME_HEADER_BYTES + FRAME_BODY_BYTES_MAX;

const _: () = assert!(FRAME_BYTES_MAX <= u32::MAX as usize);

/// Socket buffer size below which a warning is logged: the 208 KiB default lost ~25k packets
/// per 4 GiB here, 4 MiB lost only under heavy CPU contention.
pub const SOCKET_BUFFER_BYTES_ADEQUATE: usize = 4 << 20;

/// ALPN protocol id: a peer speaking another transport version fails the handshake cleanly.
pub const ALPN_PROTOCOL: &[u8] = b"ferry/1";

/// Socket and QUIC settings; both ends must agree on `max_udp_payload_bytes`.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// SO_RCVBUF / SO_SNDBUF requested for the UDP socket. The kernel caps it at
    /// net.core.rmem_max / wmem_max unless we run as root (then SO_*BUFFORCE is used); below
    /// `SOCKET_BUFFER_BYTES_ADEQUATE` a warning says so.
    pub socket_buffer_bytes: usize,
    /// First packet size tried: 1452 fits a 1500-byte path through IPv6 + UDP headers.
    pub initial_mtu: u16,
    /// Largest UDP payload this endpoint accepts; must be at least `initial_mtu` on both ends.
    pub max_udp_payload_bytes: u16,
    /// Upper bound for path MTU discovery; `None` disables discovery.
    pub mtu_discovery_upper_bound: Option<u16>,
    /// Receive window of one stream: must cover bandwidth x RTT of one stream class.
    pub stream_receive_window_bytes: u32,
    /// Receive window of the whole connection.
    pub receive_window_bytes: u32,
    /// Bytes the sender keeps in flight unacknowledged.
    pub send_window_bytes: u64,
    /// Cubic's initial congestion window.
    pub initial_congestion_window_bytes: u64,
    /// RTT assumed before the first measurement; the handshake gives up after about
    /// three probe timeouts derived from it (and at least `idle_timeout`).
    pub initial_rtt: Duration,
    /// Keep-alive period: keeps NAT bindings and lets a silent link be noticed.
    pub keep_alive_interval: Duration,
    /// A link silent this long is declared dead and the connection closed.
    pub idle_timeout: Duration,
    /// Time allowed for the handshake plus stream set-up.
    pub handshake_timeout: Duration,
    /// UDP generic segmentation offload (one sendmsg for up to 64 KiB of packets).
    pub segmentation_offload: bool,
    /// Largest frame sent or accepted.
    pub frame_bytes_max: usize,
}

impl Default for Tuning {
    fn default() -> Tuning {
        Tuning {
            // 16 MiB absorbs the receiver being descheduled for a few ms at Gbit/s rates
            // (4 MiB still lost packets on a loaded 2-core machine; see kernel-notes).
            socket_buffer_bytes: 16 << 20,
            initial_mtu: 1452,
            // Path MTU discovery probes up to 32000-byte packets: on loopback, jumbo-frame LANs
            // (~9000) and tunnels with a large MTU every packet then carries more payload for
            // the same per-packet cost (6000 instead of 1452 cut CPU ~1.5x on loopback, 32000
            // instead of 6000 another ~16-20%); on a 1500-byte path the probes are lost and the
            // link stays at 1452. A GSO batch larger than one 64 KiB datagram is sent in
            // pieces that fit (`socket::quinn_socket`): two 32000-byte packets per send, while
            // a 1500-byte path keeps ten packets per send.
            max_udp_payload_bytes: 32_000,
            mtu_discovery_upper_bound: Some(32_000),
            // 16 MiB per stream and 48 MiB per connection: 10 Gbit/s at ~13 ms RTT per stream,
            // 1 Gbit/s at ~130 ms; the memory is only used while the application lags.
            stream_receive_window_bytes: 16 << 20,
            receive_window_bytes: 48 << 20,
            send_window_bytes: 48 << 20,
            initial_congestion_window_bytes: 14_720,
            initial_rtt: Duration::from_millis(333),
            keep_alive_interval: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            segmentation_offload: true,
            frame_bytes_max: FRAME_BYTES_MAX,
        }
    }
}

/// Everything that can go wrong in the transport, naming the peer and the operation.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("transport: {operation} UDP socket {address}: {source}")]
    Socket {
        operation: &'static str,
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("transport: building the TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("transport: invalid tuning: {detail}")]
    InvalidTuning { detail: String },
    #[error("transport: dialing target {target_address}: {source}")]
    Dial {
        target_address: SocketAddr,
        #[source]
        source: quinn::ConnectError,
    },
    #[error(
        "transport: target {target_address} fingerprint mismatch: expected {expected} got {got}"
    )]
    TargetFingerprintMismatch {
        target_address: SocketAddr,
        expected: Fingerprint,
        got: Fingerprint,
    },
    #[error("transport: target {target_address} refused this source (is this appliance's fingerprint {own_fingerprint} among the target's peers?): {source}")]
    RefusedByTarget {
        target_address: SocketAddr,
        own_fingerprint: Fingerprint,
        #[source]
        source: quinn::ConnectionError,
    },
    #[error("transport: handshake with {peer_address} failed: {source}")]
    Handshake {
        peer_address: SocketAddr,
        #[source]
        source: quinn::ConnectionError,
    },
    #[error("transport: {operation} with {peer_address} timed out after {timeout:?}")]
    Timeout {
        operation: &'static str,
        peer_address: SocketAddr,
        timeout: Duration,
    },
    #[error("transport: connection to {peer_address} lost: {source}")]
    ConnectionLost {
        peer_address: SocketAddr,
        #[source]
        source: quinn::ConnectionError,
    },
    #[error("transport: peer {peer_address} broke the stream set-up: {detail}")]
    Protocol {
        peer_address: SocketAddr,
        detail: String,
    },
    #[error("transport: {class} frame of {frame_bytes} bytes (peer {peer_address}) exceeds the maximum of {frame_bytes_max}")]
    FrameTooLarge {
        class: StreamClass,
        peer_address: SocketAddr,
        frame_bytes: u64,
        frame_bytes_max: usize,
    },
    #[error("transport: {class} stream from {peer_address} ended inside a frame ({received_bytes} of {needed_bytes} bytes)")]
    TruncatedFrame {
        class: StreamClass,
        peer_address: SocketAddr,
        received_bytes: usize,
        needed_bytes: usize,
    },
    #[error("transport: writing to the {class} stream to {peer_address}: {source}")]
    Write {
        class: StreamClass,
        peer_address: SocketAddr,
        #[source]
        source: quinn::WriteError,
    },
    #[error("transport: reading the {class} stream from {peer_address}: {source}")]
    Read {
        class: StreamClass,
        peer_address: SocketAddr,
        #[source]
        source: quinn::ReadError,
    },
    #[error("transport: the {class} stream to {peer_address} is already finished")]
    StreamClosed {
        class: StreamClass,
        peer_address: SocketAddr,
    },
}
