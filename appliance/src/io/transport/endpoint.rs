//! quinn endpoints: the target listens and authenticates sources against its peers, the
//! source dials the pinned target; both end up with a `PeerConnection` of three frame streams.
//!
//! Stream set-up is part of the connection: the source opens the control, live and resync
//! streams, each starting with a preamble naming its class, and the target answers on the
//! control stream. Only then does `connect` return, so a source refused by the target (which
//! learns of the refusal only after its own side of the TLS handshake is done) gets an error
//! from `connect` rather than a connection that dies on first use.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use super::backoff::Backoff;
use super::frame::{FrameReceiver, FrameSender, FrameStream, StreamClass};
use super::identity::{Fingerprint, Identity};
use super::limiter::RateLimiter;
use super::pinning::{
    find_peer, install_ring_provider, ring_provider, Peer, PinnedSourceVerifier,
    PinnedTargetVerifier, ServerCertObservation,
};
use super::socket::{bind_udp, quinn_socket};
use super::{TransportError, Tuning, ALPN_PROTOCOL};

/// First bytes of every stream: magic, transport version, then the class tag.
const PREAMBLE_MAGIC: [u8; 4] = *b"FRY1";
const PREAMBLE_BYTES: usize = 5;
/// The target's answer on the control stream once all three streams are set up.
const ACCEPTED_TAG: u8 = b'A';

/// Server name the source puts in its ClientHello. Never checked: the pin is the identity.
const TARGET_SERVER_NAME: &str = "ferry-target";

/// Application close codes.
const CLOSE_CODE_NORMAL: u32 = 0;
const CLOSE_CODE_PROTOCOL: u32 = 1;

/// Connections waiting in the target's accept queue before handshakes are paused.
const ACCEPT_QUEUE_LENGTH: usize = 16;

fn transport_config(tuning: &Tuning) -> Result<Arc<quinn::TransportConfig>, TransportError> {
    let invalid = |detail: String| TransportError::InvalidTuning { detail };
    if tuning.initial_mtu > tuning.max_udp_payload_bytes {
        return Err(invalid(format!(
            "initial_mtu {} exceeds max_udp_payload_bytes {}",
            tuning.initial_mtu, tuning.max_udp_payload_bytes
        )));
    }
    if u32::try_from(tuning.frame_bytes_max).is_err() {
        return Err(invalid(format!(
            "frame_bytes_max {} does not fit the u32 length prefix",
            tuning.frame_bytes_max
        )));
    }
    let idle_timeout = quinn::IdleTimeout::try_from(tuning.idle_timeout).map_err(|_| {
        invalid(format!(
            "idle_timeout {:?} is too long",
            tuning.idle_timeout
        ))
    })?;
    let mut config = quinn::TransportConfig::default();
    config
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(StreamClass::ALL.len() as u32))
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(0))
        .stream_receive_window(quinn::VarInt::from_u32(tuning.stream_receive_window_bytes))
        .receive_window(quinn::VarInt::from_u32(tuning.receive_window_bytes))
        .send_window(tuning.send_window_bytes)
        .initial_mtu(tuning.initial_mtu)
        .initial_rtt(tuning.initial_rtt)
        .keep_alive_interval(Some(tuning.keep_alive_interval))
        .max_idle_timeout(Some(idle_timeout))
        .enable_segmentation_offload(tuning.segmentation_offload)
        .datagram_receive_buffer_size(None);
    match tuning.mtu_discovery_upper_bound {
        None => {
            config.mtu_discovery_config(None);
        }
        Some(upper_bound) => {
            let mut discovery = quinn::MtuDiscoveryConfig::default();
            discovery.upper_bound(upper_bound.min(tuning.max_udp_payload_bytes));
            config.mtu_discovery_config(Some(discovery));
        }
    }
    let mut cubic = quinn::congestion::CubicConfig::default();
    cubic.initial_window(tuning.initial_congestion_window_bytes);
    config.congestion_controller_factory(Arc::new(cubic));
    Ok(Arc::new(config))
}

