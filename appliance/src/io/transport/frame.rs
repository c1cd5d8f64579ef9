//! Length-prefixed frames on one QUIC stream: `[u32 LE length][length bytes]`, bounded by a
//! maximum frame size so that a peer can never make us allocate without limit.
//!
//! The layer is generic: what a frame holds is the replication protocol's business
//! (`core::wire`). Frames are `bytes::Bytes` so a journal record can be sent without copying,
//! and a frame that arrives in one QUIC chunk is handed up without copying either.

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::limiter::RateLimiter;
use super::TransportError;
use crate::io::disk::{BufPool, IO_ALIGN_BYTES};

/// Bytes of the length prefix in front of every frame.
pub const FRAME_LENGTH_PREFIX_BYTES: usize = 4;

/// Chunks fetched from quinn per read call: amortises the connection lock over many packets.
const READ_CHUNKS_PER_CALL: usize = 32;

/// The three kinds of traffic between a source and a target, each on its own QUIC stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamClass {
    /// Session set-up, acknowledgements, status, commands: small, latency-sensitive.
    Control,
    /// Journal records of live writes: what the recovery point objective depends on.
    Live,
    /// Initial replication and resync extents: bulk, must never starve live writes.
    Resync,
}

impl StreamClass {
    /// Every class, in the order the source opens their streams.
    pub const ALL: [StreamClass; 3] =
        [StreamClass::Control, StreamClass::Live, StreamClass::Resync];

    /// quinn send priority: higher goes first. Strict ordering (control > live > resync) is
    /// what "resync never starves live writes" needs; live writes are bounded by the rate the
    /// machines write at, so resync still gets the rest of the link.
    pub fn priority(self) -> i32 {
        match self {
            StreamClass::Control => 2,
            StreamClass::Live => 1,
            StreamClass::Resync => 0,
        }
    }

    /// The tag the source writes at the start of each stream so that the target knows which
    /// stream is which regardless of arrival order.
    pub(crate) fn tag(self) -> u8 {
        match self {
            StreamClass::Control => b'c',
            StreamClass::Live => b'l',
            StreamClass::Resync => b'r',
        }
    }

    pub(crate) fn from_tag(tag: u8) -> Option<StreamClass> {
        StreamClass::ALL
            .into_iter()
            .find(|class| class.tag() == tag)
    }

    /// Whether the bandwidth limit applies. Control frames are tiny and carry the
    /// acknowledgements that let the source free its journal: throttling them would only
    /// slow everything else down.
    fn is_rate_limited(self) -> bool {
        !matches!(self, StreamClass::Control)
    }
}

impl fmt::Display for StreamClass {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            StreamClass::Control => "control",
            StreamClass::Live => "live",
            StreamClass::Resync => "resync",
        })
    }
}

/// Sends frames on one stream class.
#[derive(Debug)]
pub struct FrameSender {
    class: StreamClass,
    peer_address: SocketAddr,
    stream: quinn::SendStream,
    frame_bytes_max: usize,
    limiter: Option<Arc<RateLimiter>>,
}

impl FrameSender {
    pub(crate) fn new(
        class: StreamClass,
        peer_address: SocketAddr,
        stream: quinn::SendStream,
        frame_bytes_max: usize,
        limiter: Option<Arc<RateLimiter>>,
    ) -> FrameSender {
        FrameSender {
            class,
            peer_address,
            stream,
            frame_bytes_max,
            limiter,
        }
    }

    /// The class of this stream.
    pub fn class(&self) -> StreamClass {
        self.class
    }

    /// Sends one frame. Waits for the bandwidth limiter (if any) and for flow control; returns
    /// once quinn has taken the bytes (not once the peer has them: the protocol acknowledges).
    ///
    /// Not cancel-safe: dropping the future mid-frame leaves a partial frame on the stream, so
    /// the connection must then be closed (the ship layer reconnects and resends).
    pub async fn send(&mut self, frame: Bytes) -> Result<(), TransportError> {
        self.send_pieces(vec![frame]).await
    }

    /// Sends one frame given as the buffers it was built from, in order (`wire::Frame::
    /// into_pieces`): none is copied into another before the stream takes them.
    pub async fn send_pieces(&mut self, pieces: Vec<Bytes>) -> Result<(), TransportError> {
        let frame_bytes: usize = pieces.iter().map(Bytes::len).sum();
        if frame_bytes > self.frame_bytes_max {
            return Err(TransportError::FrameTooLarge {
                class: self.class,
                peer_address: self.peer_address,
                frame_bytes: frame_bytes as u64,
                frame_bytes_max: self.frame_bytes_max,
            });
        }
        if self.class.is_rate_limited() {
            if let Some(limiter) = &self.limiter {
                limiter
                    .acquire((FRAME_LENGTH_PREFIX_BYTES + frame_bytes) as u64)
                    .await;
            }
        }
        let mut chunks = Vec::with_capacity(1 + pieces.len());
        chunks.push(Bytes::copy_from_slice(&(frame_bytes as u32).to_le_bytes()));
        chunks.extend(pieces.into_iter().filter(|piece| !piece.is_empty()));
        self.stream
            .write_all_chunks(&mut chunks)
            .await
            .map_err(|source| TransportError::Write {
                class: self.class,
                peer_address: self.peer_address,
                source,
            })
    }

