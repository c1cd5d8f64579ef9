//! The target's end of the control plane to its sources (`core::peer`): which source is
//! connected and which groups it protects, requests to a source (planned failover, failback)
//! with their answers, and the set of groups failed over here, which every connecting source is
//! told so that it fences their disks (an unplanned failover happens while the source is gone).
//!
//! Reprotect: the failover registers each failed-over disk of a group as a [`ReprotectDisk`]
//! ([`PeerControl::serve_reprotect`]); the source then pulls from them over its connection
//! (extent hashes, extent bytes, the blocks written since its last round).
//!
//! One [`PeerControl`] per target appliance, shared by the apply sessions (each attaches its
//! connection's control stream with [`PeerControl::attach`]) and the failover commands.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::core::peer::{
    coarsen_ranges, PeerMessage, PeerOutcome, PeerRequest, EXTENT_BYTES_MAX, HASH_EXTENTS_MAX,
};
use crate::core::wire::{self, Frame, Message};
use crate::io::transport::FrameReceiver;

/// Why a request to a source got no answer.
#[derive(Debug, thiserror::Error)]
pub enum PeerRequestError {
    #[error("source {source_name} is not connected to this target")]
    NotConnected { source_name: String },
    #[error("source {source_name} did not answer within {timeout:?}")]
    Timeout {
        source_name: String,
        timeout: Duration,
    },
    #[error("the connection to source {source_name} ended before it answered")]
    Disconnected { source_name: String },
    #[error("request to source {source_name} cannot be encoded: {message}")]
    Encode {
        source_name: String,
        message: String,
    },
}

/// A failed-over disk as reprotect reads it (implemented by the failover's disks: their view
/// of the point with the overlay of the failed-over machine's writes on top).
pub trait ReprotectDisk: Send + Sync {
    fn size_bytes(&self) -> u64;
    /// Reads `length` bytes at `offset` (inside the disk).
    fn read_at(&self, offset: u64, length: u64) -> ReadFuture<'_>;
    /// The ranges `(offset, length)` written since the previous call, sorted.
    fn take_dirty(&self) -> DirtyFuture<'_>;
}

/// What [`ReprotectDisk::take_dirty`] returns.
pub type DirtyFuture<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = std::io::Result<Vec<(u64, u64)>>> + Send + 'a>,
>;

/// What [`ReprotectDisk::read_at`] returns.
pub type ReadFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<Vec<u8>>> + Send + 'a>>;

/// A reprotect's totals as the source reports them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReprotectTotals {
    pub extents_compared: u64,
    pub bytes_copied: u64,
    pub rounds: u64,
}

/// The failed-over disks of a group, by (source, machine, disk).
pub type ReprotectDisks = BTreeMap<(String, String, String), Arc<dyn ReprotectDisk>>;

/// The final point a source cut for a planned failover.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedPoint {
    pub source: String,
    pub point_id: u64,
    pub marker_seq: u64,
}

/// Why a planned failover (or failback's hand-over) cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum PlannedFailoverError {
    #[error("no source appliance of group {group:?} is connected to this target: use an unplanned failover (ferry failover --group {group} without --planned)")]
    NotConnected { group: String },
    #[error("group {group:?} spans several source appliances ({sources}): a planned failover supports one source per group; use an unplanned failover")]
    SeveralSources { group: String, sources: String },
    #[error("source {source_name}: {message}")]
    Source {
        source_name: String,
        message: String,
    },
    #[error(transparent)]
    Request(PeerRequestError),
}

/// The control plane of a target appliance.
#[derive(Default)]
pub struct PeerControl {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    links: BTreeMap<String, Link>,
    failed_over: BTreeSet<String>,
    /// Groups whose failed-over disks sources may pull.
    reprotect: BTreeMap<String, ReprotectDisks>,
    next_id: u64,
    next_generation: u64,
}

