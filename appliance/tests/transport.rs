//! Transport tests over real quinn sockets on 127.0.0.1: mutual authentication with pinned
//! fingerprints, refusal of unknown or mismatched peers on both sides, frames on every stream
//! class, reconnect after a target restart, frame size bounds, and the bandwidth limit.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ferry_appliance::io::transport::{
    Backoff, FrameSender, Identity, Peer, PeerConnection, RateLimiter, SourceDialer, StreamClass,
    TargetEndpoint, TransportError, Tuning,
};
use tokio::time::{timeout, Instant};

/// Bound on every wait in these tests: generous for a loaded 2-core machine, still finite.
const WAIT_MAX: Duration = Duration::from_secs(20);

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

struct Appliances {
    _state_dir: tempfile::TempDir,
    source: Identity,
    target: Identity,
    stranger: Identity,
}

fn appliances() -> Appliances {
    let state_dir = tempfile::tempdir().unwrap();
    let load = |name: &str| Identity::load_or_create(&state_dir.path().join(name)).unwrap();
    Appliances {
        source: load("source"),
        target: load("target"),
        stranger: load("stranger"),
        _state_dir: state_dir,
    }
}

fn peers_of(source: &Identity) -> Vec<Peer> {
    vec![Peer {
        name: "site-a".to_owned(),
        fingerprint: source.fingerprint,
    }]
}

/// Captures log output of the current thread (tests run on a current-thread runtime, so the
/// endpoints' tasks log here too).
#[derive(Clone, Default)]
struct CapturedLog(Arc<Mutex<Vec<u8>>>);

impl CapturedLog {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    fn install(&self) -> tracing::subscriber::DefaultGuard {
        let writer = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        tracing::subscriber::set_default(subscriber)
    }
}

