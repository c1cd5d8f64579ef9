//! The recovery-point barrier between the source appliances of one consistency group, over QUIC
//! with mutual TLS (the transport of `io::transport`: each side pins the other's fingerprint).
//!
//! The group's coordinator dials every member; members listen on `barrier_listen` (default
//! port 20004). One round, for point `id`:
//! 1. the coordinator makes sure it is connected to every member (an unreachable member fails
//!    the point before any gate closes), closes its own gate and sends `Prepare(id)`;
//! 2. each member (after its freeze hook for an app-consistent point) closes its gate and
//!    answers `Closed`;
//! 3. once every member is closed, the coordinator appends its marker, opens its gate and sends
//!    `Cut(id)`; each member still closed appends its marker, opens its gate and answers `Done`
//!    with the marker's sequence.
//!
//! Why this is consistent: a write acknowledged before another was issued on another appliance
//! is ordered before it; every gate was closed at one common instant (when the coordinator had
//! all `Closed`), and each marker was appended while its gate was still closed since before that
//! instant, so no marker can hold a write whose predecessor on another appliance came after
//! that appliance's marker.
//!
//! Production never stalls: the coordinator aborts the round when a member does not answer
//! `Closed` within [`BARRIER_TIMEOUT`], and a member opens its gate on its own when `Cut` has
//! not come [`BARRIER_TIMEOUT`] after it closed; it then appends no marker, so the point lacks
//! that member's marker and stays incomplete (unusable) at the target.
//!
//! (ISSUE5.md sketched Prepare → members append → Cut → Release; appending only on `Cut`
//! keeps a member that released on its own from leaving a marker that looks complete.)

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::points::{self, Barrier, CutError, CutPoint, Cutter, GroupCutter, PendingPoint};
use crate::config::SourceConfig;
use crate::core::record::Seq;
use crate::core::recovery::PointKind;
use crate::io::transport::{
    Identity, Peer, PeerConnection, SourceDialer, TargetEndpoint, TransportError, Tuning,
};

/// How long a gate stays closed waiting for the other side: the coordinator for every member's
/// `Closed`, a member for `Cut`.
pub const BARRIER_TIMEOUT: Duration = Duration::from_secs(2);

/// Largest barrier message accepted (they are a few hundred bytes of JSON).
const MESSAGE_BYTES_MAX: usize = 16 << 10;

/// The messages of a round, as JSON frames on the connection's control stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
enum Message {
    Prepare {
        point: PendingPoint,
    },
    Closed {
        group: String,
        point_id: u64,
    },
    /// The member cannot take part (unknown group, not the coordinator, freeze hook failed).
    Refused {
        group: String,
        point_id: u64,
        message: String,
    },
    Cut {
        group: String,
        point_id: u64,
    },
    /// `seq`: the member's marker; `None` with `message` when it appended none.
    Done {
        group: String,
        point_id: u64,
        seq: Option<Seq>,
        #[serde(default)]
        message: Option<String>,
    },
    Abort {
        group: String,
        point_id: u64,
    },
}

impl Message {
    fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).expect("barrier messages serialize"))
    }

    fn decode(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() > MESSAGE_BYTES_MAX {
            return Err(format!("message of {} bytes is too large", bytes.len()));
        }
        serde_json::from_slice(bytes).map_err(|error| format!("undecodable message: {error}"))
    }

    /// The round the message belongs to.
    fn round(&self) -> (&str, u64) {
        match self {
            Message::Prepare { point } => (&point.group, point.id),
            Message::Closed { group, point_id }
            | Message::Refused {
                group, point_id, ..
            }
            | Message::Cut { group, point_id }
            | Message::Done {
                group, point_id, ..
            }
            | Message::Abort { group, point_id } => (group, *point_id),
        }
    }
}

fn tuning() -> Tuning {
    Tuning {
        // Barrier messages are tiny: small socket buffers, and a handshake that fits a round.
        socket_buffer_bytes: 256 << 10,
        handshake_timeout: BARRIER_TIMEOUT,
        frame_bytes_max: MESSAGE_BYTES_MAX,
        ..Tuning::default()
    }
}

/// One member as the coordinator reaches it.
struct MemberLink {
    name: String,
    dialer: SourceDialer,
    connection: tokio::sync::Mutex<Option<PeerConnection>>,
}

