//! Bounds of every timeout and retry count an operator sets (cluster.yaml's `workflow`,
//! `kd-coord` and `kd-agent` flags), in one place. A value past them is refused with the field,
//! the value and the limit, instead of overflowing a time computation (`Instant + Duration`
//! panics) or waiting for years.
//!
//! | what | allowed |
//! |---|---|
//! | a timeout, delay or interval (seconds) | at most [`MAX_SECS`] (1 day); at least 1 where 0 would mean "never wait" |
//! | retries of a step | 0 to [`MAX_RETRIES`] |

/// Longest timeout, delay or interval, in seconds: one day. A deployment step or a transfer
/// that needs more is stuck; the operator still gets a result the same day.
pub const MAX_SECS: u64 = 86_400;

/// Most retries of one step: each retry reboots the node again.
pub const MAX_RETRIES: u32 = 10;

/// Checks a number of seconds against `min..=MAX_SECS`; the error names the value and the
/// limit (the caller names the field).
pub fn check_secs(value: u64, min: u64) -> Result<u64, String> {
    if value > MAX_SECS {
        return Err(format!(
            "{value} s is more than the limit of {MAX_SECS} s (1 day)"
        ));
    }
    if value < min {
        return Err(format!("{value} s is less than the minimum of {min} s"));
    }
    Ok(value)
}

/// Checks a retry count against `0..=MAX_RETRIES`.
pub fn check_retries(value: u32) -> Result<u32, String> {
    if value > MAX_RETRIES {
        return Err(format!(
            "{value} retries is more than the limit of {MAX_RETRIES}"
        ));
    }
    Ok(value)
}

/// A command-line timeout in seconds, 1 to [`MAX_SECS`] (for clap's `value_parser`: clap names
/// the flag in front of the message).
pub fn parse_timeout_secs(s: &str) -> Result<u64, String> {
    let v: u64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds (1 to {MAX_SECS})"))?;
    check_secs(v, 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_named() {
        assert_eq!(check_secs(MAX_SECS, 1), Ok(MAX_SECS));
        assert_eq!(check_secs(0, 0), Ok(0));
        assert_eq!(
            check_secs(86_401, 1).unwrap_err(),
            "86401 s is more than the limit of 86400 s (1 day)"
        );
        assert!(check_secs(0, 1).unwrap_err().contains("minimum of 1 s"));
        assert_eq!(check_retries(10), Ok(10));
        assert!(check_retries(u32::MAX).unwrap_err().contains("limit of 10"));
        assert_eq!(parse_timeout_secs("30"), Ok(30));
        for bad in [
            "18446744073709551615",
            "99999999999999999999999",
            "-1",
            "x",
            "0",
        ] {
            assert!(parse_timeout_secs(bad).is_err(), "{bad}");
        }
    }
}
