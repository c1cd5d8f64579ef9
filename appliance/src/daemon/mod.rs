//! The appliance daemon: event loop, control socket, metrics, signals.
//!
//! [`Daemon::start`] builds a running appliance from a validated [`Config`]: it lays out the state
//! dir, opens the protected disks, binds the control socket (owner-only) and the optional
//! metrics listener, and spawns the event loop. The loop owns the mutable state and handles one
//! closed [`Event`] enum: control commands, the once-a-second tick, shutdown. Components report
//! their figures into the shared [`StatusModel`]; the control socket and `/metrics` read it.
//! [`run_until_signal`] is `ferry run`: start, wait for SIGTERM/SIGINT, shut down cleanly.

mod barrier;
pub mod client;
mod commands;
mod control_server;
pub mod layout;
pub mod metrics;
mod notify;
mod points;
mod reprotect;
pub mod running;
mod source;
pub mod status;
pub mod table;
mod target;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

pub use self::client::{Client, ClientError};
pub use self::layout::StateLayout;
pub use self::status::{DiskSample, DiskStats, StatusModel};
use crate::config::Config;
use crate::control::{Request, Response};

/// Commands queued for the event loop before senders wait.
const EVENT_QUEUE_CAPACITY: usize = 64;
/// How often rates are refreshed.
pub const TICK_INTERVAL: Duration = Duration::from_secs(1);
/// How often components' own counters are copied into the status model; RPO lag is
/// overestimated by at most this much.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(250);