impl MemberLink {
    /// Dials the member unless a live connection exists (bounded by `deadline`). Done before
    /// the gate closes, so an unreachable member never holds writes up.
    async fn connect(&self, deadline: Instant) -> Result<(), String> {
        let mut connection = self.connection.lock().await;
        if connection
            .as_ref()
            .is_none_or(|live| live.handle.close_reason().is_some())
        {
            let dialed = tokio::time::timeout_at(deadline, self.dialer.connect_once())
                .await
                .map_err(|_| format!("not reachable within {BARRIER_TIMEOUT:?}"))?
                .map_err(|error| error.to_string())?;
            *connection = Some(dialed);
        }
        Ok(())
    }

    /// Sends a message, dialing first when there is no live connection (bounded by `deadline`).
    async fn send(&self, message: &Message, deadline: Instant) -> Result<(), String> {
        let mut connection = self.connection.lock().await;
        for attempt in 0..2 {
            if connection
                .as_ref()
                .is_none_or(|live| live.handle.close_reason().is_some())
            {
                let dialed = tokio::time::timeout_at(deadline, self.dialer.connect_once())
                    .await
                    .map_err(|_| "no connection before the barrier timeout".to_string())?
                    .map_err(|error| error.to_string())?;
                *connection = Some(dialed);
            }
            let live = connection.as_mut().expect("connected above");
            match live.control.sender.send(message.encode()).await {
                Ok(()) => return Ok(()),
                Err(error) if attempt == 0 => {
                    tracing::debug!(member = %self.name, %error, "barrier connection broken; dialing again");
                    *connection = None;
                }
                Err(error) => return Err(error.to_string()),
            }
        }
        Err("connection lost".to_string())
    }

    /// The next message of round (`group`, `point_id`), skipping late answers of older rounds.
    async fn receive(
        &self,
        group: &str,
        point_id: u64,
        deadline: Instant,
    ) -> Result<Message, String> {
        let mut connection = self.connection.lock().await;
        let Some(live) = connection.as_mut() else {
            return Err("not connected".to_string());
        };
        loop {
            let frame = tokio::time::timeout_at(deadline, live.control.receiver.recv()).await;
            let frame = match frame {
                Err(_) => return Err(format!("no answer within {BARRIER_TIMEOUT:?}")),
                Ok(Err(error)) => {
                    *connection = None;
                    return Err(error.to_string());
                }
                Ok(Ok(None)) => {
                    *connection = None;
                    return Err("the member closed the connection".to_string());
                }
                Ok(Ok(Some(frame))) => frame,
            };
            let message = Message::decode(&frame)?;
            if message.round() == (group, point_id) {
                return Ok(message);
            }
        }
    }
}

/// The coordinator's side: one link per (group, member).
pub(crate) struct Coordinator {
    links: BTreeMap<String, Vec<MemberLink>>,
}