struct Link {
    generation: u64,
    outgoing: mpsc::UnboundedSender<Frame>,
    pending: BTreeMap<u64, oneshot::Sender<PeerOutcome>>,
    /// Groups of the disks the source announced on this connection.
    groups: BTreeSet<String>,
}

impl PeerControl {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records whether `group` is failed over here (its copy at the target is production) and
    /// tells every connected source the new set.
    pub fn set_failed_over(&self, group: &str, failed_over: bool) {
        let mut inner = self.lock();
        let changed = if failed_over {
            inner.failed_over.insert(group.to_string())
        } else {
            inner.failed_over.remove(group)
        };
        if changed {
            let Some(frame) = failed_over_frame(&inner.failed_over) else {
                return;
            };
            for link in inner.links.values() {
                let _ = link.outgoing.send(frame.clone());
            }
        }
    }

    /// Groups failed over here, sorted.
    pub fn failed_over_groups(&self) -> Vec<String> {
        self.lock().failed_over.iter().cloned().collect()
    }

    /// The connected sources that protect disks of `group`, sorted.
    pub fn sources_of_group(&self, group: &str) -> Vec<String> {
        self.lock()
            .links
            .iter()
            .filter(|(_, link)| link.groups.contains(group))
            .map(|(source, _)| source.clone())
            .collect()
    }

    /// Whether `source` has a connection here.
    pub fn is_connected(&self, source: &str) -> bool {
        self.lock().links.contains_key(source)
    }

