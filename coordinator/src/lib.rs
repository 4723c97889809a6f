//! kd-coord: the coordinator library (the binary in `main.rs` is a thin CLI over it).
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod broadcast;
pub mod chunks;
pub mod client;
pub mod config;
pub mod console;
pub mod db;
pub mod deploy;
pub mod env;
pub mod fsutil;
pub mod https;
pub mod image;
pub mod pki;
pub mod service;
pub mod state;
pub mod tokens;
pub mod workflow;
