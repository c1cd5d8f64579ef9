//! A counting UDP relay between the bench's source and target appliances: the source dials the
//! relay, the relay forwards every datagram to the target and back, and counts the bytes of each
//! direction (UDP payload: QUIC packets with their headers, retransmissions and acks). Scenario 4
//! reads "bytes sent" from it without root or a network namespace, and when the target first
//! answered after a restart (the link's reconnection). It survives a restart of the target on the
//! same address.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;

/// Receive timeout of the relay threads: how quickly they notice the stop flag.
const TICK: Duration = Duration::from_millis(100);
/// Socket buffers asked for (the kernel caps them at `net.core.[rw]mem_max`).
const SOCKET_BUFFER_BYTES: usize = 16 << 20;

#[derive(Default)]
struct Counters {
    source_to_target_bytes: AtomicU64,
    target_to_source_bytes: AtomicU64,
    stop: AtomicBool,
    /// When the target first sent a datagram after the last `mark_answers`.
    first_answer: Mutex<Option<Instant>>,
}

pub struct Relay {
    address: SocketAddr,
    counters: Arc<Counters>,
    threads: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Listens on a free loopback port and forwards to `target`.
    pub fn start(target: SocketAddr) -> anyhow::Result<Relay> {
        let front = bind()?;
        let back = bind()?;
        back.connect(target)
            .with_context(|| format!("relay: cannot connect to {target}"))?;
        let address = front.local_addr().context("relay: local_addr")?;
        let counters = Arc::new(Counters::default());
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));

        let forward = {
            let front = front.try_clone().context("relay: clone socket")?;
            let back = back.try_clone().context("relay: clone socket")?;
            let counters = counters.clone();
            let client = client.clone();
            std::thread::Builder::new()
                .name("bench-relay-out".into())
                .spawn(move || {
                    let mut buffer = vec![0u8; 65_536];
                    while !counters.stop.load(Ordering::Relaxed) {
                        let Ok((length, from)) = front.recv_from(&mut buffer) else {
                            continue; // timeout, or an ICMP error from an earlier send
                        };
                        *client.lock().unwrap_or_else(|e| e.into_inner()) = Some(from);
                        counters
                            .source_to_target_bytes
                            .fetch_add(length as u64, Ordering::Relaxed);
                        // A stopped target refuses: the datagram is lost, as on a real link.
                        let _ = back.send(&buffer[..length]);
                    }
                })
                .context("relay: spawn")?
        };
        let backward = {
            let counters = counters.clone();
            std::thread::Builder::new()
                .name("bench-relay-back".into())
                .spawn(move || {
                    let mut buffer = vec![0u8; 65_536];
                    while !counters.stop.load(Ordering::Relaxed) {
                        let Ok(length) = back.recv(&mut buffer) else {
                            continue;
                        };
                        counters
                            .target_to_source_bytes
                            .fetch_add(length as u64, Ordering::Relaxed);
                        counters
                            .first_answer
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get_or_insert_with(Instant::now);
                        let to = *client.lock().unwrap_or_else(|e| e.into_inner());
                        if let Some(to) = to {
                            let _ = front.send_to(&buffer[..length], to);
                        }
                    }
                })
                .context("relay: spawn")?
        };
        Ok(Relay {
            address,
            counters,
            threads: vec![forward, backward],
        })
    }

    /// Where the source should dial.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Bytes relayed from the source to the target so far.
    pub fn source_to_target_bytes(&self) -> u64 {
        self.counters.source_to_target_bytes.load(Ordering::Relaxed)
    }

    /// Bytes relayed from the target to the source so far.
    pub fn target_to_source_bytes(&self) -> u64 {
        self.counters.target_to_source_bytes.load(Ordering::Relaxed)
    }

    /// Forgets when the target last answered: `first_answer` reports the next datagram from it.
    pub fn mark_answers(&self) {
        *self
            .counters
            .first_answer
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// When the target first sent a datagram after `mark_answers` (a restarted target's first
    /// answer: the link is back).
    pub fn first_answer(&self) -> Option<Instant> {
        *self
            .counters
            .first_answer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.counters.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn bind() -> anyhow::Result<UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .context("relay: socket")?;
    // Best effort: a small buffer only risks drops, which QUIC retransmits (and the count shows).
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    let address: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
    socket
        .bind(&address.into())
        .context("relay: bind 127.0.0.1:0")?;
    let socket: UdpSocket = socket.into();
    socket
        .set_read_timeout(Some(TICK))
        .context("relay: set_read_timeout")?;
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relays_both_ways_and_counts() {
        let target = UdpSocket::bind("127.0.0.1:0").expect("bind target");
        target
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let relay = Relay::start(target.local_addr().expect("addr")).expect("relay");
        relay.mark_answers();
        let source = UdpSocket::bind("127.0.0.1:0").expect("bind source");
        source
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        source
            .send_to(b"hello", relay.address())
            .expect("send to relay");
        let mut buffer = [0u8; 64];
        let (length, from) = target.recv_from(&mut buffer).expect("target receives");
        assert_eq!(&buffer[..length], b"hello");
        target.send_to(b"hi!", from).expect("answer");
        let (length, _) = source.recv_from(&mut buffer).expect("source receives");
        assert_eq!(&buffer[..length], b"hi!");
        assert_eq!(relay.source_to_target_bytes(), 5);
        assert_eq!(relay.target_to_source_bytes(), 3);
        let answered = relay.first_answer().expect("the target answered");
        relay.mark_answers();
        assert_eq!(relay.first_answer(), None);
        target.send_to(b"again", from).expect("answer");
        source.recv_from(&mut buffer).expect("source receives");
        assert!(relay.first_answer().expect("answered again") >= answered);
    }
}