    /// Sends `request` to `source` and waits at most `timeout` for its answer.
    pub async fn request(
        &self,
        source: &str,
        request: PeerRequest,
        timeout: Duration,
    ) -> Result<PeerOutcome, PeerRequestError> {
        let (answer, answered) = oneshot::channel();
        {
            let mut inner = self.lock();
            inner.next_id += 1;
            let id = inner.next_id;
            let Some(link) = inner.links.get_mut(source) else {
                return Err(PeerRequestError::NotConnected {
                    source_name: source.to_string(),
                });
            };
            let frame = PeerMessage::Request { id, request }
                .to_frame()
                .map_err(|error| PeerRequestError::Encode {
                    source_name: source.to_string(),
                    message: error.to_string(),
                })?;
            if link.outgoing.send(frame).is_err() {
                return Err(PeerRequestError::Disconnected {
                    source_name: source.to_string(),
                });
            }
            link.pending.insert(id, answer);
        }
        match tokio::time::timeout(timeout, answered).await {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(_)) => Err(PeerRequestError::Disconnected {
                source_name: source.to_string(),
            }),
            Err(_) => Err(PeerRequestError::Timeout {
                source_name: source.to_string(),
                timeout,
            }),
        }
    }

    /// The first step of a planned failover of `group` (`ferry failover --group G --planned`):
    /// its source fences the group's disks, cuts a final point and answers once the point is
    /// durable here. The caller then fails over to `point_id` (the catalog records the marker
    /// once durable: resolve it with a short bounded retry).
    pub async fn prepare_planned_failover(
        &self,
        group: &str,
        timeout: Duration,
    ) -> Result<PlannedPoint, PlannedFailoverError> {
        let sources = self.sources_of_group(group);
        let source = match sources.as_slice() {
            [] => {
                return Err(PlannedFailoverError::NotConnected {
                    group: group.to_string(),
                })
            }
            [source] => source.clone(),
            _ => {
                return Err(PlannedFailoverError::SeveralSources {
                    group: group.to_string(),
                    sources: sources.join(", "),
                })
            }
        };
        let request = PeerRequest::PlannedFailover {
            group: group.to_string(),
        };
        match self.request(&source, request, timeout).await {
            Ok(PeerOutcome::FinalPoint {
                point_id,
                marker_seq,
                ..
            }) => Ok(PlannedPoint {
                source,
                point_id,
                marker_seq,
            }),
            Ok(PeerOutcome::Error { message }) => Err(PlannedFailoverError::Source {
                source_name: source,
                message,
            }),
            Ok(other) => Err(PlannedFailoverError::Source {
                source_name: source,
                message: format!("unexpected answer {other:?}"),
            }),
            Err(error) => Err(PlannedFailoverError::Request(error)),
        }
    }

    /// Failback's hand-over: every connected source of `group` un-fences its disks and resyncs
    /// them to this target. Returns the disks made writable (`machine/disk`).
    pub async fn unfence_sources(
        &self,
        group: &str,
        timeout: Duration,
    ) -> Result<Vec<String>, PlannedFailoverError> {
        let sources = self.sources_of_group(group);
        if sources.is_empty() {
            return Err(PlannedFailoverError::NotConnected {
                group: group.to_string(),
            });
        }
        let mut disks = Vec::new();
        for source in sources {
            let request = PeerRequest::Unfence {
                group: group.to_string(),
            };
            match self.request(&source, request, timeout).await {
                Ok(PeerOutcome::Unfenced {
                    disks: unfenced, ..
                }) => disks.extend(unfenced),
                Ok(PeerOutcome::Error { message }) => {
                    return Err(PlannedFailoverError::Source {
                        source_name: source,
                        message,
                    })
                }
                Ok(other) => {
                    return Err(PlannedFailoverError::Source {
                        source_name: source,
                        message: format!("unexpected answer {other:?}"),
                    })
                }
                Err(error) => return Err(PlannedFailoverError::Request(error)),
            }
        }
        Ok(disks)
    }

    /// Lets the sources of `group` pull its failed-over disks (replaces a previous set).
    pub fn serve_reprotect(&self, group: &str, disks: ReprotectDisks) {
        self.lock().reprotect.insert(group.to_string(), disks);
    }

    /// Stops serving `group`'s failed-over disks to reprotect.
    pub fn stop_reprotect(&self, group: &str) {
        self.lock().reprotect.remove(group);
    }

    /// `ferry reprotect`: asks every connected source of `group` to pull its failed-over disks
    /// (registered with [`PeerControl::serve_reprotect`] first). Returns the disks being pulled.
    pub async fn start_reprotect(
        &self,
        group: &str,
        timeout: Duration,
    ) -> Result<Vec<String>, PlannedFailoverError> {
        let sources = self.sources_of_group(group);
        if sources.is_empty() {
            return Err(PlannedFailoverError::NotConnected {
                group: group.to_string(),
            });
        }
        let mut disks = Vec::new();
        for source in sources {
            let request = PeerRequest::Reprotect {
                group: group.to_string(),
            };
            match self.request(&source, request, timeout).await {
                Ok(PeerOutcome::ReprotectStarted { disks: pulled, .. }) => disks.extend(pulled),
                Ok(other) => return Err(unexpected(source, other)),
                Err(error) => return Err(PlannedFailoverError::Request(error)),
            }
        }
        Ok(disks)
    }

    /// Failback's last reprotect round: with the failover exports read-only, every source of
    /// `group` pulls what is left and answers once its disks hold the data durably.
    pub async fn finish_reprotect(
        &self,
        group: &str,
        timeout: Duration,
    ) -> Result<ReprotectTotals, PlannedFailoverError> {
        let sources = self.sources_of_group(group);
        if sources.is_empty() {
            return Err(PlannedFailoverError::NotConnected {
                group: group.to_string(),
            });
        }
        let mut totals = ReprotectTotals::default();
        for source in sources {
            let request = PeerRequest::FinishReprotect {
                group: group.to_string(),
            };
            match self.request(&source, request, timeout).await {
                Ok(PeerOutcome::Reprotected {
                    extents_compared,
                    bytes_copied,
                    rounds,
                    ..
                }) => {
                    totals.extents_compared += extents_compared;
                    totals.bytes_copied += bytes_copied;
                    totals.rounds = totals.rounds.max(rounds);
                }
                Ok(other) => return Err(unexpected(source, other)),
                Err(error) => return Err(PlannedFailoverError::Request(error)),
            }
        }
        Ok(totals)
    }

    /// Answers a source's reprotect request from the registered failed-over disks.
    fn serve_request(&self, source: &str, generation: u64, id: u64, request: PeerRequest) {
        let outgoing = {
            let inner = self.lock();
            match inner
                .links
                .get(source)
                .filter(|link| link.generation == generation)
            {
                Some(link) => link.outgoing.clone(),
                None => return,
            }
        };
        let (group, machine, disk) = match &request {
            PeerRequest::HashExtents {
                group,
                machine,
                disk,
                ..
            }
            | PeerRequest::ReadExtent {
                group,
                machine,
                disk,
                ..
            }
            | PeerRequest::TakeDirty {
                group,
                machine,
                disk,
            } => (group.clone(), machine.clone(), disk.clone()),
            _ => {
                let reply = PeerMessage::Reply {
                    id,
                    outcome: PeerOutcome::Error {
                        message: "a source asked for what only a target asks".to_string(),
                    },
                };
                if let Ok(frame) = reply.to_frame() {
                    let _ = outgoing.send(frame);
                }
                return;
            }
        };
        let served = self.lock().reprotect.get(&group).and_then(|disks| {
            disks
                .get(&(source.to_string(), machine.clone(), disk.clone()))
                .cloned()
        });
        let source = source.to_string();
        tokio::spawn(async move {
            let (outcome, data) = match served {
                None => (
                    PeerOutcome::Error {
                        message: format!(
                            "group {group} is not being reprotected, or has no failed-over disk {machine}/{disk} of source {source}"
                        ),
                    },
                    Vec::new(),
                ),
                Some(served) => answer_reprotect_read(served.as_ref(), request).await,
            };
            match (PeerMessage::Reply { id, outcome }).to_frame_with(&data) {
                Ok(frame) => {
                    let _ = outgoing.send(frame);
                }
                Err(error) => {
                    tracing::error!(source = %source, id, "cannot encode an answer: {error}")
                }
            }
        });
    }

    /// Attaches a new connection of `source`: reads its control stream (`receiver`) and queues
    /// the frames for it, starting with the failed-over groups. The session sends what
    /// [`SessionPeer::next_frame`] gives on its control stream, and drops the `SessionPeer` when
    /// the connection ends.
    pub fn attach(self: &Arc<Self>, source: &str, receiver: FrameReceiver) -> SessionPeer {
        let (outgoing, frames) = mpsc::unbounded_channel();
        let generation = {
            let mut inner = self.lock();
            inner.next_generation += 1;
            let generation = inner.next_generation;
            if let Some(frame) = failed_over_frame(&inner.failed_over) {
                let _ = outgoing.send(frame);
            }
            // A previous connection's requests will never be answered: dropping their senders
            // tells the waiters.
            inner.links.insert(
                source.to_string(),
                Link {
                    generation,
                    outgoing,
                    pending: BTreeMap::new(),
                    groups: BTreeSet::new(),
                },
            );
            generation
        };
        let reader = tokio::spawn(read_control(
            self.clone(),
            source.to_string(),
            generation,
            receiver,
        ));
        SessionPeer {
            control: self.clone(),
            source: source.to_string(),
            generation,
            frames,
            reader,
        }
    }

    fn handle_document(&self, source: &str, generation: u64, version: u16, json: &[u8]) {
        let message = match PeerMessage::from_document(version, json) {
            Ok(message) => message,
            Err(error) => {
                tracing::warn!(source = %source, "control message refused: {error}");
                return;
            }
        };
        match message {
            PeerMessage::Reply { id, outcome } => {
                let mut inner = self.lock();
                let waiter = inner
                    .links
                    .get_mut(source)
                    .filter(|link| link.generation == generation)
                    .and_then(|link| link.pending.remove(&id));
                match waiter {
                    Some(waiter) => {
                        let _ = waiter.send(outcome);
                    }
                    // The answer to a resumed reprotect has no waiter.
                    None if matches!(outcome, PeerOutcome::ReprotectStarted { .. }) => {
                        tracing::debug!(source = %source, id, "reprotect resumed")
                    }
                    None => {
                        tracing::warn!(source = %source, id, "answer to no pending request")
                    }
                }
            }
            PeerMessage::Request { id, request } => {
                self.serve_request(source, generation, id, request)
            }
            PeerMessage::FailedOverGroups { .. } => {
                tracing::warn!(source = %source, "a source sent a message only a target sends");
            }
        }
    }
}

