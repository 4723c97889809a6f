//! Shared helpers for kd tests.
