//! The NBD server of the capture front-end: listeners on unix sockets or TCP ports; per
//! connection, a task that runs the `core::nbd` handshake and then a receive thread (requests,
//! blocking reads) and a reply thread (blocking writes; large writes' handlers send their own
//! short replies, see `Replies`); one runtime task per request, so that many requests are in
//! flight per connection and replies go out in completion order — or earlier: a backend may
//! let a change be answered before it completes (`ExportBackend::apply`'s `answer`; capture's
//! write-behind), and its task still holds the request's permit until it does, so a closing
//! connection waits for it.
//!
//! The protocol loop is generic over [`ExportBackend`]: capture serves its `CaptureDisk`s, and
//! failover (`crate::failover`) serves point views with a writable overlay through the same loop.
//!
//! A bad client costs one log line (a `warn` naming the peer, the export and the reason) and at
//! worst its own connection; the listener and every other connection keep serving.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use std::io::{Read, Write};
use std::os::fd::AsFd;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::task::JoinSet;

use crate::capture::disk::{CaptureDisk, Change, EarlyAnswer};
use crate::control::DiskState;
use crate::core::nbd::{
    decode_request, encode_simple_reply, Action, ErrorCode, Handshake, HandshakeEvent, Negotiated,
    ServerConfig, FLAG_READ_ONLY, REQUEST_HEADER_BYTES,
};
use crate::io::disk::{BufPool, IoBuf};
use crate::io::sock::send_nonblocking;

/// Requests one connection may have in flight; the connection stops reading when it has this
/// many (back-pressure to the client, bounded memory here). qemu and libnbd keep up to 16–64.
pub const REQUESTS_IN_FLIGHT_MAX: usize = 128;

/// A client that has not finished its handshake by then is dropped (one log line).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Bad requests logged per connection; later ones are counted, not logged, so a looping client
/// cannot flood the log.
const REJECTS_LOGGED_MAX: u32 = 16;

/// Write-path requests (WRITE, and likewise WRITE_ZEROES and TRIM) covering at least this much
/// answer from their handler (`Replies::send_direct`), smaller ones through the reply thread. Large writes are few and each waits its turn at the
/// device, so the reply thread's wake-up (0.2–0.5 ms on this 2-vCPU guest) sat on every 1 MiB
/// write's critical path; small replies come in bursts, which the reply thread sends in one
/// `write` and one client wake-up, where direct sends cost one each (4 KiB random writes at
/// QD32 were ~10% slower with every reply direct; benches/RESULTS.md, 2026-11-29).
const DIRECT_REPLY_MIN_BYTES: u64 = 64 * 1024;

/// The time slice a connection's receive thread asks for (`io::sched::request_short_slice`).
const RECEIVE_SLICE: Duration = Duration::from_micros(100);

/// Read/write buffering of a connection: large enough to batch many small requests per syscall.
const SOCKET_BUFFER_BYTES: usize = 256 * 1024;

/// Where a listener listens.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl Endpoint {
    /// Reads a config value: `host:port` (IPv4, or `[v6]:port`) is TCP, anything else is a unix
    /// socket path.
    pub fn parse(text: &str) -> Endpoint {
        match text.parse::<SocketAddr>() {
            Ok(address) => Endpoint::Tcp(address),
            Err(_) => Endpoint::Unix(PathBuf::from(text)),
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
            Endpoint::Tcp(address) => write!(f, "tcp:{address}"),
        }
    }
}

/// Buffers for request payloads and read data, by size class, recycled across requests. The
/// classes up to 1 MiB come from the registered arena (`io::disk` arena.rs), so the image's
/// O_DIRECT writes skip pinning their pages per request: ~5% of the capture path's CPU at 1 MiB,
/// and 1 MiB sequential writes ran 1.1–1.2x faster with it (benches/RESULTS.md).
pub(crate) struct Buffers {
    classes: Vec<BufPool>,
}

impl Buffers {
    pub(crate) fn new() -> Self {
        // (capacity, kept): small random I/O, 1 MiB sequential I/O, up to the 32 MiB maximum.
        let classes = [
            (64 * 1024, 256),
            (1 << 20, 64),
            (4 << 20, 16),
            (32 << 20, 4),
        ];
        Self {
            classes: classes
                .iter()
                .map(|&(capacity, kept)| {
                    // The classes that carry nearly all writes are registered (see `Buffers`).
                    if capacity <= 1 << 20 {
                        BufPool::registered(capacity, kept)
                    } else {
                        BufPool::new(capacity, kept)
                    }
                })
                .collect(),
        }
    }

