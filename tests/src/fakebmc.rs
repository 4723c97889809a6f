//! A fake BMC over "process nodes", for loopback tests of the whole deploy workflow.
//!
//! `kd-fakebmc --dir D CMD NODE` is what a test cluster's command templates run. A node is a
//! *machine* process (`kd-fakebmc --dir D machine NODE`, detached, its own process group) that
//! "boots" by reading the node's iPXE profile under `http_root`:
//! * a deploy profile (`kernel URL PARAMS` with `kd.*`): it writes the parameters to a file and
//!   runs `kd-agent --cmdline FILE --disk DISK --work-dir DIR --listen ADDR:0 ...`; when the
//!   agent exits 0 (told to reboot) the machine boots again, otherwise it halts;
//! * a local-boot profile (`sanboot`) or no profile: it checks that the node's disk holds the
//!   deployed system (GRUB in the MBR, the marker file, root's `authorized_keys` with the key,
//!   mode 600, `/boot/grub/grub.cfg`) and only then listens on `ADDR:check_port`, writing an SSH
//!   banner to every connection; otherwise it halts ("no bootable disk").
//!
//! Everything lives under `D`: `bmc.json` ([`BmcConfig`]), `events.log` (one line per BMC
//! command and boot), and per node `nodes/NAME/` with `pid` (`PID STARTTIME`: only that exact
//! process is ever killed), `machine.log`, `agent.log`, `cmdline`, `work/`, and the test's
//! switches `dead` (the node never answers: commands exit 0 and do nothing), `fault` (one
//! `kd-agent --fault` value per line; `fault-once`: the same for the next agent only) and
//! `broken-boot` (the deployed system never boots).
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use kd_disk::procstat::ProcStat;
use serde::{Deserialize, Serialize};

/// The fake BMC's description of the cluster (`D/bmc.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BmcConfig {
    /// The `kd-agent` binary.
    pub agent: PathBuf,
    /// Where the coordinator writes iPXE profiles (`nodes/<mac-with-hyphens>.ipxe`).
    pub http_root: PathBuf,
    /// TCP port the deployed system answers on.
    pub check_port: u16,
    /// Partition number that receives the image.
    pub deploy_partition: u32,
    /// File that the deployed system must hold, and its content.
    pub marker: (String, String),
    /// Text root's `authorized_keys` must contain.
    pub key: String,
    /// Extra `kd-agent` arguments (e.g. `--stall-timeout 5`).
    pub agent_args: Vec<String>,
    /// The nodes.
    pub nodes: Vec<BmcNode>,
}

/// One process node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BmcNode {
    /// Name.
    pub name: String,
    /// MAC address (`aa:bb:..`).
    pub mac: String,
    /// Loopback address the node "has" (its agent and deployed system listen there).
    pub address: IpAddr,
    /// Its disk (a loop device).
    pub disk: PathBuf,
}

/// What a node's PXE profile says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Profile {
    /// Boot the deploy kernel with these parameters (everything after the kernel URL).
    Deploy(String),
    /// Boot from the local disk.
    Local,
    /// No profile file: iPXE's chain script falls back to the local disk.
    Missing,
}

/// Parses an iPXE profile (as `kd-coord` renders it).
pub fn parse_profile(text: &str) -> Result<Profile> {
    for line in text.lines() {
        let mut w = line.split_whitespace();
        if w.next() == Some("kernel") {
            let _url = w.next().context("kernel line without a URL")?;
            let params: Vec<&str> = w.collect();
            return Ok(Profile::Deploy(params.join(" ")));
        }
    }
    if text.contains("sanboot") {
        return Ok(Profile::Local);
    }
    bail!("neither a kernel line nor sanboot in the profile:\n{text}")
}

impl BmcConfig {
    /// Reads `D/bmc.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let p = dir.join("bmc.json");
        let s = std::fs::read_to_string(&p).with_context(|| format!("read {}", p.display()))?;
        serde_json::from_str(&s).with_context(|| format!("parse {}", p.display()))
    }

    /// Writes `D/bmc.json` and the per-node directories.
    pub fn save(&self, dir: &Path) -> Result<()> {
        for n in &self.nodes {
            std::fs::create_dir_all(node_dir(dir, &n.name))?;
        }
        std::fs::write(dir.join("bmc.json"), serde_json::to_vec_pretty(self)?)?;
        Ok(())
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Result<&BmcNode> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .with_context(|| format!("unknown node {name}"))
    }

    /// Path of a node's iPXE profile.
    pub fn profile_path(&self, node: &BmcNode) -> PathBuf {
        self.http_root.join("nodes").join(format!(
            "{}.ipxe",
            node.mac.to_ascii_lowercase().replace(':', "-")
        ))
    }
}