    pub(crate) async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), TransportError> {
        self.stream
            .write_all(bytes)
            .await
            .map_err(|source| TransportError::Write {
                class: self.class,
                peer_address: self.peer_address,
                source,
            })
    }

    /// Ends the stream after the frames already sent; the peer's receiver then returns `None`.
    pub fn finish(&mut self) -> Result<(), TransportError> {
        self.stream
            .finish()
            .map_err(|_| TransportError::StreamClosed {
                class: self.class,
                peer_address: self.peer_address,
            })
    }
}

/// Receives frames from one stream class.
pub struct FrameReceiver {
    class: StreamClass,
    peer_address: SocketAddr,
    stream: quinn::RecvStream,
    frame_bytes_max: usize,
    /// Bytes read from quinn but not yet returned as frames, in order.
    pending: VecDeque<Bytes>,
    pending_bytes: usize,
    finished: bool,
    aligned: Option<AlignedFrames>,
}

impl fmt::Debug for FrameReceiver {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("FrameReceiver")
            .field("class", &self.class)
            .field("peer_address", &self.peer_address)
            .field("pending_bytes", &self.pending_bytes)
            .field("finished", &self.finished)
            .field("aligned_offset", &self.aligned.as_ref().map(|a| a.offset))
            .finish()
    }
}

/// Large frames assembled into pooled aligned buffers (`FrameReceiver::align_frames`).
struct AlignedFrames {
    /// The byte of each frame that lands on an `IO_ALIGN_BYTES` boundary.
    offset: usize,
    pool: BufPool,
}

/// Frames spanning several chunks from this size on are assembled into a pooled aligned
/// buffer when the receiver aligns frames: half the pool's buffer, so a small frame never pins
/// a whole one.
fn aligned_frame_bytes_min(pool: &BufPool) -> usize {
    pool.buf_capacity() / 2
}

impl FrameReceiver {
    pub(crate) fn new(
        class: StreamClass,
        peer_address: SocketAddr,
        stream: quinn::RecvStream,
        frame_bytes_max: usize,
    ) -> FrameReceiver {
        FrameReceiver {
            class,
            peer_address,
            stream,
            frame_bytes_max,
            pending: VecDeque::new(),
            pending_bytes: 0,
            finished: false,
            aligned: None,
        }
    }

    /// Assembles each large frame that arrives in several chunks (the usual case: one chunk per
    /// QUIC packet) into a pooled buffer placed so that the frame's byte `offset` sits at an
    /// `IO_ALIGN_BYTES`-aligned address, instead of into a fresh unaligned one. The apply
    /// session passes where a records frame's first payload starts: a large record's payload
    /// is then written to the replica with O_DIRECT straight from the frame, with no second
    /// copy. Frames of up to `frame_bytes_at_most` bytes use the pool (`cached_max` buffers
    /// kept); larger ones, smaller ones and frames in one chunk are received as before. The
    /// pool is a registered one, so that write goes to io_uring as a fixed-buffer request
    /// (no page pinning per write).
    pub fn align_frames(&mut self, offset: usize, frame_bytes_at_most: usize, cached_max: usize) {
        let capacity = frame_bytes_at_most + IO_ALIGN_BYTES;
        self.aligned = Some(AlignedFrames {
            offset,
            pool: BufPool::registered(capacity, cached_max),
        });
    }

    /// The class of this stream.
    pub fn class(&self) -> StreamClass {
        self.class
    }

    /// The next frame, or `None` once the peer finished the stream at a frame boundary.
    ///
    /// Cancel-safe: bytes read from quinn stay buffered until a whole frame is returned, so
    /// this can sit in a `tokio::select!` beside other events.
    pub async fn recv(&mut self) -> Result<Option<Bytes>, TransportError> {
        if !self.fill(FRAME_LENGTH_PREFIX_BYTES).await? {
            if self.pending_bytes == 0 {
                return Ok(None);
            }
            return Err(self.truncated(FRAME_LENGTH_PREFIX_BYTES));
        }
        let mut prefix = [0u8; FRAME_LENGTH_PREFIX_BYTES];
        self.copy_front(&mut prefix);
        let frame_bytes = u32::from_le_bytes(prefix) as usize;
        if frame_bytes > self.frame_bytes_max {
            return Err(TransportError::FrameTooLarge {
                class: self.class,
                peer_address: self.peer_address,
                frame_bytes: frame_bytes as u64,
                frame_bytes_max: self.frame_bytes_max,
            });
        }
        let total_bytes = FRAME_LENGTH_PREFIX_BYTES + frame_bytes;
        if !self.fill(total_bytes).await? {
            return Err(self.truncated(total_bytes));
        }
        self.consume(FRAME_LENGTH_PREFIX_BYTES);
        Ok(Some(self.take(frame_bytes)))
    }

