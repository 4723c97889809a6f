//! Per-step timing records the agent reports to the coordinator.
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::DiskError;

/// One step: its name, how long it took, its error and the output of its tools.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Step name, e.g. `partition`, `mkfs:3`, `postinstall:1`, `grub-install:i386-pc`.
    pub name: String,
    /// Duration in milliseconds.
    pub millis: u64,
    /// The error if the step failed.
    pub error: Option<String>,
    /// Captured output (shortened), or a note (e.g. why a step was skipped).
    pub output: String,
}

/// The records of one pipeline run, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepLog {
    /// Steps in the order they ran.
    pub steps: Vec<StepRecord>,
}

impl StepLog {
    /// Run `f` as step `name`; `f` returns its result and the output to record.
    pub fn step<T>(
        &mut self,
        name: impl Into<String>,
        f: impl FnOnce() -> Result<(T, String), DiskError>,
    ) -> Result<T, DiskError> {
        let start = Instant::now();
        let r = f();
        let millis = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        let name = name.into();
        match r {
            Ok((v, output)) => {
                tracing::debug!(step = %name, millis, "step done");
                self.steps.push(StepRecord {
                    name,
                    millis,
                    error: None,
                    output,
                });
                Ok(v)
            }
            Err(e) => {
                let output = match &e {
                    DiskError::Command { output, .. } => output.clone(),
                    _ => String::new(),
                };
                self.steps.push(StepRecord {
                    name,
                    millis,
                    error: Some(e.to_string()),
                    output,
                });
                Err(e)
            }
        }
    }

    /// The record of step `name`, if it ran.
    pub fn get(&self, name: &str) -> Option<&StepRecord> {
        self.steps.iter().find(|s| s.name == name)
    }
}