impl io::Write for CapturedLog {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Polls `condition` every 10 ms until it holds or WAIT_MAX passes.
async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT_MAX;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn accept(target: &mut TargetEndpoint) -> PeerConnection {
    timeout(WAIT_MAX, target.accept())
        .await
        .expect("accept timed out")
        .expect("endpoint closed")
}

/// A target endpoint and one connection to it from the source: (endpoint, source's end,
/// target's end). The endpoint must outlive the connection.
async fn connected(
    appliances: &Appliances,
    source_tuning: &Tuning,
    target_tuning: &Tuning,
    limiter: Option<Arc<RateLimiter>>,
) -> (
    TargetEndpoint,
    Result<PeerConnection, TransportError>,
    PeerConnection,
) {
    let mut target = TargetEndpoint::bind(
        loopback(),
        &appliances.target,
        peers_of(&appliances.source),
        target_tuning,
    )
    .unwrap();
    let target_address = target.local_address();
    let (source_side, target_side) = dial(
        appliances,
        &mut target,
        target_address,
        source_tuning,
        limiter,
    )
    .await;
    (target, source_side, target_side)
}

/// A target endpoint on loopback that knows the source.
fn bind_target(appliances: &Appliances, tuning: &Tuning) -> TargetEndpoint {
    TargetEndpoint::bind(
        loopback(),
        &appliances.target,
        peers_of(&appliances.source),
        tuning,
    )
    .unwrap()
}

/// Dials `target` at `address` (its own, or a relay's in front of it) and accepts there:
/// (source's end, target's end).
async fn dial(
    appliances: &Appliances,
    target: &mut TargetEndpoint,
    address: SocketAddr,
    source_tuning: &Tuning,
    limiter: Option<Arc<RateLimiter>>,
) -> (Result<PeerConnection, TransportError>, PeerConnection) {
    let dialer = SourceDialer::new(
        address,
        &appliances.source,
        appliances.target.fingerprint,
        source_tuning,
        limiter,
    )
    .unwrap();
    tokio::join!(dialer.connect_once(), accept(target))
}

fn pattern(seed: u8, length: usize) -> Bytes {
    (0..length)
        .map(|index| (index as u8).wrapping_mul(31).wrapping_add(seed))
        .collect::<Vec<u8>>()
        .into()
}

/// Sends the 1 MiB frames `pattern(index, 1 MiB)` for every index of `indexes`, in order.
async fn send_mib_patterns(
    sender: &mut FrameSender,
    indexes: std::ops::Range<u8>,
) -> Result<(), TransportError> {
    for index in indexes {
        sender.send(pattern(index, 1 << 20)).await?;
    }
    Ok(())
}

/// Sends frames both ways on every class and checks each arrives intact and in order.
async fn exchange_on_every_class(source: &mut PeerConnection, target: &mut PeerConnection) {
    for (round, class) in StreamClass::ALL.into_iter().enumerate() {
        let sizes = [0usize, 1, 1400, 70_000, 1 << 20];
        for (index, &size) in sizes.iter().enumerate() {
            let frame = pattern((round * 16 + index) as u8, size);
            source
                .stream_mut(class)
                .sender
                .send(frame.clone())
                .await
                .unwrap();
            let received = target.stream_mut(class).receiver.recv().await.unwrap();
            assert_eq!(
                received.as_ref(),
                Some(&frame),
                "{class} source→target size {size}"
            );

            let reply = pattern((round * 16 + index) as u8 ^ 0xff, size);
            target
                .stream_mut(class)
                .sender
                .send(reply.clone())
                .await
                .unwrap();
            let received = source.stream_mut(class).receiver.recv().await.unwrap();
            assert_eq!(
                received.as_ref(),
                Some(&reply),
                "{class} target→source size {size}"
            );
        }
    }
}

#[tokio::test]
async fn mutual_auth_succeeds_and_frames_flow_both_ways_on_every_class() {
    let appliances = appliances();
    let tuning = Tuning::default();
    let mut target = TargetEndpoint::bind(
        loopback(),
        &appliances.target,
        peers_of(&appliances.source),
        &tuning,
    )
    .unwrap();
    let target_address = target.local_address();
    let dialer = SourceDialer::new(
        target_address,
        &appliances.source,
        appliances.target.fingerprint,
        &tuning,
        None,
    )
    .unwrap();
    let (source_side, target_side) = tokio::join!(dialer.connect_once(), accept(&mut target));
    let mut source_side = source_side.unwrap();
    let mut target_side = target_side;

    assert_eq!(target_side.peer_name, "site-a");
    assert_eq!(target_side.peer_fingerprint, appliances.source.fingerprint);
    assert_eq!(source_side.peer_fingerprint, appliances.target.fingerprint);
    exchange_on_every_class(&mut source_side, &mut target_side).await;

    // A finished stream ends cleanly at a frame boundary.
    source_side.live.sender.finish().unwrap();
    assert_eq!(target_side.live.receiver.recv().await.unwrap(), None);
    assert_eq!(target.refused_total(), 0);

    source_side.handle.close("test done");
    let reason = timeout(WAIT_MAX, target_side.handle.closed())
        .await
        .unwrap();
    assert!(
        matches!(reason, TransportError::ConnectionLost { .. }),
        "{reason}"
    );
}

#[tokio::test]
async fn wrong_pinned_target_fingerprint_is_refused_by_the_source() {
    let log = CapturedLog::default();
    let _guard = log.install();
    let appliances = appliances();
    let tuning = Tuning::default();
    let mut target = TargetEndpoint::bind(
        loopback(),
        &appliances.target,
        peers_of(&appliances.source),
        &tuning,
    )
    .unwrap();
    let target_address = target.local_address();

    // The source pins the stranger's fingerprint, so the real target does not match.
    let wrong_pin = appliances.stranger.fingerprint;
    let error = SourceDialer::new(target_address, &appliances.source, wrong_pin, &tuning, None)
        .unwrap()
        .connect_once()
        .await
        .unwrap_err();
    match &error {
        TransportError::TargetFingerprintMismatch { expected, got, .. } => {
            assert_eq!(*expected, wrong_pin);
            assert_eq!(*got, appliances.target.fingerprint);
        }
        other => panic!("expected a fingerprint mismatch, got {other}"),
    }
    let expected_line = format!(
        "target fingerprint mismatch: expected {wrong_pin} got {}",
        appliances.target.fingerprint
    );
    assert!(log.text().contains(&expected_line), "log:\n{}", log.text());

    // The target refuses its side too and never hands the connection up.
    wait_until("the target to count the refusal", || {
        target.refused_total() == 1
    })
    .await;
    assert!(
        log.text().contains("refused connection"),
        "log:\n{}",
        log.text()
    );

    // The next connection the target yields is a correctly pinned one: nothing of the
    // refused attempt was delivered.
    let dialer = SourceDialer::new(
        target_address,
        &appliances.source,
        appliances.target.fingerprint,
        &tuning,
        None,
    )
    .unwrap();
    let (good, accepted) = tokio::join!(dialer.connect_once(), accept(&mut target));
    let mut good = good.unwrap();
    let mut accepted = accepted;
    good.control
        .sender
        .send(Bytes::from_static(b"hello"))
        .await
        .unwrap();
    assert_eq!(
        accepted.control.receiver.recv().await.unwrap().as_deref(),
        Some(&b"hello"[..])
    );
}

#[tokio::test]
async fn unknown_source_is_refused_by_the_target_and_delivers_nothing() {
    let log = CapturedLog::default();
    let _guard = log.install();
    let appliances = appliances();
    let tuning = Tuning::default();
    let mut target = TargetEndpoint::bind(
        loopback(),
        &appliances.target,
        peers_of(&appliances.source),
        &tuning,
    )
    .unwrap();
    let target_address = target.local_address();

    // The stranger pins the right target, but the target does not know the stranger.
    let error = SourceDialer::new(
        target_address,
        &appliances.stranger,
        appliances.target.fingerprint,
        &tuning,
        None,
    )
    .unwrap()
    .connect_once()
    .await
    .unwrap_err();
    match &error {
        TransportError::RefusedByTarget {
            own_fingerprint, ..
        } => assert_eq!(*own_fingerprint, appliances.stranger.fingerprint),
        other => panic!("expected a refusal by the target, got {other}"),
    }
    wait_until("the target to count the refusal", || {
        target.refused_total() == 1
    })
    .await;
    let text = log.text();
    assert!(
        text.contains(&format!(
            "refused unknown source {}",
            appliances.stranger.fingerprint
        )),
        "log:\n{text}"
    );
    assert!(text.contains("refused this source"), "log:\n{text}");

    let dialer = SourceDialer::new(
        target_address,
        &appliances.source,
        appliances.target.fingerprint,
        &tuning,
        None,
    )
    .unwrap();
    let (good, accepted) = tokio::join!(dialer.connect_once(), accept(&mut target));
    good.unwrap();
    assert_eq!(accepted.peer_name, "site-a");
    assert_eq!(accepted.peer_fingerprint, appliances.source.fingerprint);
}

#[tokio::test]
async fn source_reconnects_after_the_target_endpoint_restarts() {
    let appliances = appliances();
    // A short idle timeout: a dial to a target that is down fails only when it expires
    // (QUIC ignores ICMP port-unreachable), and this test makes two such dials.
    let tuning = Tuning {
        idle_timeout: Duration::from_millis(800),
        keep_alive_interval: Duration::from_millis(200),
        // The handshake timeout is at least three probe timeouts, derived from this.
        initial_rtt: Duration::from_millis(20),
        ..Tuning::default()
    };
    let mut target = TargetEndpoint::bind(
        loopback(),
        &appliances.target,
        peers_of(&appliances.source),
        &tuning,
    )
    .unwrap();
    let target_address = target.local_address();
    let mut dialer = SourceDialer::new(
        target_address,
        &appliances.source,
        appliances.target.fingerprint,
        &tuning,
        None,
    )
    .unwrap();
    dialer.set_backoff(Backoff::with_bounds(
        Duration::from_millis(10),
        Duration::from_millis(200),
        7,
    ));
    let (first, accepted) = tokio::join!(dialer.connect_once(), accept(&mut target));
    let mut first = first.unwrap();
    let mut accepted = accepted;
    first
        .live
        .sender
        .send(Bytes::from_static(b"before"))
        .await
        .unwrap();
    assert_eq!(
        accepted.live.receiver.recv().await.unwrap().as_deref(),
        Some(&b"before"[..])
    );

    // Restart the target: the source notices the loss promptly (close frame, or at worst
    // the idle timeout).
    drop(accepted);
    target.close().await;
    let loss = timeout(WAIT_MAX, first.handle.closed()).await.unwrap();
    assert!(
        matches!(loss, TransportError::ConnectionLost { .. }),
        "{loss}"
    );

    // While the target is down, an attempt fails.
    let down = dialer.connect_with_backoff(1).await;
    assert!(down.is_err());

    let mut target = {
        let deadline = Instant::now() + WAIT_MAX;
        loop {
            match TargetEndpoint::bind(
                target_address,
                &appliances.target,
                peers_of(&appliances.source),
                &tuning,
            ) {
                Ok(target) => break target,
                Err(error) => {
                    assert!(Instant::now() < deadline, "rebinding the target: {error}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    };
    let (second, accepted) = tokio::join!(dialer.connect_with_backoff(50), accept(&mut target));
    let mut second = second.unwrap();
    let mut accepted = accepted;
    second
        .live
        .sender
        .send(Bytes::from_static(b"after"))
        .await
        .unwrap();
    assert_eq!(
        accepted.live.receiver.recv().await.unwrap().as_deref(),
        Some(&b"after"[..])
    );
}

#[tokio::test]
async fn oversized_frames_are_rejected_by_sender_and_receiver() {
    let appliances = appliances();
    let source_tuning = Tuning::default();
    let target_tuning = Tuning {
        frame_bytes_max: 1024,
        ..Tuning::default()
    };
    let (_target, source_side, target_side) =
        connected(&appliances, &source_tuning, &target_tuning, None).await;
    let mut source_side = source_side.unwrap();
    let mut target_side = target_side;

    // The target's own sender refuses a frame over its limit without sending anything.
    let error = target_side
        .live
        .sender
        .send(Bytes::from(vec![0u8; 1025]))
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            TransportError::FrameTooLarge {
                frame_bytes: 1025,
                frame_bytes_max: 1024,
                ..
            }
        ),
        "{error}"
    );

    // The source (larger limit) sends 2000 bytes: the target refuses to read it, reporting
    // the declared size before allocating anything.
    source_side
        .resync
        .sender
        .send(Bytes::from(vec![7u8; 2000]))
        .await
        .unwrap();
    let error = target_side.resync.receiver.recv().await.unwrap_err();
    assert!(
        matches!(
            error,
            TransportError::FrameTooLarge {
                class: StreamClass::Resync,
                frame_bytes: 2000,
                ..
            }
        ),
        "{error}"
    );
    assert!(
        error.to_string().contains("exceeds the maximum of 1024"),
        "{error}"
    );

    // The sender refuses a frame over the absolute limit too.
    let error = source_side
        .live
        .sender
        .send(Bytes::from(vec![0u8; source_tuning.frame_bytes_max + 1]))
        .await
        .unwrap_err();
    assert!(
        matches!(error, TransportError::FrameTooLarge { .. }),
        "{error}"
    );
}

#[tokio::test]
async fn live_frames_flow_while_resync_is_blocked() {
    let appliances = appliances();
    let tuning = Tuning {
        stream_receive_window_bytes: 1 << 20,
        ..Tuning::default()
    };
    let (_target, source_side, target_side) = connected(&appliances, &tuning, &tuning, None).await;
    let PeerConnection {
        live: mut source_live,
        resync: mut source_resync,
        ..
    } = source_side.unwrap();
    let mut target_side = target_side;

    // The resync sender queues far more than the target's window while the target does not
    // read resync at all: it blocks on flow control.
    let resync_task = tokio::spawn(async move {
        send_mib_patterns(&mut source_resync.sender, 0..16).await?;
        Ok::<_, TransportError>(source_resync)
    });
    // Live frames still arrive, in order.
    for index in 0..64u8 {
        let frame = pattern(index, 64 << 10);
        source_live.sender.send(frame.clone()).await.unwrap();
        let received = timeout(WAIT_MAX, target_side.live.receiver.recv())
            .await
            .expect("a live frame was starved")
            .unwrap();
        assert_eq!(received, Some(frame));
    }
    assert!(
        !resync_task.is_finished(),
        "resync should still be blocked by flow control"
    );
    // Draining resync lets it finish, intact.
    for index in 0..16u8 {
        let received = timeout(WAIT_MAX, target_side.resync.receiver.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(received, Some(pattern(index, 1 << 20)));
    }
    timeout(WAIT_MAX, resync_task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn bandwidth_limit_slows_the_sender_and_can_be_lifted() {
    let appliances = appliances();
    let tuning = Tuning::default();
    let rate_bytes_per_s = 4 << 20;
    let limiter = Arc::new(RateLimiter::new(rate_bytes_per_s));
    let (_target, source_side, target_side) =
        connected(&appliances, &tuning, &tuning, Some(limiter.clone())).await;
    let mut source_side = source_side.unwrap();
    let mut target_side = target_side;
    let receiver = tokio::spawn(async move {
        let mut received_bytes = 0usize;
        while let Some(frame) = target_side.live.receiver.recv().await? {
            received_bytes += frame.len();
        }
        Ok::<_, TransportError>(received_bytes)
    });

    // 3 MiB at 4 MiB/s with a 1 MiB burst: the last 2 MiB (plus prefixes) need >= 0.5 s.
    let started = Instant::now();
    send_mib_patterns(&mut source_side.live.sender, 0..3)
        .await
        .unwrap();
    let limited = started.elapsed();
    assert!(
        limited >= Duration::from_millis(490),
        "3 MiB took only {limited:?}"
    );

    // Lifting the limit at run time: 16 MiB, which would take 4 s at the old rate, goes
    // without waiting on tokens.
    limiter.set_rate(0);
    assert_eq!(limiter.rate_bytes_per_s(), 0);
    let started = Instant::now();
    send_mib_patterns(&mut source_side.live.sender, 0..16)
        .await
        .unwrap();
    source_side.live.sender.finish().unwrap();
    let received_bytes = timeout(WAIT_MAX, receiver).await.unwrap().unwrap().unwrap();
    let unlimited = started.elapsed();
    assert_eq!(received_bytes, 19 << 20);
    assert!(
        unlimited < Duration::from_secs(4),
        "unlimited 16 MiB took {unlimited:?}"
    );
}

#[tokio::test]
async fn frame_receive_survives_cancellation_mid_frame() {
    let appliances = appliances();
    let tuning = Tuning::default();
    let (_target, source_side, target_side) = connected(&appliances, &tuning, &tuning, None).await;
    let PeerConnection {
        live: mut source_live,
        ..
    } = source_side.unwrap();
    let mut target_side = target_side;
    let frames: Vec<Bytes> = (0..8u8).map(|index| pattern(index, 1 << 20)).collect();
    let sent = frames.clone();
    let sender = tokio::spawn(async move {
        for frame in sent {
            source_live.sender.send(frame).await?;
        }
        Ok::<_, TransportError>(source_live)
    });
    // Poll with a tiny timeout so that many receive calls are dropped mid-frame; every frame
    // must still come out whole and in order.
    let mut cancelled = 0u32;
    let deadline = Instant::now() + WAIT_MAX;
    for expected in &frames {
        loop {
            assert!(Instant::now() < deadline, "timed out receiving frames");
            match timeout(Duration::from_micros(200), target_side.live.receiver.recv()).await {
                Ok(received) => {
                    assert_eq!(received.unwrap().as_ref(), Some(expected));
                    break;
                }
                Err(_) => cancelled += 1,
            }
        }
    }
    println!("receive calls cancelled: {cancelled}");
    timeout(WAIT_MAX, sender).await.unwrap().unwrap().unwrap();
}

#[tokio::test]
async fn aligned_frames_arrive_intact_with_the_chosen_byte_aligned() {
    let appliances = appliances();
    let tuning = Tuning::default();
    let (_target, source_side, target_side) = connected(&appliances, &tuning, &tuning, None).await;
    let mut source_side = source_side.unwrap();
    let mut target_side = target_side;
    let offset = 88;
    let at_most = offset + (1 << 20) + 64;
    target_side.live.receiver.align_frames(offset, at_most, 4);
    // (size, whether it goes through the aligned pool): a full-size frame, one just over half
    // the pool's buffer, a small one, one too large for the pool, and the largest that fits.
    let cases = [
        (1 << 20, true),
        (at_most / 2 + 4096, true),
        (70_000, false),
        (2 << 20, false),
        (at_most, true),
    ];
    for (index, &(size, aligned)) in cases.iter().enumerate() {
        let frame = pattern(index as u8 + 1, size);
        source_side.live.sender.send(frame.clone()).await.unwrap();
        let received = timeout(WAIT_MAX, target_side.live.receiver.recv())
            .await
            .expect("frame timed out")
            .unwrap()
            .expect("stream open");
        assert_eq!(received, frame, "frame of {size} bytes");
        if aligned {
            let at = received.as_ptr() as usize + offset;
            assert_eq!(
                at % 4096,
                0,
                "byte {offset} of a {size}-byte frame is not aligned"
            );
        }
    }
    source_side.handle.close("test done");
}

/// One direction of an impaired relay: every `drop_every`th datagram is dropped and every
/// `reorder_every`th is held back behind the next one.
struct Impairment {
    drop_every: u64,
    reorder_every: u64,
    count: u64,
    held: Option<Vec<u8>>,
}

impl Impairment {
    fn new(drop_every: u64, reorder_every: u64) -> Impairment {
        Impairment {
            drop_every,
            reorder_every,
            count: 0,
            held: None,
        }
    }

    /// The datagrams to forward, in order, now that `datagram` arrived.
    fn pass(&mut self, datagram: &[u8]) -> Vec<Vec<u8>> {
        self.count += 1;
        if self.count % self.drop_every == 0 {
            return Vec::new();
        }
        if self.count % self.reorder_every == 0 && self.held.is_none() {
            self.held = Some(datagram.to_vec());
            return Vec::new();
        }
        std::iter::once(datagram.to_vec())
            .chain(self.held.take())
            .collect()
    }
}

/// A UDP relay between a source and a target that loses and reorders datagrams in both
/// directions, deterministically (`Impairment`). Returns the address the source dials.
async fn impaired_relay(
    target_address: SocketAddr,
    drop_every: u64,
    reorder_every: u64,
) -> SocketAddr {
    let front = tokio::net::UdpSocket::bind(loopback()).await.unwrap();
    let back = tokio::net::UdpSocket::bind(loopback()).await.unwrap();
    back.connect(target_address).await.unwrap();
    let front_address = front.local_addr().unwrap();
    tokio::spawn(async move {
        let mut source_address = None;
        let (mut from_source, mut from_target) = (vec![0u8; 65536], vec![0u8; 65536]);
        let mut forward = Impairment::new(drop_every, reorder_every);
        let mut backward = Impairment::new(drop_every, reorder_every);
        loop {
            tokio::select! {
                received = front.recv_from(&mut from_source) => {
                    let Ok((length, address)) = received else { return };
                    source_address = Some(address);
                    for datagram in forward.pass(&from_source[..length]) {
                        let _ = back.send(&datagram).await;
                    }
                }
                received = back.recv(&mut from_target) => {
                    let Ok(length) = received else { return };
                    let Some(source_address) = source_address else { continue };
                    for datagram in backward.pass(&from_target[..length]) {
                        let _ = front.send_to(&datagram, source_address).await;
                    }
                }
            }
        }
    });
    front_address
}

/// Bulk frames through a relay that loses ~3% and reorders ~2% of the datagrams each way
/// (data one way, mostly ACKs the other) arrive intact and in order with the default tuning:
/// loss recovery copes with lost data packets and with lost and late ACKs.
#[tokio::test]
async fn bulk_frames_arrive_intact_through_loss_and_reordering() {
    let appliances = appliances();
    let tuning = Tuning::default();
    let mut target = bind_target(&appliances, &tuning);
    let relay_address = impaired_relay(target.local_address(), 31, 47).await;
    let (source_side, target_side) =
        dial(&appliances, &mut target, relay_address, &tuning, None).await;
    let mut source_side = source_side.unwrap();
    let mut target_side = target_side;
    const FRAMES: u8 = 24;
    let sender = async {
        send_mib_patterns(&mut source_side.live.sender, 0..FRAMES)
            .await
            .unwrap();
    };
    let receiver = async {
        for index in 0..FRAMES {
            let received = target_side.live.receiver.recv().await.unwrap();
            assert_eq!(received, Some(pattern(index, 1 << 20)), "frame {index}");
        }
    };
    timeout(WAIT_MAX * 3, async { tokio::join!(sender, receiver) })
        .await
        .expect("bulk transfer through the impaired relay timed out");
    let source_stats = source_side.handle.stats();
    let target_stats = target_side.handle.stats();
    assert!(
        source_stats.path.lost_packets > 0,
        "the relay dropped data packets, so the sender must have declared some lost: {:?}",
        source_stats.path
    );
    assert!(
        target_stats.frame_tx.acks > 0 && source_stats.frame_rx.acks > 0,
        "ACKs flowed"
    );
}

/// Sends one 1 MiB live frame and checks it arrives intact within WAIT_MAX.
async fn live_frame_round_trip(
    source: &mut PeerConnection,
    target: &mut PeerConnection,
    seed: u8,
    when: &str,
) {
    let frame = pattern(seed, 1 << 20);
    source.live.sender.send(frame.clone()).await.unwrap();
    let received = timeout(WAIT_MAX, target.live.receiver.recv())
        .await
        .unwrap_or_else(|_| panic!("a frame stalled {when}"))
        .unwrap();
    assert_eq!(received, Some(frame));
}

/// On loopback path MTU discovery climbs past ~6,500 bytes, where quinn's ten-packet GSO
/// batches no longer fit one UDP datagram: the socket caps the batch, so bulk frames keep
/// flowing in large packets instead of stalling.
#[tokio::test]
async fn bulk_frames_flow_in_packets_above_the_gso_batch_limit() {
    let appliances = appliances();
    let tuning = Tuning::default();
    assert!(
        tuning.max_udp_payload_bytes > 6_500,
        "the default tuning no longer probes above the ten-segment limit"
    );
    let (_target, source_side, mut target_side) =
        connected(&appliances, &tuning, &tuning, None).await;
    let mut source_side = source_side.unwrap();
    let mut index = 0u8;
    let deadline = Instant::now() + WAIT_MAX;
    while source_side.handle.stats().path.current_mtu <= 6_500 {
        assert!(
            Instant::now() < deadline,
            "path MTU discovery stayed at {} bytes",
            source_side.handle.stats().path.current_mtu
        );
        live_frame_round_trip(
            &mut source_side,
            &mut target_side,
            index,
            "while MTUD probed",
        )
        .await;
        index = index.wrapping_add(1);
    }
    // After the climb, frames still arrive: batches of large packets fit the socket.
    for _ in 0..8 {
        live_frame_round_trip(
            &mut source_side,
            &mut target_side,
            index,
            "in large packets",
        )
        .await;
        index = index.wrapping_add(1);
    }
    let stats = source_side.handle.stats();
    assert!(stats.path.current_mtu > 6_500, "{:?}", stats.path);
    assert_eq!(
        stats.path.lost_packets, 0,
        "loopback lost packets: {:?}",
        stats.path
    );
}
