//! The short fuzz run CI keeps, and the replay of every saved finding.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

fn kd_fuzz(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kd-fuzz"))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Every file under fuzz/regressions/TARGET/ runs without a finding.
#[test]
fn regressions_replay_clean() {
    let (ok, out) = kd_fuzz(&["replay", "all"]);
    assert!(ok, "a saved finding fails again:\n{out}");
}

/// A short run of one target: the inputs all ran, some were accepted, nothing was found.
fn short_run(target: &str, inputs: u64) {
    let n = inputs.to_string();
    let (ok, out) = kd_fuzz(&[
        "run",
        target,
        "--inputs",
        &n,
        "--seed",
        "14",
        "--max-secs",
        "120",
    ]);
    assert!(ok, "{target}: the short fuzz run found something:\n{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with(&format!("{target}: ")))
        .unwrap_or_else(|| panic!("no summary line:\n{out}"));
    assert!(
        line.starts_with(&format!("{target}: {n} inputs")),
        "not every input ran: {line}"
    );
    let accepted: u64 = line
        .split(", ")
        .find_map(|p| p.strip_suffix(" accepted"))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        accepted > 0,
        "{target}: no input was accepted (the seeds are not valid?): {line}"
    );
}

#[test]
fn short_run_frame() {
    short_run("frame", 20_000);
}

#[test]
fn short_run_manifest() {
    short_run("manifest", 5_000);
}

#[test]
fn short_run_tokens() {
    short_run("tokens", 20_000);
}

#[test]
fn short_run_cluster_yaml() {
    short_run("cluster-yaml", 5_000);
}

#[test]
fn short_run_env_yaml() {
    short_run("env-yaml", 5_000);
}

#[test]
fn short_run_tar() {
    short_run("tar", 2_000);
}

/// Every seed of every target is valid: accepted by the real parser (a seed that does not
/// parse means the fuzzer mutates garbage).
#[test]
fn seeds_are_accepted() {
    for t in kd_fuzz::targets::all() {
        if t.name == "tar" {
            continue; // needs its sandbox: covered by the short run's accepted count
        }
        let seeds = (t.seeds)();
        assert!(seeds.len() >= 3, "{}: {} seeds", t.name, seeds.len());
        let accepted = seeds
            .iter()
            .filter(|s| (t.run)(s) == kd_fuzz::targets::Outcome::Accepted)
            .count();
        assert!(
            accepted * 2 > seeds.len(),
            "{}: only {accepted} of {} seeds accepted",
            t.name,
            seeds.len()
        );
    }
    assert!(Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("regressions")
        .is_dir());
}
