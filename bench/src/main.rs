//! kd-bench: measurements that print tables (never timed tests).
use clap::{Parser, Subcommand};

mod agents;
mod api;
mod arity;
mod disk;
mod plot;
mod storm;
mod tcp;

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
    /// Broadcast time against tree arity: kd-coord and kd-agent in network namespaces on a
    /// bridge, every link shaped by tc (needs root).
    Arity(Box<arity::ArityArgs>),
    /// Latency and memory of the kd daemon's HTTP API with a large cluster and history.
    Api(api::ApiArgs),
    /// Memory of the kd daemon with N simulated agents connected to one deployment (loopback).
    Agents(agents::AgentsArgs),
    /// One coordinator and N real agents (`--sink null`) started at once on loopback: time to
    /// admit and plan them all, every copy verified, refused handshakes, coordinator memory.
    Storm(storm::StormArgs),
    /// One hop of the plain TCP chain `arity --tcp-chain` runs as a reference.
    #[command(hide = true)]
    TcpRelay(tcp::RelayArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Disk(a) => disk::run(a),
        Cmd::Arity(a) => arity::run(*a),
        Cmd::Api(a) => api::run(a),
        Cmd::Agents(a) => agents::run(a),
        Cmd::Storm(a) => storm::run(a),
        Cmd::TcpRelay(a) => tcp::run(a),
    }
}