    /// A buffer with room for `length` bytes, `len() == length`.
    pub(crate) fn take(&self, length: usize) -> IoBuf {
        let mut buf = match self
            .classes
            .iter()
            .find(|pool| pool.buf_capacity() >= length)
        {
            Some(pool) => pool.get(),
            None => IoBuf::with_capacity(length),
        };
        buf.set_len(length);
        buf
    }
}

/// What an export serves: reads, the write-path changes and flushes of one disk. Cloning is
/// cheap (a handle); every request runs in its own task with its own clone.
pub(crate) trait ExportBackend: Clone + Send + Sync + 'static {
    type Error: std::fmt::Display + Send + 'static;

    /// `<machine>/<disk>`, for log lines.
    fn export_name(&self) -> &str;

    /// Reads `length` bytes at `offset` into `buf` (capacity at least `length`).
    fn read(
        &self,
        offset: u64,
        buf: IoBuf,
        length: usize,
    ) -> impl Future<Output = (Result<(), Self::Error>, IoBuf)> + Send;

    /// Applies a write, write-zeroes or trim; durable on return with `fua`. A backend that may
    /// answer the change before it completes (write-behind) says so through `answer`; the
    /// future still ends when the change does. Dropping `answer` unsent means: answer at the
    /// end.
    fn apply(
        &self,
        offset: u64,
        length: u64,
        change: Change,
        fua: bool,
        answer: EarlyAnswer,
    ) -> impl Future<Output = (Result<(), Self::Error>, Option<IoBuf>)> + Send;

    /// Makes every completed change durable.
    fn flush(&self) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Whether writes are refused now (EPERM; new connections see a read-only export): a
    /// capture disk of a failed-over (fenced) group, a failover disk switched read-only.
    fn is_read_only(&self) -> bool;

    /// The NBD error a failed request answers (EIO unless the backend knows better, e.g. EPERM
    /// for a write to an export switched read-only at run time).
    fn error_code(_error: &Self::Error) -> ErrorCode {
        ErrorCode::Io
    }
}

impl ExportBackend for CaptureDisk {
    type Error = crate::capture::disk::CaptureIoError;

    fn export_name(&self) -> &str {
        CaptureDisk::export_name(self)
    }

    fn read(
        &self,
        offset: u64,
        buf: IoBuf,
        length: usize,
    ) -> impl Future<Output = (Result<(), Self::Error>, IoBuf)> + Send {
        CaptureDisk::read(self, offset, buf, length)
    }

    fn apply(
        &self,
        offset: u64,
        length: u64,
        change: Change,
        fua: bool,
        answer: EarlyAnswer,
    ) -> impl Future<Output = (Result<(), Self::Error>, Option<IoBuf>)> + Send {
        CaptureDisk::apply_answering_early(self, offset, length, change, fua, Some(answer))
    }

    fn flush(&self) -> impl Future<Output = Result<(), Self::Error>> + Send {
        CaptureDisk::flush(self)
    }

    fn is_read_only(&self) -> bool {
        self.state() == DiskState::FailedOver
    }
}

/// What a listener serves.
pub(crate) struct ExportSet<B = CaptureDisk> {
    pub(crate) config: ServerConfig,
    pub(crate) disks: Vec<B>,
    pub(crate) buffers: Arc<Buffers>,
    pub(crate) endpoint: Endpoint,
}

static CONNECTION_IDS: AtomicU64 = AtomicU64::new(1);

/// A bound listener of either kind.
pub(crate) enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// Accepts connections until `shutdown` turns true, then waits for the connections to finish
/// their in-flight requests (they stop reading new ones at shutdown).
pub(crate) async fn run_listener<B: ExportBackend>(
    listener: Listener,
    exports: Arc<ExportSet<B>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        // Reap finished connections so the set does not grow with every client ever seen.
        while connections.try_join_next().is_some() {}
        let accepted = tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => break,
            accepted = accept(&listener) => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let exports = exports.clone();
                let shutdown = shutdown.clone();
                connections.spawn(serve_connection(stream, peer, exports, shutdown));
            }
            Err(error) => {
                // EMFILE and friends: log, back off briefly, keep the listener alive.
                tracing::warn!(endpoint = %exports.endpoint, %error, "accept failed");
                tokio::select! {
                    _ = shutdown.wait_for(|stop| *stop) => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        }
    }
    while connections.join_next().await.is_some() {}
    if let Endpoint::Unix(path) = &exports.endpoint {
        let _ = std::fs::remove_file(path);
    }
}

