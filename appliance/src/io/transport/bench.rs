//! Transport throughput measurement (issue 7, scenario 5): bulk transfer over Ferry's tuned,
//! pinned QUIC link beside a plain quinn stream with default settings and beside a TCP stream,
//! all on loopback in the same run. `benches/transport.rs` and `ferry bench` call this.
//!
//! Each side runs on its own OS thread with its own current-thread tokio runtime, so sender
//! and receiver each get a core, as two appliances would. A run ends when the receiver has
//! counted every byte and its one-byte answer is back at the sender: the time covers delivery,
//! not just handing bytes to a send buffer.

use std::net::SocketAddr;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{
    install_ring_provider, Identity, Peer, SourceDialer, TargetEndpoint, TransportError, Tuning,
};

/// What to transfer.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Bytes per run and link.
    pub total_bytes: u64,
    /// Size of each frame (or write).
    pub frame_bytes: usize,
    /// Runs per link; links are interleaved round by round so drift hits all alike.
    pub rounds: u32,
    /// Ferry's tuning for its link.
    pub tuning: Tuning,
    /// Links to measure (all three by default; profiling runs pick one).
    pub links: Vec<Link>,
}

impl Default for BenchOptions {
    fn default() -> BenchOptions {
        BenchOptions {
            total_bytes: 1 << 30,
            frame_bytes: 1 << 20,
            rounds: 3,
            tuning: Tuning::default(),
            links: vec![Link::Ferry, Link::PlainQuinn, Link::Tcp],
        }
    }
}

/// Which link a measurement is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Ferry's link: pinned mutual TLS, tuned socket and QUIC settings, framed live stream.
    Ferry,
    /// quinn with its default endpoint, transport and socket settings, one stream.
    PlainQuinn,
    /// One TCP connection, no encryption.
    Tcp,
}

impl Link {
    pub fn name(self) -> &'static str {
        match self {
            Link::Ferry => "ferry QUIC link (tuned, pinned mutual TLS)",
            Link::PlainQuinn => "plain quinn, default settings",
            Link::Tcp => "TCP, one stream, unencrypted",
        }
    }
}

/// One run of one link.
#[derive(Debug, Clone)]
pub struct Run {
    pub link: Link,
    pub bytes: u64,
    pub elapsed: Duration,
    /// Packets the sender declared lost (QUIC only).
    pub lost_packets: Option<u64>,
    /// CPU time (user + system) of the whole process, sender and receiver together, over
    /// the run: what a link costs per byte, not just how fast it goes.
    pub cpu: Duration,
    /// quinn's counters of the sending side at the end of the run (QUIC only).
    pub sender_stats: Option<quinn::ConnectionStats>,
    /// quinn's counters of the receiving side once it had every byte (QUIC only).
    pub receiver_stats: Option<quinn::ConnectionStats>,
}

impl Run {
    /// Throughput in 10^9 bytes per second.
    pub fn gigabytes_per_s(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64() / 1e9
    }

    /// CPU seconds (both sides) per 10^9 bytes delivered.
    pub fn cpu_seconds_per_gigabyte(&self) -> f64 {
        self.cpu.as_secs_f64() / (self.bytes as f64 / 1e9)
    }
}

/// CPU time (user + system) this process has used so far, all threads: both sides of a run
/// live in this process.
fn process_cpu_time() -> Duration {
    let mut time = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `time` is a valid, writable timespec on this stack frame for the whole call.
    let result = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut time) };
    if result != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        u64::try_from(time.tv_sec).unwrap_or(0),
        u32::try_from(time.tv_nsec).unwrap_or(0),
    )
}

/// Failure of a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("transport bench: {link:?}: {source}")]
    Transport {
        link: Link,
        #[source]
        source: TransportError,
    },
    #[error("transport bench: {link:?}: {detail}")]
    Other { link: Link, detail: String },
}

/// Runs every link `options.rounds` times, interleaved, and returns every run.
pub fn run(options: &BenchOptions) -> Result<Vec<Run>, BenchError> {
    install_ring_provider();
    let source = Identity::ephemeral().map_err(|error| BenchError::Other {
        link: Link::Ferry,
        detail: error.to_string(),
    })?;
    let target = Identity::ephemeral().map_err(|error| BenchError::Other {
        link: Link::Ferry,
        detail: error.to_string(),
    })?;
    // The same buffer is sent over and over (Bytes clones share it): the bench measures the
    // link, not a data generator. Random-looking content defeats any compression on the way.
    let frame = Bytes::from(pseudo_random_bytes(options.frame_bytes));
    let mut runs = Vec::new();
    for _ in 0..options.rounds {
        for link in &options.links {
            runs.push(match link {
                Link::Ferry => ferry_link(options, &source, &target, frame.clone())?,
                Link::PlainQuinn => plain_quinn(options, &target, frame.clone())?,
                Link::Tcp => tcp(options, frame.clone())?,
            });
        }
    }
    Ok(runs)
}

