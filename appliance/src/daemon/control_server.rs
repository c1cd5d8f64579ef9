//! The control socket server: a unix socket, owner-only (0600), one JSON request per line in and
//! one JSON response per line out (`control::Request` / `control::Response`). Status is answered
//! from the shared status model directly; every other command goes to the daemon's event loop,
//! which owns the mutable state, and its reply comes back here.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::task::JoinSet;

use super::status::StatusModel;
use super::{DaemonError, Event};
use crate::control::{Request, Response};

/// Longest request line accepted; longer ones get an error and the connection is closed.
pub const REQUEST_BYTES_MAX: usize = 64 << 10;
/// Control connections served at once (the CLI and a few consoles need far fewer).
pub const CONTROL_CONNECTIONS_MAX: usize = 64;
/// How long a command may take in the event loop before the client is told it timed out.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// The same for `verify`, which drains and reads whole disks on both appliances (a 2 GiB disk
/// took more than 30 s on a loaded machine): the client's own `--timeout` bounds its wait.
pub const VERIFY_COMMAND_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

/// A bound control socket, ready to serve.
pub(crate) struct BoundSocket {
    pub listener: UnixListener,
    pub path: PathBuf,
    /// Device and inode of the socket file we created, so shutdown removes only our own file
    /// (not one a newer appliance put at the same path).
    identity: (u64, u64),
}

impl BoundSocket {
    /// Removes the socket file if it is still the one we bound.
    pub fn remove_file(path: &Path, identity: (u64, u64)) {
        if let Ok(metadata) = std::fs::symlink_metadata(path) {
            if (metadata.dev(), metadata.ino()) == identity {
                if let Err(error) = std::fs::remove_file(path) {
                    tracing::warn!(socket = %path.display(), %error, "cannot remove control socket");
                }
            }
        }
    }

    pub fn identity(&self) -> (u64, u64) {
        self.identity
    }
}

/// Binds the control socket at `path`: creates the parent directory, replaces a stale socket
/// file (refusing if an appliance still answers on it), and makes the socket owner-only before
/// it becomes visible at `path` (bound under a temporary name, chmod 0600, renamed), so no other
/// user can ever connect.
pub(crate) fn bind(path: &Path) -> Result<BoundSocket, DaemonError> {
    let error = |operation: &'static str| {
        move |source| DaemonError::ControlSocket {
            path: path.to_path_buf(),
            operation,
            source,
        }
    };
    if let Some(parent) = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
    {
        std::fs::create_dir_all(parent).map_err(error("create parent directory"))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(metadata) if metadata.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(DaemonError::AlreadyRunning {
                    path: path.to_path_buf(),
                });
            }
            tracing::info!(socket = %path.display(), "replacing stale control socket");
            std::fs::remove_file(path).map_err(error("remove stale socket"))?;
        }
        Ok(_) => {
            return Err(DaemonError::NotASocket {
                path: path.to_path_buf(),
            })
        }
        Err(not_found) if not_found.kind() == std::io::ErrorKind::NotFound => {}
        Err(other) => return Err(error("inspect")(other)),
    }
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(format!(".{}.tmp", std::process::id()));
    let temporary = PathBuf::from(temporary);
    let _ = std::fs::remove_file(&temporary);
    let listener = UnixListener::bind(&temporary).map_err(error("bind"))?;
    let finish = || -> std::io::Result<(u64, u64)> {
        std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&temporary, path)?;
        let metadata = std::fs::symlink_metadata(path)?;
        Ok((metadata.dev(), metadata.ino()))
    };
    match finish() {
        Ok(identity) => Ok(BoundSocket {
            listener,
            path: path.to_path_buf(),
            identity,
        }),
        Err(source) => {
            let _ = std::fs::remove_file(&temporary);
            Err(error("set owner-only permissions")(source))
        }
    }
}

/// Serves connections until `shutdown` turns true; then stops accepting and drops every
/// connection.
pub(crate) async fn serve(
    listener: UnixListener,
    status: Arc<StatusModel>,
    events: mpsc::Sender<Event>,
    mut shutdown: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(CONTROL_CONNECTIONS_MAX));
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let Ok(permit) = permits.clone().try_acquire_owned() else {
                        tracing::warn!("control socket: {CONTROL_CONNECTIONS_MAX} connections open, refusing another");
                        continue;
                    };
                    let status = status.clone();
                    let events = events.clone();
                    connections.spawn(async move {
                        serve_connection(stream, &status, &events).await;
                        drop(permit);
                    });
                }
                Err(error) => {
                    tracing::warn!(%error, "control socket: accept failed");
                    // Back off briefly so a persistent error (EMFILE) does not spin a core.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = shutdown.changed() => break,
        }
    }
    connections.shutdown().await;
}

async fn serve_connection(stream: UnixStream, status: &StatusModel, events: &mpsc::Sender<Event>) {
    let (reader, mut writer) = stream.into_split();
    let mut reader = BufReader::new(reader);
    let mut line = Vec::new();
    loop {
        line.clear();
        let read = match (&mut reader)
            .take(REQUEST_BYTES_MAX as u64 + 1)
            .read_until(b'\n', &mut line)
            .await
        {
            Ok(read) => read,
            Err(error) => {
                tracing::debug!(%error, "control connection: read failed");
                return;
            }
        };
        if read == 0 {
            return;
        }
        let oversized = line.len() > REQUEST_BYTES_MAX;
        let response = if oversized {
            Response::Error {
                message: format!("request longer than {REQUEST_BYTES_MAX} bytes"),
            }
        } else {
            match serde_json::from_slice::<Request>(&line) {
                Ok(request) => handle(request, status, events).await,
                Err(error) => Response::Error {
                    message: format!("bad request: {error}"),
                },
            }
        };
        let mut bytes = match serde_json::to_vec(&response) {
            Ok(bytes) => bytes,
            Err(error) => {
                tracing::error!(%error, "control connection: cannot encode response");
                return;
            }
        };
        bytes.push(b'\n');
        if let Err(error) = writer.write_all(&bytes).await {
            tracing::debug!(%error, "control connection: write failed");
            return;
        }
        if oversized {
            // The rest of the oversized line is still in the socket; resynchronising on it is
            // not worth it.
            return;
        }
    }
}

async fn handle(request: Request, status: &StatusModel, events: &mpsc::Sender<Event>) -> Response {
    if request == Request::Status {
        return Response::Status(status.snapshot_now());
    }
    let timeout = match request {
        Request::Verify { .. } => VERIFY_COMMAND_TIMEOUT,
        _ => COMMAND_TIMEOUT,
    };
    let (reply, answer) = oneshot::channel();
    if events
        .send(Event::Command { request, reply })
        .await
        .is_err()
    {
        return Response::Error {
            message: "the appliance is shutting down".to_string(),
        };
    }
    match tokio::time::timeout(timeout, answer).await {
        Ok(Ok(response)) => response,
        Ok(Err(_)) => Response::Error {
            message: "the appliance is shutting down".to_string(),
        },
        Err(_) => Response::Error {
            message: format!("command timed out after {timeout:?}"),
        },
    }
}