/// `D/nodes/NAME`.
pub fn node_dir(dir: &Path, name: &str) -> PathBuf {
    dir.join("nodes").join(name)
}

/// Appends a line to `D/events.log` (`MILLIS NODE WHAT`).
pub fn event(dir: &Path, node: &str, what: &str) {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("events.log"))
    {
        // One write per line: `writeln!` on a File writes each piece on its own, and the
        // pieces of lines from several processes (one per node) then interleave.
        let _ = f.write_all(format!("{ms} {node} {what}\n").as_bytes());
    }
}

/// The events of `D/events.log` for one node (without the timestamps).
pub fn events(dir: &Path, node: &str) -> Vec<String> {
    std::fs::read_to_string(dir.join("events.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut w = l.splitn(3, ' ');
            let _ms = w.next()?;
            (w.next()? == node).then(|| w.next().unwrap_or("").to_string())
        })
        .collect()
}

/// `PID STARTTIME` of the current process, for a pidfile.
pub fn pidfile_line(pid: u32) -> Option<String> {
    ProcStat::of(pid).map(|st| format!("{pid} {}", st.start))
}

/// The machine process of a node, if the pidfile names a process that is still that one and
/// still running (not a zombie).
pub fn machine_pid(dir: &Path, name: &str) -> Option<u32> {
    let s = std::fs::read_to_string(node_dir(dir, name).join("pid")).ok()?;
    let mut w = s.split_whitespace();
    let pid: u32 = w.next()?.parse().ok()?;
    let start: u64 = w.next()?.parse().ok()?;
    ProcStat::of(pid)
        .is_some_and(|st| st.start == start && st.running())
        .then_some(pid)
}

/// Kills a node's machine and everything it started (its process group), if it runs; waits
/// (bounded) until it is gone. Only the process recorded in the pidfile (same start time) is
/// touched.
pub fn kill_machine(dir: &Path, name: &str) -> bool {
    let Some(pid) = machine_pid(dir, name) else {
        let _ = std::fs::remove_file(node_dir(dir, name).join("pid"));
        return false;
    };
    let Ok(pgid) = i32::try_from(pid) else {
        return false;
    };
    // The pidfile's process was verified above to be the machine we started (same start
    // time); it leads its own process group, which holds its agent and the agent's tools.
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pgid),
        nix::sys::signal::Signal::SIGKILL,
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while machine_pid(dir, name).is_some() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_file(node_dir(dir, name).join("pid"));
    true
}

/// Kills every node's machine (test cleanup).
pub fn kill_all(dir: &Path) {
    let Ok(cfg) = BmcConfig::load(dir) else {
        return;
    };
    for n in &cfg.nodes {
        kill_machine(dir, &n.name);
    }
}

