//! Consumer-group coordinator (A6), classic protocol with client-side assignment: members
//! join, the leader computes the assignment, everyone syncs, heartbeats keep sessions alive,
//! and a join, leave or expired session starts a new generation.
//!
//! States per group: Empty → PreparingRebalance → CompletingRebalance → Stable, and back to
//! PreparingRebalance on membership change. JoinGroup and SyncGroup answers wait (oneshot
//! channels) until the rebalance step they belong to completes.
//!
//! Committed offsets and generations are kept in a [`journal::Journal`] and replayed at start;
//! membership itself is not persisted: after a restart members find themselves unknown and
//! rejoin, as they would after a coordinator move in Kafka.

pub mod journal;
mod protocol;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kafka_protocol::ResponseError;
use parking_lot::Mutex;
use qanat_log::{Clock, Storage};
use tokio::sync::oneshot;
use tokio::time::Instant;

use journal::Journal;
pub use journal::{Entry, JournalError};

/// Group states, named as Kafka names them in ListGroups/DescribeGroups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupState {
    Empty,
    PreparingRebalance,
    CompletingRebalance,
    Stable,
}

impl GroupState {
    pub fn as_str(self) -> &'static str {
        match self {
            GroupState::Empty => "Empty",
            GroupState::PreparingRebalance => "PreparingRebalance",
            GroupState::CompletingRebalance => "CompletingRebalance",
            GroupState::Stable => "Stable",
        }
    }
}

/// A JoinGroup request in plain terms.
#[derive(Debug, Clone)]
pub struct JoinRequest {
    pub group: String,
    pub member_id: String,
    pub instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub session_timeout: Duration,
    pub rebalance_timeout: Duration,
    pub protocol_type: String,
    pub protocols: Vec<(String, Bytes)>,
}

/// The answer to one JoinGroup.
#[derive(Debug, Clone, Default)]
pub struct JoinResult {
    pub error: i16,
    pub generation: i32,
    pub protocol_type: Option<String>,
    pub protocol_name: Option<String>,
    pub leader: String,
    pub member_id: String,
    /// (member id, instance id, metadata) — only for the leader.
    pub members: Vec<(String, Option<String>, Bytes)>,
}

/// The answer to one SyncGroup.
#[derive(Debug, Clone, Default)]
pub struct SyncResult {
    pub error: i16,
    pub protocol_type: Option<String>,
    pub protocol_name: Option<String>,
    pub assignment: Bytes,
}

/// A committed offset.
#[derive(Debug, Clone, PartialEq)]
pub struct Committed {
    pub offset: i64,
    pub metadata: Option<String>,
    pub timestamp: i64,
}

/// One member as DescribeGroups shows it.
#[derive(Debug, Clone)]
pub struct MemberDescription {
    pub member_id: String,
    pub instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub metadata: Bytes,
    pub assignment: Bytes,
}

/// One group as DescribeGroups shows it.
#[derive(Debug, Clone)]
pub struct GroupDescription {
    pub state: GroupState,
    pub protocol_type: String,
    pub protocol: String,
    pub generation: i32,
    pub members: Vec<MemberDescription>,
}

struct Member {
    instance_id: Option<String>,
    client_id: String,
    client_host: String,
    session_timeout: Duration,
    rebalance_timeout: Duration,
    protocols: Vec<(String, Bytes)>,
    assignment: Bytes,
    last_heartbeat: Instant,
    pending_join: Option<oneshot::Sender<JoinResult>>,
    /// Order of first join, so the longest-standing member leads.
    joined_seq: u64,
}

struct Group {
    state: GroupState,
    generation: i32,
    protocol_type: Option<String>,
    protocol: Option<String>,
    leader: Option<String>,
    members: BTreeMap<String, Member>,
    /// Bumped at each rebalance so a stale deadline timer does nothing.
    rebalance_epoch: u64,
    /// While set, a first rebalance waits for more members instead of completing early.
    initial_delay_until: Option<Instant>,
    pending_sync: Vec<(String, oneshot::Sender<SyncResult>)>,
}

impl Group {
    fn new(generation: i32) -> Self {
        Self {
            state: GroupState::Empty,
            generation,
            protocol_type: None,
            protocol: None,
            leader: None,
            members: BTreeMap::new(),
            rebalance_epoch: 0,
            initial_delay_until: None,
            pending_sync: Vec::new(),
        }
    }
}

