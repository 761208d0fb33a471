//! `qanat lake merge`.

use clap::Args;

#[derive(Args)]
pub struct MergeArgs {}

pub async fn run(_args: MergeArgs) -> anyhow::Result<()> {
    anyhow::bail!("qanat lake merge is not available in this build")
}
