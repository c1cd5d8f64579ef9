//! The console's only I/O: an `Appliance` it fetches status from and sends requests to. The
//! runner calls it from worker threads, never from the UI thread, so a slow or absent appliance
//! cannot freeze the screen. `SocketAppliance` adapts the daemon's control client
//! (`ferry_appliance::daemon::Client`): one connection kept open and replaced when it fails.

use std::path::PathBuf;
use std::time::Duration;

use ferry_appliance::control::{Request, StatusSnapshot};
use ferry_appliance::daemon::{Client, ClientError};

/// A failed exchange with the appliance; `ClientError::Refused` carries the appliance's own
/// answer (including "not supported"), shown to the operator as it is.
pub type ApplianceError = ClientError;

/// What the console talks to. `Send` so the runner can move one into each worker thread.
pub trait Appliance: Send + 'static {
    fn fetch_status(&mut self) -> Result<StatusSnapshot, ApplianceError>;
    /// Sends a command; `Ok` carries the appliance's message.
    fn send(&mut self, request: &Request) -> Result<String, ApplianceError>;
}

/// A client of an appliance's unix control socket that reconnects by itself.
#[derive(Debug)]
pub struct SocketAppliance {
    pub path: PathBuf,
    /// How long one exchange may take before the console calls the appliance unresponsive.
    pub timeout: Duration,
    connection: Option<Client>,
}

impl Clone for SocketAppliance {
    /// A clone has its own connection, opened on first use.
    fn clone(&self) -> Self {
        Self::new(self.path.clone(), self.timeout)
    }
}

impl SocketAppliance {
    pub fn new(path: impl Into<PathBuf>, timeout: Duration) -> Self {
        Self {
            path: path.into(),
            timeout,
            connection: None,
        }
    }

    /// Runs one exchange. A kept connection may have been closed by the appliance in the
    /// meantime (restart, idle timeout), so a transport failure on a reused connection is
    /// retried once on a fresh one before it is reported.
    fn exchange<T>(
        &mut self,
        mut call: impl FnMut(&mut Client) -> Result<T, ClientError>,
    ) -> Result<T, ApplianceError> {
        let reused = self.connection.is_some();
        match self.exchange_once(&mut call) {
            Err(error) if reused && !matches!(error, ClientError::Refused { .. }) => {
                self.exchange_once(&mut call)
            }
            result => result,
        }
    }

    fn exchange_once<T>(
        &mut self,
        call: &mut impl FnMut(&mut Client) -> Result<T, ClientError>,
    ) -> Result<T, ApplianceError> {
        let client = match &mut self.connection {
            Some(client) => client,
            None => self
                .connection
                .insert(Client::connect_with_timeout(&self.path, self.timeout)?),
        };
        let result = call(client);
        if matches!(&result, Err(error) if !matches!(error, ClientError::Refused { .. })) {
            // The connection is in an unknown state (half a line read, timed out): drop it.
            self.connection = None;
        }
        result
    }
}

impl Appliance for SocketAppliance {
    fn fetch_status(&mut self) -> Result<StatusSnapshot, ApplianceError> {
        self.exchange(Client::status)
    }

    fn send(&mut self, request: &Request) -> Result<String, ApplianceError> {
        self.exchange(|client| client.command(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;

    /// A scripted appliance on a real unix socket: connection `i` reads one request, answers
    /// `answers[i]` and closes. Returns the requests it was sent.
    fn serve(
        answers: Vec<&'static str>,
    ) -> (
        tempfile::TempDir,
        PathBuf,
        std::thread::JoinHandle<Vec<String>>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let handle = std::thread::spawn(move || {
            let mut requests = Vec::new();
            for answer in answers {
                let (stream, _) = listener.accept().unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request = String::new();
                reader.read_line(&mut request).unwrap();
                (&stream).write_all(answer.as_bytes()).unwrap();
                requests.push(request);
            }
            requests
        });
        (dir, path, handle)
    }

    const STATUS: &str = "{\"result\":\"status\",\"appliance\":\"source-a\",\"time_unix_ms\":5}\n";

    #[test]
    fn a_refusal_is_reported_as_the_appliance_said_it() {
        let (_dir, path, server) = serve(vec![
            "{\"result\":\"error\",\"message\":\"not supported yet: failover\"}\n",
        ]);
        let mut client = SocketAppliance::new(&path, Duration::from_secs(5));
        let request = Request::Failover {
            group: "db".into(),
            point: Some(3),
            test: false,
            at_unix_ms: None,
            planned: false,
            materialize_dir: None,
        };
        let error = client.send(&request).unwrap_err();
        assert!(matches!(error, ClientError::Refused { .. }), "{error:?}");
        assert_eq!(error.to_string(), "not supported yet: failover");
        let sent = server.join().unwrap();
        assert_eq!(
            sent,
            ["{\"cmd\":\"failover\",\"group\":\"db\",\"point\":3,\"test\":false}\n"]
        );
    }

    #[test]
    fn a_connection_closed_by_the_appliance_is_replaced_without_an_error() {
        // The scripted appliance closes after every answer, so the second fetch finds its kept
        // connection dead and must reconnect instead of reporting a disconnection.
        let (_dir, path, server) = serve(vec![STATUS, STATUS]);
        let mut client = SocketAppliance::new(&path, Duration::from_secs(5));
        assert_eq!(client.fetch_status().unwrap().appliance, "source-a");
        assert_eq!(client.fetch_status().unwrap().appliance, "source-a");
        assert_eq!(server.join().unwrap(), ["{\"cmd\":\"status\"}\n"; 2]);
    }

    #[test]
    fn a_missing_socket_names_its_path() {
        let mut absent = SocketAppliance::new("/nonexistent/ferry.sock", Duration::from_secs(1));
        let error = absent.fetch_status().unwrap_err().to_string();
        assert!(error.contains("/nonexistent/ferry.sock"), "{error}");
    }
}
