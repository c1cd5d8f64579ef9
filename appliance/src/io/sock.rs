//! Socket calls the standard library does not offer.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// One `send(2)` that does not wait for room in the socket (`MSG_DONTWAIT`, whatever the
/// socket's blocking mode) and does not raise SIGPIPE on a closed connection (`MSG_NOSIGNAL`):
/// how many bytes went out (a stream socket may take fewer than offered), or the error
/// (`WouldBlock`: no room at all). Retried on EINTR.
pub fn send_nonblocking(socket: BorrowedFd<'_>, bytes: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: the descriptor is open for the borrow's lifetime; the pointer and length
        // describe `bytes`, which the kernel only reads during the call.
        let sent = unsafe {
            libc::send(
                socket.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if sent >= 0 {
            return Ok(sent as usize);
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}
