//! `qanat lake land`.

use clap::Args;

#[derive(Args)]
pub struct LandArgs {}

pub async fn run(_args: LandArgs) -> anyhow::Result<()> {
    anyhow::bail!("qanat lake land is not available in this build")
}