/// Runs a command, returning stdout; an error with stderr on failure.
fn run(cmd: &mut Command) -> Result<String> {
    let o = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !o.status.success() {
        bail!(
            "{cmd:?}: {}: {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).to_string())
}

/// Byte offset and size of partition `number` of `disk` (sfdisk's JSON).
pub fn partition_range(disk: &Path, number: u32) -> Result<(u64, u64)> {
    let out = run(Command::new("sfdisk").arg("--json").arg(disk))?;
    let j: serde_json::Value = serde_json::from_str(&out).context("sfdisk --json")?;
    let parts = j["partitiontable"]["partitions"]
        .as_array()
        .context("no partitions")?;
    for p in parts {
        let node = p["node"].as_str().unwrap_or("");
        let digits: String = node
            .chars()
            .rev()
            .take_while(char::is_ascii_digit)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        if digits.parse::<u32>().ok() == Some(number) {
            let start = p["start"].as_u64().context("start")?;
            let size = p["size"].as_u64().context("size")?;
            return Ok((start * 512, size * 512));
        }
    }
    bail!("no partition {number} on {}", disk.display())
}

/// Runs one debugfs request on the file system at `offset` of `disk` (read-only).
pub fn debugfs(disk: &Path, offset: u64, request: &str) -> Result<String> {
    run(Command::new("debugfs")
        .args(["-R", request])
        .arg(format!("{}?offset={offset}", disk.display())))
}

/// Checks that a node's disk holds the deployed system; `Err` says what is missing.
pub fn check_disk(cfg: &BmcConfig, node: &BmcNode) -> Result<()> {
    let mut mbr = [0u8; 512];
    {
        use std::io::Read;
        let mut f = std::fs::File::open(&node.disk)
            .with_context(|| format!("open {}", node.disk.display()))?;
        f.read_exact(&mut mbr).context("read the MBR")?;
    }
    if mbr[..440].iter().all(|&b| b == 0) {
        bail!("no boot code in the MBR (no GRUB)");
    }
    let (off, _) = partition_range(&node.disk, cfg.deploy_partition)?;
    let (path, want) = &cfg.marker;
    let got = debugfs(&node.disk, off, &format!("cat {path}"))?;
    if &got != want {
        bail!("{path} holds {got:?}, not {want:?}");
    }
    let keys = debugfs(&node.disk, off, "cat /root/.ssh/authorized_keys")?;
    if !keys.contains(&cfg.key) {
        bail!("root's authorized_keys ({keys:?}) lacks the key");
    }
    let st = debugfs(&node.disk, off, "stat /root/.ssh/authorized_keys")?;
    if !st.contains("Mode:  0600") {
        bail!("root's authorized_keys is not mode 600: {st}");
    }
    let st = debugfs(&node.disk, off, "stat /boot/grub/grub.cfg")?;
    if !st.contains("Inode:") {
        bail!("no /boot/grub/grub.cfg");
    }
    Ok(())
}

/// Releases what killed agents may leave behind under `dir`: mounts below it (lazily
/// unmounted, deepest first) and loop devices backed by files below it or by `keep` (the
/// test's own disks, which are not detached here), transitively.
pub fn release_under(dir: &Path, keep: &[PathBuf]) {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut mounts: Vec<String> = mountinfo
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_string))
        .filter(|m| Path::new(m).starts_with(dir))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mounts {
        eprintln!("cleanup: umount -l {m}");
        let _ = Command::new("umount").arg("-l").arg(&m).status();
    }
    let mut backing: Vec<PathBuf> = keep.to_vec();
    for _round in 0..4 {
        let Ok(o) = Command::new("losetup")
            .args([
                "--list",
                "--noheadings",
                "--raw",
                "--output",
                "NAME,BACK-FILE",
            ])
            .output()
        else {
            return;
        };
        let mut detached = false;
        for l in String::from_utf8_lossy(&o.stdout).lines() {
            let Some((name, back)) = l.split_once(' ') else {
                continue;
            };
            let (name, back) = (PathBuf::from(name), PathBuf::from(back.trim()));
            if keep.contains(&name) {
                continue;
            }
            if backing.contains(&back) || back.starts_with(dir) {
                eprintln!(
                    "cleanup: losetup -d {} ({})",
                    name.display(),
                    back.display()
                );
                let _ = Command::new("losetup").arg("-d").arg(&name).status();
                backing.push(name);
                detached = true;
            }
        }
        if !detached {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles() {
        let d = "#!ipxe\n# kd: deploy environment for node2\nkernel http://h:1/boot/vmlinuz initrd=initramfs.img console=ttyS0 kd.coord=127.0.0.1:7 kd.pin=ab kd.node=node2 kd.token=t\ninitrd http://h:1/boot/initramfs.img\nboot\n";
        assert_eq!(
            parse_profile(d).unwrap(),
            Profile::Deploy(
                "initrd=initramfs.img console=ttyS0 kd.coord=127.0.0.1:7 kd.pin=ab kd.node=node2 kd.token=t".into()
            )
        );
        let l =
            "#!ipxe\n# kd: local disk boot for node2\nsanboot --no-describe --drive 0x80 || exit\n";
        assert_eq!(parse_profile(l).unwrap(), Profile::Local);
        assert!(parse_profile("#!ipxe\nboot\n").is_err());
        assert!(parse_profile("kernel\n").is_err());
    }

    #[test]
    fn own_pidfile_line() {
        let me = std::process::id();
        let l = pidfile_line(me).unwrap();
        assert!(l.starts_with(&format!("{me} ")));
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(node_dir(dir.path(), "n")).unwrap();
        std::fs::write(node_dir(dir.path(), "n").join("pid"), &l).unwrap();
        assert_eq!(machine_pid(dir.path(), "n"), Some(me));
        // Same pid, other start time: not ours.
        std::fs::write(node_dir(dir.path(), "n").join("pid"), format!("{me} 1")).unwrap();
        assert_eq!(machine_pid(dir.path(), "n"), None);
    }

    #[test]
    fn event_log() {
        let dir = tempfile::tempdir().unwrap();
        event(dir.path(), "a", "reset");
        event(dir.path(), "b", "on");
        event(dir.path(), "a", "boot deploy");
        assert_eq!(events(dir.path(), "a"), vec!["reset", "boot deploy"]);
        assert!(events(dir.path(), "c").is_empty());
    }
}
