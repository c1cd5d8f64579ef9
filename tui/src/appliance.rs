//! The console's only I/O: an `Appliance` it fetches status from and sends requests to. The
//! runner calls it from worker threads, never from the UI thread, so a slow or absent appliance
//! cannot freeze the screen. `SocketAppliance` adapts the daemon's control client
//! (`ferry_appliance::daemon::Client`): one connection kept open and replaced when it fails.
//! `SitePair` is a source and a target appliance seen as one (the demo runs both): their status
//! merged, each command sent to the appliance that carries it out.

use std::path::PathBuf;
use std::time::Duration;

use ferry_appliance::control::{GroupState, Request, Response, StatusSnapshot};
use ferry_appliance::daemon::{Client, ClientError};

/// A failed exchange with the appliance; `ClientError::Refused` carries the appliance's own
/// answer (including "not supported"), shown to the operator as it is.
pub type ApplianceError = ClientError;

/// What the console talks to. `Send` so the runner can move one into each worker thread.
pub trait Appliance: Send + 'static {
    fn fetch_status(&mut self) -> Result<StatusSnapshot, ApplianceError>;
    /// Sends a command; `Ok` carries the appliance's answer (never `Response::Error`: a refusal
    /// is `ClientError::Refused`).
    fn send(&mut self, request: &Request) -> Result<Response, ApplianceError>;
}

/// How long an action may take before the console reports it as timed out: the appliance
/// answers a command within its own 30 s limit, a failover included.
pub const ACTION_TIMEOUT: Duration = Duration::from_secs(60);

/// A client of an appliance's unix control socket that reconnects by itself. Status fetches and
/// actions use separate connections: a slow action never delays the next status, and status
/// keeps its short timeout while an action gets `ACTION_TIMEOUT`.
#[derive(Debug)]
pub struct SocketAppliance {
    pub path: PathBuf,
    /// How long one status exchange may take before the console calls the appliance
    /// unresponsive.
    pub timeout: Duration,
    status_connection: Option<Client>,
    action_connection: Option<Client>,
}

impl Clone for SocketAppliance {
    /// A clone has its own connections, opened on first use.
    fn clone(&self) -> Self {
        Self::new(self.path.clone(), self.timeout)
    }
}

impl SocketAppliance {
    pub fn new(path: impl Into<PathBuf>, timeout: Duration) -> Self {
        Self {
            path: path.into(),
            timeout,
            status_connection: None,
            action_connection: None,
        }
    }

    /// Runs one exchange. A kept connection may have been closed by the appliance in the
    /// meantime (restart, idle timeout), so a transport failure on a reused connection is
    /// retried once on a fresh one before it is reported. Only status is retried that way:
    /// an action is never sent twice.
    fn exchange<T>(
        &mut self,
        action: bool,
        mut call: impl FnMut(&mut Client) -> Result<T, ClientError>,
    ) -> Result<T, ApplianceError> {
        let reused = if action {
            self.action_connection.is_some()
        } else {
            self.status_connection.is_some()
        };
        match self.exchange_once(action, &mut call) {
            Err(error) if reused && !action && !matches!(error, ClientError::Refused { .. }) => {
                self.exchange_once(action, &mut call)
            }
            result => result,
        }
    }

    fn exchange_once<T>(
        &mut self,
        action: bool,
        call: &mut impl FnMut(&mut Client) -> Result<T, ClientError>,
    ) -> Result<T, ApplianceError> {
        let (slot, timeout) = if action {
            (&mut self.action_connection, ACTION_TIMEOUT)
        } else {
            (&mut self.status_connection, self.timeout)
        };
        let client = match slot {
            Some(client) => client,
            None => slot.insert(Client::connect_with_timeout(&self.path, timeout)?),
        };
        let result = call(client);
        if matches!(&result, Err(error) if !matches!(error, ClientError::Refused { .. })) {
            // The connection is in an unknown state (half a line read, timed out): drop it.
            *slot = None;
        }
        result
    }
}

impl Appliance for SocketAppliance {
    fn fetch_status(&mut self) -> Result<StatusSnapshot, ApplianceError> {
        self.exchange(false, Client::status)
    }

    fn send(&mut self, request: &Request) -> Result<Response, ApplianceError> {
        // An idle action connection may have been closed by the appliance since the last
        // action; unlike status, a failed action is not retried (it might have run), so open a
        // fresh connection for every action.
        self.action_connection = None;
        self.exchange(true, |client| match client.request(request)? {
            Response::Error { message } => Err(ClientError::Refused { message }),
            response => Ok(response),
        })
    }
}