/// Coordinator settings.
#[derive(Debug, Clone)]
pub struct GroupSettings {
    /// How long a group's first rebalance waits for more members to join.
    pub initial_rebalance_delay: Duration,
    /// Bounds on the session timeout a member may ask for.
    pub min_session_timeout: Duration,
    pub max_session_timeout: Duration,
    /// Whether offset commits wait for fdatasync.
    pub sync_commits: bool,
}

struct State {
    groups: HashMap<String, Group>,
    offsets: HashMap<String, BTreeMap<(String, i32), Committed>>,
    next_member_seq: u64,
    next_producer_id: i64,
    /// Producer ids below this are reserved in the journal.
    reserved_producer_ids: i64,
}

/// The coordinator of every group on this broker.
pub struct GroupCoordinator {
    state: Mutex<State>,
    journal: Journal,
    settings: GroupSettings,
    clock: Arc<dyn Clock>,
}

/// The coordinator's durable state as journal entries (what a compacted journal holds).
fn snapshot(state: &State) -> Vec<Entry> {
    let mut entries: Vec<Entry> = state
        .groups
        .iter()
        .map(|(group, g)| Entry::Generation {
            group: group.clone(),
            generation: g.generation,
        })
        .collect();
    for (group, offsets) in &state.offsets {
        for ((topic, partition), c) in offsets {
            entries.push(Entry::Offset {
                group: group.clone(),
                topic: topic.clone(),
                partition: *partition,
                offset: c.offset,
                metadata: c.metadata.clone(),
                timestamp: c.timestamp,
            });
        }
    }
    entries.push(Entry::ProducerIds {
        next: state.reserved_producer_ids,
    });
    entries
}

fn code(e: ResponseError) -> i16 {
    e.code()
}

/// Producer ids are reserved in blocks so the journal is written once per block.
const PRODUCER_ID_BLOCK: i64 = 1000;

impl GroupCoordinator {
    /// Open the journal under `data_dir` and rebuild offsets and generations from it.
    pub fn open(
        data_dir: &Path,
        storage: Arc<dyn Storage>,
        clock: Arc<dyn Clock>,
        settings: GroupSettings,
    ) -> Result<Self, JournalError> {
        let (journal, entries) = Journal::open(data_dir, storage, clock.clone())?;
        let mut state = State {
            groups: HashMap::new(),
            offsets: HashMap::new(),
            next_member_seq: 0,
            next_producer_id: 0,
            reserved_producer_ids: 0,
        };
        let replayed = entries.len();
        for entry in entries {
            match entry {
                Entry::Offset {
                    group,
                    topic,
                    partition,
                    offset,
                    metadata,
                    timestamp,
                } => {
                    state.offsets.entry(group).or_default().insert(
                        (topic, partition),
                        Committed {
                            offset,
                            metadata,
                            timestamp,
                        },
                    );
                }
                Entry::Generation { group, generation } => {
                    state
                        .groups
                        .entry(group)
                        .or_insert_with(|| Group::new(0))
                        .generation = generation;
                }
                Entry::DeleteGroup { group } => {
                    state.groups.remove(&group);
                    state.offsets.remove(&group);
                }
                Entry::ProducerIds { next } => {
                    state.reserved_producer_ids = state.reserved_producer_ids.max(next);
                }
            }
        }
        // Ids of a block reserved before the restart may have been handed out: skip it.
        state.next_producer_id = state.reserved_producer_ids;
        tracing::info!(
            entries = replayed,
            groups = state.offsets.len(),
            "group coordinator state replayed"
        );
        Ok(Self {
            state: Mutex::new(state),
            journal,
            settings,
            clock,
        })
    }

    fn persist(&self, entries: &[Entry]) -> Result<(), i16> {
        self.journal
            .append(entries, self.settings.sync_commits)
            .map_err(|e| {
                tracing::error!(error = %e, "coordinator journal write failed");
                code(ResponseError::KafkaStorageError)
            })
    }