enum Stream {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

impl Stream {
    /// The socket in blocking mode, for the connection's receive and reply threads.
    fn into_blocking(self) -> std::io::Result<BlockingStream> {
        Ok(match self {
            Stream::Unix(stream) => {
                let stream = stream.into_std()?;
                stream.set_nonblocking(false)?;
                BlockingStream::Unix(stream)
            }
            Stream::Tcp(stream) => {
                // Small replies go out at once; a socket that refuses the option still serves.
                let _ = stream.set_nodelay(true);
                let stream = stream.into_std()?;
                stream.set_nonblocking(false)?;
                BlockingStream::Tcp(stream)
            }
        })
    }
}

/// A connection's socket after its handshake. Requests are read by a thread blocked in `read`,
/// as nbdkit does: a sender that fills the socket buffer is drained while it copies, so a 1 MiB
/// write moves in a few large sends. Read from a runtime task, each refill waited for an epoll
/// wake-up and the next poll of that task (~3x the sends and the context switches of nbdkit,
/// and 0.6–0.7x its 1 MiB throughput: benches/RESULTS.md).
enum BlockingStream {
    Unix(std::os::unix::net::UnixStream),
    Tcp(std::net::TcpStream),
}

impl BlockingStream {
    fn try_clone(&self) -> std::io::Result<BlockingStream> {
        Ok(match self {
            BlockingStream::Unix(stream) => BlockingStream::Unix(stream.try_clone()?),
            BlockingStream::Tcp(stream) => BlockingStream::Tcp(stream.try_clone()?),
        })
    }

    fn shutdown(&self, how: std::net::Shutdown) -> std::io::Result<()> {
        match self {
            BlockingStream::Unix(stream) => stream.shutdown(how),
            BlockingStream::Tcp(stream) => stream.shutdown(how),
        }
    }
}

impl std::os::fd::AsFd for BlockingStream {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            BlockingStream::Unix(stream) => stream.as_fd(),
            BlockingStream::Tcp(stream) => stream.as_fd(),
        }
    }
}

impl Read for BlockingStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            BlockingStream::Unix(stream) => stream.read(buf),
            BlockingStream::Tcp(stream) => stream.read(buf),
        }
    }
}

impl Write for &BlockingStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            BlockingStream::Unix(stream) => (&*stream).write(buf),
            BlockingStream::Tcp(stream) => (&*stream).write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            BlockingStream::Unix(stream) => (&*stream).flush(),
            BlockingStream::Tcp(stream) => (&*stream).flush(),
        }
    }
}

async fn accept(listener: &Listener) -> std::io::Result<(Stream, String)> {
    let id = CONNECTION_IDS.fetch_add(1, Ordering::Relaxed);
    match listener {
        Listener::Unix(listener) => {
            let (stream, _) = listener.accept().await?;
            let peer = match stream.peer_cred() {
                Ok(cred) => format!("unix#{id} (pid {})", cred.pid().unwrap_or(-1)),
                Err(_) => format!("unix#{id}"),
            };
            Ok((Stream::Unix(stream), peer))
        }
        Listener::Tcp(listener) => {
            let (stream, address) = listener.accept().await?;
            Ok((Stream::Tcp(stream), format!("tcp#{id} {address}")))
        }
    }
}

/// A reply on its way to the writer task.
enum Reply {
    Simple([u8; 16]),
    Read([u8; 16], IoBuf),
    /// Nothing to add: the reply thread is to send what a direct send left unsent.
    Unsent,
}

/// Where a connection's replies go. The handler of a large write-path request (at least
/// [`DIRECT_REPLY_MIN_BYTES`]) sends its simple (16-byte) reply itself, with one non-blocking
/// `send`, when nobody else is writing to the socket; everything else — read data, small
/// writes' replies, a reply the socket had no room for, one that comes while the reply thread
/// writes — goes through the reply thread. Replies may go out in any order (NBD matches them by
/// cookie); what must never happen is two writers interleaving inside one reply, and the writer
/// lock rules that out: the reply thread holds it across each batch of blocking writes, a
/// handler only `try_lock`s it.
#[derive(Clone)]
struct Replies {
    queue: mpsc::Sender<Reply>,
    writer: Arc<ReplyWriter>,
}

/// The socket's write side, shared by the reply thread and the handlers' direct sends.
struct ReplyWriter {
    stream: BlockingStream,
    /// The tail of a reply that a direct send wrote only in part (a TCP socket can take a
    /// few bytes of 16): the reply thread writes it before anything else, and no direct send
    /// goes out while it is not empty.
    unsent: std::sync::Mutex<Vec<u8>>,
}

impl Replies {
    fn new(stream: BlockingStream, queue: mpsc::Sender<Reply>) -> Self {
        Replies {
            queue,
            writer: Arc::new(ReplyWriter {
                stream,
                unsent: std::sync::Mutex::new(Vec::new()),
            }),
        }
    }

