#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use qanat_log::{ManualClock, OsStorage};

fn settings() -> GroupSettings {
    GroupSettings {
        initial_rebalance_delay: Duration::from_millis(100),
        min_session_timeout: Duration::from_millis(100),
        max_session_timeout: Duration::from_secs(300),
        sync_commits: true,
    }
}

fn open(dir: &Path) -> Arc<GroupCoordinator> {
    Arc::new(
        GroupCoordinator::open(
            dir,
            Arc::new(OsStorage),
            Arc::new(ManualClock::new(1_000)),
            settings(),
        )
        .unwrap(),
    )
}

fn join_req(member_id: &str, client: &str) -> JoinRequest {
    JoinRequest {
        group: "g".into(),
        member_id: member_id.into(),
        instance_id: None,
        client_id: client.into(),
        client_host: "/127.0.0.1".into(),
        session_timeout: Duration::from_secs(10),
        rebalance_timeout: Duration::from_secs(30),
        protocol_type: "consumer".into(),
        protocols: vec![("range".into(), Bytes::from_static(b"meta"))],
    }
}

#[tokio::test(start_paused = true)]
async fn two_members_share_one_generation_and_get_their_assignments() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    let (a, b) = tokio::join!(c.join(join_req("", "a")), c.join(join_req("", "b")));
    assert_eq!((a.error, b.error), (0, 0));
    assert_eq!(a.generation, b.generation);
    assert_eq!(a.leader, b.leader);
    let (leader, follower) = if a.member_id == a.leader {
        (a, b)
    } else {
        (b, a)
    };
    assert_eq!(leader.members.len(), 2);
    assert!(follower.members.is_empty());
    assert_eq!(leader.protocol_name.as_deref(), Some("range"));

    let assignments = vec![
        (leader.member_id.clone(), Bytes::from_static(b"L")),
        (follower.member_id.clone(), Bytes::from_static(b"F")),
    ];
    let (fs, ls) = tokio::join!(
        c.sync("g", follower.generation, &follower.member_id, Vec::new()),
        c.sync("g", leader.generation, &leader.member_id, assignments),
    );
    assert_eq!((fs.error, ls.error), (0, 0));
    assert_eq!(&ls.assignment[..], b"L");
    assert_eq!(&fs.assignment[..], b"F");
    assert_eq!(c.describe("g").unwrap().state, GroupState::Stable);
    assert_eq!(c.heartbeat("g", leader.generation, &leader.member_id), 0);
}

#[tokio::test(start_paused = true)]
async fn stale_generation_and_unknown_member_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    let a = c.join(join_req("", "a")).await;
    let s = c
        .sync(
            "g",
            a.generation,
            &a.member_id,
            vec![(a.member_id.clone(), Bytes::new())],
        )
        .await;
    assert_eq!(s.error, 0);
    let offsets = vec![("t".to_string(), 0, 5, None)];
    assert_eq!(
        c.commit("g", a.generation - 1, &a.member_id, offsets.clone()),
        Err(ResponseError::IllegalGeneration.code())
    );
    assert_eq!(
        c.commit("g", a.generation, "nobody", offsets.clone()),
        Err(ResponseError::UnknownMemberId.code())
    );
    assert_eq!(c.commit("g", a.generation, &a.member_id, offsets), Ok(()));
    assert_eq!(
        c.heartbeat("g", a.generation + 1, &a.member_id),
        ResponseError::IllegalGeneration.code()
    );
}

#[tokio::test(start_paused = true)]
async fn expired_member_triggers_rebalance_and_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    let (a, b) = tokio::join!(c.join(join_req("", "a")), c.join(join_req("", "b")));
    let (leader, follower) = if a.member_id == a.leader {
        (a, b)
    } else {
        (b, a)
    };
    let _ = tokio::join!(
        c.sync("g", follower.generation, &follower.member_id, Vec::new()),
        c.sync("g", leader.generation, &leader.member_id, Vec::new()),
    );
    // Only the leader keeps heartbeating past the follower's session timeout.
    for _ in 0..12 {
        tokio::time::advance(Duration::from_secs(1)).await;
        c.heartbeat("g", leader.generation, &leader.member_id);
        c.expire_sessions();
    }
    assert_eq!(
        c.heartbeat("g", leader.generation, &leader.member_id),
        ResponseError::RebalanceInProgress.code()
    );
    let rejoined = c.join(join_req(&leader.member_id, "a")).await;
    assert_eq!(rejoined.error, 0);
    assert_eq!(rejoined.generation, leader.generation + 1);
    assert_eq!(rejoined.members.len(), 1);
    assert_eq!(
        c.heartbeat("g", follower.generation, &follower.member_id),
        ResponseError::UnknownMemberId.code()
    );
}

#[tokio::test(start_paused = true)]
async fn member_that_does_not_rejoin_is_removed_at_the_rebalance_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    let (a, b) = tokio::join!(c.join(join_req("", "a")), c.join(join_req("", "b")));
    let _ = tokio::join!(
        c.sync("g", a.generation, &a.member_id, Vec::new()),
        c.sync("g", b.generation, &b.member_id, Vec::new()),
    );
    // A new member joins; only it and `a` rejoin, `b` stays silent past the deadline.
    let (n, a2) = tokio::join!(
        c.join(join_req("", "n")),
        c.join(join_req(&a.member_id, "a"))
    );
    assert_eq!((n.error, a2.error), (0, 0));
    assert_eq!(n.generation, a.generation + 1);
    let d = c.describe("g").unwrap();
    assert_eq!(d.members.len(), 2);
    assert!(d.members.iter().all(|m| m.member_id != b.member_id));
}

