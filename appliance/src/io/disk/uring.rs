//! The io_uring disk engine: one ring per open disk, driven by a dedicated thread that takes
//! requests from async callers, keeps up to [`QUEUE_DEPTH`] of them in flight, and hands each
//! completion (with its buffer) back through a oneshot channel.
//!
//! Wake-up protocol: callers push onto a mutex-protected queue and write the ring thread's
//! eventfd only when the thread asked for wake-ups at its last drain (`State::needs_wake`:
//! fewer than `WAKE_SKIP_IN_FLIGHT_MIN` requests in flight; otherwise it drains again at its
//! next completion) and `wake_pending` was false; the thread keeps a POLLIN poll on that eventfd
//! in the ring, so one `io_uring_enter` waits for either a completion or new work. After the
//! poll fires the thread resets the eventfd, clears `wake_pending` (an AcqRel swap, so every
//! push before a caller's "already pending" swap is visible) and then drains the queue.
//!
//! Fixed buffers: once the process has a registered arena (`arena.rs`), the ring thread
//! registers it as buffer 0 (`IORING_REGISTER_BUFFERS2`, which unlike the first version never
//! waits for the ring to go idle) before it submits its next request, and from then on issues a
//! read or write whose memory lies inside the arena as `READ_FIXED`/`WRITE_FIXED`: the kernel
//! pinned those pages at registration and does not pin them per request. If registration
//! fails (RLIMIT_MEMLOCK without CAP_IPC_LOCK, an old kernel) the ring keeps plain requests.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use io_uring::{opcode, squeue, types, IoUring, Probe};

use super::arena::{self, Arena};
use super::buf::IoBuf;
use super::sys::{Fds, CHUNK_BYTES_MAX};
use super::{Completion, Engine, EngineKind, FixedBuffers, Op, Request};

/// Requests in flight per disk. The reference machine peaks at QD32 for 1 MiB writes and at
/// QD64 for 4 KiB random writes; more only adds latency.
pub const QUEUE_DEPTH: usize = 64;

/// Submission ring size: room for every in-flight request plus the wake-up poll, with slack.
pub(crate) const RING_ENTRIES: u32 = 128;

/// Retries of one request that the kernel answered with EINTR/EAGAIN before it counts as failed.
const RETRIES_MAX: u32 = 64;

const WAKE_TOKEN: u64 = u64::MAX;

/// With this many requests in flight, new ones wait for the ring thread's next completion
/// instead of waking it through the eventfd (a `write`, a poll completion, a `read` and a
/// context switch each): the device has work queued meanwhile, and one wake-up then submits
/// every request that came in the interval, in one `io_uring_enter` (one device notify).
const WAKE_SKIP_IN_FLIGHT_MIN: usize = 8;

/// The registered arena's index in every ring's buffer table (it is the only buffer).
const ARENA_BUF_INDEX: u16 = 0;

/// One log line per process when rings register the arena, and one when they cannot.
static ARENA_REGISTERED_LOGGED: AtomicBool = AtomicBool::new(false);
static ARENA_REFUSED_LOGGED: AtomicBool = AtomicBool::new(false);

/// Where a ring stands with the registered arena (`Shared::fixed_state`).
const FIXED_WAITING: u8 = 0;
const FIXED_REGISTERED: u8 = 1;
const FIXED_REFUSED: u8 = 2;

struct State {
    queue: VecDeque<Request>,
    /// Whether a submitter must wake the ring thread: false while the thread has at least
    /// [`WAKE_SKIP_IN_FLIGHT_MIN`] requests in flight, since it then wakes for their
    /// completions anyway and drains the queue before it sleeps again.
    needs_wake: bool,
    closed: bool,
    /// The ring thread hit an unrecoverable error and exited.
    dead: bool,
}

struct Shared {
    state: Mutex<State>,
    wake_pending: AtomicBool,
    eventfd: OwnedFd,
    /// `FIXED_*`: whether the ring thread registered the arena.
    fixed_state: AtomicU8,
    /// Reads and writes issued as fixed-buffer requests (each resubmitted part counts).
    fixed_requests: AtomicU64,
}