    /// Sends a reply through the reply thread. An error means the connection is ending (the
    /// reply thread is gone).
    async fn send(&self, reply: Reply) -> Result<(), ()> {
        self.queue.send(reply).await.map_err(|_| ())
    }

    /// Sends a reply from a handler directly if it can, else through the reply thread; errors
    /// as [`Replies::send`].
    async fn send_direct(&self, reply: Reply) -> Result<(), ()> {
        self.send_with(reply, |bytes| {
            send_nonblocking(self.writer.stream.as_fd(), bytes)
        })
        .await
    }

    /// [`Replies::send_direct`] with the direct send made by `send` (tests stand in a partial
    /// one).
    async fn send_with(
        &self,
        reply: Reply,
        send: impl FnOnce(&[u8]) -> std::io::Result<usize>,
    ) -> Result<(), ()> {
        let reply = match reply {
            Reply::Simple(header) => match self.try_direct(&header, send) {
                Direct::Sent => return Ok(()),
                Direct::Partly => Reply::Unsent,
                Direct::NotSent => Reply::Simple(header),
            },
            other => other,
        };
        self.queue.send(reply).await.map_err(|_| ())
    }

    /// As [`Replies::send`], for the receive thread (outside the runtime), through the reply
    /// thread.
    fn blocking_send(&self, reply: Reply) -> Result<(), ()> {
        self.queue.blocking_send(reply).map_err(|_| ())
    }

    fn try_direct(
        &self,
        header: &[u8; 16],
        send: impl FnOnce(&[u8]) -> std::io::Result<usize>,
    ) -> Direct {
        let Ok(mut unsent) = self.writer.unsent.try_lock() else {
            return Direct::NotSent;
        };
        if !unsent.is_empty() {
            return Direct::NotSent;
        }
        match send(header) {
            Ok(sent) if sent == header.len() => Direct::Sent,
            Ok(0) | Err(_) => Direct::NotSent,
            Ok(sent) => {
                unsent.extend_from_slice(&header[sent..]);
                Direct::Partly
            }
        }
    }
}

enum Direct {
    Sent,
    /// Part went out; the rest is in `unsent`, for the reply thread.
    Partly,
    NotSent,
}

/// Serves one connection from handshake to close. Every way it ends is logged once.
async fn serve_connection<B: ExportBackend>(
    mut stream: Stream,
    peer: String,
    exports: Arc<ExportSet<B>>,
    shutdown: watch::Receiver<bool>,
) {
    let mut stop = shutdown.clone();
    let handshake = async {
        match &mut stream {
            Stream::Unix(stream) => {
                let (mut reader, mut writer) = stream.split();
                handshake(&mut reader, &mut writer, &exports).await
            }
            Stream::Tcp(stream) => {
                let (mut reader, mut writer) = stream.split();
                handshake(&mut reader, &mut writer, &exports).await
            }
        }
    };
    let handshake = tokio::select! {
        handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake) => handshake,
        _ = stop.wait_for(|stop| *stop) => {
            tracing::debug!(%peer, endpoint = %exports.endpoint, "appliance shutting down during a handshake");
            return;
        }
    };
    let (negotiated, leftover) = match handshake {
        Ok(Ok(Some(done))) => done,
        Ok(Ok(None)) => {
            tracing::debug!(%peer, endpoint = %exports.endpoint, "client ended the handshake (NBD_OPT_ABORT)");
            return;
        }
        Ok(Err(reason)) => {
            tracing::warn!(%peer, endpoint = %exports.endpoint, "NBD handshake failed, connection closed: {reason}");
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, endpoint = %exports.endpoint, "NBD handshake not finished within {HANDSHAKE_TIMEOUT:?}, connection closed");
            return;
        }
    };
    let disk = exports.disks[negotiated.export_index].clone();
    tracing::debug!(%peer, export = disk.export_name(), "NBD client attached");
    let stream = match stream.into_blocking() {
        Ok(stream) => stream,
        Err(error) => {
            tracing::warn!(%peer, export = disk.export_name(), "connection closed: setting up its socket: {error}");
            return;
        }
    };
    transmission(
        stream,
        leftover,
        &peer,
        negotiated,
        disk,
        exports.buffers.clone(),
        shutdown,
    )
    .await;
}

