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

/// The harness itself: a panic, an allocation over the memory limit (the child aborts), a
/// hang and a slow input are each reported once, saved, and the run goes on to the end.
#[test]
fn harness_reports_every_kind_of_finding() {
    let out_dir = std::env::temp_dir().join(format!("kd-fuzz-selftest-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_kd-fuzz"))
        .args(["run", "selftest", "--inputs", "50", "--out"])
        .arg(&out_dir)
        .env("KD_FUZZ_HANG_SECS", "10")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("selftest: 50 inputs"), "{text}");
    for kind in ["(panic)", "(crash)", "(hang)", "(slow)"] {
        assert!(
            text.contains(&format!("FINDING {kind}")),
            "no {kind} finding:\n{text}"
        );
    }
    assert!(text.contains("selftest panic"), "{text}");
    let saved: Vec<Vec<u8>> = std::fs::read_dir(out_dir.join("selftest"))
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    for s in ["PANIC", "ALLOC", "HANG", "SLOW"] {
        assert!(
            saved.contains(&s.as_bytes().to_vec()),
            "{s} not saved:\n{text}"
        );
    }
    std::fs::remove_dir_all(&out_dir).unwrap();
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
    kd_fuzz::targets::remove_scratch();
    assert!(Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("regressions")
        .is_dir());
}