impl Coordinator {
    async fn round(
        &self,
        cutter: &Cutter,
        group: &GroupCutter,
        point: PendingPoint,
    ) -> Result<CutPoint, CutError> {
        let barrier_error = |message: String| CutError::Barrier {
            group: point.group.clone(),
            message,
        };
        let links = self
            .links
            .get(&point.group)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let connect_deadline = Instant::now() + BARRIER_TIMEOUT;
        let mut unreachable = Vec::new();
        for link in links {
            if let Err(error) = link.connect(connect_deadline).await {
                unreachable.push(format!("{}: {error}", link.name));
            }
        }
        if !unreachable.is_empty() {
            return Err(barrier_error(format!(
                "point {} not cut (no gate was closed): {}",
                point.id,
                unreachable.join("; ")
            )));
        }
        let closed = group.gate.close().await;
        let hooks = if point.kind == PointKind::App {
            points::HOOK_TIMEOUT
        } else {
            Duration::ZERO
        };
        let deadline = Instant::now() + BARRIER_TIMEOUT + hooks;
        let (group_name, point_id) = (point.group.clone(), point.id);
        let prepare = Message::Prepare {
            point: point.clone(),
        };
        let mut failures = Vec::new();
        for link in links {
            if let Err(error) = link.send(&prepare, deadline).await {
                failures.push(format!("{}: {error}", link.name));
            }
        }
        if failures.is_empty() {
            for link in links {
                match link.receive(&group_name, point_id, deadline).await {
                    Ok(Message::Closed { .. }) => {}
                    Ok(Message::Refused { message, .. }) => {
                        failures.push(format!("{} refused: {message}", link.name))
                    }
                    Ok(other) => failures.push(format!("{} answered {other:?}", link.name)),
                    Err(error) => failures.push(format!("{}: {error}", link.name)),
                }
            }
        }
        if !failures.is_empty() {
            drop(closed);
            let abort = Message::Abort {
                group: group_name.clone(),
                point_id,
            };
            let abort_deadline = Instant::now() + BARRIER_TIMEOUT;
            for link in links {
                let _ = link.send(&abort, abort_deadline).await;
            }
            return Err(barrier_error(format!(
                "point {point_id} not cut, gates released: {}",
                failures.join("; ")
            )));
        }
        // Every gate is closed now: the common instant of the point.
        let cut = cutter.cut_closed(group, &point);
        let held = closed.open();
        let mut cut = match cut {
            Ok(mut cut) => {
                cut.gate_held_us = held.as_micros() as u64;
                cut
            }
            Err(error) => {
                let abort = Message::Abort {
                    group: group_name.clone(),
                    point_id,
                };
                for link in links {
                    let _ = link.send(&abort, deadline).await;
                }
                return Err(error);
            }
        };
        let cut_message = Message::Cut {
            group: group_name.clone(),
            point_id,
        };
        let done_deadline = Instant::now() + BARRIER_TIMEOUT;
        let mut missing = Vec::new();
        for link in links {
            if let Err(error) = link.send(&cut_message, done_deadline).await {
                missing.push(format!("{}: {error}", link.name));
            }
        }
        for link in links {
            if missing
                .iter()
                .any(|entry| entry.starts_with(&format!("{}:", link.name)))
            {
                continue;
            }
            match link.receive(&group_name, point_id, done_deadline).await {
                Ok(Message::Done { seq: Some(_), .. }) => {}
                Ok(Message::Done { message, .. }) => missing.push(format!(
                    "{}: {}",
                    link.name,
                    message.unwrap_or_else(|| "appended no marker".to_string())
                )),
                Ok(other) => missing.push(format!("{} answered {other:?}", link.name)),
                Err(error) => missing.push(format!("{}: {error}", link.name)),
            }
        }
        if !missing.is_empty() {
            let reason = format!("incomplete: {}", missing.join("; "));
            tracing::warn!(group = %group_name, point = point_id, "barrier point {reason}");
            cut.incomplete = Some(reason);
        }
        Ok(cut)
    }
}

impl Barrier for Coordinator {
    fn cut<'a>(
        &'a self,
        cutter: &'a Cutter,
        group: &'a GroupCutter,
        point: PendingPoint,
    ) -> Pin<Box<dyn std::future::Future<Output = Result<CutPoint, CutError>> + Send + 'a>> {
        Box::pin(self.round(cutter, group, point))
    }
}

/// Why the barrier could not start (the daemon names the key).
#[derive(Debug, thiserror::Error)]
pub enum BarrierError {
    #[error("{key} {address}: {message}")]
    Address {
        key: String,
        address: String,
        message: String,
    },
    #[error("{key}: {source}")]
    Transport {
        key: String,
        #[source]
        source: Box<TransportError>,
    },
}