/// Runs the handshake codec over the socket. `Ok(None)`: the client aborted.
async fn handshake<R, W, B>(
    reader: &mut R,
    writer: &mut W,
    exports: &ExportSet<B>,
) -> Result<Option<(Negotiated, Vec<u8>)>, String>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    B: ExportBackend,
{
    let mut config = exports.config.clone();
    if exports.disks.iter().any(|disk| disk.is_read_only()) {
        // Fenced (failed over to the target): clients see a read-only export.
        config.transmission_flags |= FLAG_READ_ONLY;
    }
    let mut codec = Handshake::new(config);
    let mut input: Vec<u8> = Vec::with_capacity(1024);
    writer
        .write_all(&codec.take_output())
        .await
        .map_err(|error| format!("sending greeting: {error}"))?;
    // Bounded: the codec closes after OPTIONS_PER_CONNECTION_MAX options and each read either
    // makes progress or ends the loop.
    loop {
        let step = codec.handle_input(&input);
        let output = codec.take_output();
        if !output.is_empty() {
            writer
                .write_all(&output)
                .await
                .map_err(|error| format!("sending option reply: {error}"))?;
        }
        let (used, event) = step.map_err(|error| error.to_string())?;
        input.drain(..used);
        match event {
            HandshakeEvent::Continue => {}
            HandshakeEvent::Ready(negotiated) => return Ok(Some((negotiated, input))),
            HandshakeEvent::Aborted => {
                let _ = writer.shutdown().await;
                return Ok(None);
            }
            HandshakeEvent::NeedMore { bytes_needed } => {
                input.reserve(bytes_needed.saturating_sub(input.len()));
                let read = reader
                    .read_buf(&mut input)
                    .await
                    .map_err(|error| format!("reading: {error}"))?;
                if read == 0 {
                    return Err(format!(
                        "client closed the connection during the handshake ({} bytes of an unfinished message)",
                        input.len()
                    ));
                }
            }
        }
    }
}

/// The transmission phase: a thread reads requests and spawns their handlers on the runtime,
/// another writes the replies; this task waits for both and for the handlers.
async fn transmission<B: ExportBackend>(
    stream: BlockingStream,
    leftover: Vec<u8>,
    peer: &str,
    negotiated: Negotiated,
    disk: B,
    buffers: Arc<Buffers>,
    mut shutdown: watch::Receiver<bool>,
) {
    let export = disk.export_name().to_owned();
    let (reply_sender, reply_receiver) = mpsc::channel::<Reply>(REQUESTS_IN_FLIGHT_MAX * 2);
    let permits = Arc::new(Semaphore::new(REQUESTS_IN_FLIGHT_MAX));
    let threads = stream.try_clone().and_then(|writer| {
        let control = stream.try_clone()?;
        let replies = Replies::new(writer, reply_sender);
        let (writer_done, writer_task) = oneshot::channel();
        let reply_writer = replies.writer.clone();
        std::thread::Builder::new()
            .name("nbd-reply".into())
            .spawn(move || {
                write_replies(&reply_writer, reply_receiver);
                let _ = writer_done.send(());
            })?;
        let receive = Receive {
            reader: std::io::BufReader::with_capacity(
                SOCKET_BUFFER_BYTES,
                Read::chain(std::io::Cursor::new(leftover), stream),
            ),
            runtime: tokio::runtime::Handle::current(),
            peer: peer.to_owned(),
            negotiated,
            disk,
            buffers,
            replies,
            permits: permits.clone(),
            shutdown: shutdown.clone(),
        };
        let (receive_done, receive_task) = oneshot::channel();
        std::thread::Builder::new()
            .name("nbd-receive".into())
            .spawn(move || {
                // It wakes for every few hundred KiB a client sends and runs briefly; with the
                // default slice it waited behind the handlers it had just woken (1 MiB writes:
                // 1.78–1.94 against 1.76–1.85 GB/s in five pairs of runs, benches/RESULTS.md,
                // 2026-11-29).
                if let Err(error) = crate::io::sched::request_short_slice(RECEIVE_SLICE) {
                    tracing::debug!(%error, "no short time slice for the receive thread");
                }
                let _ = receive_done.send(receive.run());
            })?;
        Ok((control, writer_task, receive_task))
    });
    let (control, writer_task, mut receive_task) = match threads {
        Ok(threads) => threads,
        Err(error) => {
            tracing::warn!(%peer, %export, "connection closed: starting its threads: {error}");
            return;
        }
    };
    let ended = tokio::select! {
        ended = &mut receive_task => ended,
        _ = async { shutdown.wait_for(|stop| *stop).await.map(|_| ()) } => {
            // Wakes the receive thread from its read; it ends at the next request boundary.
            let _ = control.shutdown(std::net::Shutdown::Read);
            receive_task.await
        }
    };
    let (end, rejects) =
        ended.unwrap_or_else(|_| (Err("internal: the receive thread stopped".into()), 0));

    // Let every in-flight request finish (their writes are journaled and must reach the disk;
    // their replies go out if the client is still there), then close.
    let _all = permits.acquire_many(REQUESTS_IN_FLIGHT_MAX as u32).await;
    let _ = writer_task.await;
    let _ = control.shutdown(std::net::Shutdown::Both);
    if rejects > REJECTS_LOGGED_MAX {
        tracing::warn!(%peer, %export, "{rejects} requests refused on this connection in total");
    }
    match end {
        Ok(reason) => tracing::debug!(%peer, %export, "connection ended: {reason}"),
        Err(reason) => tracing::warn!(%peer, %export, "connection closed: {reason}"),
    }
}

