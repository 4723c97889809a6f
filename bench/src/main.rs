//! kd-bench: measurements that print tables (never timed tests).
use clap::{Parser, Subcommand};

mod disk;

#[derive(Parser)]
#[command(name = "kd-bench", about = "kd benchmarks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Disk write throughput of kd's tar and raw paths against `tar -x` and `dd`.
    Disk(disk::DiskArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Disk(a) => disk::run(a),
    }
}