fn endpoint_config(tuning: &Tuning) -> Result<quinn::EndpointConfig, TransportError> {
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(tuning.max_udp_payload_bytes)
        .map_err(|error| TransportError::InvalidTuning {
            detail: format!(
                "max_udp_payload_bytes {}: {error}",
                tuning.max_udp_payload_bytes
            ),
        })?;
    Ok(config)
}

/// A quinn endpoint on `socket` (see `socket::quinn_socket` for why the socket is wrapped).
fn quinn_endpoint(
    socket: std::net::UdpSocket,
    tuning: &Tuning,
    server_config: Option<quinn::ServerConfig>,
    local_address: SocketAddr,
) -> Result<quinn::Endpoint, TransportError> {
    let endpoint_config = endpoint_config(tuning)?;
    quinn_socket(socket)
        .and_then(|socket| {
            quinn::Endpoint::new_with_abstract_socket(
                endpoint_config,
                server_config,
                socket,
                Arc::new(quinn::TokioRuntime),
            )
        })
        .map_err(|source| TransportError::Socket {
            operation: "start the QUIC endpoint on",
            address: local_address,
            source,
        })
}

fn server_config(
    identity: &Identity,
    peers: Arc<[Peer]>,
    source_address: SocketAddr,
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ServerConfig, TransportError> {
    let provider = ring_provider();
    let verifier = Arc::new(PinnedSourceVerifier::new(peers, source_address, &provider));
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![identity.cert_der.clone()], identity.private_key())?;
    tls.alpn_protocols = vec![ALPN_PROTOCOL.to_vec()];
    // No 0-RTT: replayable early data has no place in a replication protocol.
    tls.max_early_data_size = 0;
    let crypto =
        quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(tls)).map_err(|error| {
            TransportError::InvalidTuning {
                detail: format!("TLS server configuration unusable for QUIC: {error}"),
            }
        })?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport);
    Ok(config)
}

fn client_config(
    identity: &Identity,
    pinned: Fingerprint,
    target_address: SocketAddr,
    observation: Arc<Mutex<ServerCertObservation>>,
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ClientConfig, TransportError> {
    let provider = ring_provider();
    let verifier = Arc::new(PinnedTargetVerifier::new(
        pinned,
        target_address,
        &provider,
        observation,
    ));
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![identity.cert_der.clone()], identity.private_key())?;
    tls.alpn_protocols = vec![ALPN_PROTOCOL.to_vec()];
    tls.enable_early_data = false;
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls)).map_err(|error| {
            TransportError::InvalidTuning {
                detail: format!("TLS client configuration unusable for QUIC: {error}"),
            }
        })?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport);
    Ok(config)
}

/// A cheap, clonable handle on an established connection: close it, wait for its end, read
/// its statistics.
#[derive(Debug, Clone)]
pub struct ConnectionHandle {
    connection: quinn::Connection,
}

impl ConnectionHandle {
    /// The peer's UDP address.
    pub fn peer_address(&self) -> SocketAddr {
        self.connection.remote_address()
    }

    /// Closes the connection at once; pending data is dropped.
    pub fn close(&self, reason: &str) {
        self.connection.close(
            quinn::VarInt::from_u32(CLOSE_CODE_NORMAL),
            reason.as_bytes(),
        );
    }

    /// Waits until the connection ends (peer closed, idle timeout, local close) and says why.
    pub async fn closed(&self) -> TransportError {
        TransportError::ConnectionLost {
            peer_address: self.connection.remote_address(),
            source: self.connection.closed().await,
        }
    }

    /// Why the connection ended, if it has.
    pub fn close_reason(&self) -> Option<TransportError> {
        self.connection
            .close_reason()
            .map(|source| TransportError::ConnectionLost {
                peer_address: self.connection.remote_address(),
                source,
            })
    }