impl Shared {
    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd we own. A failure can only be
        // EAGAIN on counter overflow, which still leaves the eventfd readable.
        unsafe {
            libc::write(
                self.eventfd.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }

    fn reset_wake(&self) {
        let mut value: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from our non-blocking eventfd; EAGAIN (nothing
        // to read) is harmless.
        unsafe {
            libc::read(
                self.eventfd.as_raw_fd(),
                (&mut value as *mut u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }
}

pub(crate) struct UringEngine {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl UringEngine {
    /// Sets up a ring of `entries` and its thread. Fails if io_uring is unavailable (disabled by
    /// `kernel.io_uring_disabled`, blocked by seccomp, or a kernel without the opcodes we use).
    pub fn new(fds: Fds, entries: u32, name: &str) -> io::Result<UringEngine> {
        // SAFETY: plain syscall; the returned fd (checked below) becomes owned by `OwnedFd`.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh, valid fd that nothing else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(raw) };
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queue: VecDeque::with_capacity(QUEUE_DEPTH),
                needs_wake: true,
                closed: false,
                dead: false,
            }),
            wake_pending: AtomicBool::new(false),
            eventfd,
            fixed_state: AtomicU8::new(FIXED_WAITING),
            fixed_requests: AtomicU64::new(0),
        });
        // The ring is created on its own thread: with IORING_SETUP_SINGLE_ISSUER the creating
        // task is the only one allowed to submit.
        let (setup_sender, setup_receiver) = std::sync::mpsc::sync_channel(1);
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("disk-uring-{name}"))
            .spawn(move || match build_ring(entries) {
                Ok(ring) => {
                    let _ = setup_sender.send(Ok(()));
                    RingThread::new(ring, fds, thread_shared).run();
                }
                Err(error) => {
                    let _ = setup_sender.send(Err(error));
                }
            })?;
        let setup = setup_receiver
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("io_uring thread exited during set-up")));
        if let Err(error) = setup {
            let _ = thread.join();
            return Err(error);
        }
        Ok(UringEngine {
            shared,
            thread: Some(thread),
        })
    }
}

/// Builds the ring and checks that the kernel has every opcode we use. Fails if io_uring is
/// unavailable (disabled by `kernel.io_uring_disabled`, blocked by seccomp, or too old).
fn build_ring(entries: u32) -> io::Result<IoUring> {
    // Only this thread submits and reaps, so tell the kernel: completions are then processed
    // when we enter the ring to wait (DEFER_TASKRUN) instead of interrupting us (needs 6.1).
    let ring = match IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(entries)
    {
        Ok(ring) => ring,
        Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
            IoUring::builder().build(entries)?
        }
        Err(error) => return Err(error),
    };
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for code in [
        opcode::Read::CODE,
        opcode::Write::CODE,
        opcode::Fallocate::CODE,
        opcode::Fsync::CODE,
        opcode::PollAdd::CODE,
    ] {
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("io_uring opcode {code} not supported by this kernel"),
            ));
        }
    }
    Ok(ring)
}

