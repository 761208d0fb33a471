//! `qanat groups`: consumer groups, their members, assignments, committed offsets and lag —
//! through librdkafka, so it works against any Kafka-protocol broker.

use std::collections::BTreeMap;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use rdkafka::admin::AdminOptions;
use rdkafka::consumer::Consumer;
use rdkafka::{Offset, TopicPartitionList};

use crate::topics_cmd::{admin, check, consumer, Bootstrap, TIMEOUT};

#[derive(Args)]
pub struct GroupsArgs {
    #[command(flatten)]
    bootstrap: Bootstrap,
    #[command(subcommand)]
    command: GroupsCommand,
}

#[derive(Subcommand)]
enum GroupsCommand {
    /// List groups with their state and member count.
    List,
    /// Members (client id, host, assignment) and per-partition committed offset, log end, lag.
    Describe { group: String },
    /// Delete a group that has no members, with its committed offsets.
    Delete { group: String },
}

pub async fn run(args: GroupsArgs) -> anyhow::Result<()> {
    args.bootstrap.security.install()?;
    crate::kafka_security::check_login(&args.bootstrap.addr).await?;
    match args.command {
        GroupsCommand::Delete { group } => {
            let opts = AdminOptions::new().operation_timeout(Some(TIMEOUT));
            let results = admin(&args.bootstrap.addr)?
                .delete_groups(&[&group], &opts)
                .await
                .context("DeleteGroups")?;
            check(results, "deleted group")
        }
        GroupsCommand::List => {
            let bootstrap = args.bootstrap.addr.clone();
            let text = tokio::task::spawn_blocking(move || list(&bootstrap)).await??;
            print!("{text}");
            Ok(())
        }
        GroupsCommand::Describe { group } => {
            let bootstrap = args.bootstrap.addr.clone();
            let text = tokio::task::spawn_blocking(move || describe(&bootstrap, &group)).await??;
            print!("{text}");
            Ok(())
        }
    }
}

fn list(bootstrap: &str) -> anyhow::Result<String> {
    let c = consumer(bootstrap, "qanat-groups")?;
    let groups = c
        .fetch_group_list(None, TIMEOUT)
        .context("listing groups")?;
    let mut out = String::from("GROUP\tSTATE\tPROTOCOL\tMEMBERS\n");
    for g in groups.groups() {
        out.push_str(&format!(
            "{}\t{}\t{}\t{}\n",
            g.name(),
            g.state(),
            g.protocol(),
            g.members().len()
        ));
    }
    Ok(out)
}

/// Decode a consumer-protocol assignment: version, [topic, [partition]], user data.
pub fn parse_assignment(bytes: &[u8]) -> Option<Vec<(String, Vec<i32>)>> {
    fn take<const N: usize>(b: &mut &[u8]) -> Option<[u8; N]> {
        let (head, rest) = b.split_first_chunk::<N>()?;
        *b = rest;
        Some(*head)
    }
    let mut b = bytes;
    if b.is_empty() {
        return Some(Vec::new());
    }
    take::<2>(&mut b)?;
    let topics = i32::from_be_bytes(take::<4>(&mut b)?);
    let mut out = Vec::new();
    for _ in 0..topics.max(0) {
        let len = usize::try_from(i16::from_be_bytes(take::<2>(&mut b)?)).ok()?;
        if b.len() < len {
            return None;
        }
        let (name, rest) = b.split_at(len);
        b = rest;
        let name = String::from_utf8_lossy(name).into_owned();
        let count = i32::from_be_bytes(take::<4>(&mut b)?);
        let mut partitions = Vec::new();
        for _ in 0..count.max(0) {
            partitions.push(i32::from_be_bytes(take::<4>(&mut b)?));
        }
        out.push((name, partitions));
    }
    Some(out)
}

fn describe(bootstrap: &str, group: &str) -> anyhow::Result<String> {
    let c = consumer(bootstrap, group)?;
    let groups = c
        .fetch_group_list(Some(group), TIMEOUT)
        .context("describing the group")?;
    let Some(g) = groups.groups().iter().find(|g| g.name() == group) else {
        bail!("group {group} not found");
    };
    if g.state() == "Dead" {
        bail!("group {group} not found");
    }
    let mut out = format!(
        "group {}\tstate {}\tprotocol {}\n",
        g.name(),
        g.state(),
        g.protocol()
    );
    let mut owner: BTreeMap<(String, i32), String> = BTreeMap::new();
    for m in g.members() {
        let assignment = m
            .assignment()
            .and_then(parse_assignment)
            .unwrap_or_default();
        let shown: Vec<String> = assignment
            .iter()
            .map(|(t, ps)| format!("{t}{ps:?}"))
            .collect();
        out.push_str(&format!(
            "  member {}\tclient {}\thost {}\tassigned {}\n",
            m.id(),
            m.client_id(),
            m.client_host(),
            shown.join(" ")
        ));
        for (t, ps) in assignment {
            for p in ps {
                owner.insert((t.clone(), p), m.client_id().to_string());
            }
        }
    }
    // Committed offsets of every partition of every topic; show those the group touches.
    let metadata = c
        .fetch_metadata(None, TIMEOUT)
        .context("fetching metadata")?;
    let mut tpl = TopicPartitionList::new();
    for t in metadata.topics() {
        for p in t.partitions() {
            tpl.add_partition(t.name(), p.id());
        }
    }
    let committed = c
        .committed_offsets(tpl, TIMEOUT)
        .context("fetching committed offsets")?;
    out.push_str("  TOPIC\tPARTITION\tCOMMITTED\tLOG-END\tLAG\tOWNER\n");
    for e in committed.elements() {
        let key = (e.topic().to_string(), e.partition());
        let offset = match e.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        };
        if offset.is_none() && !owner.contains_key(&key) {
            continue;
        }
        let (_, high) = c
            .fetch_watermarks(e.topic(), e.partition(), TIMEOUT)
            .with_context(|| format!("offsets of {}-{}", e.topic(), e.partition()))?;
        let lag = offset.map_or("-".to_string(), |o| (high - o).max(0).to_string());
        out.push_str(&format!(
            "  {}\t{}\t{}\t{}\t{}\t{}\n",
            e.topic(),
            e.partition(),
            offset.map_or("-".to_string(), |o| o.to_string()),
            high,
            lag,
            owner.get(&key).map_or("-", String::as_str)
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignment_bytes_decode_and_garbage_is_none() {
        let mut b = vec![
            0, 1, 0, 0, 0, 1, 0, 2, b'o', b'k', 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 5,
        ];
        b.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(
            parse_assignment(&b),
            Some(vec![("ok".to_string(), vec![3, 5])])
        );
        assert_eq!(parse_assignment(&[0, 1, 0, 0, 0, 9]), None);
        assert_eq!(parse_assignment(&[]), Some(Vec::new()));
    }
}
