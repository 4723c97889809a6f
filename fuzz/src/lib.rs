//! kd-fuzz: fuzzing on the stable toolchain, without libFuzzer or AFL.
//!
//! A coverage-less mutation fuzzer: each target starts from a corpus of valid inputs made by
//! the real code ([`seeds`]), mutates them ([`mutate`]) or builds inputs from random bytes with
//! `arbitrary`, and runs each one under `catch_unwind` ([`runner`]) in child processes with a
//! memory limit. See `fuzz/README.md`.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod mutate;
pub mod runner;
pub mod seeds;
pub mod targets;
