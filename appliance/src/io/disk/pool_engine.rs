//! The fallback disk engine: blocking pread/pwrite/fallocate/fdatasync on a small pool of
//! dedicated threads. Used when io_uring is unavailable (disabled by sysctl or seccomp) or when
//! asked for; four threads reach about the io_uring engine's sequential throughput here.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::sys::{self, Fds};
use super::{Completion, Engine, EngineKind, Op, Request};

/// Worker threads of one disk's fallback engine: enough to keep several requests in flight
/// without oversubscribing a small appliance.
pub(crate) const POOL_THREADS: usize = 4;

pub(crate) struct PoolEngine {
    sender: Option<mpsc::Sender<Request>>,
    workers: Vec<JoinHandle<()>>,
}

impl PoolEngine {
    pub fn new(fds: Fds, threads: usize, name: &str) -> std::io::Result<PoolEngine> {
        let (sender, receiver) = mpsc::channel::<Request>();
        let receiver = Arc::new(Mutex::new(receiver));
        let mut workers = Vec::with_capacity(threads);
        for index in 0..threads.max(1) {
            let receiver = receiver.clone();
            let worker = std::thread::Builder::new()
                .name(format!("disk-io-{name}-{index}"))
                .spawn(move || worker_loop(fds, &receiver))?;
            workers.push(worker);
        }
        Ok(PoolEngine {
            sender: Some(sender),
            workers,
        })
    }
}

fn worker_loop(fds: Fds, receiver: &Mutex<mpsc::Receiver<Request>>) {
    loop {
        // Hold the lock only while waiting for the next request, not while doing I/O.
        let next = receiver.lock().unwrap_or_else(|e| e.into_inner()).recv();
        let Ok(request) = next else {
            return; // Sender dropped: the disk is closing and the queue is drained.
        };
        let completion = execute(&fds, request.op);
        // The caller may have stopped waiting (its future was dropped); then the buffer is
        // simply freed here.
        let _ = request.reply.send(completion);
    }
}

pub(crate) fn execute(fds: &Fds, op: Op) -> Completion {
    match op {
        Op::Read { offset, mut buf } => {
            let result = sys::pread_exact(fds, offset, &mut buf);
            Completion {
                result,
                buf: Some(buf),
            }
        }
        Op::Write { offset, buf } => {
            let result = sys::pwrite_all(fds, offset, &buf);
            Completion {
                result,
                buf: Some(buf),
            }
        }
        Op::Fallocate { mode, offset, len } => Completion {
            result: sys::fallocate(fds.buffered, mode, offset, len),
            buf: None,
        },
        Op::Sync => Completion {
            result: sys::fdatasync(fds.buffered),
            buf: None,
        },
    }
}

impl Engine for PoolEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Sync
    }

    fn submit(&self, request: Request) -> Result<(), Request> {
        match self.sender.as_ref() {
            Some(sender) => sender.send(request).map_err(|mpsc::SendError(r)| r),
            None => Err(request),
        }
    }
}

impl Drop for PoolEngine {
    fn drop(&mut self) {
        // Closing the channel lets the workers finish what is queued and exit; joining keeps the
        // disk's file descriptors open until no worker can use them.
        self.sender.take();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}