    /// Current smoothed round-trip time.
    pub fn rtt(&self) -> Duration {
        self.connection.rtt()
    }

    /// quinn's counters (bytes, packets, losses, congestion events).
    pub fn stats(&self) -> quinn::ConnectionStats {
        self.connection.stats()
    }
}

/// An authenticated connection between a source and a target, with its three streams.
///
/// Move the halves into separate tasks by destructuring:
/// `let PeerConnection { control, live, resync, handle, .. } = connection;` — each
/// `FrameStream` has a `sender` and a `receiver` that can also go their own ways.
#[derive(Debug)]
pub struct PeerConnection {
    /// On the target: the configured name of the source. On the source: "target".
    pub peer_name: String,
    /// The fingerprint the peer authenticated with.
    pub peer_fingerprint: Fingerprint,
    pub control: FrameStream,
    pub live: FrameStream,
    pub resync: FrameStream,
    pub handle: ConnectionHandle,
    /// Keeps a dialing endpoint alive as long as its connection.
    _endpoint: Option<quinn::Endpoint>,
}

impl PeerConnection {
    /// The stream of one class.
    pub fn stream_mut(&mut self, class: StreamClass) -> &mut FrameStream {
        match class {
            StreamClass::Control => &mut self.control,
            StreamClass::Live => &mut self.live,
            StreamClass::Resync => &mut self.resync,
        }
    }
}

fn frame_stream(
    class: StreamClass,
    peer_address: SocketAddr,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    tuning: &Tuning,
    limiter: Option<Arc<RateLimiter>>,
) -> Result<FrameStream, TransportError> {
    send.set_priority(class.priority())
        .map_err(|_| TransportError::StreamClosed {
            class,
            peer_address,
        })?;
    Ok(FrameStream {
        sender: FrameSender::new(class, peer_address, send, tuning.frame_bytes_max, limiter),
        receiver: FrameReceiver::new(class, peer_address, recv, tuning.frame_bytes_max),
    })
}

fn preamble(tag: u8) -> [u8; PREAMBLE_BYTES] {
    let mut bytes = [0u8; PREAMBLE_BYTES];
    bytes[..4].copy_from_slice(&PREAMBLE_MAGIC);
    bytes[4] = tag;
    bytes
}

/// The target's listening endpoint.
#[derive(Debug)]
pub struct TargetEndpoint {
    endpoint: quinn::Endpoint,
    local_address: SocketAddr,
    accepted: mpsc::Receiver<PeerConnection>,
    peers: Arc<Mutex<Arc<[Peer]>>>,
    refused_total: Arc<AtomicU64>,
    accept_task: tokio::task::JoinHandle<()>,
}

/// What the accept task needs for each incoming connection.
struct AcceptContext {
    identity: Identity,
    peers: Arc<Mutex<Arc<[Peer]>>>,
    tuning: Tuning,
    transport: Arc<quinn::TransportConfig>,
    limiter: Option<Arc<RateLimiter>>,
    refused_total: Arc<AtomicU64>,
    accepted: mpsc::Sender<PeerConnection>,
}

impl TargetEndpoint {
    /// Listens at `listen_address` (port 0 picks one: see `local_address`). Must be called
    /// within a tokio runtime. `limiter` throttles what the target sends (rarely needed).
    pub fn bind(
        listen_address: SocketAddr,
        identity: &Identity,
        peers: Vec<Peer>,
        tuning: &Tuning,
    ) -> Result<TargetEndpoint, TransportError> {
        TargetEndpoint::bind_with_limiter(listen_address, identity, peers, tuning, None)
    }

