//! The UDP socket under a quinn endpoint, with receive/send buffers large enough for a
//! multi-Gbit/s burst (the 208 KiB default dropped ~25k packets per 4 GiB here).

use std::io::IoSliceMut;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, Runtime, UdpPoller};

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

/// Largest UDP payload of one datagram over IPv4 (65,535 minus IP and UDP headers): a GSO
/// batch is sent as one datagram, so its packets together must fit this.
const UDP_DATAGRAM_PAYLOAD_BYTES_MAX: usize = 65_507;

/// Hands `socket` to quinn's tokio runtime, splitting any GSO batch larger than one UDP
/// datagram into sends that fit. quinn batches up to 10 packets of the path's current MTU per
/// send; once path MTU discovery takes packets above ~6,500 bytes (loopback, jumbo frames) ten
/// no longer fit, the kernel refuses the send and quinn's connection driver fails. Splitting
/// where the batch is sent keeps 10-packet batches on ordinary 1500-byte paths (a cap on the
/// batch size derived from the largest packet allowed would cut them to 2 there).
pub(crate) fn quinn_socket(socket: UdpSocket) -> std::io::Result<Arc<dyn AsyncUdpSocket>> {
    let inner = quinn::TokioRuntime.wrap_udp_socket(socket)?;
    Ok(Arc::new(SplittingSocket { inner }))
}

/// quinn's socket, sending each GSO batch in pieces of at most one UDP datagram.
#[derive(Debug)]
struct SplittingSocket {
    inner: Arc<dyn AsyncUdpSocket>,
}

impl AsyncUdpSocket for SplittingSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> std::io::Result<()> {
        let Some(segment_bytes) = transmit
            .segment_size
            .filter(|_| transmit.contents.len() > UDP_DATAGRAM_PAYLOAD_BYTES_MAX)
        else {
            return self.inner.try_send(transmit);
        };
        let piece_bytes = (UDP_DATAGRAM_PAYLOAD_BYTES_MAX / segment_bytes).max(1) * segment_bytes;
        // A piece refused with WouldBlock after earlier pieces went out makes quinn retry the
        // whole batch: those packets then arrive twice, and QUIC drops a packet number it has
        // already seen. Reporting success instead would lose the rest and count it as congestion.
        for piece in transmit.contents.chunks(piece_bytes) {
            self.inner.try_send(&Transmit {
                contents: piece,
                segment_size: (piece.len() > segment_bytes).then_some(segment_bytes),
                ..transmit.clone()
            })?;
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        context: &mut Context,
        buffers: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<std::io::Result<usize>> {
        self.inner.poll_recv(context, buffers, meta)
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}