/// The receive side of a connection, run on its own thread.
struct Receive<B, R> {
    reader: std::io::BufReader<R>,
    runtime: tokio::runtime::Handle,
    peer: String,
    negotiated: Negotiated,
    disk: B,
    buffers: Arc<Buffers>,
    replies: Replies,
    permits: Arc<Semaphore>,
    shutdown: watch::Receiver<bool>,
}

impl<B: ExportBackend, R: Read> Receive<B, R> {
    /// Reads requests until DISC, EOF, a fatal error or shutdown; returns why it ended and how
    /// many requests it refused.
    fn run(mut self) -> (Result<&'static str, String>, u32) {
        // Handlers are spawned from this thread onto the runtime.
        let _runtime = self.runtime.enter();
        let mut rejects: u32 = 0;
        let end = self.receive(&mut rejects);
        (end, rejects)
    }

    fn receive(&mut self, rejects: &mut u32) -> Result<&'static str, String> {
        let validator = self.negotiated.validator();
        let (peer, export) = (self.peer.as_str(), self.disk.export_name().to_owned());
        let (disk, buffers, reader) = (&self.disk, &self.buffers, &mut self.reader);
        let replies = &self.replies;
        let mut header = [0u8; REQUEST_HEADER_BYTES];
        let change = |cookie, offset, length: u32, change, fua, permit| {
            spawn_change(
                disk,
                replies,
                peer,
                cookie,
                offset,
                u64::from(length),
                change,
                fua,
                permit,
            )
        };
        // Each iteration reads one request; the loop ends on DISC, EOF, a fatal error or shutdown.
        let end: Result<&'static str, String> = loop {
            let Ok(permit) = self.runtime.block_on(self.permits.clone().acquire_owned()) else {
                break Err("internal: request permits closed".into());
            };
            if *self.shutdown.borrow() {
                break Ok("appliance shutting down");
            }
            let read = read_header(reader, &mut header);
            match read {
                Ok(true) => {}
                Ok(false) if *self.shutdown.borrow() => break Ok("appliance shutting down"),
                Ok(false) => break Ok("client closed the connection"),
                Err(error) => break Err(format!("client vanished mid-request: {error}")),
            }
            let request = match decode_request(&header) {
                Ok(Some(request)) => request,
                Ok(None) => break Err("internal: short request header".into()),
                Err(error) => break Err(format!("protocol error: {error}")),
            };
            match validator.decide(&request) {
                Action::Disconnect => break Ok("client disconnected (NBD_CMD_DISC)"),
                Action::Reject {
                    cookie,
                    error,
                    discard_payload_bytes,
                    reason,
                } => {
                    *rejects += 1;
                    if *rejects <= REJECTS_LOGGED_MAX {
                        tracing::warn!(%peer, %export, command = request.command, "request refused with {}: {reason}", error.name());
                    }
                    if discard_payload_bytes > 0 {
                        let mut payload = (&mut *reader).take(u64::from(discard_payload_bytes));
                        match std::io::copy(&mut payload, &mut std::io::sink()) {
                            Ok(copied) if copied == u64::from(discard_payload_bytes) => {}
                            Ok(copied) => {
                                break Err(format!(
                                    "client vanished mid-write: {copied} of {discard_payload_bytes} payload bytes of a refused write"
                                ))
                            }
                            Err(error) => break Err(format!("client vanished mid-write: {error}")),
                        }
                    }
                    if replies
                        .blocking_send(Reply::Simple(encode_simple_reply(cookie, error)))
                        .is_err()
                    {
                        break Err("reply writer stopped".into());
                    }
                }
                Action::RejectAndClose {
                    cookie,
                    error,
                    reason,
                } => {
                    let _ =
                        replies.blocking_send(Reply::Simple(encode_simple_reply(cookie, error)));
                    break Err(format!("request refused with {}: {reason}", error.name()));
                }
                Action::Read {
                    cookie,
                    offset,
                    length,
                } => {
                    let buf = buffers.take(length as usize);
                    let disk = disk.clone();
                    let replies = replies.clone();
                    let (peer, export) = (peer.to_owned(), export.clone());
                    tokio::spawn(async move {
                        let (result, buf) = disk.read(offset, buf, length as usize).await;
                        let reply = match result {
                            Ok(()) => Reply::Read(encode_simple_reply(cookie, ErrorCode::Ok), buf),
                            Err(error) => {
                                tracing::error!(%peer, %export, offset, length, "read failed: {error}");
                                Reply::Simple(encode_simple_reply(cookie, B::error_code(&error)))
                            }
                        };
                        let _ = replies.send(reply).await;
                        drop(permit);
                    });
                }
                Action::Write {
                    cookie,
                    offset,
                    length,
                    fua,
                } => {
                    let mut buf = buffers.take(length as usize);
                    if let Err(error) = reader.read_exact(&mut buf[..]) {
                        // Nothing of a partial write is journaled or applied.
                        if *self.shutdown.borrow() {
                            // The stop woke this read (`shutdown(SHUT_RD)`): not the client's doing.
                            break Ok("appliance shutting down (an unfinished write was dropped)");
                        }
                        break Err(format!(
                            "client vanished mid-write ({length} byte write at {offset}): {error}"
                        ));
                    }
                    change(cookie, offset, length, Change::Data(buf), fua, permit);
                }
                Action::WriteZeroes {
                    cookie,
                    offset,
                    length,
                    fua,
                    no_hole: _,
                } => {
                    // NO_HOLE or not, the range must read back as zeroes; the disk engine keeps
                    // space allocated for WRITE_ZEROES either way.
                    change(cookie, offset, length, Change::Zeroes, fua, permit);
                }
                Action::Trim {
                    cookie,
                    offset,
                    length,
                    fua,
                } => {
                    change(cookie, offset, length, Change::Trim, fua, permit);
                }
                Action::Flush { cookie } => {
                    let disk = disk.clone();
                    let replies = replies.clone();
                    let (peer, export) = (peer.to_owned(), export.clone());
                    tokio::spawn(async move {
                        let error = match disk.flush().await {
                            Ok(()) => ErrorCode::Ok,
                            Err(error) => {
                                tracing::error!(%peer, %export, "flush failed: {error}");
                                B::error_code(&error)
                            }
                        };
                        let _ = replies
                            .send(Reply::Simple(encode_simple_reply(cookie, error)))
                            .await;
                        drop(permit);
                    });
                }
            }
        };
        end
    }
}