/// Starts the barrier of every group with members: the coordinator's links (installed in the
/// cutter) and the listeners of the groups another appliance coordinates.
pub(crate) fn start(
    cutter: &Arc<Cutter>,
    source: &SourceConfig,
    identity: &Identity,
    shutdown: watch::Receiver<bool>,
) -> Result<Vec<JoinHandle<()>>, BarrierError> {
    let own = cutter.appliance().to_string();
    let mut links: BTreeMap<String, Vec<MemberLink>> = BTreeMap::new();
    // barrier_listen → (key, peers allowed to connect)
    let mut listeners: BTreeMap<SocketAddr, (String, Vec<Peer>)> = BTreeMap::new();
    for (index, group) in source.group.iter().enumerate() {
        if group.members.is_empty() {
            continue;
        }
        let coordinator = group.coordinator.clone().unwrap_or_else(|| own.clone());
        if coordinator == own {
            let mut group_links = Vec::new();
            for (number, member) in group.members.iter().enumerate() {
                let key = format!("source.group[{index}].members[{number}].address");
                let address = member
                    .address
                    .to_socket_addrs()
                    .map_err(|error| BarrierError::Address {
                        key: key.clone(),
                        address: member.address.clone(),
                        message: error.to_string(),
                    })?
                    .next()
                    .ok_or_else(|| BarrierError::Address {
                        key: key.clone(),
                        address: member.address.clone(),
                        message: "resolves to no address".to_string(),
                    })?;
                let dialer =
                    SourceDialer::new(address, identity, member.fingerprint, &tuning(), None)
                        .map_err(|source| BarrierError::Transport {
                            key,
                            source: Box::new(source),
                        })?;
                group_links.push(MemberLink {
                    name: member.name.clone(),
                    dialer,
                    connection: tokio::sync::Mutex::new(None),
                });
            }
            links.insert(group.name.clone(), group_links);
        } else if let Some(listen) = group.barrier_listen {
            let Some(member) = group.members.iter().find(|m| m.name == coordinator) else {
                continue;
            };
            let entry = listeners
                .entry(listen)
                .or_insert_with(|| (format!("source.group[{index}].barrier_listen"), Vec::new()));
            if !entry.1.iter().any(|peer| peer.name == member.name) {
                entry.1.push(Peer {
                    name: member.name.clone(),
                    fingerprint: member.fingerprint,
                });
            }
        }
    }
    if !links.is_empty() {
        cutter.set_barrier(Arc::new(Coordinator { links }));
    }
    let mut tasks = Vec::new();
    for (listen, (key, peers)) in listeners {
        let endpoint =
            TargetEndpoint::bind(listen, identity, peers, &tuning()).map_err(|source| {
                BarrierError::Transport {
                    key,
                    source: Box::new(source),
                }
            })?;
        tracing::info!(address = %endpoint.local_address(), "recovery-point barrier listening");
        tasks.push(tokio::spawn(serve(
            endpoint,
            cutter.clone(),
            shutdown.clone(),
        )));
    }
    Ok(tasks)
}

/// A member's listener: one task per coordinator connection.
async fn serve(
    mut endpoint: TargetEndpoint,
    cutter: Arc<Cutter>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut sessions = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            connection = endpoint.accept() => match connection {
                Some(connection) => {
                    sessions.spawn(member_session(connection, cutter.clone(), shutdown.clone()));
                }
                None => break,
            },
            _ = shutdown.changed() => break,
        }
    }
    sessions.shutdown().await;
    endpoint.close().await;
}

/// Answers one coordinator's rounds, one at a time.
async fn member_session(
    mut connection: PeerConnection,
    cutter: Arc<Cutter>,
    mut shutdown: watch::Receiver<bool>,
) {
    let coordinator = connection.peer_name.clone();
    loop {
        let frame = tokio::select! {
            frame = connection.control.receiver.recv() => frame,
            _ = shutdown.changed() => return,
        };
        let message = match frame {
            Ok(Some(frame)) => match Message::decode(&frame) {
                Ok(message) => message,
                Err(error) => {
                    tracing::warn!(%coordinator, "barrier: {error}");
                    return;
                }
            },
            Ok(None) => return,
            Err(error) => {
                tracing::debug!(%coordinator, %error, "barrier connection ended");
                return;
            }
        };
        let answer = match message {
            Message::Prepare { point } => {
                member_round(&mut connection, &cutter, &coordinator, point).await
            }
            Message::Cut { group, point_id } => Some(Message::Done {
                group,
                point_id,
                seq: None,
                message: Some("its gate was already released (no Prepare pending)".to_string()),
            }),
            _ => None,
        };
        if let Some(answer) = answer {
            if let Err(error) = connection.control.sender.send(answer.encode()).await {
                tracing::debug!(%coordinator, %error, "barrier answer not sent");
                return;
            }
        }
    }
}

