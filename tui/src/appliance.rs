//! The console's only I/O: an `Appliance` it fetches status from and sends requests to. The
//! runner calls it from worker threads, never from the UI thread, so a slow or absent appliance
//! cannot freeze the screen. `SocketAppliance` speaks the control socket's line protocol (one
//! JSON object per line each way, one connection per exchange).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use ferry_appliance::control::{Request, Response, StatusSnapshot};

/// The longest answer line accepted; a status of thousands of disks is well under this.
const RESPONSE_BYTES_MAX: u64 = 64 * 1024 * 1024;

/// A failed exchange with the appliance.
#[derive(Debug, thiserror::Error)]
pub enum ApplianceError {
    #[error("cannot connect to the control socket {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{operation} on the control socket {path}: {source}")]
    Io {
        operation: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the appliance closed the control socket {path} without answering")]
    Closed { path: PathBuf },
    #[error("unreadable answer on the control socket {path}: {source}")]
    Decode {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("unexpected answer to {request}: {answer}")]
    Unexpected {
        request: &'static str,
        answer: String,
    },
    /// The appliance answered with an error (including "not supported yet").
    #[error("{0}")]
    Refused(String),
}

/// What the console talks to. `Send` so the runner can move one into each worker thread.
pub trait Appliance: Send + 'static {
    fn fetch_status(&mut self) -> Result<StatusSnapshot, ApplianceError>;
    /// Sends a command; `Ok` carries the appliance's message.
    fn send(&mut self, request: &Request) -> Result<String, ApplianceError>;
}

/// A client of an appliance's unix control socket.
#[derive(Clone, Debug)]
pub struct SocketAppliance {
    pub path: PathBuf,
    /// How long one exchange may take before the console calls the appliance unresponsive.
    pub timeout: Duration,
}

impl SocketAppliance {
    pub fn new(path: impl Into<PathBuf>, timeout: Duration) -> Self {
        Self {
            path: path.into(),
            timeout,
        }
    }

    fn exchange(&self, request: &Request) -> Result<Response, ApplianceError> {
        let path = &self.path;
        let io = |operation| {
            move |source| ApplianceError::Io {
                operation,
                path: path.clone(),
                source,
            }
        };
        let mut stream = UnixStream::connect(path).map_err(|source| ApplianceError::Connect {
            path: path.clone(),
            source,
        })?;
        stream
            .set_read_timeout(Some(self.timeout))
            .map_err(io("set read timeout"))?;
        stream
            .set_write_timeout(Some(self.timeout))
            .map_err(io("set write timeout"))?;
        let mut line = serde_json::to_vec(request).map_err(|source| ApplianceError::Decode {
            path: path.clone(),
            source,
        })?;
        line.push(b'\n');
        stream.write_all(&line).map_err(io("write request"))?;
        let mut answer = String::new();
        BufReader::new(stream.take(RESPONSE_BYTES_MAX))
            .read_line(&mut answer)
            .map_err(io("read answer"))?;
        if answer.is_empty() {
            return Err(ApplianceError::Closed { path: path.clone() });
        }
        serde_json::from_str(&answer).map_err(|source| ApplianceError::Decode {
            path: path.clone(),
            source,
        })
    }
}

impl Appliance for SocketAppliance {
    fn fetch_status(&mut self) -> Result<StatusSnapshot, ApplianceError> {
        match self.exchange(&Request::Status)? {
            Response::Status(snapshot) => Ok(snapshot),
            Response::Error { message } => Err(ApplianceError::Refused(message)),
            Response::Ok { message } => Err(ApplianceError::Unexpected {
                request: "status",
                answer: message,
            }),
        }
    }

    fn send(&mut self, request: &Request) -> Result<String, ApplianceError> {
        match self.exchange(request)? {
            Response::Ok { message } => Ok(message),
            Response::Error { message } => Err(ApplianceError::Refused(message)),
            Response::Status(_) => Err(ApplianceError::Unexpected {
                request: "command",
                answer: "a status snapshot".to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A one-connection fake appliance on a real unix socket: it answers one line and records
    /// what it was asked.
    fn serve_once(
        answer: &'static str,
    ) -> (tempfile::TempDir, PathBuf, std::thread::JoinHandle<String>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let handle = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            reader.read_line(&mut request).unwrap();
            (&stream).write_all(answer.as_bytes()).unwrap();
            request
        });
        (dir, path, handle)
    }

    #[test]
    fn a_refusal_is_reported_as_the_appliance_said_it() {
        let (_dir, path, server) =
            serve_once("{\"result\":\"error\",\"message\":\"not supported yet: failover\"}\n");
        let mut client = SocketAppliance::new(&path, Duration::from_secs(5));
        let request = Request::Failover {
            group: "db".into(),
            point: Some(3),
            test: false,
        };
        let error = client.send(&request).unwrap_err();
        assert_eq!(error.to_string(), "not supported yet: failover");
        let sent = server.join().unwrap();
        assert_eq!(
            sent,
            "{\"cmd\":\"failover\",\"group\":\"db\",\"point\":3,\"test\":false}\n"
        );
    }

    #[test]
    fn status_round_trips_and_a_missing_socket_names_its_path() {
        let (_dir, path, server) =
            serve_once("{\"result\":\"status\",\"appliance\":\"source-a\",\"time_unix_ms\":5}\n");
        let mut client = SocketAppliance::new(&path, Duration::from_secs(5));
        let snapshot = client.fetch_status().unwrap();
        assert_eq!(snapshot.appliance, "source-a");
        assert_eq!(server.join().unwrap(), "{\"cmd\":\"status\"}\n");

        let mut absent = SocketAppliance::new("/nonexistent/ferry.sock", Duration::from_secs(1));
        let error = absent.fetch_status().unwrap_err().to_string();
        assert!(error.contains("/nonexistent/ferry.sock"), "{error}");
    }
}
