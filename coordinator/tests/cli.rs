//! `kd-coord` as an operator runs it: the state directory under concurrent starts and any
//! umask, the tokens file, bounds of the timeout flags.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use kd_coord::pki::{keys_match, CoordIdentity};

const BIN: &str = env!("CARGO_BIN_EXE_kd-coord");

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Runs `kd-coord ARGS` (killed after 60 s: a hang is a failure, not a stuck test).
fn run(args: &[&str]) -> Output {
    kd_disk::cmd::output(
        Command::new(BIN).args(args).env("KD_LOG", "warn"),
        Duration::from_secs(60),
        None,
    )
    .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Four `kd-coord pin` started at once on an empty state directory, 20 times: all print the
/// same pin, the pin of the certificate left on disk, whose key is the one left beside it.
#[test]
fn concurrent_first_starts_agree_on_one_identity() {
    let d = tempfile::tempdir().unwrap();
    for round in 0..20 {
        let state = d.path().join(format!("state{round}"));
        let children: Vec<_> = (0..4)
            .map(|_| {
                Command::new(BIN)
                    .arg("--state")
                    .arg(&state)
                    .arg("pin")
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let pins: Vec<String> = children
            .into_iter()
            .map(|c| {
                let o = c.wait_with_output().unwrap();
                assert!(o.status.success(), "round {round}: {}", stderr(&o));
                String::from_utf8_lossy(&o.stdout).trim().to_string()
            })
            .collect();
        assert!(
            pins.iter().all(|p| *p == pins[0]),
            "round {round}: {pins:?}"
        );
        let cert = std::fs::read(state.join(CoordIdentity::CERT_FILE)).unwrap();
        let key = std::fs::read(state.join(CoordIdentity::KEY_FILE)).unwrap();
        assert_eq!(keys_match(&cert, &key), Ok(()), "round {round}");
        assert_eq!(
            kd_proto::manifest::hex(&kd_net::cert_sha256(&cert)),
            pins[0],
            "round {round}"
        );
    }
}

/// Under umask 000 the state directory is still 0700 and the key 0600.
#[test]
fn the_state_directory_is_private_whatever_the_umask() {
    let d = tempfile::tempdir().unwrap();
    let state = d.path().join("var/lib/kd");
    let o = Command::new("/bin/sh")
        .arg("-c")
        .arg("umask 000 && exec \"$0\" --state \"$1\" pin")
        .arg(BIN)
        .arg(&state)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&state.join(CoordIdentity::KEY_FILE)), 0o600);
    assert_eq!(mode(&state.join(".lock")), 0o600);
    assert_eq!(mode(&state.join(CoordIdentity::CERT_FILE)), 0o644);
    assert_eq!(mode(&d.path().join("var/lib")), 0o755);
}

/// A key left 0644 (by hand, or by an older kd) is 0600 after the next start; a key that does
/// not go with the certificate stops kd-coord with both files named.
#[test]
fn an_existing_key_is_made_private_and_a_mismatched_one_refused() {
    let d = tempfile::tempdir().unwrap();
    let state = d.path().join("state");
    let s = state.to_str().unwrap();
    let first = run(&["--state", s, "pin"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let key = state.join(CoordIdentity::KEY_FILE);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let again = run(&["--state", s, "pin"]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(first.stdout, again.stdout, "the pin changed");
    assert_eq!(mode(&key), 0o600);
    std::fs::write(&key, CoordIdentity::generate().unwrap().key_der).unwrap();
    let bad = run(&["--state", s, "pin"]);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    let e = stderr(&bad);
    assert!(
        e.contains(&key.display().to_string())
            && e.contains(&state.join(CoordIdentity::CERT_FILE).display().to_string())
            && e.contains("does not belong")
            && e.contains("Delete both files"),
        "{e}"
    );
}

/// A small .kdi packed by the real packer.
fn image(dir: &Path) -> PathBuf {
    let input = dir.join("input.raw");
    std::fs::write(&input, vec![7u8; 100_000]).unwrap();
    let out = dir.join("small.kdi");
    let o = run(&[
        "image",
        "pack",
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    out
}

/// `broadcast --hello-timeout`/`--timeout` past a day are refused by name with the limit
/// (a huge one used to panic: `Instant + Duration` overflow).
#[test]
fn huge_timeout_flags_are_refused_with_the_limit() {
    let d = tempfile::tempdir().unwrap();
    let img = image(d.path());
    let state = d.path().join("state");
    let tokens = d.path().join("tokens");
    for (flag, other) in [
        ("--hello-timeout", "--timeout"),
        ("--timeout", "--hello-timeout"),
    ] {
        for value in ["18446744073709551615", "86401"] {
            let o = run(&[
                "--state",
                state.to_str().unwrap(),
                "broadcast",
                img.to_str().unwrap(),
                "-m",
                "n1",
                "--listen",
                "127.0.0.1:0",
                "--tokens",
                tokens.to_str().unwrap(),
                other,
                "1",
                flag,
                value,
            ]);
            let e = stderr(&o);
            assert_eq!(o.status.code(), Some(2), "{flag} {value}: {e}");
            assert!(
                e.contains(flag) && e.contains(value) && e.contains("limit of 86400 s"),
                "{flag} {value}: {e}"
            );
        }
    }
}

/// A tokens file that names a node outside `-m`, or a node twice, is refused before anything
/// listens, with the line.
#[test]
fn a_tokens_file_that_disagrees_with_the_node_set_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let img = image(d.path());
    let state = d.path().join("state");
    let tokens = d.path().join("tokens");
    for (text, want) in [
        (
            "n1 aa\nn9 bb\nn2 cc\n",
            "line 2: n9 is not one of the nodes",
        ),
        ("n1 aa\nn2 bb\nn1 cc\n", "line 3: a second token for n1"),
    ] {
        std::fs::write(&tokens, text).unwrap();
        let o = run(&[
            "--state",
            state.to_str().unwrap(),
            "broadcast",
            img.to_str().unwrap(),
            "-m",
            "n[1-2]",
            "--listen",
            "127.0.0.1:0",
            "--tokens",
            tokens.to_str().unwrap(),
            "--hello-timeout",
            "1",
        ]);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{text:?}: {e}");
        assert!(e.contains(want), "{text:?}: {e}");
        assert!(!e.contains("listening"), "{text:?}: {e}");
    }
}