    /// Handle a JoinGroup; resolves when the rebalance completes.
    pub async fn join(self: &Arc<Self>, req: JoinRequest) -> JoinResult {
        let fail = |error: ResponseError, member_id: &str| JoinResult {
            error: code(error),
            generation: -1,
            member_id: member_id.to_string(),
            ..JoinResult::default()
        };
        if req.group.is_empty() {
            return fail(ResponseError::InvalidGroupId, &req.member_id);
        }
        let s = &self.settings;
        if req.session_timeout < s.min_session_timeout
            || req.session_timeout > s.max_session_timeout
        {
            return fail(ResponseError::InvalidSessionTimeout, &req.member_id);
        }
        if req.protocols.is_empty() || req.protocol_type.is_empty() {
            return fail(ResponseError::InconsistentGroupProtocol, &req.member_id);
        }
        let rx = {
            let mut state = self.state.lock();
            let state = &mut *state;
            let group = state
                .groups
                .entry(req.group.clone())
                .or_insert_with(|| Group::new(0));
            if !group.members.is_empty() {
                let same_type = group.protocol_type.as_deref() == Some(req.protocol_type.as_str());
                let shared = group.members.values().all(|m| {
                    m.protocols
                        .iter()
                        .any(|(n, _)| req.protocols.iter().any(|(p, _)| p == n))
                });
                if !same_type || !shared {
                    return fail(ResponseError::InconsistentGroupProtocol, &req.member_id);
                }
            }
            if !req.member_id.is_empty() && !group.members.contains_key(&req.member_id) {
                return fail(ResponseError::UnknownMemberId, &req.member_id);
            }
            let member_id = if req.member_id.is_empty() {
                state.next_member_seq += 1;
                format!(
                    "{}-{}-{}",
                    if req.client_id.is_empty() {
                        "member"
                    } else {
                        &req.client_id
                    },
                    self.clock.now_ms(),
                    state.next_member_seq
                )
            } else {
                req.member_id.clone()
            };
            let (tx, rx) = oneshot::channel();
            let seq = state.next_member_seq;
            let now = Instant::now();
            let member = group
                .members
                .entry(member_id.clone())
                .or_insert_with(|| Member {
                    instance_id: req.instance_id.clone(),
                    client_id: req.client_id.clone(),
                    client_host: req.client_host.clone(),
                    session_timeout: req.session_timeout,
                    rebalance_timeout: req.rebalance_timeout,
                    protocols: Vec::new(),
                    assignment: Bytes::new(),
                    last_heartbeat: now,
                    pending_join: None,
                    joined_seq: seq,
                });
            member.protocols = req.protocols.clone();
            member.session_timeout = req.session_timeout;
            member.rebalance_timeout = req.rebalance_timeout;
            member.last_heartbeat = now;
            if let Some(previous) = member.pending_join.replace(tx) {
                // A duplicate join replaces the earlier one, as in Kafka.
                let _ = previous.send(fail(ResponseError::RebalanceInProgress, &member_id));
            }
            group.protocol_type = Some(req.protocol_type.clone());
            if group.state != GroupState::PreparingRebalance {
                self.prepare_rebalance(&req.group, group);
            }
            self.maybe_complete_join(&req.group, group);
            rx
        };
        match rx.await {
            Ok(result) => result,
            Err(_) => fail(ResponseError::RebalanceInProgress, &req.member_id),
        }
    }

