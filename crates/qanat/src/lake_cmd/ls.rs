//! `qanat lake ls`.

use clap::Args;

#[derive(Args)]
pub struct LsArgs {}

pub async fn run(_args: LsArgs) -> anyhow::Result<()> {
    anyhow::bail!("qanat lake ls is not available in this build")
}