/// Reads a whole request header. `Ok(false)` on a clean EOF before its first byte.
fn read_header<R: Read>(
    reader: &mut std::io::BufReader<R>,
    header: &mut [u8; REQUEST_HEADER_BYTES],
) -> std::io::Result<bool> {
    let mut filled = 0;
    while filled < header.len() {
        let read = match reader.read(&mut header[filled..]) {
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            read => read?,
        };
        if read == 0 {
            if filled == 0 {
                return Ok(false);
            }
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("EOF after {filled} of {REQUEST_HEADER_BYTES} header bytes"),
            ));
        }
        filled += read;
    }
    Ok(true)
}

#[allow(clippy::too_many_arguments)]
fn spawn_change<B: ExportBackend>(
    disk: &B,
    replies: &Replies,
    peer: &str,
    cookie: u64,
    offset: u64,
    length: u64,
    change: Change,
    fua: bool,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let disk = disk.clone();
    let replies = replies.clone();
    let peer = peer.to_owned();
    tokio::spawn(async move {
        if disk.is_read_only() {
            // Fenced after this connection negotiated a writable export: refuse, nothing is
            // written or journaled (the target's copy is production now).
            let _ = replies
                .send(Reply::Simple(encode_simple_reply(cookie, ErrorCode::Perm)))
                .await;
            drop(permit);
            return;
        }
        let send = |error| {
            let reply = Reply::Simple(encode_simple_reply(cookie, error));
            let replies = &replies;
            async move {
                let _ = if length >= DIRECT_REPLY_MIN_BYTES {
                    replies.send_direct(reply).await
                } else {
                    replies.send(reply).await
                };
            }
        };
        let (answer, answered_early) = oneshot::channel();
        let apply = disk.apply(offset, length, change, fua, answer);
        tokio::pin!(apply);
        // The change ends first, or says it may be answered before it ends (write-behind);
        // either way the permit is held until it ends, so the connection's close waits for it.
        let (early, result) = tokio::select! {
            biased;
            (result, _buf) = &mut apply => (false, result),
            Ok(()) = answered_early => {
                send(ErrorCode::Ok).await;
                (true, apply.await.0)
            }
        };
        match result {
            Ok(()) if early => {}
            Ok(()) => send(ErrorCode::Ok).await,
            // The backend logged it and the next FLUSH fails.
            Err(_) if early => {}
            Err(error) => {
                tracing::error!(%peer, export = disk.export_name(), offset, length, "write failed: {error}");
                send(B::error_code(&error)).await;
            }
        }
        drop(permit);
    });
}

