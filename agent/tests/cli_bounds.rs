//! kd-agent's timeout flags are bounded (`kd_proto::bounds`): a huge value is refused by name
//! with the limit (it used to overflow the agent's clock arithmetic once data flowed).
#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn a_huge_stall_timeout_is_refused_with_the_limit() {
    for value in ["18446744073709551615", "86401", "0"] {
        let pin = "00".repeat(32);
        // Refused at once; an agent that starts would try to connect for minutes.
        let o = kd_disk::cmd::output(
            Command::new(env!("CARGO_BIN_EXE_kd-agent"))
                .args(["--coord", "127.0.0.1:9", "--pin", &pin, "--node", "n1"])
                .args(["--token", "t", "--stall-timeout", value]),
            Duration::from_secs(10),
            None,
        )
        .unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{value}: {e}");
        assert!(
            e.contains("--stall-timeout") && e.contains(value),
            "{value}: {e}"
        );
    }
}

#[test]
fn a_window_out_of_bounds_is_refused_with_the_range() {
    // 2^40 chunks of window would be an allocation bomb the moment data flows.
    for value in ["1099511627776", "257", "0"] {
        let pin = "00".repeat(32);
        let o = Command::new(env!("CARGO_BIN_EXE_kd-agent"))
            .args(["--coord", "127.0.0.1:9", "--pin", &pin, "--node", "n1"])
            .args(["--token", "t", "--window", value])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{value}: {e}");
        assert!(
            e.contains("--window") && e.contains("2..=256"),
            "{value}: {e}"
        );
    }
}