    /// `bind` with a bandwidth limiter applied to everything the target sends.
    pub fn bind_with_limiter(
        listen_address: SocketAddr,
        identity: &Identity,
        peers: Vec<Peer>,
        tuning: &Tuning,
        limiter: Option<Arc<RateLimiter>>,
    ) -> Result<TargetEndpoint, TransportError> {
        install_ring_provider();
        let transport = transport_config(tuning)?;
        let peers: Arc<Mutex<Arc<[Peer]>>> = Arc::new(Mutex::new(peers.into()));
        // The endpoint-wide server config is a fallback; each incoming connection gets its own
        // (accept_with) so that the verifier can name the source address in its log line.
        let default_server_config = server_config(
            identity,
            lock_peers(&peers),
            listen_address,
            transport.clone(),
        )?;
        let socket = bind_udp(listen_address, tuning)?;
        let local_address = socket
            .local_addr()
            .map_err(|source| TransportError::Socket {
                operation: "read the local address of",
                address: listen_address,
                source,
            })?;
        let endpoint = quinn_endpoint(socket, tuning, Some(default_server_config), local_address)?;
        let (sender, accepted) = mpsc::channel(ACCEPT_QUEUE_LENGTH);
        let refused_total = Arc::new(AtomicU64::new(0));
        let context = Arc::new(AcceptContext {
            identity: identity.clone(),
            peers: peers.clone(),
            tuning: tuning.clone(),
            transport,
            limiter,
            refused_total: refused_total.clone(),
            accepted: sender,
        });
        let accept_task = tokio::spawn(accept_loop(endpoint.clone(), context));
        tracing::info!(%local_address, fingerprint = %identity.fingerprint, "target listening");
        Ok(TargetEndpoint {
            endpoint,
            local_address,
            accepted,
            peers,
            refused_total,
            accept_task,
        })
    }

    /// The address actually bound.
    pub fn local_address(&self) -> SocketAddr {
        self.local_address
    }

    /// The next authenticated connection, with its streams set up. Refused or failed
    /// handshakes are logged and counted, never returned. `None` once the endpoint is closed.
    pub async fn accept(&mut self) -> Option<PeerConnection> {
        self.accepted.recv().await
    }

    /// Replaces the accepted peers (config reload); established connections are kept.
    pub fn set_peers(&self, peers: Vec<Peer>) {
        *self
            .peers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = peers.into();
    }

    /// Connection attempts refused or failed so far (unknown source, bad handshake, broken
    /// stream set-up).
    pub fn refused_total(&self) -> u64 {
        self.refused_total.load(Ordering::Relaxed)
    }

    /// Closes every connection and the socket, and waits until the port is free again.
    pub async fn close(self) {
        self.accept_task.abort();
        self.endpoint.close(
            quinn::VarInt::from_u32(CLOSE_CODE_NORMAL),
            b"target shutting down",
        );
        self.endpoint.wait_idle().await;
    }
}

impl Drop for TargetEndpoint {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

fn lock_peers(peers: &Mutex<Arc<[Peer]>>) -> Arc<[Peer]> {
    peers
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone()
}

async fn accept_loop(endpoint: quinn::Endpoint, context: Arc<AcceptContext>) {
    while let Some(incoming) = endpoint.accept().await {
        let context = context.clone();
        // One task per handshake, so a slow or hostile source cannot hold up the others.
        tokio::spawn(async move {
            let source_address = incoming.remote_address();
            match accept_one(incoming, &context).await {
                Ok(connection) => {
                    tracing::info!(source = %connection.peer_name, %source_address, "source connected");
                    if context.accepted.send(connection).await.is_err() {
                        tracing::debug!(%source_address, "endpoint closed before the connection was taken");
                    }
                }
                Err(error) => {
                    context.refused_total.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%source_address, "refused connection: {error}");
                }
            }
        });
    }
}