impl Engine for UringEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Uring
    }

    fn fixed_buffers(&self) -> FixedBuffers {
        FixedBuffers {
            registered: self.shared.fixed_state.load(Ordering::Relaxed) == FIXED_REGISTERED,
            requests: self.shared.fixed_requests.load(Ordering::Relaxed),
        }
    }

    fn submit(&self, request: Request) -> Result<(), Request> {
        let needs_wake = {
            let mut state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
            if state.closed || state.dead {
                return Err(request);
            }
            state.queue.push_back(request);
            state.needs_wake
        };
        if needs_wake && !self.shared.wake_pending.swap(true, Ordering::AcqRel) {
            self.shared.wake();
        }
        Ok(())
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        self.shared
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .closed = true;
        self.shared.wake();
        // The thread finishes every queued and in-flight request before exiting, so the disk's
        // file descriptors (closed after this) outlive all kernel use of them.
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct InFlight {
    op: Op,
    reply: tokio::sync::oneshot::Sender<Completion>,
    /// Bytes of a read/write already transferred (short transfers are resubmitted).
    done: usize,
    retries: u32,
}

struct RingThread {
    ring: IoUring,
    fds: Fds,
    shared: Arc<Shared>,
    slots: Vec<Option<InFlight>>,
    free_slots: Vec<usize>,
    backlog: VecDeque<Request>,
    wake_armed: bool,
    completed: Vec<(u64, i32)>,
    /// The arena once this ring registered it: requests inside it go as fixed-buffer ones.
    arena: Option<&'static Arena>,
    /// Registration was tried and failed; never tried again.
    arena_refused: bool,
}

impl RingThread {
    fn new(ring: IoUring, fds: Fds, shared: Arc<Shared>) -> RingThread {
        RingThread {
            ring,
            fds,
            shared,
            slots: (0..QUEUE_DEPTH).map(|_| None).collect(),
            free_slots: (0..QUEUE_DEPTH).rev().collect(),
            backlog: VecDeque::with_capacity(QUEUE_DEPTH),
            wake_armed: false,
            completed: Vec::with_capacity(2 * QUEUE_DEPTH),
            arena: None,
            arena_refused: false,
        }
    }

    /// Registers the process's arena with this ring once some pool has mapped it. Called
    /// before submitting, so the first request from arena memory can already go fixed.
    fn register_arena(&mut self) {
        let Some(arena) = arena::existing() else {
            return;
        };
        // SAFETY: the arena is a mapping that is never unmapped or remapped (it lives as long
        // as the process), so the registered memory stays valid for as long as the ring can
        // use it. Tag 0 asks for no completion when the buffer is unregistered.
        let result = unsafe {
            self.ring
                .submitter()
                .register_buffers2(&[arena.iovec()], &[0])
        };
        match result {
            Ok(()) => {
                self.arena = Some(arena);
                self.shared
                    .fixed_state
                    .store(FIXED_REGISTERED, Ordering::Relaxed);
                if !ARENA_REGISTERED_LOGGED.swap(true, Ordering::Relaxed) {
                    tracing::info!(
                        bytes = arena.iovec().iov_len,
                        "io_uring rings use the registered buffer arena"
                    );
                }
            }
            Err(error) => {
                self.arena_refused = true;
                self.shared
                    .fixed_state
                    .store(FIXED_REFUSED, Ordering::Relaxed);
                if !ARENA_REFUSED_LOGGED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        %error,
                        bytes = arena.iovec().iov_len,
                        memlock_limit_bytes = memlock_limit(),
                        "registering the I/O buffer arena with io_uring failed (raise \
                         RLIMIT_MEMLOCK, e.g. LimitMEMLOCK=infinity); disks pin their buffers \
                         per request instead"
                    );
                }
            }
        }
    }

    fn in_flight(&self) -> usize {
        QUEUE_DEPTH - self.free_slots.len()
    }

    fn run(mut self) {
        loop {
            if !self.wake_armed {
                let poll = opcode::PollAdd::new(
                    types::Fd(self.shared.eventfd.as_raw_fd()),
                    libc::POLLIN as u32,
                )
                .build()
                .user_data(WAKE_TOKEN);
                self.push(poll);
                self.wake_armed = true;
            }
            let closed = {
                let mut state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
                self.backlog.extend(state.queue.drain(..));
                // In flight once the backlog is submitted (as far as slots allow). Set under
                // the lock that the queue's pushes take: a push after this drain either sees
                // `needs_wake` or is drained after the next completion, which is certain,
                // as at least one request is in flight whenever it is false.
                let in_flight = self.in_flight() + self.backlog.len().min(self.free_slots.len());
                state.needs_wake = in_flight < WAKE_SKIP_IN_FLIGHT_MIN;
                state.closed
            };
            if self.arena.is_none() && !self.arena_refused && !self.backlog.is_empty() {
                self.register_arena();
            }
            while !self.backlog.is_empty() {
                let Some(slot) = self.free_slots.pop() else {
                    break;
                };
                let Some(request) = self.backlog.pop_front() else {
                    self.free_slots.push(slot);
                    break;
                };
                self.slots[slot] = Some(InFlight {
                    op: request.op,
                    reply: request.reply,
                    done: 0,
                    retries: 0,
                });
                self.submit_slot(slot);
            }
            if closed && self.backlog.is_empty() && self.in_flight() == 0 {
                return;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
                    ) => {}
                Err(error) => {
                    self.die(error);
                    return;
                }
            }
            self.completed.clear();
            for cqe in self.ring.completion() {
                self.completed.push((cqe.user_data(), cqe.result()));
            }
            for index in 0..self.completed.len() {
                let (token, result) = self.completed[index];
                if token == WAKE_TOKEN {
                    self.wake_armed = false;
                    self.shared.reset_wake();
                    self.shared.wake_pending.swap(false, Ordering::AcqRel);
                } else {
                    self.complete(token as usize, result);
                }
            }
        }
    }

    fn push(&mut self, entry: squeue::Entry) {
        // SAFETY: every pointer in `entry` refers to a buffer owned by an in-flight slot, which
        // stays allocated (heap or arena memory of its `IoBuf`, never moved) until this entry's
        // completion has been reaped; a fixed-buffer entry's range lies inside the registered
        // arena (checked in `submit_slot`); the poll entry references no memory.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        // Internal invariant: at most QUEUE_DEPTH + 1 entries are ever unsubmitted, and the
        // ring has RING_ENTRIES > QUEUE_DEPTH + 1 slots.
        assert!(pushed.is_ok(), "io_uring submission queue full");
    }

    fn submit_slot(&mut self, slot: usize) {
        let fds = self.fds;
        let arena = self.arena;
        let fixed_requests = &self.shared.fixed_requests;
        let in_arena = |ptr: *const u8, len: usize| {
            let inside = arena.is_some_and(|arena| arena.contains(ptr, len));
            if inside {
                fixed_requests.fetch_add(1, Ordering::Relaxed);
            }
            inside
        };
        let flight = self.slots[slot].as_mut().expect("submit of an empty slot");
        let done = flight.done;
        let entry = match &mut flight.op {
            Op::Read { offset, buf } => {
                let chunk = (buf.len() - done).min(CHUNK_BYTES_MAX);
                // SAFETY: `done < len <= capacity`, so the pointer stays in the allocation.
                let ptr = unsafe { buf.as_mut_ptr().add(done) };
                let at = *offset + done as u64;
                let fd = fds.for_io(at, chunk, ptr);
                if in_arena(ptr, chunk) {
                    opcode::ReadFixed::new(types::Fd(fd), ptr, chunk as u32, ARENA_BUF_INDEX)
                        .offset(at)
                        .build()
                } else {
                    opcode::Read::new(types::Fd(fd), ptr, chunk as u32)
                        .offset(at)
                        .build()
                }
            }
            Op::Write { offset, buf } => {
                let chunk = (buf.len() - done).min(CHUNK_BYTES_MAX);
                // SAFETY: `done < len <= capacity`, so the pointer stays in the allocation.
                let ptr = unsafe { buf.as_ptr().add(done) };
                let at = *offset + done as u64;
                let fd = fds.for_io(at, chunk, ptr);
                if in_arena(ptr, chunk) {
                    opcode::WriteFixed::new(types::Fd(fd), ptr, chunk as u32, ARENA_BUF_INDEX)
                        .offset(at)
                        .build()
                } else {
                    opcode::Write::new(types::Fd(fd), ptr, chunk as u32)
                        .offset(at)
                        .build()
                }
            }
            Op::Fallocate { mode, offset, len } => {
                opcode::Fallocate::new(types::Fd(fds.buffered), *len)
                    .offset(*offset)
                    .mode(*mode)
                    .build()
            }
            Op::Sync => opcode::Fsync::new(types::Fd(fds.buffered))
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        };
        self.push(entry.user_data(slot as u64));
    }

    fn complete(&mut self, slot: usize, result: i32) {
        let Some(flight) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
            // Internal invariant: tokens are slot indices we submitted.
            panic!("io_uring completion for unknown slot {slot}");
        };
        let outcome: Option<io::Result<()>> = if result < 0 {
            let error = io::Error::from_raw_os_error(-result);
            if matches!(-result, libc::EINTR | libc::EAGAIN) && flight.retries < RETRIES_MAX {
                flight.retries += 1;
                None
            } else {
                Some(Err(error))
            }
        } else {
            let transferred = result as usize;
            match &flight.op {
                Op::Read { buf, .. } | Op::Write { buf, .. } => {
                    let total = buf.len();
                    let is_read = matches!(flight.op, Op::Read { .. });
                    if transferred == 0 {
                        let (kind, what) = if is_read {
                            (io::ErrorKind::UnexpectedEof, "end of file")
                        } else {
                            (io::ErrorKind::WriteZero, "wrote 0 bytes")
                        };
                        Some(Err(io::Error::new(
                            kind,
                            format!("{what} after {} of {total} bytes", flight.done),
                        )))
                    } else {
                        flight.done += transferred;
                        if flight.done < total {
                            None
                        } else {
                            Some(Ok(()))
                        }
                    }
                }
                Op::Fallocate { .. } | Op::Sync => Some(Ok(())),
            }
        };
        match outcome {
            None => self.submit_slot(slot),
            Some(result) => {
                let flight = self.slots[slot].take().expect("slot checked above");
                self.free_slots.push(slot);
                // A caller that stopped waiting just lets the buffer drop here.
                let _ = flight.reply.send(Completion {
                    result,
                    buf: flight.op.into_buf(),
                });
            }
        }
    }

    /// `io_uring_enter` failed in a way we cannot retry: fail everything and stop. Buffers of
    /// requests still in the kernel are leaked on purpose (the kernel may still write them); their
    /// callers get an error and a fresh buffer of the same length.
    fn die(&mut self, error: io::Error) {
        tracing::error!(%error, "io_uring disk engine stopped");
        let queued: Vec<Request> = {
            let mut state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
            state.dead = true;
            state.queue.drain(..).collect()
        };
        for request in self.backlog.drain(..).chain(queued) {
            let buf = request.op.into_buf();
            let _ = request.reply.send(Completion {
                result: Err(io::Error::other(format!(
                    "io_uring engine stopped: {error}"
                ))),
                buf,
            });
        }
        for slot in 0..self.slots.len() {
            if let Some(flight) = self.slots[slot].take() {
                let replacement = flight.op.into_buf().map(|buf| {
                    let len = buf.len();
                    std::mem::forget(buf);
                    IoBuf::zeroed(len)
                });
                let _ = flight.reply.send(Completion {
                    result: Err(io::Error::other(format!(
                        "io_uring engine stopped: {error}"
                    ))),
                    buf: replacement,
                });
            }
        }
    }
}

/// The soft RLIMIT_MEMLOCK in bytes, for the log line when registering fails (`None` if unknown
/// or unlimited).
pub(super) fn memlock_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` into the live struct we pass.
    let ret = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) };
    (ret == 0 && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}