/// The median throughput of a link over the runs given.
pub fn median_gigabytes_per_s(runs: &[Run], link: Link) -> Option<f64> {
    median_of(runs, link, Run::gigabytes_per_s)
}

/// The median CPU seconds per GB of a link over the runs given.
pub fn median_cpu_seconds_per_gigabyte(runs: &[Run], link: Link) -> Option<f64> {
    median_of(runs, link, Run::cpu_seconds_per_gigabyte)
}

fn median_of(runs: &[Run], link: Link, figure: fn(&Run) -> f64) -> Option<f64> {
    let mut values: Vec<f64> = runs
        .iter()
        .filter(|run| run.link == link)
        .map(figure)
        .collect();
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    Some(values[values.len() / 2])
}

fn pseudo_random_bytes(length: usize) -> Vec<u8> {
    let mut state = 0x243F_6A88_85A3_08D3u64;
    let mut bytes = Vec::with_capacity(length + 8);
    while bytes.len() < length {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.truncate(length);
    bytes
}

fn frames_for(options: &BenchOptions) -> u64 {
    options.total_bytes.div_ceil(options.frame_bytes as u64)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building a current-thread tokio runtime")
}

/// Runs `target` and `source` on two threads; `target` reports its address first.
fn two_sided<T, S>(link: Link, target: T, source: S) -> Result<Run, BenchError>
where
    T: FnOnce(std_mpsc::Sender<SocketAddr>) -> Result<(), BenchError> + Send + 'static,
    S: FnOnce(SocketAddr) -> Result<Run, BenchError> + Send + 'static,
{
    let (address_sender, address_receiver) = std_mpsc::channel();
    let target_thread = thread::spawn(move || target(address_sender));
    let address = address_receiver
        .recv_timeout(Duration::from_secs(30))
        .map_err(|_| BenchError::Other {
            link,
            detail: "the receiving side did not start".to_owned(),
        });
    let result = address.and_then(|address| {
        thread::spawn(move || source(address))
            .join()
            .unwrap_or_else(|_| {
                Err(BenchError::Other {
                    link,
                    detail: "the sending side panicked".to_owned(),
                })
            })
    });
    let target_result = target_thread.join().unwrap_or_else(|_| {
        Err(BenchError::Other {
            link,
            detail: "the receiving side panicked".to_owned(),
        })
    });
    let run = result?;
    target_result?;
    Ok(run)
}

/// Where the receiving side leaves its quinn counters for the run.
type StatsSlot = Arc<Mutex<Option<quinn::ConnectionStats>>>;

fn with_receiver_stats(run: Result<Run, BenchError>, slot: &StatsSlot) -> Result<Run, BenchError> {
    let mut run = run?;
    run.receiver_stats = slot
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .take();
    Ok(run)
}

fn ferry_link(
    options: &BenchOptions,
    source: &Identity,
    target: &Identity,
    frame: Bytes,
) -> Result<Run, BenchError> {
    let link = Link::Ferry;
    let wrap = move |source| BenchError::Transport { link, source };
    let frames = frames_for(options);
    let total_bytes = frames * frame.len() as u64;
    let peers = vec![Peer {
        name: "bench-source".to_owned(),
        fingerprint: source.fingerprint,
    }];
    let (target_identity, target_tuning) = (target.clone(), options.tuning.clone());
    let receiver_stats: StatsSlot = Arc::default();
    let receiver_stats_slot = receiver_stats.clone();
    let target_side = move |address_sender: std_mpsc::Sender<SocketAddr>| {
        runtime().block_on(async move {
            let mut endpoint = TargetEndpoint::bind(
                "127.0.0.1:0".parse().expect("literal address"),
                &target_identity,
                peers,
                &target_tuning,
            )
            .map_err(wrap)?;
            let _ = address_sender.send(endpoint.local_address());
            let mut connection = endpoint.accept().await.ok_or(BenchError::Other {
                link,
                detail: "endpoint closed before a connection".to_owned(),
            })?;
            let mut received_bytes = 0u64;
            while received_bytes < total_bytes {
                match connection.live.receiver.recv().await.map_err(wrap)? {
                    Some(frame) => received_bytes += frame.len() as u64,
                    None => break,
                }
            }
            *receiver_stats_slot
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(connection.handle.stats());
            connection
                .control
                .sender
                .send(Bytes::from_static(b"k"))
                .await
                .map_err(wrap)?;
            // Wait for the source to close, so the answer is not cut off.
            let _ = connection.handle.closed().await;
            endpoint.close().await;
            Ok(())
        })
    };
    let (source_identity, source_tuning, pinned) =
        (source.clone(), options.tuning.clone(), target.fingerprint);
    let source_side = move |address: SocketAddr| {
        runtime().block_on(async move {
            let dialer = SourceDialer::new(address, &source_identity, pinned, &source_tuning, None)
                .map_err(wrap)?;
            let mut connection = dialer.connect_once().await.map_err(wrap)?;
            let started = Instant::now();
            let cpu_started = process_cpu_time();
            for _ in 0..frames {
                connection
                    .live
                    .sender
                    .send(frame.clone())
                    .await
                    .map_err(wrap)?;
            }
            connection.control.receiver.recv().await.map_err(wrap)?;
            let elapsed = started.elapsed();
            let cpu = process_cpu_time().saturating_sub(cpu_started);
            let stats = connection.handle.stats();
            connection.handle.close("bench done");
            dialer.close().await;
            Ok(Run {
                link,
                bytes: total_bytes,
                elapsed,
                lost_packets: Some(stats.path.lost_packets),
                cpu,
                sender_stats: Some(stats),
                receiver_stats: None,
            })
        })
    };
    with_receiver_stats(two_sided(link, target_side, source_side), &receiver_stats)
}

fn plain_quinn(options: &BenchOptions, target: &Identity, frame: Bytes) -> Result<Run, BenchError> {
    let link = Link::PlainQuinn;
    let other = move |detail: String| BenchError::Other { link, detail };
    let frames = frames_for(options);
    let total_bytes = frames * frame.len() as u64;
    let target_identity = target.clone();
    let receiver_stats: StatsSlot = Arc::default();
    let receiver_stats_slot = receiver_stats.clone();
    let target_side = move |address_sender: std_mpsc::Sender<SocketAddr>| {
        runtime().block_on(async move {
            let config = quinn::ServerConfig::with_single_cert(
                vec![target_identity.cert_der.clone()],
                target_identity.private_key(),
            )
            .map_err(|error| other(error.to_string()))?;
            let endpoint =
                quinn::Endpoint::server(config, "127.0.0.1:0".parse().expect("literal address"))
                    .map_err(|error| other(error.to_string()))?;
            let _ = address_sender.send(
                endpoint
                    .local_addr()
                    .map_err(|error| other(error.to_string()))?,
            );
            let incoming = endpoint
                .accept()
                .await
                .ok_or_else(|| other("endpoint closed".to_owned()))?;
            let connection = incoming.await.map_err(|error| other(error.to_string()))?;
            let (mut send, mut recv) = connection
                .accept_bi()
                .await
                .map_err(|error| other(error.to_string()))?;
            let mut received_bytes = 0u64;
            while received_bytes < total_bytes {
                match recv
                    .read_chunk(usize::MAX, true)
                    .await
                    .map_err(|error| other(error.to_string()))?
                {
                    Some(chunk) => received_bytes += chunk.bytes.len() as u64,
                    None => break,
                }
            }
            *receiver_stats_slot
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(connection.stats());
            send.write_all(b"k")
                .await
                .map_err(|error| other(error.to_string()))?;
            let _ = connection.closed().await;
            endpoint.wait_idle().await;
            Ok(())
        })
    };
    let target_cert = target.cert_der.clone();
    let source_side = move |address: SocketAddr| {
        runtime().block_on(async move {
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(target_cert)
                .map_err(|error| other(error.to_string()))?;
            let client_config = quinn::ClientConfig::with_root_certificates(Arc::new(roots))
                .map_err(|error| other(error.to_string()))?;
            let mut endpoint =
                quinn::Endpoint::client("127.0.0.1:0".parse().expect("literal address"))
                    .map_err(|error| other(error.to_string()))?;
            endpoint.set_default_client_config(client_config);
            let connection = endpoint
                .connect(address, super::identity::CERT_SUBJECT_NAME)
                .map_err(|error| other(error.to_string()))?
                .await
                .map_err(|error| other(error.to_string()))?;
            let (mut send, mut recv) = connection
                .open_bi()
                .await
                .map_err(|error| other(error.to_string()))?;
            let started = Instant::now();
            let cpu_started = process_cpu_time();
            for _ in 0..frames {
                send.write_chunk(frame.clone())
                    .await
                    .map_err(|error| other(error.to_string()))?;
            }
            let mut answer = [0u8; 1];
            recv.read_exact(&mut answer)
                .await
                .map_err(|error| other(error.to_string()))?;
            let elapsed = started.elapsed();
            let cpu = process_cpu_time().saturating_sub(cpu_started);
            let stats = connection.stats();
            connection.close(0u32.into(), b"bench done");
            endpoint.wait_idle().await;
            Ok(Run {
                link,
                bytes: total_bytes,
                elapsed,
                lost_packets: Some(stats.path.lost_packets),
                cpu,
                sender_stats: Some(stats),
                receiver_stats: None,
            })
        })
    };
    with_receiver_stats(two_sided(link, target_side, source_side), &receiver_stats)
}

fn tcp(options: &BenchOptions, frame: Bytes) -> Result<Run, BenchError> {
    let link = Link::Tcp;
    let other = move |detail: String| BenchError::Other { link, detail };
    let frames = frames_for(options);
    let total_bytes = frames * frame.len() as u64;
    let buffer_bytes = options.frame_bytes;
    let target_side = move |address_sender: std_mpsc::Sender<SocketAddr>| {
        runtime().block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .map_err(|error| other(error.to_string()))?;
            let _ = address_sender.send(
                listener
                    .local_addr()
                    .map_err(|error| other(error.to_string()))?,
            );
            let (mut stream, _) = listener
                .accept()
                .await
                .map_err(|error| other(error.to_string()))?;
            let mut buffer = vec![0u8; buffer_bytes];
            let mut received_bytes = 0u64;
            while received_bytes < total_bytes {
                let count = stream
                    .read(&mut buffer)
                    .await
                    .map_err(|error| other(error.to_string()))?;
                if count == 0 {
                    break;
                }
                received_bytes += count as u64;
            }
            stream
                .write_all(b"k")
                .await
                .map_err(|error| other(error.to_string()))?;
            Ok(())
        })
    };
    let source_side = move |address: SocketAddr| {
        runtime().block_on(async move {
            let mut stream = tokio::net::TcpStream::connect(address)
                .await
                .map_err(|error| other(error.to_string()))?;
            let started = Instant::now();
            let cpu_started = process_cpu_time();
            for _ in 0..frames {
                stream
                    .write_all(&frame)
                    .await
                    .map_err(|error| other(error.to_string()))?;
            }
            let mut answer = [0u8; 1];
            stream
                .read_exact(&mut answer)
                .await
                .map_err(|error| other(error.to_string()))?;
            Ok(Run {
                link,
                bytes: total_bytes,
                elapsed: started.elapsed(),
                lost_packets: None,
                cpu: process_cpu_time().saturating_sub(cpu_started),
                sender_stats: None,
                receiver_stats: None,
            })
        })
    };
    two_sided(link, target_side, source_side)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_run_measures_every_link() {
        let options = BenchOptions {
            total_bytes: 8 << 20,
            frame_bytes: 1 << 20,
            rounds: 1,
            ..BenchOptions::default()
        };
        let runs = run(&options).unwrap();
        assert_eq!(runs.len(), 3);
        for link in [Link::Ferry, Link::PlainQuinn, Link::Tcp] {
            let rate = median_gigabytes_per_s(&runs, link).unwrap();
            assert!(rate > 0.0, "{link:?}");
        }
        assert!(runs.iter().all(|run| run.bytes == 8 << 20));
        assert!(runs.iter().all(|run| run.cpu > Duration::ZERO));
        for run in runs.iter().filter(|run| run.link != Link::Tcp) {
            let sender = run
                .sender_stats
                .expect("QUIC runs carry the sender's counters");
            let receiver = run.receiver_stats.expect("and the receiver's");
            assert!(sender.udp_tx.bytes >= 8 << 20, "{:?}", run.link);
            assert!(receiver.udp_rx.bytes >= 8 << 20, "{:?}", run.link);
        }
    }
}