/// The failed-over groups as a frame; `None` (logged) when they do not fit one, which takes
/// hundreds of groups of the longest names.
fn unexpected(source: String, outcome: PeerOutcome) -> PlannedFailoverError {
    match outcome {
        PeerOutcome::Error { message } => PlannedFailoverError::Source {
            source_name: source,
            message,
        },
        other => PlannedFailoverError::Source {
            source_name: source,
            message: format!("unexpected answer {other:?}"),
        },
    }
}

/// Reads what a reprotect request asks of a failed-over disk: `(outcome, data)`.
async fn answer_reprotect_read(
    disk: &dyn ReprotectDisk,
    request: PeerRequest,
) -> (PeerOutcome, Vec<u8>) {
    let size = disk.size_bytes();
    let error = |message: String| (PeerOutcome::Error { message }, Vec::new());
    match request {
        PeerRequest::HashExtents {
            offset,
            extent_bytes,
            count,
            ..
        } => {
            if extent_bytes == 0
                || extent_bytes > EXTENT_BYTES_MAX
                || count == 0
                || count > HASH_EXTENTS_MAX
            {
                return error(format!(
                    "{count} extents of {extent_bytes} bytes: out of bounds"
                ));
            }
            let mut hashes = Vec::with_capacity(count as usize * 16);
            for index in 0..u64::from(count) {
                let start = offset.saturating_add(index * u64::from(extent_bytes));
                if start >= size {
                    break;
                }
                let length = u64::from(extent_bytes).min(size - start);
                match disk.read_at(start, length).await {
                    Ok(bytes) => hashes.extend_from_slice(&wire::extent_hash(&bytes).to_le_bytes()),
                    Err(read) => {
                        return error(format!("reading {length} bytes at {start}: {read}"))
                    }
                }
            }
            (PeerOutcome::Hashes { size_bytes: size }, hashes)
        }
        PeerRequest::ReadExtent { offset, length, .. } => {
            let length = u64::from(length);
            if length == 0
                || length > u64::from(EXTENT_BYTES_MAX)
                || offset.checked_add(length).is_none_or(|end| end > size)
            {
                return error(format!(
                    "{length} bytes at {offset}: outside the disk of {size} bytes or too long"
                ));
            }
            match disk.read_at(offset, length).await {
                Ok(bytes) => (PeerOutcome::Extent, bytes),
                Err(read) => error(format!("reading {length} bytes at {offset}: {read}")),
            }
        }
        PeerRequest::TakeDirty { .. } => match disk.take_dirty().await {
            Ok(ranges) => (
                PeerOutcome::Dirty {
                    ranges: coarsen_ranges(ranges, size),
                },
                Vec::new(),
            ),
            Err(take) => error(format!("the blocks written since the last round: {take}")),
        },
        _ => error("not a reprotect read".to_string()),
    }
}