async fn accept_one(
    incoming: quinn::Incoming,
    context: &AcceptContext,
) -> Result<PeerConnection, TransportError> {
    let source_address = incoming.remote_address();
    let peers = lock_peers(&context.peers);
    let config = server_config(
        &context.identity,
        peers.clone(),
        source_address,
        context.transport.clone(),
    )?;
    let timeout = context.tuning.handshake_timeout;
    let setup = async {
        let connecting =
            incoming
                .accept_with(Arc::new(config))
                .map_err(|source| TransportError::Handshake {
                    peer_address: source_address,
                    source,
                })?;
        let connection = connecting
            .await
            .map_err(|source| TransportError::Handshake {
                peer_address: source_address,
                source,
            })?;
        let peer_fingerprint =
            peer_fingerprint(&connection).ok_or_else(|| TransportError::Protocol {
                peer_address: source_address,
                detail: "no client certificate after the handshake".to_owned(),
            })?;
        // The verifier already checked this; looking it up again names the peer, and guards
        // against the peers list changing between handshake and here.
        let peer = find_peer(&peers, &peer_fingerprint)
            .cloned()
            .ok_or_else(|| TransportError::Protocol {
                peer_address: source_address,
                detail: format!("refused unknown source {peer_fingerprint}"),
            })?;
        let result = accept_streams(&connection, context).await;
        let [control, live, resync] = match result {
            Ok(streams) => streams,
            Err(error) => {
                connection.close(
                    quinn::VarInt::from_u32(CLOSE_CODE_PROTOCOL),
                    b"stream set-up failed",
                );
                return Err(error);
            }
        };
        Ok(PeerConnection {
            peer_name: peer.name,
            peer_fingerprint,
            control,
            live,
            resync,
            handle: ConnectionHandle { connection },
            _endpoint: None,
        })
    };
    tokio::time::timeout(timeout, setup)
        .await
        .unwrap_or(Err(TransportError::Timeout {
            operation: "handshake and stream set-up",
            peer_address: source_address,
            timeout,
        }))
}

async fn accept_streams(
    connection: &quinn::Connection,
    context: &AcceptContext,
) -> Result<[FrameStream; 3], TransportError> {
    let peer_address = connection.remote_address();
    let mut slots: [Option<FrameStream>; 3] = [None, None, None];
    for _ in 0..StreamClass::ALL.len() {
        let (send, mut recv) =
            connection
                .accept_bi()
                .await
                .map_err(|source| TransportError::ConnectionLost {
                    peer_address,
                    source,
                })?;
        let mut preamble_bytes = [0u8; PREAMBLE_BYTES];
        recv.read_exact(&mut preamble_bytes)
            .await
            .map_err(|error| TransportError::Protocol {
                peer_address,
                detail: format!("reading a stream preamble: {error}"),
            })?;
        let class = (preamble_bytes[..4] == PREAMBLE_MAGIC)
            .then(|| StreamClass::from_tag(preamble_bytes[4]))
            .flatten()
            .ok_or_else(|| TransportError::Protocol {
                peer_address,
                detail: format!("bad stream preamble {preamble_bytes:?}"),
            })?;
        let index = class_index(class);
        if slots[index].is_some() {
            return Err(TransportError::Protocol {
                peer_address,
                detail: format!("second {class} stream"),
            });
        }
        slots[index] = Some(frame_stream(
            class,
            peer_address,
            send,
            recv,
            &context.tuning,
            context.limiter.clone(),
        )?);
    }
    let [Some(mut control), Some(live), Some(resync)] = slots else {
        unreachable!("three distinct classes were accepted");
    };
    control.sender.send_raw(&preamble(ACCEPTED_TAG)).await?;
    Ok([control, live, resync])
}

fn class_index(class: StreamClass) -> usize {
    match class {
        StreamClass::Control => 0,
        StreamClass::Live => 1,
        StreamClass::Resync => 2,
    }
}

fn peer_fingerprint(connection: &quinn::Connection) -> Option<Fingerprint> {
    let identity = connection.peer_identity()?;
    let certificates = identity
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    certificates
        .first()
        .map(|certificate| Fingerprint::of_certificate(certificate))
}