    /// Reads exactly `output.len()` bytes without a length prefix: only for the stream set-up.
    pub(crate) async fn recv_raw(&mut self, output: &mut [u8]) -> Result<(), TransportError> {
        if !self.fill(output.len()).await? {
            return Err(self.truncated(output.len()));
        }
        self.copy_front(output);
        self.consume(output.len());
        Ok(())
    }

    fn truncated(&self, needed_bytes: usize) -> TransportError {
        TransportError::TruncatedFrame {
            class: self.class,
            peer_address: self.peer_address,
            received_bytes: self.pending_bytes,
            needed_bytes,
        }
    }

    /// Reads until at least `needed_bytes` are pending; false if the stream ended first.
    /// Reads at most one batch beyond what is needed, so memory stays bounded by the frame
    /// limit plus one batch of packets.
    async fn fill(&mut self, needed_bytes: usize) -> Result<bool, TransportError> {
        while self.pending_bytes < needed_bytes {
            if self.finished {
                return Ok(false);
            }
            let mut chunks: [Bytes; READ_CHUNKS_PER_CALL] = std::array::from_fn(|_| Bytes::new());
            let read = self
                .stream
                .read_chunks(&mut chunks)
                .await
                .map_err(|source| TransportError::Read {
                    class: self.class,
                    peer_address: self.peer_address,
                    source,
                })?;
            match read {
                None => self.finished = true,
                Some(count) => {
                    for chunk in chunks.into_iter().take(count) {
                        if !chunk.is_empty() {
                            self.pending_bytes += chunk.len();
                            self.pending.push_back(chunk);
                        }
                    }
                }
            }
        }
        Ok(true)
    }

    /// Copies the first `output.len()` pending bytes without consuming them.
    fn copy_front(&self, output: &mut [u8]) {
        assert!(self.pending_bytes >= output.len());
        let mut copied = 0;
        for chunk in &self.pending {
            let count = (output.len() - copied).min(chunk.len());
            output[copied..copied + count].copy_from_slice(&chunk[..count]);
            copied += count;
            if copied == output.len() {
                break;
            }
        }
    }

    fn consume(&mut self, mut bytes: usize) {
        assert!(self.pending_bytes >= bytes);
        self.pending_bytes -= bytes;
        while bytes > 0 {
            let front = self
                .pending
                .front_mut()
                .expect("pending_bytes counts the queue");
            if front.len() <= bytes {
                bytes -= front.len();
                self.pending.pop_front();
            } else {
                let _ = front.split_to(bytes);
                bytes = 0;
            }
        }
    }

    /// Removes and returns the first `bytes` pending bytes: without copying if they lie in one
    /// chunk, else assembled once.
    fn take(&mut self, bytes: usize) -> Bytes {
        assert!(self.pending_bytes >= bytes);
        if bytes == 0 {
            return Bytes::new();
        }
        let front = self
            .pending
            .front_mut()
            .expect("pending_bytes counts the queue");
        if front.len() >= bytes {
            let frame = front.split_to(bytes);
            if front.is_empty() {
                self.pending.pop_front();
            }
            self.pending_bytes -= bytes;
            return frame;
        }
        if let Some(aligned) = &self.aligned {
            let pool = &aligned.pool;
            // The padding in front that puts frame byte `offset` on an aligned address (pool
            // buffers start aligned).
            let lead = (IO_ALIGN_BYTES - aligned.offset % IO_ALIGN_BYTES) % IO_ALIGN_BYTES;
            if bytes >= aligned_frame_bytes_min(pool) && lead + bytes <= pool.buf_capacity() {
                let mut frame = pool.get();
                frame.set_len(lead);
                self.drain_into(bytes, |chunk| frame.extend_from_slice(chunk));
                return Bytes::from_owner(frame).slice(lead..);
            }
        }
        let mut frame = BytesMut::with_capacity(bytes);
        self.drain_into(bytes, |chunk| frame.extend_from_slice(chunk));
        frame.freeze()
    }

    /// Removes the first `bytes` pending bytes, handing them to `append` chunk by chunk.
    fn drain_into(&mut self, bytes: usize, mut append: impl FnMut(&[u8])) {
        let mut remaining = bytes;
        while remaining > 0 {
            let front = self
                .pending
                .front_mut()
                .expect("pending_bytes counts the queue");
            if front.len() <= remaining {
                remaining -= front.len();
                append(front);
                self.pending.pop_front();
            } else {
                append(&front.split_to(remaining));
                remaining = 0;
            }
        }
        self.pending_bytes -= bytes;
    }
}

/// The sending and receiving half of one stream class.
#[derive(Debug)]
pub struct FrameStream {
    pub sender: FrameSender,
    pub receiver: FrameReceiver,
}
