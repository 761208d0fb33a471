//! `qanat`: the broker and its operator tools.

mod acls_cmd;
mod admin;
mod agent_cmd;
mod audit_cmd;
mod broker_cmd;
mod cdc_cmd;
mod collect_cmd;
mod groups_cmd;
mod https;
mod kafka_security;
mod lake_cmd;
mod quotas_cmd;
mod sync_cmd;
mod telemetry;
mod topics_cmd;
mod users_cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "qanat",
    version,
    about = "Qanat data ingestion: a Kafka-compatible bus and its tools"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker.
    Broker(broker_cmd::BrokerArgs),
    /// Create, list, describe, grow and delete topics on any Kafka-protocol broker.
    Topics(topics_cmd::TopicsArgs),
    /// List, describe (members, offsets, lag) and delete consumer groups.
    Groups(groups_cmd::GroupsArgs),
    /// Run the HTTP collection server for web and mobile logs.
    Collect(collect_cmd::CollectArgs),
    /// Tail log files and ship them to the bus with trajectory metadata.
    Agent(agent_cmd::AgentArgs),
    /// Prove every byte of every source file arrived exactly once (exit 1 on loss).
    Audit(audit_cmd::AuditArgs),
    /// Stream database changes (MariaDB/MySQL binlog, PostgreSQL logical replication) into the bus.
    Cdc(cdc_cmd::CdcArgs),
    /// Batch-copy tables between MariaDB/MySQL, PostgreSQL and Parquet (DataX-style).
    Sync(sync_cmd::SyncArgs),
    /// Land topics into the lake as Parquet, merge daily snapshots, audit rows.
    Lake(lake_cmd::LakeArgs),
    /// SCRAM users of a stopped broker's data directory.
    Users(users_cmd::UsersArgs),
    /// Kafka ACLs of a stopped broker's data directory.
    Acls(acls_cmd::AclsArgs),
    /// Client quotas of a stopped broker's data directory or of a running broker.
    Quotas(quotas_cmd::QuotasArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init_logging();
    if matches!(cli.command, Command::Broker(_)) {
        broker_cmd::cap_malloc_arenas();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("qanat")
        .build()?;
    match cli.command {
        Command::Broker(args) => runtime.block_on(broker_cmd::run(args)),
        Command::Topics(args) => runtime.block_on(topics_cmd::run(args)),
        Command::Groups(args) => runtime.block_on(groups_cmd::run(args)),
        Command::Collect(args) => runtime.block_on(collect_cmd::run(args)),
        Command::Agent(args) => runtime.block_on(agent_cmd::run(args)),
        Command::Audit(args) => runtime.block_on(audit_cmd::run(args)),
        Command::Cdc(args) => runtime.block_on(cdc_cmd::run(args)),
        Command::Sync(args) => runtime.block_on(sync_cmd::run(args)),
        Command::Lake(args) => runtime.block_on(lake_cmd::run(args)),
        Command::Users(args) => runtime.block_on(users_cmd::run(args)),
        Command::Acls(args) => runtime.block_on(acls_cmd::run(args)),
        Command::Quotas(args) => runtime.block_on(quotas_cmd::run(args)),
    }
}
