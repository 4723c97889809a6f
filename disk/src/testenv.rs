//! One rule for tests that need something of the host (loop devices, root, a deploy initrd,
//! user xattrs): where it is missing, a test says why and is skipped; under CI (`CI=true`, as
//! `.ci/run` is run) it fails with that reason instead, so a green CI run means every test ran.

/// Whether the calling test must stop here (`true`) because what it needs is not `met`: prints
/// `SKIPPED: <why>` (also when the harness captures output) and returns `true`; under `CI=true`
/// panics with the reason instead.
pub fn skip_unless(met: bool, why: &str) -> bool {
    match decide(met, why, std::env::var("CI").ok().as_deref()) {
        Ok(skip) => {
            if skip {
                // Past the test harness's capture (which shows only failing tests' output).
                use std::io::Write;
                let _ = writeln!(std::io::stderr(), "SKIPPED: {why}");
            }
            skip
        }
        Err(reason) => panic!("{reason}"),
    }
}

/// `Ok(skip)`, or `Err(reason)` when a test that cannot run must fail (`ci` is `CI`'s value).
fn decide(met: bool, why: &str, ci: Option<&str>) -> Result<bool, String> {
    if met {
        Ok(false)
    } else if ci.is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        Err(format!(
            "this test cannot run here, and CI=true forbids skipping it: {why}"
        ))
    } else {
        Ok(true)
    }
}

/// [`skip_unless`] for what the disk tests need: loop devices (`/dev/loop-control`) and root
/// (loop devices, mounts).
pub fn skip_without_loop_devices() -> bool {
    skip_unless(
        crate::loopdev::loop_available(),
        "/dev/loop-control is absent (no loop devices)",
    ) || skip_unless(
        nix::unistd::geteuid().is_root(),
        "needs root for loop devices and mounts",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_requirement_skips_but_fails_under_ci() {
        assert_eq!(decide(true, "x", Some("true")), Ok(false));
        assert_eq!(decide(true, "x", None), Ok(false));
        assert_eq!(decide(false, "no loop", None), Ok(true));
        assert_eq!(decide(false, "no loop", Some("false")), Ok(true));
        let e = decide(false, "no loop", Some("true")).unwrap_err();
        assert!(e.contains("CI=true") && e.contains("no loop"), "{e}");
        assert!(decide(false, "no loop", Some("TRUE")).is_err());
    }
}
