//! `kd-bench disk` (being written).
#[derive(clap::Args)]
pub(crate) struct DiskArgs {}

pub(crate) fn run(_a: DiskArgs) -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}
