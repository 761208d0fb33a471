//! `qanat lake ls`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use qanat_lake::layout::TableName;
use qanat_lake::ls::{list, PartitionKind};

#[derive(Args)]
pub struct LsArgs {
    /// Lake root directory.
    #[arg(long)]
    root: PathBuf,
    /// Only this table, `db.table`.
    #[arg(long)]
    table: Option<String>,
    /// One JSON document instead of a table.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: LsArgs) -> anyhow::Result<()> {
    let table: Option<TableName> = args.table.as_deref().map(str::parse).transpose()?;
    let root = args.root.clone();
    let tables = tokio::task::spawn_blocking(move || list(&root, table.as_ref()))
        .await
        .context("listing task")??;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&tables)?);
        return Ok(());
    }
    println!(
        "{:<28} {:<8} {:<9} {:>5} {:>12} {:>14} {:<4} sources",
        "table", "kind", "ds", "files", "rows", "bytes", "done"
    );
    for table in &tables {
        for p in &table.partitions {
            let sources: Vec<String> = p
                .sources
                .iter()
                .map(|s| {
                    format!(
                        "{}:{}@{}..{}",
                        s.topic, s.partition, s.first_offset, s.last_offset
                    )
                })
                .collect();
            println!(
                "{:<28} {:<8} {:<9} {:>5} {:>12} {:>14} {:<4} {}",
                table.table,
                match p.kind {
                    PartitionKind::Snapshot => "snapshot",
                    PartitionKind::Changes => "changes",
                },
                p.ds,
                p.files,
                p.rows,
                p.bytes,
                if p.complete { "yes" } else { "no" },
                sources.join(" ")
            );
        }
    }
    Ok(())
}
