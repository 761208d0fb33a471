//! `qanat lake audit`.

use clap::Args;

#[derive(Args)]
pub struct AuditArgs {}

pub async fn run(_args: AuditArgs) -> anyhow::Result<()> {
    anyhow::bail!("qanat lake audit is not available in this build")
}
