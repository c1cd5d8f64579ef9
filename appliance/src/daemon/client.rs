//! The control client: a blocking connection to a running appliance's control socket, used by
//! the CLI (`ferry status`, `ferry pause` …) and by the operator console (from a thread of its
//! own). One JSON request per line out, one JSON response per line back; every read and write
//! has a timeout so a stuck appliance never hangs the caller.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::control::{Request, Response, StatusSnapshot};

/// Default timeout for one request/response exchange.
pub const CLIENT_TIMEOUT_DEFAULT: Duration = Duration::from_secs(5);

/// Longest response line the client accepts (a status of thousands of disks fits easily).
pub const RESPONSE_BYTES_MAX: usize = 16 << 20;

/// What can go wrong talking to an appliance.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket: the appliance is not running (or uses another socket).
    #[error("no appliance is running at {} ({source}); start one with `ferry run --config FILE`, or pass --socket/--config", socket.display())]
    NotRunning {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket {}: permission denied (it is owner-only: run as the appliance's user)", socket.display())]
    PermissionDenied { socket: PathBuf },
    #[error("control socket {}: {operation} timed out after {timeout:?}", socket.display())]
    Timeout {
        socket: PathBuf,
        operation: &'static str,
        timeout: Duration,
    },
    #[error("control socket {}: {operation} failed: {source}", socket.display())]
    Io {
        socket: PathBuf,
        operation: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The appliance answered something that is not a response this client understands.
    #[error("control socket {}: bad response: {message}", socket.display())]
    Protocol { socket: PathBuf, message: String },
    /// The appliance understood the command and refused it.
    #[error("{message}")]
    Refused { message: String },
}

/// A connection to one appliance's control socket.
#[derive(Debug)]
pub struct Client {
    socket: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    timeout: Duration,
}

impl Client {
    /// Connects with the default timeout.
    pub fn connect(socket: &Path) -> Result<Self, ClientError> {
        Self::connect_with_timeout(socket, CLIENT_TIMEOUT_DEFAULT)
    }

    pub fn connect_with_timeout(socket: &Path, timeout: Duration) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(socket).map_err(|source| match source.kind() {
            ErrorKind::NotFound | ErrorKind::ConnectionRefused => ClientError::NotRunning {
                socket: socket.to_path_buf(),
                source,
            },
            ErrorKind::PermissionDenied => ClientError::PermissionDenied {
                socket: socket.to_path_buf(),
            },
            _ => ClientError::Io {
                socket: socket.to_path_buf(),
                operation: "connect",
                source,
            },
        })?;
        let io_error = |operation| {
            move |source| ClientError::Io {
                socket: socket.to_path_buf(),
                operation,
                source,
            }
        };
        stream
            .set_read_timeout(Some(timeout))
            .map_err(io_error("set read timeout"))?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(io_error("set write timeout"))?;
        let writer = stream.try_clone().map_err(io_error("clone"))?;
        Ok(Self {
            socket: socket.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
            timeout,
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends one request and waits for its response.
    pub fn request(&mut self, request: &Request) -> Result<Response, ClientError> {
        let mut line = serde_json::to_vec(request).map_err(|error| ClientError::Protocol {
            socket: self.socket.clone(),
            message: format!("cannot encode request: {error}"),
        })?;
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .map_err(|source| self.io_error("send request", source))?;
        let mut response = Vec::new();
        let read = (&mut self.reader)
            .take(RESPONSE_BYTES_MAX as u64 + 1)
            .read_until(b'\n', &mut response)
            .map_err(|source| self.io_error("read response", source))?;
        if read == 0 {
            return Err(ClientError::Protocol {
                socket: self.socket.clone(),
                message: "the appliance closed the connection without answering".to_string(),
            });
        }
        if response.len() > RESPONSE_BYTES_MAX || response.last() != Some(&b'\n') {
            return Err(ClientError::Protocol {
                socket: self.socket.clone(),
                message: format!("response longer than {RESPONSE_BYTES_MAX} bytes or cut short"),
            });
        }
        serde_json::from_slice(&response).map_err(|error| ClientError::Protocol {
            socket: self.socket.clone(),
            message: error.to_string(),
        })
    }

    /// Fetches a status snapshot.
    pub fn status(&mut self) -> Result<StatusSnapshot, ClientError> {
        match self.request(&Request::Status)? {
            Response::Status(snapshot) => Ok(snapshot),
            Response::Error { message } => Err(ClientError::Refused { message }),
            other => Err(ClientError::Protocol {
                socket: self.socket.clone(),
                message: format!("expected a status snapshot, got {other:?}"),
            }),
        }
    }

    /// Sends a command that answers `ok` or `error`; returns the appliance's message.
    pub fn command(&mut self, request: &Request) -> Result<String, ClientError> {
        match self.request(request)? {
            Response::Ok { message } => Ok(message),
            Response::Error { message } => Err(ClientError::Refused { message }),
            other => Err(ClientError::Protocol {
                socket: self.socket.clone(),
                message: format!("expected ok or error, got {other:?}"),
            }),
        }
    }

    fn io_error(&self, operation: &'static str, source: std::io::Error) -> ClientError {
        match source.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => ClientError::Timeout {
                socket: self.socket.clone(),
                operation,
                timeout: self.timeout,
            },
            _ => ClientError::Io {
                socket: self.socket.clone(),
                operation,
                source,
            },
        }
    }
}