#[tokio::test(start_paused = true)]
async fn offsets_and_generation_survive_restart_and_delete_rules_hold() {
    let dir = tempfile::tempdir().unwrap();
    let generation;
    {
        let c = open(dir.path());
        let a = c.join(join_req("", "a")).await;
        generation = a.generation;
        c.sync("g", a.generation, &a.member_id, Vec::new()).await;
        c.commit(
            "g",
            a.generation,
            &a.member_id,
            vec![("t".into(), 3, 77, Some("meta".into()))],
        )
        .unwrap();
        c.commit("solo", -1, "", vec![("t".into(), 0, 9, None)])
            .unwrap();
        assert_eq!(c.delete("g"), ResponseError::NonEmptyGroup.code());
        assert!(c.next_producer_id().unwrap() >= 0);
        c.close();
    }
    let c = open(dir.path());
    let got = c.committed("g", Some(vec![("t".into(), 3), ("t".into(), 4)]));
    assert_eq!(
        got[0].2.as_ref().map(|x| (x.offset, x.metadata.clone())),
        Some((77, Some("meta".into())))
    );
    assert!(got[1].2.is_none());
    assert_eq!(c.committed("solo", None).len(), 1);
    // The next generation continues from the persisted one.
    let a = c.join(join_req("", "a")).await;
    assert!(a.generation > generation);
    assert_eq!(c.delete("solo"), 0);
    assert_eq!(c.delete("solo"), ResponseError::GroupIdNotFound.code());
    assert!(c.committed("solo", None).is_empty());
}

#[tokio::test(start_paused = true)]
async fn producer_ids_are_never_reused_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let first = {
        let c = open(dir.path());
        let ids: Vec<i64> = (0..3).map(|_| c.next_producer_id().unwrap()).collect();
        c.close();
        ids
    };
    let c = open(dir.path());
    let next = c.next_producer_id().unwrap();
    assert!(first.iter().all(|id| *id < next), "{first:?} then {next}");
}

#[tokio::test(start_paused = true)]
async fn compacted_state_replays_to_the_same_offsets_generations_and_producer_ids() {
    let dir = tempfile::tempdir().unwrap();
    let (generation, issued) = {
        let c = open(dir.path());
        let a = c.join(join_req("", "a")).await;
        c.sync("g", a.generation, &a.member_id, Vec::new()).await;
        for i in 0..50 {
            c.commit(
                "g",
                a.generation,
                &a.member_id,
                vec![("t".into(), i % 4, i64::from(i), Some(format!("m{i}")))],
            )
            .unwrap();
        }
        c.commit("solo", -1, "", vec![("u".into(), 0, 5, None)])
            .unwrap();
        let issued = c.next_producer_id().unwrap();
        {
            let state = c.state.lock();
            c.journal.compact(&snapshot(&state)).unwrap();
        }
        c.close();
        (a.generation, issued)
    };
    let c = open(dir.path());
    let got = c.committed("g", None);
    assert_eq!(got.len(), 4);
    for (topic, partition, committed) in got {
        let committed = committed.unwrap();
        assert_eq!(topic, "t");
        // The last commit of each partition.
        let last = (0..50).filter(|i| i % 4 == partition).max().unwrap();
        assert_eq!(committed.offset, i64::from(last));
        assert_eq!(committed.metadata, Some(format!("m{last}")));
    }
    assert_eq!(c.committed("solo", None).len(), 1);
    assert!(c.producer_id_issued(issued));
    assert!(c.next_producer_id().unwrap() > issued);
    let a = c.join(join_req("", "a")).await;
    assert!(a.generation > generation);
}

#[tokio::test(start_paused = true)]
async fn a_sync_waiting_when_the_group_empties_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    let (a, b) = tokio::join!(c.join(join_req("", "a")), c.join(join_req("", "b")));
    let (leader, follower) = if a.member_id == a.leader {
        (a, b)
    } else {
        (b, a)
    };
    // The follower waits for the leader's assignment; then both leave at once.
    let waiting = {
        let c = c.clone();
        let f = follower.clone();
        tokio::spawn(async move { c.sync("g", f.generation, &f.member_id, Vec::new()).await })
    };
    tokio::task::yield_now().await;
    let codes = c.leave("g", &[leader.member_id.clone(), follower.member_id.clone()]);
    assert_eq!(codes, vec![0, 0]);
    let answered = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the waiting SyncGroup was never answered")
        .unwrap();
    assert_eq!(answered.error, ResponseError::UnknownMemberId.code());
    assert_eq!(c.describe("g").unwrap().state, GroupState::Empty);
}

#[tokio::test(start_paused = true)]
async fn leaving_with_an_unknown_member_id_does_not_rebalance() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    let a = c.join(join_req("", "a")).await;
    c.sync("g", a.generation, &a.member_id, Vec::new()).await;
    assert_eq!(
        c.leave("g", &["gone".to_string()]),
        vec![ResponseError::UnknownMemberId.code()]
    );
    assert_eq!(c.describe("g").unwrap().state, GroupState::Stable);
    assert_eq!(c.heartbeat("g", a.generation, &a.member_id), 0);
}
