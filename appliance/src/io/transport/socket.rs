//! The UDP socket under a quinn endpoint, with receive/send buffers large enough for a
//! multi-Gbit/s burst (the 208 KiB default dropped ~25k packets per 4 GiB here).

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

use super::{TransportError, Tuning, SOCKET_BUFFER_BYTES_ADEQUATE};

/// Binds a UDP socket at `address` and sizes its buffers per `tuning`.
pub(crate) fn bind_udp(address: SocketAddr, tuning: &Tuning) -> Result<UdpSocket, TransportError> {
    let socket_error = |operation: &'static str| {
        move |source| TransportError::Socket {
            operation,
            address,
            source,
        }
    };
    let socket = UdpSocket::bind(address).map_err(socket_error("bind"))?;
    let state =
        quinn_udp::UdpSocketState::new((&socket).into()).map_err(socket_error("configure"))?;
    let wanted_bytes = tuning.socket_buffer_bytes;
    // Linux caps SO_RCVBUF at net.core.rmem_max silently; read back what we got.
    if let Err(error) = state.set_recv_buffer_size((&socket).into(), wanted_bytes) {
        tracing::warn!(%address, %error, "could not set the UDP receive buffer");
    }
    if let Err(error) = state.set_send_buffer_size((&socket).into(), wanted_bytes) {
        tracing::warn!(%address, %error, "could not set the UDP send buffer");
    }
    // Linux reports twice the requested size (it counts its bookkeeping), so half is the
    // figure to compare.
    let recv_bytes = state.recv_buffer_size((&socket).into()).unwrap_or(0) / 2;
    let send_bytes = state.send_buffer_size((&socket).into()).unwrap_or(0) / 2;
    if recv_bytes < wanted_bytes {
        force_buffer_size(&socket, libc::SO_RCVBUFFORCE, wanted_bytes);
    }
    if send_bytes < wanted_bytes {
        force_buffer_size(&socket, libc::SO_SNDBUFFORCE, wanted_bytes);
    }
    let recv_bytes = state.recv_buffer_size((&socket).into()).unwrap_or(0) / 2;
    let send_bytes = state.send_buffer_size((&socket).into()).unwrap_or(0) / 2;
    let adequate_bytes = wanted_bytes.min(SOCKET_BUFFER_BYTES_ADEQUATE);
    if recv_bytes < adequate_bytes || send_bytes < adequate_bytes {
        tracing::warn!(
            %address,
            wanted_bytes,
            recv_bytes,
            send_bytes,
            "UDP socket buffers are smaller than wanted: raise net.core.rmem_max and \
             net.core.wmem_max (see kernel-notes/quic-udp.md) or expect packet loss at high rates"
        );
    } else {
        tracing::debug!(%address, wanted_bytes, recv_bytes, send_bytes, gso_segments_max = state.max_gso_segments(), "UDP socket ready");
    }
    Ok(socket)
}

/// Root (CAP_NET_ADMIN) may exceed the sysctl caps for this one socket, which is better than
/// raising them machine-wide. Without the capability this fails with EPERM, which is fine.
fn force_buffer_size(socket: &UdpSocket, option: libc::c_int, bytes: usize) {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: the fd is a live socket owned by `socket` for the duration of the call; the
    // option value points at a c_int on this stack frame and its exact size is passed.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result != 0 {
        tracing::debug!(
            option,
            error = %std::io::Error::last_os_error(),
            "forcing the UDP buffer size was refused (not root)"
        );
    }
}