/// Dials one pinned target, repeatedly if asked, from one local UDP socket.
#[derive(Debug)]
pub struct SourceDialer {
    endpoint: quinn::Endpoint,
    target_address: SocketAddr,
    identity: Identity,
    pinned: Fingerprint,
    tuning: Tuning,
    transport: Arc<quinn::TransportConfig>,
    limiter: Option<Arc<RateLimiter>>,
    backoff: Backoff,
}

impl SourceDialer {
    /// Binds an ephemeral local UDP port of the target's address family. Must be called within
    /// a tokio runtime. `limiter` throttles live and resync frames (the bandwidth limit).
    pub fn new(
        target_address: SocketAddr,
        identity: &Identity,
        pinned: Fingerprint,
        tuning: &Tuning,
        limiter: Option<Arc<RateLimiter>>,
    ) -> Result<SourceDialer, TransportError> {
        install_ring_provider();
        let transport = transport_config(tuning)?;
        let local_address: SocketAddr = if target_address.is_ipv6() {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let socket = bind_udp(local_address, tuning)?;
        let endpoint = quinn_endpoint(socket, tuning, None, local_address)?;
        // Jitter seed: differs between processes and between restarts of one.
        let seed = u64::from(std::process::id())
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|elapsed| elapsed.as_nanos() as u64)
                .unwrap_or(0);
        Ok(SourceDialer {
            endpoint,
            target_address,
            identity: identity.clone(),
            pinned,
            tuning: tuning.clone(),
            transport,
            limiter,
            backoff: Backoff::new(seed),
        })
    }

    /// The target this dialer connects to.
    pub fn target_address(&self) -> SocketAddr {
        self.target_address
    }

    /// Replaces the reconnect policy (tests use short delays).
    pub fn set_backoff(&mut self, backoff: Backoff) {
        self.backoff = backoff;
    }

    /// One connection attempt: handshake, pin check, stream set-up.
    pub async fn connect_once(&self) -> Result<PeerConnection, TransportError> {
        let target_address = self.target_address;
        let observation = Arc::new(Mutex::new(ServerCertObservation::default()));
        let config = client_config(
            &self.identity,
            self.pinned,
            target_address,
            observation.clone(),
            self.transport.clone(),
        )?;
        let timeout = self.tuning.handshake_timeout;
        let attempt = async {
            let connecting = self
                .endpoint
                .connect_with(config, target_address, TARGET_SERVER_NAME)
                .map_err(|source| TransportError::Dial {
                    target_address,
                    source,
                })?;
            let connection = connecting
                .await
                .map_err(|source| self.classify_failure(source, &observation))?;
            self.open_streams(&connection)
                .await
                .map_err(|error| match error {
                    TransportError::ConnectionLost { source, .. }
                    | TransportError::Read {
                        source: quinn::ReadError::ConnectionLost(source),
                        ..
                    }
                    | TransportError::Write {
                        source: quinn::WriteError::ConnectionLost(source),
                        ..
                    } => self.classify_failure(source, &observation),
                    other => other,
                })
                .inspect_err(|_| {
                    connection.close(
                        quinn::VarInt::from_u32(CLOSE_CODE_PROTOCOL),
                        b"stream set-up failed",
                    )
                })
                .map(|[control, live, resync]| PeerConnection {
                    peer_name: "target".to_owned(),
                    peer_fingerprint: self.pinned,
                    control,
                    live,
                    resync,
                    handle: ConnectionHandle {
                        connection: connection.clone(),
                    },
                    _endpoint: Some(self.endpoint.clone()),
                })
        };
        let result =
            tokio::time::timeout(timeout, attempt)
                .await
                .unwrap_or(Err(TransportError::Timeout {
                    operation: "handshake and stream set-up",
                    peer_address: target_address,
                    timeout,
                }));
        match &result {
            Ok(_) => tracing::info!(%target_address, "connected to target"),
            Err(error @ TransportError::RefusedByTarget { .. }) => {
                tracing::error!("{error}")
            }
            Err(_) => {}
        }
        result
    }

