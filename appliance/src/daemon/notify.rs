//! systemd readiness notification (`Type=notify`): one datagram to `$NOTIFY_SOCKET`, the
//! protocol of sd_notify(3), without linking libsystemd. Outside systemd it does nothing.

use std::os::unix::net::UnixDatagram;

/// Sends `state` (e.g. `READY=1`) to systemd when it asked for notifications. Failures are
/// logged, never fatal: the appliance works the same without a supervisor.
pub(crate) fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let result = UnixDatagram::unbound().and_then(|socket| {
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            // An abstract socket name (Linux): '@' stands for the leading NUL byte.
            use std::os::linux::net::SocketAddrExt;
            let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(state.as_bytes(), &address)
        } else {
            socket.send_to(state.as_bytes(), &path)
        }
    });
    if let Err(error) = result {
        tracing::warn!(%error, notify_socket = ?path, "cannot notify systemd");
    }
}