/// Why the appliance could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("state dir {}: {operation} failed: {source}", path.display())]
    StateDir {
        path: PathBuf,
        operation: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket {}: {operation} failed: {source}", path.display())]
    ControlSocket {
        path: PathBuf,
        operation: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket {}: another appliance is running and answering on it", path.display())]
    AlreadyRunning { path: PathBuf },
    #[error("control socket {}: the path exists and is not a socket; refusing to replace it", path.display())]
    NotASocket { path: PathBuf },
    #[error("{component}: {message}")]
    Component {
        component: &'static str,
        message: String,
    },
    #[error("metrics listener {address}: bind failed: {source}")]
    Metrics {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// A protected disk cannot be opened; `key` is its config key path.
    #[error("disk {disk} ({key} = {}): {operation} failed: {source}", path.display())]
    Disk {
        disk: String,
        key: String,
        path: PathBuf,
        operation: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cache journal: {0}")]
    Journal(#[source] crate::io::mmap_journal::MmapJournalError),
    #[error("capture: {0}")]
    CaptureStart(#[source] crate::capture::CaptureError),
    #[error("capture: final flush failed: {0}")]
    CaptureFlush(#[source] crate::capture::CaptureIoError),
    #[error("signal handler: {0}")]
    Signal(#[source] std::io::Error),
    #[error("the event loop stopped unexpectedly: {0}")]
    EventLoop(String),
}

/// What the event loop reacts to. Closed on purpose: a new kind of input is a new variant and
/// one arm in the loop, never a callback registered from elsewhere.
pub(crate) enum Event {
    /// A control command other than `status` (which is served from the status model directly).
    Command {
        request: Request,
        reply: oneshot::Sender<Response>,
    },
}

/// A running appliance.
pub struct Daemon {
    status: Arc<StatusModel>,
    layout: StateLayout,
    control_socket: PathBuf,
    control_socket_identity: (u64, u64),
    metrics_address: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    event_loop: JoinHandle<Result<(), DaemonError>>,
    servers: Vec<JoinHandle<()>>,
}

impl Daemon {
    /// Starts an appliance. Returns once the control socket accepts connections; everything
    /// else runs on the current tokio runtime.
    pub async fn start(config: Config) -> Result<Self, DaemonError> {
        let config = Arc::new(config);
        let layout = StateLayout::new(&config.appliance.state_dir);
        layout.create()?;
        if let Some(target) = &config.target {
            layout::create_private_dir(&target.storage_dir)?;
        }
        let status = Arc::new(StatusModel::from_config(&config));
        if let Some(source) = &config.source {
            for (machine_index, machine) in source.machine.iter().enumerate() {
                for (disk_index, disk) in machine.disks.iter().enumerate() {
                    let key = format!("source.machine[{machine_index}].disks[{disk_index}].path");
                    let size_bytes = layout::probe_disk(&machine.name, disk, key)?;
                    if let Some(stats) = status.disk_by_id(disk.id) {
                        stats.set_size_bytes(size_bytes);
                    }
                }
            }
        }

        // The control socket first: it is what tells a second appliance on the same config that
        // one is already running.
        let bound = control_server::bind(config.control_socket())?;
        let control_socket = bound.path.clone();
        let control_socket_identity = bound.identity();
        let (shutdown, shutdown_receiver) = watch::channel(false);
        // Everything after the bind removes the socket again if it fails.
        let started = async {
            let metrics_listener = match config.appliance.metrics_listen {
                Some(address) => Some(
                    TcpListener::bind(address)
                        .await
                        .map_err(|source| DaemonError::Metrics { address, source })?,
                ),
                None => None,
            };
            let source_side = match &config.source {
                Some(source) => Some(
                    source::SourceSide::start(
                        &config.appliance.name,
                        source,
                        &layout,
                        &status,
                        shutdown_receiver.clone(),
                    )
                    .await?,
                ),
                None => None,
            };
            let target_side = match &config.target {
                Some(target) => Some(target::TargetSide::start(
                    target,
                    &layout,
                    shutdown_receiver.clone(),
                )?),
                None => None,
            };
            Ok::<_, DaemonError>((metrics_listener, source_side, target_side))
        }
        .await;
        let (metrics_listener, source_side, target_side) = match started {
            Ok(started) => started,
            Err(error) => {
                let _ = shutdown.send(true);
                control_server::BoundSocket::remove_file(&control_socket, control_socket_identity);
                return Err(error);
            }
        };
        let metrics_address = metrics_listener
            .as_ref()
            .and_then(|listener| listener.local_addr().ok());

        let (events, event_receiver) = mpsc::channel(EVENT_QUEUE_CAPACITY);
        let mut servers = vec![tokio::spawn(control_server::serve(
            bound.listener,
            status.clone(),
            events,
            shutdown_receiver.clone(),
        ))];
        if let Some(listener) = metrics_listener {
            servers.push(tokio::spawn(metrics::serve(
                listener,
                status.clone(),
                shutdown_receiver.clone(),
            )));
        }
        let event_loop = tokio::spawn(event_loop(
            config.clone(),
            status.clone(),
            source_side,
            target_side,
            event_receiver,
            shutdown_receiver,
        ));

        tracing::info!(
            appliance = %config.appliance.name,
            control_socket = %control_socket.display(),
            metrics = ?metrics_address,
            disks = status.disks().len(),
            source = config.source.is_some(),
            target = config.target.is_some(),
            "appliance started"
        );
        if let Some(source) = &config.source {
            if source.target_fingerprint.is_none() {
                tracing::warn!(
                    target_address = %source.target,
                    "source.target_fingerprint is not set: writes are journaled but nothing is shipped until the target is pinned"
                );
            }
        }
        Ok(Self {
            status,
            layout,
            control_socket,
            control_socket_identity,
            metrics_address,
            shutdown,
            event_loop,
            servers,
        })
    }

    /// The shared status model (components update it; snapshots read it).
    pub fn status(&self) -> &Arc<StatusModel> {
        &self.status
    }

    pub fn layout(&self) -> &StateLayout {
        &self.layout
    }

    pub fn control_socket(&self) -> &Path {
        &self.control_socket
    }

    /// The address the metrics listener actually bound (a configured port 0 is resolved).
    pub fn metrics_address(&self) -> Option<SocketAddr> {
        self.metrics_address
    }

    /// Resolves when the event loop stops on its own, which only a bug or a fatal component
    /// error does.
    pub async fn stopped(&mut self) -> DaemonError {
        match (&mut self.event_loop).await {
            Ok(Ok(())) => DaemonError::EventLoop("it returned".to_string()),
            Ok(Err(error)) => error,
            Err(error) => DaemonError::EventLoop(error.to_string()),
        }
    }

    /// Stops accepting commands, lets the event loop finish (flushing what it owns), stops the
    /// servers and removes the control socket.
    pub async fn shutdown(self) -> Result<(), DaemonError> {
        let _ = self.shutdown.send(true);
        let loop_result = self.event_loop.await;
        for server in self.servers {
            let _ = server.await;
        }
        control_server::BoundSocket::remove_file(
            &self.control_socket,
            self.control_socket_identity,
        );
        let result = loop_result.map_err(|error| DaemonError::EventLoop(error.to_string()))?;
        tracing::info!("appliance stopped");
        result
    }
}

async fn event_loop(
    config: Arc<Config>,
    status: Arc<StatusModel>,
    source: Option<source::SourceSide>,
    target: Option<target::TargetSide>,
    mut events: mpsc::Receiver<Event>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), DaemonError> {
    let mut sample = tokio::time::interval(SAMPLE_INTERVAL);
    sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut previous_sample = Instant::now();
    let mut last_tick = previous_sample;
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(Event::Command { request: Request::Verify { selector }, reply }) => {
                    start_verify(&status, source.as_ref(), &selector, reply);
                }
                Some(Event::Command { request: request @ (Request::Failover { .. } | Request::FailoverCleanup { .. }), reply }) if target.is_some() => {
                    if let Some(target) = &target {
                        target.failover_command(request, reply);
                    }
                }
                Some(Event::Command { request: Request::Reprotect { group }, reply }) if target.is_some() => {
                    if let Some(target) = &target {
                        target.reprotect_command(group, false, reply);
                    }
                }
                Some(Event::Command { request: Request::Failback { group }, reply }) if target.is_some() => {
                    if let Some(target) = &target {
                        target.reprotect_command(group, true, reply);
                    }
                }
                Some(Event::Command { request, reply })
                    if source_answers_points(source.as_ref(), target.is_some(), &request) =>
                {
                    if let Some(source) = &source {
                        source.recovery_point_command(request, reply);
                    }
                }
                Some(Event::Command { request, reply }) => {
                    // A target answers for the groups its recovery-point catalog knows.
                    let from_target = match (&request, &target) {
                        (Request::ListRecoveryPoints { group }, Some(target)) => {
                            Some(target.list_recovery_points(group))
                        }
                        _ => None,
                    };
                    let response = from_target
                        .unwrap_or_else(|| commands::dispatch(&config, &status, request));
                    let _ = reply.send(response);
                }
                None => break,
            },
            _ = sample.tick() => {
                let now = Instant::now();
                if let Some(source) = &source {
                    source.sample(&status, previous_sample);
                }
                if let Some(target) = &target {
                    target.sample(&status);
                }
                previous_sample = now;
                if now.saturating_duration_since(last_tick) >= TICK_INTERVAL {
                    status.tick(now);
                    last_tick = now;
                }
            }
            _ = shutdown.changed() => break,
        }
    }
    // Capture finishes its in-flight requests and makes the journal and the disks durable
    // before the process exits.
    if let Some(target) = target {
        target.stop().await;
    }
    if let Some(source) = source {
        source.stop().await?;
    }
    Ok(())
}

/// Recovery-point commands of a source's own groups are answered by the source (it cuts them
/// and logs what it cut); other groups' by the target's catalog when this appliance is one.
fn source_answers_points(
    source: Option<&source::SourceSide>,
    has_target: bool,
    request: &Request,
) -> bool {
    let group = match request {
        Request::CreateRecoveryPoint { group, .. } | Request::ListRecoveryPoints { group } => group,
        _ => return false,
    };
    source.is_some_and(|source| source.has_group(group) || !has_target)
}

/// Verify drains and reads whole disks: it runs beside the event loop and answers when done.
fn start_verify(
    status: &Arc<StatusModel>,
    source: Option<&source::SourceSide>,
    selector: &crate::control::DiskSelector,
    reply: oneshot::Sender<Response>,
) {
    let answer = commands::select(status, selector).and_then(|disks| {
        let disk_ids = disks.iter().map(|disk| disk.id).collect();
        source
            .ok_or_else(|| {
                "verify runs on a source appliance; this one has no [source]".to_string()
            })?
            .verify(disk_ids)
    });
    let answer = match answer {
        Ok(answer) => answer,
        Err(message) => {
            let _ = reply.send(Response::Error { message });
            return;
        }
    };
    let status = status.clone();
    tokio::spawn(async move {
        let response = match answer.await {
            Ok(Ok(results)) => Response::Verify {
                disks: results
                    .into_iter()
                    .filter_map(|result| {
                        let disk = status.disk_by_id(result.disk_id)?;
                        Some(crate::control::VerifyDisk {
                            machine: disk.machine.clone(),
                            name: disk.name.clone(),
                            identical: result.extents_differing == 0,
                            extents_compared: result.extents_compared,
                            extents_differing: result.extents_differing,
                            bytes_compared: result.bytes_compared,
                        })
                    })
                    .collect(),
            },
            Ok(Err(message)) => Response::Error { message },
            Err(_) => Response::Error {
                message: "the shipper stopped during verify".to_string(),
            },
        };
        let _ = reply.send(response);
    });
}

/// `ferry run`: starts the appliance, tells systemd it is ready, and runs until SIGTERM or
/// SIGINT, then shuts down cleanly.
pub async fn run_until_signal(config: Config) -> Result<(), DaemonError> {
    use tokio::signal::unix::{signal, SignalKind};
    // Handlers go in before anything starts, so a signal during start-up is not fatal mid-way.
    let mut terminate = signal(SignalKind::terminate()).map_err(DaemonError::Signal)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(DaemonError::Signal)?;
    let mut daemon = Daemon::start(config).await?;
    notify::notify("READY=1");
    let failure = tokio::select! {
        _ = terminate.recv() => { tracing::info!("SIGTERM: shutting down"); None }
        _ = interrupt.recv() => { tracing::info!("SIGINT: shutting down"); None }
        error = daemon.stopped() => Some(error),
    };
    notify::notify("STOPPING=1");
    if let Some(error) = failure {
        control_server::BoundSocket::remove_file(
            &daemon.control_socket,
            daemon.control_socket_identity,
        );
        return Err(error);
    }
    daemon.shutdown().await
}

#[cfg(test)]
mod tests;