/// One round on a member: close, answer `Closed`, wait for `Cut` (append, open) or `Abort` or
/// the timeout (open without a marker). Returns the final answer to send.
async fn member_round(
    connection: &mut PeerConnection,
    cutter: &Cutter,
    coordinator: &str,
    point: PendingPoint,
) -> Option<Message> {
    let (group_name, point_id) = (point.group.clone(), point.id);
    let refused = |message: String| {
        Some(Message::Refused {
            group: group_name.clone(),
            point_id,
            message,
        })
    };
    let group = match cutter.group(&point.group) {
        Ok(group) => group,
        Err(error) => return refused(error.to_string()),
    };
    if group.coordinator != coordinator {
        return refused(format!(
            "{coordinator} is not the coordinator of group {:?} here ({} is)",
            point.group, group.coordinator
        ));
    }
    let app = point.kind == PointKind::App;
    if app {
        if let Some(freeze) = &group.config.freeze_hook {
            if let Err(error) = points::run_hook("freeze_hook", &point.group, freeze).await {
                thaw(group).await;
                return refused(error.to_string());
            }
        }
    }
    let closed = group.gate.close().await;
    let answer = Message::Closed {
        group: group_name.clone(),
        point_id,
    };
    if let Err(error) = connection.control.sender.send(answer.encode()).await {
        drop(closed);
        if app {
            thaw(group).await;
        }
        tracing::warn!(group = %group_name, point = point_id, %error, "barrier: coordinator gone; gate released");
        return None;
    }
    let released_at = Instant::now() + BARRIER_TIMEOUT;
    let outcome = loop {
        let frame = tokio::time::timeout_at(released_at, connection.control.receiver.recv()).await;
        let message = match frame {
            Err(_) => break None,
            Ok(Ok(Some(frame))) => match Message::decode(&frame) {
                Ok(message) => message,
                Err(_) => break None,
            },
            Ok(_) => break None,
        };
        match message {
            Message::Cut {
                group,
                point_id: id,
            } if group == group_name && id == point_id => break Some(true),
            Message::Abort {
                group,
                point_id: id,
            } if group == group_name && id == point_id => break Some(false),
            _ => continue,
        }
    };
    let answer = match outcome {
        Some(true) => {
            let cut = cutter.cut_closed(group, &point);
            let held = closed.open();
            match cut {
                Ok(mut cut) => {
                    cut.gate_held_us = held.as_micros() as u64;
                    match cutter.finish(group, cut).await {
                        Ok(cut) => Some(Message::Done {
                            group: group_name.clone(),
                            point_id,
                            seq: Some(cut.seq),
                            message: None,
                        }),
                        Err(error) => Some(Message::Done {
                            group: group_name.clone(),
                            point_id,
                            seq: None,
                            message: Some(error.to_string()),
                        }),
                    }
                }
                Err(error) => Some(Message::Done {
                    group: group_name.clone(),
                    point_id,
                    seq: None,
                    message: Some(error.to_string()),
                }),
            }
        }
        Some(false) => {
            drop(closed);
            None
        }
        None => {
            drop(closed);
            tracing::warn!(
                group = %group_name,
                point = point_id,
                "barrier: no Cut within {BARRIER_TIMEOUT:?}; gate released without a marker (the point stays incomplete)"
            );
            None
        }
    };
    if app {
        thaw(group).await;
    }
    answer
}