    /// Connects, retrying with backoff (100 ms doubling to 10 s, jittered) up to
    /// `attempts_max` times; each failure is logged. Returns the last error if all fail.
    pub async fn connect_with_backoff(
        &mut self,
        attempts_max: u32,
    ) -> Result<PeerConnection, TransportError> {
        let mut last_error = None;
        for attempt in 0..attempts_max.max(1) {
            if attempt > 0 {
                tokio::time::sleep(self.backoff.next_delay()).await;
            }
            match self.connect_once().await {
                Ok(connection) => {
                    self.backoff.reset();
                    return Ok(connection);
                }
                Err(error) => {
                    tracing::warn!(
                        target_address = %self.target_address,
                        attempt = attempt + 1,
                        "connecting to the target failed: {error}"
                    );
                    last_error = Some(error);
                }
            }
        }
        Err(last_error.expect("at least one attempt was made"))
    }

    /// Closes the endpoint (every connection of this dialer) and waits for the socket to go.
    pub async fn close(self) {
        self.endpoint.close(
            quinn::VarInt::from_u32(CLOSE_CODE_NORMAL),
            b"source shutting down",
        );
        self.endpoint.wait_idle().await;
    }

    fn classify_failure(
        &self,
        source: quinn::ConnectionError,
        observation: &Mutex<ServerCertObservation>,
    ) -> TransportError {
        let presented = observation
            .lock()
            .map(|observation| observation.presented)
            .unwrap_or(None);
        if let Some(got) = presented.filter(|got| *got != self.pinned) {
            return TransportError::TargetFingerprintMismatch {
                target_address: self.target_address,
                expected: self.pinned,
                got,
            };
        }
        // A crypto-level close from the target after our side of the handshake completed
        // means it did not accept our certificate.
        let closed_by_target_tls = matches!(
            &source,
            quinn::ConnectionError::ConnectionClosed(close)
                if (0x100..0x200).contains(&u64::from(close.error_code))
        );
        if closed_by_target_tls {
            return TransportError::RefusedByTarget {
                target_address: self.target_address,
                own_fingerprint: self.identity.fingerprint,
                source,
            };
        }
        TransportError::Handshake {
            peer_address: self.target_address,
            source,
        }
    }

    async fn open_streams(
        &self,
        connection: &quinn::Connection,
    ) -> Result<[FrameStream; 3], TransportError> {
        let peer_address = connection.remote_address();
        let mut streams = Vec::with_capacity(StreamClass::ALL.len());
        for class in StreamClass::ALL {
            let (send, recv) =
                connection
                    .open_bi()
                    .await
                    .map_err(|source| TransportError::ConnectionLost {
                        peer_address,
                        source,
                    })?;
            let mut stream = frame_stream(
                class,
                peer_address,
                send,
                recv,
                &self.tuning,
                self.limiter.clone(),
            )?;
            // QUIC streams become visible to the peer only when data is sent on them.
            stream.sender.send_raw(&preamble(class.tag())).await?;
            streams.push(stream);
        }
        let mut streams = streams.into_iter();
        let (Some(mut control), Some(live), Some(resync)) =
            (streams.next(), streams.next(), streams.next())
        else {
            unreachable!("three streams were opened");
        };
        let mut answer = [0u8; PREAMBLE_BYTES];
        control.receiver.recv_raw(&mut answer).await?;
        if answer != preamble(ACCEPTED_TAG) {
            return Err(TransportError::Protocol {
                peer_address,
                detail: format!("unexpected answer to the stream set-up: {answer:?}"),
            });
        }
        Ok([control, live, resync])
    }
}

/// Dials `target_address` once from a fresh local endpoint; for a source that reconnects,
/// keep a [`SourceDialer`] instead.
pub async fn connect(
    target_address: SocketAddr,
    identity: &Identity,
    pinned: Fingerprint,
    tuning: &Tuning,
) -> Result<PeerConnection, TransportError> {
    SourceDialer::new(target_address, identity, pinned, tuning, None)?
        .connect_once()
        .await
}
