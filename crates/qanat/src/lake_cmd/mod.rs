//! `qanat lake`: land topics into Parquet, merge daily snapshots, audit rows, list partitions.

mod audit;
mod land;
mod ls;
mod merge;

use clap::{Args, Subcommand};

#[derive(Args)]
pub struct LakeArgs {
    #[command(subcommand)]
    command: LakeCommand,
}

#[derive(Subcommand)]
enum LakeCommand {
    /// Land topics into Hive-partitioned Parquet change logs, exactly once.
    Land(land::LandArgs),
    /// Merge a day's changes onto the previous snapshot: the day's ODS partition.
    Merge(merge::MergeArgs),
    /// Reconcile rows from the bus to the change log to the snapshot; exit 1 on loss.
    Audit(audit::AuditArgs),
    /// List partitions with rows, bytes and source positions.
    Ls(ls::LsArgs),
}

pub async fn run(args: LakeArgs) -> anyhow::Result<()> {
    match args.command {
        LakeCommand::Land(args) => land::run(args).await,
        LakeCommand::Merge(args) => merge::run(args).await,
        LakeCommand::Audit(args) => audit::run(args).await,
        LakeCommand::Ls(args) => ls::run(args).await,
    }
}