async fn thaw(group: &GroupCutter) {
    if let Some(thaw) = &group.config.thaw_hook {
        if let Err(error) = points::run_hook("thaw_hook", &group.config.name, thaw).await {
            tracing::error!(group = %group.config.name, "{error}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::DiskState;
    use crate::core::record::RecordKind;
    use crate::daemon::points::tests::{rig_named, write};

    /// Member "b" listening on loopback, and a raw connection of coordinator "a" to it.
    async fn member_and_coordinator() -> (
        crate::daemon::points::tests::Rig,
        PeerConnection,
        watch::Sender<bool>,
        tempfile::TempDir,
    ) {
        let keys = tempfile::tempdir().unwrap();
        let identity_a = Identity::load_or_create(&keys.path().join("a")).unwrap();
        let identity_b = Identity::load_or_create(&keys.path().join("b")).unwrap();
        let rig = rig_named(
            "b",
            &format!(
                "members = [{{ name = \"a\", address = \"127.0.0.1:9\", fingerprint = \"{}\" }}]",
                identity_a.fingerprint
            ),
            DiskState::Protected,
        );
        let endpoint = TargetEndpoint::bind(
            "127.0.0.1:0".parse().unwrap(),
            &identity_b,
            vec![Peer {
                name: "a".into(),
                fingerprint: identity_a.fingerprint,
            }],
            &tuning(),
        )
        .unwrap();
        let address = endpoint.local_address();
        let (shutdown, shutdown_receiver) = watch::channel(false);
        tokio::spawn(serve(endpoint, rig.cutter.clone(), shutdown_receiver));
        let dialer = SourceDialer::new(
            address,
            &identity_a,
            identity_b.fingerprint,
            &tuning(),
            None,
        )
        .unwrap();
        let connection = dialer.connect_once().await.unwrap();
        (rig, connection, shutdown, keys)
    }

    async fn send(connection: &mut PeerConnection, message: Message) {
        connection
            .control
            .sender
            .send(message.encode())
            .await
            .unwrap();
    }

    async fn receive(connection: &mut PeerConnection) -> Message {
        let frame =
            tokio::time::timeout(Duration::from_secs(10), connection.control.receiver.recv())
                .await
                .expect("an answer within 10 s")
                .unwrap()
                .unwrap();
        Message::decode(&frame).unwrap()
    }

    fn prepare(id: u64) -> Message {
        Message::Prepare {
            point: PendingPoint {
                group: "g".into(),
                id,
                time_unix_ms: id,
                kind: PointKind::Crash,
                members: vec!["a".into(), "b".into()],
            },
        }
    }

    fn markers(rig: &crate::daemon::points::tests::Rig) -> usize {
        let journal = rig.journal.lock();
        journal
            .iter_from(journal.first_seq().max(1))
            .filter(|record| {
                record
                    .as_ref()
                    .is_ok_and(|record| record.kind == RecordKind::Marker)
            })
            .count()
    }

    #[tokio::test]
    async fn a_member_cuts_on_cut_and_releases_on_its_own_without_one() {
        let (rig, mut connection, _shutdown, _keys) = member_and_coordinator().await;

        // A full round: Closed, then the marker on Cut.
        send(&mut connection, prepare(100)).await;
        assert_eq!(
            receive(&mut connection).await,
            Message::Closed {
                group: "g".into(),
                point_id: 100
            }
        );
        send(
            &mut connection,
            Message::Cut {
                group: "g".into(),
                point_id: 100,
            },
        )
        .await;
        let Message::Done { seq: Some(seq), .. } = receive(&mut connection).await else {
            panic!("Done with a sequence expected");
        };
        assert_eq!(
            rig.journal.lock().record(seq).unwrap().kind,
            RecordKind::Marker
        );
        assert!(rig.journal.durable_seq() >= seq);

        // No Cut: writes wait while the gate is closed, then go on within the timeout; no
        // marker is appended, and a late Cut is answered without one.
        send(&mut connection, prepare(200)).await;
        assert!(matches!(
            receive(&mut connection).await,
            Message::Closed { .. }
        ));
        let before = rig.journal.last_seq();
        let started = Instant::now();
        let disk = rig.disk.clone();
        let pending = tokio::spawn(async move { write(&disk, 0, 3).await });
        tokio::time::timeout(Duration::from_secs(10), pending)
            .await
            .expect("the member releases its gate on its own")
            .unwrap();
        let waited = started.elapsed();
        assert!(
            waited >= BARRIER_TIMEOUT - Duration::from_millis(500),
            "the write waited {waited:?}"
        );
        assert_eq!(
            rig.journal.last_seq(),
            before + 1,
            "only the write, no marker"
        );
        send(
            &mut connection,
            Message::Cut {
                group: "g".into(),
                point_id: 200,
            },
        )
        .await;
        assert!(matches!(
            receive(&mut connection).await,
            Message::Done { seq: None, .. }
        ));
        assert_eq!(markers(&rig), 1);

        // Abort: released at once, no marker.
        send(&mut connection, prepare(300)).await;
        assert!(matches!(
            receive(&mut connection).await,
            Message::Closed { .. }
        ));
        send(
            &mut connection,
            Message::Abort {
                group: "g".into(),
                point_id: 300,
            },
        )
        .await;
        let disk = rig.disk.clone();
        let started = Instant::now();
        tokio::time::timeout(Duration::from_secs(10), write(&disk, 4096, 4))
            .await
            .unwrap();
        assert!(
            started.elapsed() < BARRIER_TIMEOUT,
            "{:?}",
            started.elapsed()
        );
        assert_eq!(markers(&rig), 1);
        let listed = rig.cutter.list("g").unwrap();
        assert_eq!(listed.iter().map(|p| p.id).collect::<Vec<_>>(), vec![100]);
    }

    #[tokio::test]
    async fn a_member_refuses_unknown_groups() {
        let (rig, mut connection, _shutdown, _keys) = member_and_coordinator().await;
        let point = PendingPoint {
            group: "other".into(),
            id: 5,
            time_unix_ms: 5,
            kind: PointKind::Crash,
            members: vec!["a".into(), "b".into()],
        };
        send(&mut connection, Message::Prepare { point }).await;
        let Message::Refused { message, .. } = receive(&mut connection).await else {
            panic!("Refused expected");
        };
        assert!(message.contains("other"), "{message}");
        assert_eq!(markers(&rig), 0);
    }
}
