//! System helpers: running commands, process liveness and verified kills, namespaces.
//! All `unsafe` of the crate lives here.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;

use crate::Error;

/// How long a short command (`ip`, `dnsmasq --test`) may take.
const RUN_LIMIT: Duration = Duration::from_secs(60);

/// Run a short command to completion (killed past [`RUN_LIMIT`]); an error carries its stderr.
pub(crate) fn run(cmd: &mut Command) -> Result<String, Error> {
    let desc = describe(cmd);
    let out = kd_disk::cmd::output(cmd, RUN_LIMIT, None)
        .map_err(|e| Error::Command(format!("{desc}: {e}")))?;
    if !out.status.success() {
        return Err(Error::Command(format!(
            "{desc}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `program arg...` for messages.
pub(crate) fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// `ip netns exec NS program args...`
pub(crate) fn netns_command(netns: &str, argv: &[impl AsRef<std::ffi::OsStr>]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", netns]);
    c.args(argv);
    c
}

/// Spawn in a new session (no controlling terminal, so no SIGHUP reaches dnsmasq).
pub(crate) fn spawn_detached(cmd: &mut Command) -> Result<Child, Error> {
    let desc = describe(cmd);
    // SAFETY: setsid(2) is async-signal-safe and the closure allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn()
        .map_err(|e| Error::Command(format!("spawn {desc}: {e}")))
}

/// Reap `pid` if it is a terminated child of this process (no-op otherwise).
fn reap(pid: u32) {
    if let Ok(p) = i32::try_from(pid) {
        let _ = waitpid(Pid::from_raw(p), Some(WaitPidFlag::WNOHANG));
    }
}

/// Whether `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    reap(pid);
    kd_disk::procstat::alive(pid)
}

/// The command line of `pid`, arguments joined by spaces.
pub(crate) fn cmdline(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        String::from_utf8_lossy(&raw)
            .split('\0')
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// Whether `pid` is alive and its command line contains `needle` (guards against PID reuse).
pub(crate) fn ours(pid: u32, needle: &str) -> bool {
    alive(pid) && cmdline(pid).is_some_and(|c| c.contains(needle))
}

fn signal(pid: u32, sig: Signal) {
    if let Ok(p) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(p), sig);
    }
}

/// Wait until `pid` is gone, at most `timeout`. Returns whether it is gone.
pub(crate) fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !alive(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Stop `pid` if it is ours (command line contains `needle`): SIGTERM, then SIGKILL.
/// Returns whether it was running.
pub(crate) fn stop(pid: u32, needle: Option<&str>, grace: Duration) -> bool {
    let mine = match needle {
        Some(n) => ours(pid, n),
        None => alive(pid),
    };
    if !mine {
        return false;
    }
    signal(pid, Signal::SIGTERM);
    if !wait_gone(pid, grace) {
        signal(pid, Signal::SIGKILL);
        wait_gone(pid, Duration::from_secs(5));
    }
    true
}

/// Whether the network namespace `name` exists.
pub fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

/// PIDs of the processes in namespace `name`.
pub(crate) fn netns_pids(name: &str) -> Vec<u32> {
    run(Command::new("ip").args(["netns", "pids", name]))
        .map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Real hardware virtualization, by lab.md's test: the CPU flags show vmx/svm and a
/// kvm_intel/kvm_amd module is loaded (a paravirtual `/dev/kvm` alone is not enough).
pub fn kvm_usable() -> bool {
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let has_flag = flags
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|w| w == "vmx" || w == "svm"));
    has_flag
        && Path::new("/dev/kvm").exists()
        && (Path::new("/sys/module/kvm_intel").exists()
            || Path::new("/sys/module/kvm_amd").exists())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::zombie_processes)] // `stop` reaps it through waitpid
    fn liveness_and_stop() {
        let mut c = Command::new("sleep");
        c.arg("30");
        let child = spawn_detached(&mut c).unwrap();
        let pid = child.id();
        assert!(alive(pid));
        assert!(cmdline(pid).unwrap().contains("sleep 30"));
        // Wrong needle: not ours, not touched.
        assert!(!stop(pid, Some("not-this"), Duration::from_secs(1)));
        assert!(alive(pid));
        assert!(stop(pid, Some("sleep 30"), Duration::from_secs(5)));
        assert!(!alive(pid));
        assert!(!netns_exists("kdlab-does-not-exist"));
    }
}