    /// Enter PreparingRebalance and arm the deadline timer. Caller holds the lock.
    fn prepare_rebalance(self: &Arc<Self>, name: &str, group: &mut Group) {
        let was_empty = group.state == GroupState::Empty;
        group.state = GroupState::PreparingRebalance;
        group.rebalance_epoch += 1;
        for (_, tx) in group.pending_sync.drain(..) {
            let _ = tx.send(SyncResult {
                error: code(ResponseError::RebalanceInProgress),
                ..SyncResult::default()
            });
        }
        let rebalance_timeout = group
            .members
            .values()
            .map(|m| m.rebalance_timeout)
            .max()
            .unwrap_or(Duration::from_secs(1));
        let wait = if was_empty {
            let delay = self.settings.initial_rebalance_delay.min(rebalance_timeout);
            group.initial_delay_until = Some(Instant::now() + delay);
            delay
        } else {
            group.initial_delay_until = None;
            rebalance_timeout
        };
        let epoch = group.rebalance_epoch;
        let me = self.clone();
        let owned = name.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            let mut state = me.state.lock();
            if let Some(group) = state.groups.get_mut(&owned) {
                if group.state == GroupState::PreparingRebalance && group.rebalance_epoch == epoch {
                    group.initial_delay_until = None;
                    me.complete_join(&owned, group);
                }
            }
        });
        tracing::debug!(group = name, "rebalance started");
    }

    /// Complete the join phase early once every known member has rejoined.
    fn maybe_complete_join(self: &Arc<Self>, name: &str, group: &mut Group) {
        if group.state != GroupState::PreparingRebalance {
            return;
        }
        if let Some(until) = group.initial_delay_until {
            if Instant::now() < until {
                return;
            }
        }
        if !group.members.is_empty() && group.members.values().all(|m| m.pending_join.is_some()) {
            self.complete_join(name, group);
        }
    }

    /// Drop members that did not rejoin, start the next generation, answer every join.
    fn complete_join(self: &Arc<Self>, name: &str, group: &mut Group) {
        let dropped: Vec<String> = group
            .members
            .iter()
            .filter(|(_, m)| m.pending_join.is_none())
            .map(|(id, _)| id.clone())
            .collect();
        for id in &dropped {
            tracing::info!(
                group = name,
                member = id,
                "member did not rejoin in time; removed"
            );
            group.members.remove(id);
        }
        group.generation += 1;
        if let Err(c) = self.persist(&[Entry::Generation {
            group: name.to_string(),
            generation: group.generation,
        }]) {
            tracing::error!(group = name, code = c, "generation not persisted");
        }
        if group.members.is_empty() {
            group.state = GroupState::Empty;
            group.leader = None;
            group.protocol = None;
            group.protocol_type = None;
            return;
        }
        // Leader: keep the current one if still present, else the longest-standing member.
        let leader = match &group.leader {
            Some(l) if group.members.contains_key(l) => l.clone(),
            _ => group
                .members
                .iter()
                .min_by_key(|(_, m)| m.joined_seq)
                .map(|(id, _)| id.clone())
                .unwrap_or_default(),
        };
        // Protocol: the leader's most preferred one that every member supports.
        let protocol = group.members.get(&leader).and_then(|l| {
            l.protocols.iter().map(|(n, _)| n.clone()).find(|n| {
                group
                    .members
                    .values()
                    .all(|m| m.protocols.iter().any(|(p, _)| p == n))
            })
        });
        group.leader = Some(leader.clone());
        group.protocol = protocol.clone();
        group.state = GroupState::CompletingRebalance;
        let all: Vec<(String, Option<String>, Bytes)> = group
            .members
            .iter()
            .map(|(id, m)| {
                let metadata = m
                    .protocols
                    .iter()
                    .find(|(p, _)| Some(p) == protocol.as_ref())
                    .map(|(_, md)| md.clone())
                    .unwrap_or_default();
                (id.clone(), m.instance_id.clone(), metadata)
            })
            .collect();
        let generation = group.generation;
        let protocol_type = group.protocol_type.clone();
        let now = Instant::now();
        for (id, m) in group.members.iter_mut() {
            m.assignment = Bytes::new();
            m.last_heartbeat = now;
            if let Some(tx) = m.pending_join.take() {
                let _ = tx.send(JoinResult {
                    error: 0,
                    generation,
                    protocol_type: protocol_type.clone(),
                    protocol_name: protocol.clone(),
                    leader: leader.clone(),
                    member_id: id.clone(),
                    members: if *id == leader {
                        all.clone()
                    } else {
                        Vec::new()
                    },
                });
            }
        }
        tracing::info!(
            group = name,
            generation,
            members = group.members.len(),
            leader = leader.as_str(),
            "rebalance: join phase complete"
        );
    }

    /// Check that `member_id` is in `group` at `generation`.
    fn check_member(group: &Group, member_id: &str, generation: i32) -> Result<(), i16> {
        if !group.members.contains_key(member_id) {
            return Err(code(ResponseError::UnknownMemberId));
        }
        if generation != group.generation {
            return Err(code(ResponseError::IllegalGeneration));
        }
        Ok(())
    }

    /// Handle a SyncGroup; resolves once the leader's assignment is known.
    pub async fn sync(
        self: &Arc<Self>,
        name: &str,
        generation: i32,
        member_id: &str,
        assignments: Vec<(String, Bytes)>,
    ) -> SyncResult {
        let fail = |c: i16| SyncResult {
            error: c,
            ..SyncResult::default()
        };
        let rx = {
            let mut state = self.state.lock();
            let Some(group) = state.groups.get_mut(name) else {
                return fail(code(ResponseError::UnknownMemberId));
            };
            if let Err(c) = Self::check_member(group, member_id, generation) {
                return fail(c);
            }
            match group.state {
                GroupState::Empty => return fail(code(ResponseError::UnknownMemberId)),
                GroupState::PreparingRebalance => {
                    return fail(code(ResponseError::RebalanceInProgress))
                }
                GroupState::Stable => {
                    return SyncResult {
                        error: 0,
                        protocol_type: group.protocol_type.clone(),
                        protocol_name: group.protocol.clone(),
                        assignment: group
                            .members
                            .get(member_id)
                            .map(|m| m.assignment.clone())
                            .unwrap_or_default(),
                    }
                }
                GroupState::CompletingRebalance => {}
            }
            let (tx, rx) = oneshot::channel();
            group.pending_sync.push((member_id.to_string(), tx));
            if group.leader.as_deref() == Some(member_id) {
                let mut given: HashMap<String, Bytes> = assignments.into_iter().collect();
                for (id, m) in group.members.iter_mut() {
                    m.assignment = given.remove(id).unwrap_or_default();
                }
                group.state = GroupState::Stable;
                for (id, tx) in group.pending_sync.drain(..) {
                    let _ = tx.send(SyncResult {
                        error: 0,
                        protocol_type: group.protocol_type.clone(),
                        protocol_name: group.protocol.clone(),
                        assignment: group
                            .members
                            .get(&id)
                            .map(|m| m.assignment.clone())
                            .unwrap_or_default(),
                    });
                }
                tracing::info!(group = name, generation, "rebalance complete: group stable");
            }
            rx
        };
        rx.await
            .unwrap_or_else(|_| fail(code(ResponseError::RebalanceInProgress)))
    }

    /// Handle a Heartbeat.
    pub fn heartbeat(&self, name: &str, generation: i32, member_id: &str) -> i16 {
        let mut state = self.state.lock();
        let Some(group) = state.groups.get_mut(name) else {
            return code(ResponseError::UnknownMemberId);
        };
        if let Err(c) = Self::check_member(group, member_id, generation) {
            return c;
        }
        if let Some(m) = group.members.get_mut(member_id) {
            m.last_heartbeat = Instant::now();
        }
        match group.state {
            GroupState::PreparingRebalance => code(ResponseError::RebalanceInProgress),
            GroupState::Empty => code(ResponseError::UnknownMemberId),
            _ => 0,
        }
    }

    /// Handle a LeaveGroup; one error code per member.
    pub fn leave(self: &Arc<Self>, name: &str, member_ids: &[String]) -> Vec<i16> {
        let mut state = self.state.lock();
        let Some(group) = state.groups.get_mut(name) else {
            return vec![code(ResponseError::UnknownMemberId); member_ids.len()];
        };
        let results: Vec<i16> = member_ids
            .iter()
            .map(|id| match group.members.remove(id) {
                Some(m) => {
                    if let Some(tx) = m.pending_join {
                        let _ = tx.send(JoinResult {
                            error: code(ResponseError::UnknownMemberId),
                            generation: -1,
                            ..JoinResult::default()
                        });
                    }
                    tracing::info!(group = name, member = id, "member left");
                    0
                }
                None => code(ResponseError::UnknownMemberId),
            })
            .collect();
        // A leave naming only unknown members changes nothing and must not force a rebalance.
        if results.contains(&0) {
            self.after_membership_loss(name, group);
        }
        results
    }

    fn after_membership_loss(self: &Arc<Self>, name: &str, group: &mut Group) {
        match group.state {
            GroupState::Stable | GroupState::CompletingRebalance => {
                if group.members.is_empty() {
                    group.state = GroupState::Empty;
                    // Nobody is left to send the assignment these are waiting for.
                    for (_, tx) in group.pending_sync.drain(..) {
                        let _ = tx.send(SyncResult {
                            error: code(ResponseError::UnknownMemberId),
                            ..SyncResult::default()
                        });
                    }
                    group.generation += 1;
                    group.leader = None;
                    group.protocol = None;
                    group.protocol_type = None;
                    if let Err(c) = self.persist(&[Entry::Generation {
                        group: name.to_string(),
                        generation: group.generation,
                    }]) {
                        tracing::error!(group = name, code = c, "generation not persisted");
                    }
                } else {
                    self.prepare_rebalance(name, group);
                }
            }
            GroupState::PreparingRebalance => {
                if group.members.is_empty() {
                    group.rebalance_epoch += 1;
                    self.complete_join(name, group);
                } else {
                    self.maybe_complete_join(name, group);
                }
            }
            GroupState::Empty => {}
        }
    }

    /// Remove members whose session expired; run periodically.
    pub fn expire_sessions(self: &Arc<Self>) {
        let now = Instant::now();
        let mut state = self.state.lock();
        for (name, group) in state.groups.iter_mut() {
            let expired: Vec<String> = group
                .members
                .iter()
                .filter(|(_, m)| {
                    m.pending_join.is_none()
                        && now.duration_since(m.last_heartbeat) > m.session_timeout
                })
                .map(|(id, _)| id.clone())
                .collect();
            if expired.is_empty() {
                continue;
            }
            for id in &expired {
                tracing::info!(group = name, member = id, "session expired; member removed");
                group.members.remove(id);
            }
            self.after_membership_loss(name, group);
        }
    }

    /// Handle an OffsetCommit. `Err` is one code for every partition of the request.
    pub fn commit(
        &self,
        name: &str,
        generation: i32,
        member_id: &str,
        offsets: Vec<(String, i32, i64, Option<String>)>,
    ) -> Result<(), i16> {
        if name.is_empty() {
            return Err(code(ResponseError::InvalidGroupId));
        }
        let mut state = self.state.lock();
        let standalone = generation < 0 && member_id.is_empty();
        match state.groups.get_mut(name) {
            Some(group) if !group.members.is_empty() || !standalone => {
                if standalone {
                    return Err(code(ResponseError::UnknownMemberId));
                }
                Self::check_member(group, member_id, generation)?;
                match group.state {
                    GroupState::PreparingRebalance | GroupState::CompletingRebalance => {
                        return Err(code(ResponseError::RebalanceInProgress))
                    }
                    GroupState::Empty => return Err(code(ResponseError::UnknownMemberId)),
                    GroupState::Stable => {}
                }
                if let Some(m) = group.members.get_mut(member_id) {
                    m.last_heartbeat = Instant::now();
                }
            }
            None if !standalone => return Err(code(ResponseError::UnknownMemberId)),
            _ => {}
        }
        let now = self.clock.now_ms();
        let entries: Vec<Entry> = offsets
            .iter()
            .map(|(topic, partition, offset, metadata)| Entry::Offset {
                group: name.to_string(),
                topic: topic.clone(),
                partition: *partition,
                offset: *offset,
                metadata: metadata.clone(),
                timestamp: now,
            })
            .collect();
        // Written before the in-memory state changes: a failed write changes nothing.
        self.persist(&entries)?;
        let committed = state.offsets.entry(name.to_string()).or_default();
        for (topic, partition, offset, metadata) in offsets {
            committed.insert(
                (topic, partition),
                Committed {
                    offset,
                    metadata,
                    timestamp: now,
                },
            );
        }
        if self.journal.wants_compaction() {
            // The commit is already durable; a failed compaction only leaves a longer journal.
            if let Err(e) = self.journal.compact(&snapshot(&state)) {
                tracing::error!(error = %e, "coordinator journal compaction failed");
            }
        }
        Ok(())
    }

    /// Committed offsets of `group`: the requested partitions, or all when `None`.
    pub fn committed(
        &self,
        name: &str,
        wanted: Option<Vec<(String, i32)>>,
    ) -> Vec<(String, i32, Option<Committed>)> {
        let state = self.state.lock();
        let offsets = state.offsets.get(name);
        match wanted {
            Some(list) => list
                .into_iter()
                .map(|(t, p)| {
                    let c = offsets.and_then(|o| o.get(&(t.clone(), p)).cloned());
                    (t, p, c)
                })
                .collect(),
            None => offsets
                .map(|o| {
                    o.iter()
                        .map(|((t, p), c)| (t.clone(), *p, Some(c.clone())))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// Every committed offset: (group, topic, partition, offset).
    pub fn all_committed(&self) -> Vec<(String, String, i32, i64)> {
        let state = self.state.lock();
        state
            .offsets
            .iter()
            .flat_map(|(g, o)| {
                o.iter()
                    .map(move |((t, p), c)| (g.clone(), t.clone(), *p, c.offset))
            })
            .collect()
    }

    /// Every known group: (name, protocol type, state).
    pub fn list(&self) -> Vec<(String, String, GroupState)> {
        let state = self.state.lock();
        let mut names: Vec<&String> = state.groups.keys().chain(state.offsets.keys()).collect();
        names.sort();
        names.dedup();
        names
            .into_iter()
            .map(|n| match state.groups.get(n) {
                Some(g) => (
                    n.clone(),
                    g.protocol_type.clone().unwrap_or_else(|| "consumer".into()),
                    g.state,
                ),
                None => (n.clone(), "consumer".into(), GroupState::Empty),
            })
            .collect()
    }

    /// One group's state and members; `None` if the broker never heard of it.
    pub fn describe(&self, name: &str) -> Option<GroupDescription> {
        let state = self.state.lock();
        match state.groups.get(name) {
            Some(g) => Some(GroupDescription {
                state: g.state,
                protocol_type: g.protocol_type.clone().unwrap_or_default(),
                protocol: g.protocol.clone().unwrap_or_default(),
                generation: g.generation,
                members: g
                    .members
                    .iter()
                    .map(|(id, m)| MemberDescription {
                        member_id: id.clone(),
                        instance_id: m.instance_id.clone(),
                        client_id: m.client_id.clone(),
                        client_host: m.client_host.clone(),
                        metadata: m
                            .protocols
                            .iter()
                            .find(|(p, _)| Some(p) == g.protocol.as_ref())
                            .map(|(_, md)| md.clone())
                            .unwrap_or_default(),
                        assignment: m.assignment.clone(),
                    })
                    .collect(),
            }),
            None if state.offsets.contains_key(name) => Some(GroupDescription {
                state: GroupState::Empty,
                protocol_type: "consumer".into(),
                protocol: String::new(),
                generation: 0,
                members: Vec::new(),
            }),
            None => None,
        }
    }

    /// Delete an empty group and its offsets.
    pub fn delete(&self, name: &str) -> i16 {
        let mut state = self.state.lock();
        let known = state.groups.contains_key(name) || state.offsets.contains_key(name);
        if !known {
            return code(ResponseError::GroupIdNotFound);
        }
        if state
            .groups
            .get(name)
            .is_some_and(|g| !g.members.is_empty())
        {
            return code(ResponseError::NonEmptyGroup);
        }
        if let Err(c) = self.persist(&[Entry::DeleteGroup {
            group: name.to_string(),
        }]) {
            return c;
        }
        state.groups.remove(name);
        state.offsets.remove(name);
        tracing::info!(group = name, "group deleted");
        0
    }

    /// A producer id never handed out before, across restarts.
    pub fn next_producer_id(&self) -> Result<i64, i16> {
        let mut state = self.state.lock();
        if state.next_producer_id >= state.reserved_producer_ids {
            let next = state.next_producer_id + PRODUCER_ID_BLOCK;
            self.journal
                .append(&[Entry::ProducerIds { next }], true)
                .map_err(|e| {
                    tracing::error!(error = %e, "reserving producer ids failed");
                    code(ResponseError::KafkaStorageError)
                })?;
            state.reserved_producer_ids = next;
        }
        let id = state.next_producer_id;
        state.next_producer_id += 1;
        Ok(id)
    }

    /// Whether `id` may have been handed out by [`next_producer_id`](Self::next_producer_id).
    pub fn producer_id_issued(&self, id: i64) -> bool {
        id < self.state.lock().next_producer_id
    }

    /// fdatasync the journal (periodic flush).
    pub fn flush(&self) {
        if let Err(e) = self.journal.sync() {
            tracing::error!(error = %e, "coordinator journal fdatasync failed");
        }
    }

    pub fn close(&self) {
        if let Err(e) = self.journal.close() {
            tracing::error!(error = %e, "closing the coordinator journal failed");
        }
    }
}

#[cfg(test)]
mod tests;