/// Which appliance of a pair carries out a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Site {
    /// The appliance with the disks: capture, shipping, cuts of recovery points, verify.
    Source,
    /// The appliance with the replicas and the recovery-point catalog: failover and what
    /// follows it.
    Target,
}

/// Where a command goes: the source owns the disks and the journal (pause, bandwidth, cutting a
/// point, verify); the target owns the replicas and the catalog (listing points, failover,
/// cleanup, reprotect and failback, which the target drives over its link to the source).
pub fn route(request: &Request) -> Site {
    match request {
        Request::Status
        | Request::Pause { .. }
        | Request::Resume { .. }
        | Request::SetBandwidth { .. }
        | Request::CreateRecoveryPoint { .. }
        | Request::Verify { .. } => Site::Source,
        Request::ListRecoveryPoints { .. }
        | Request::Failover { .. }
        | Request::FailoverCleanup { .. }
        | Request::Reprotect { .. }
        | Request::Failback { .. } => Site::Target,
    }
}

/// One status out of a source's and a target's: the source's disks and link, the target's
/// replicas, and per group the source's settings with the target's recovery points, life-cycle
/// state and failover exports (the catalog lives on the target).
pub fn merge(source: StatusSnapshot, target: StatusSnapshot) -> StatusSnapshot {
    let mut merged = source;
    merged.appliance = format!("{} + {}", merged.appliance, target.appliance);
    merged.replicas = target.replicas;
    for target_group in target.groups {
        match merged
            .groups
            .iter_mut()
            .find(|group| group.name == target_group.name)
        {
            Some(group) => {
                if !target_group.recovery_points.is_empty() || group.recovery_points.is_empty() {
                    group.recovery_points = target_group.recovery_points;
                }
                if target_group.latest_point_age_seconds.is_some() {
                    group.latest_point_age_seconds = target_group.latest_point_age_seconds;
                }
                if target_group.state != GroupState::Protected {
                    group.state = target_group.state;
                }
                group.exports.extend(target_group.exports);
            }
            None => merged.groups.push(target_group),
        }
    }
    merged
}

/// A source and a target appliance shown as one: the demo's two appliances, or an operator's
/// two sites.
#[derive(Clone, Debug)]
pub struct SitePair<A> {
    pub source: A,
    pub target: A,
}

impl<A: Appliance> Appliance for SitePair<A> {
    fn fetch_status(&mut self) -> Result<StatusSnapshot, ApplianceError> {
        let source = self.source.fetch_status()?;
        let target = self.target.fetch_status()?;
        Ok(merge(source, target))
    }

    fn send(&mut self, request: &Request) -> Result<Response, ApplianceError> {
        match route(request) {
            Site::Source => self.source.send(request),
            Site::Target => self.target.send(request),
        }
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
    fn a_pair_merges_the_targets_catalog_and_routes_each_command() {
        use ferry_appliance::control::{DiskSelector, GroupState};
        let pair = crate::fixtures::site_pair();
        assert_eq!(pair.appliance, "source-a + target-b");
        assert_eq!(pair.disks.len(), 5, "the source's disks");
        assert_eq!(pair.replicas.len(), 5, "the target's replicas");
        let db = pair.groups.iter().find(|group| group.name == "db").unwrap();
        assert_eq!(db.recovery_points.len(), 6, "the target's catalog");
        assert_eq!(db.latest_point_age_seconds, Some(4.0));
        assert_eq!(db.rpo_threshold_seconds, 30.0, "the source's settings");
        let mut target = pair.clone();
        target.groups[0].state = GroupState::TestFailover;
        let merged = merge(crate::fixtures::healthy(), target);
        assert_eq!(merged.groups[0].state, GroupState::TestFailover);

        assert_eq!(
            route(&Request::CreateRecoveryPoint {
                group: "db".into(),
                app_consistent: false
            }),
            Site::Source
        );
        assert_eq!(
            route(&Request::Pause {
                selector: DiskSelector::default()
            }),
            Site::Source
        );
        assert_eq!(
            route(&Request::FailoverCleanup { group: "db".into() }),
            Site::Target
        );
        assert_eq!(
            route(&Request::ListRecoveryPoints { group: "db".into() }),
            Site::Target
        );
    }

    #[test]
    fn a_missing_socket_names_its_path() {
        let mut absent = SocketAppliance::new("/nonexistent/ferry.sock", Duration::from_secs(1));
        let error = absent.fetch_status().unwrap_err().to_string();
        assert!(error.contains("/nonexistent/ferry.sock"), "{error}");
    }
}