fn failed_over_frame(groups: &BTreeSet<String>) -> Option<Frame> {
    let message = PeerMessage::FailedOverGroups {
        groups: groups.iter().cloned().collect(),
    };
    match message.to_frame() {
        Ok(frame) => Some(frame),
        Err(error) => {
            tracing::error!("cannot tell sources the failed-over groups: {error}");
            None
        }
    }
}

/// Reads a source's control stream until it ends.
async fn read_control(
    control: Arc<PeerControl>,
    source: String,
    generation: u64,
    mut receiver: FrameReceiver,
) {
    loop {
        let frame = match receiver.recv().await {
            Ok(Some(frame)) => frame,
            Ok(None) => return,
            Err(error) => {
                tracing::debug!(source = %source, "control stream ended: {error}");
                return;
            }
        };
        match wire::decode_frame(&frame) {
            Ok(Message::Control { version, json, .. }) => {
                control.handle_document(&source, generation, version, json)
            }
            Ok(other) => {
                tracing::warn!(source = %source, "unexpected frame on the control stream: {other:?}")
            }
            Err(error) => {
                tracing::warn!(source = %source, "bad frame on the control stream: {error}");
                return;
            }
        }
    }
}

/// A session's attachment to the control plane (see [`PeerControl::attach`]).
pub struct SessionPeer {
    control: Arc<PeerControl>,
    source: String,
    generation: u64,
    frames: mpsc::UnboundedReceiver<Frame>,
    reader: tokio::task::JoinHandle<()>,
}