/// Writes the replies that come through the queue (read data, and the simple replies a
/// handler could not send itself), in the order they arrive; batches whatever is ready into one
/// flush, holding the writer lock across the batch so that no direct send lands inside a reply.
/// Runs on the connection's reply thread.
fn write_replies(writer: &ReplyWriter, mut replies: mpsc::Receiver<Reply>) {
    let mut out = std::io::BufWriter::with_capacity(SOCKET_BUFFER_BYTES, &writer.stream);
    'outer: while let Some(first) = replies.blocking_recv() {
        let mut unsent = writer
            .unsent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if out.write_all(&unsent).is_err() {
            break;
        }
        unsent.clear();
        let mut next = Some(first);
        while let Some(reply) = next.take() {
            let written = match &reply {
                Reply::Simple(header) => out.write_all(header),
                Reply::Read(header, data) => match out.write_all(header) {
                    Ok(()) => out.write_all(data),
                    Err(error) => Err(error),
                },
                Reply::Unsent => Ok(()),
            };
            if written.is_err() {
                break 'outer;
            }
            next = replies.try_recv().ok();
        }
        if out.flush().is_err() {
            break;
        }
    }
    // The client is gone or the connection is ending: drain so handlers never block on us.
    replies.close();
    while replies.blocking_recv().is_some() {}
    let _ = writer.stream.shutdown(std::net::Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(n: u8) -> [u8; 16] {
        [n; 16]
    }

    fn connected() -> (
        Replies,
        mpsc::Receiver<Reply>,
        std::os::unix::net::UnixStream,
    ) {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let (queue, receiver) = mpsc::channel(16);
        (
            Replies::new(BlockingStream::Unix(ours), queue),
            receiver,
            theirs,
        )
    }

    #[tokio::test]
    async fn a_direct_reply_goes_out_at_once_and_a_partial_one_is_finished_first() {
        let (replies, receiver, mut client) = connected();
        replies.send_direct(Reply::Simple(header(1))).await.unwrap();
        // 5 of 16 bytes go out: the rest waits in `unsent` and the reply thread is told.
        let writer = replies.writer.clone();
        replies
            .send_with(Reply::Simple(header(2)), |bytes| {
                send_nonblocking(writer.stream.as_fd(), &bytes[..5])
            })
            .await
            .unwrap();
        assert_eq!(replies.writer.unsent.lock().unwrap().len(), 11);
        // While a reply is unfinished, nothing goes out directly (it would land inside it).
        assert!(matches!(
            replies.try_direct(&header(3), |_| panic!("sent while a reply was unfinished")),
            Direct::NotSent
        ));
        replies.send_direct(Reply::Simple(header(3))).await.unwrap();
        assert_eq!(replies.writer.unsent.lock().unwrap().len(), 11);
        let thread_writer = replies.writer.clone();
        drop(replies);
        std::thread::spawn(move || write_replies(&thread_writer, receiver))
            .join()
            .unwrap();
        let mut received = Vec::new();
        client.read_to_end(&mut received).unwrap();
        let expected: Vec<u8> = [header(1), header(2), header(3)].concat();
        assert_eq!(received, expected);
    }

    #[tokio::test]
    async fn a_reply_goes_through_the_thread_when_the_socket_is_full_or_the_thread_writes() {
        let (replies, mut receiver, _client) = connected();
        // The reply thread holds the writer lock across its writes: no direct send then.
        {
            let _writing = replies.writer.unsent.lock().unwrap();
            assert!(matches!(
                replies.try_direct(&header(1), |_| panic!("sent under the reply thread")),
                Direct::NotSent
            ));
        }
        // Fill the socket until it takes no more; a reply then goes to the queue.
        let filler = [0u8; 4096];
        let mut filled = 0usize;
        while send_nonblocking(replies.writer.stream.as_fd(), &filler).is_ok() {
            filled += 1;
            assert!(filled < 1 << 16, "the socket never filled");
        }
        replies.send_direct(Reply::Simple(header(9))).await.unwrap();
        assert!(matches!(receiver.try_recv(), Ok(Reply::Simple(h)) if h == header(9)));
    }
}