impl SessionPeer {
    /// The next control frame to send to the source; pending while there is none.
    pub async fn next_frame(&mut self) -> Frame {
        match self.frames.recv().await {
            Some(frame) => frame,
            // Replaced by a newer connection of the same source: nothing more to send here.
            None => std::future::pending().await,
        }
    }

    /// Records the groups the source announced in its Hello.
    /// A group being reprotected is asked to resume pulling: a reprotect is per connection,
    /// and the source lost it with its previous connection.
    pub fn note_groups<'a>(&self, groups: impl IntoIterator<Item = &'a str>) {
        let mut inner = self.control.lock();
        let Inner {
            links,
            reprotect,
            next_id,
            ..
        } = &mut *inner;
        let Some(link) = links
            .get_mut(&self.source)
            .filter(|link| link.generation == self.generation)
        else {
            return;
        };
        link.groups = groups
            .into_iter()
            .filter(|group| !group.is_empty())
            .map(str::to_string)
            .collect();
        for group in link.groups.iter().filter(|group| {
            reprotect
                .get(*group)
                .is_some_and(|disks| disks.keys().any(|(source, _, _)| source == &self.source))
        }) {
            *next_id += 1;
            let request = PeerMessage::Request {
                id: *next_id,
                request: PeerRequest::Reprotect {
                    group: group.clone(),
                },
            };
            if let Ok(frame) = request.to_frame() {
                tracing::info!(source = %self.source, group = %group, "source reconnected: reprotect resumes");
                let _ = link.outgoing.send(frame);
            }
        }
    }
}

impl Drop for SessionPeer {
    fn drop(&mut self) {
        self.reader.abort();
        let mut inner = self.control.lock();
        let current = inner
            .links
            .get(&self.source)
            .is_some_and(|link| link.generation == self.generation);
        if current {
            // Dropping the link drops its pending answers' senders: their waiters learn the
            // connection ended.
            inner.links.remove(&self.source);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_over_set_is_kept_sorted_and_idempotent() {
        let control = PeerControl::new();
        control.set_failed_over("shop", true);
        control.set_failed_over("db", true);
        control.set_failed_over("shop", true);
        assert_eq!(control.failed_over_groups(), ["db", "shop"]);
        control.set_failed_over("db", false);
        assert_eq!(control.failed_over_groups(), ["shop"]);
        assert!(!control.is_connected("site-a"));
        assert!(control.sources_of_group("shop").is_empty());
    }

    #[tokio::test]
    async fn requests_to_absent_sources_fail_at_once() {
        let control = PeerControl::new();
        let error = control
            .request(
                "site-a",
                PeerRequest::PlannedFailover {
                    group: "shop".into(),
                },
                Duration::from_secs(1),
            )
            .await
            .unwrap_err();
        assert!(matches!(error, PeerRequestError::NotConnected { .. }));
        assert!(error.to_string().contains("site-a"));
        let error = control
            .prepare_planned_failover("shop", Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(
            error.to_string().contains("use an unplanned failover"),
            "{error}"
        );
    }
}
