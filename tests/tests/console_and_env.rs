//! `kd-coord console NODE` and `kd-coord env update` through the daemon (`kd-coord serve` on a
//! temporary state directory), as several Unix users. No disks and no nodes are needed: the
//! clusters' console command is a shell that prints a banner and echoes its input.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kd_tests::daemon::{self, text, Daemon};
use kd_tests::*;

/// Limit of one client command.
const LIMIT: Duration = Duration::from_secs(60);

/// A state directory, two clusters (`lab`: node1, node2 with a console command; `bare`: node9
/// without one), an environment file.
struct Lab {
    tmp: tempfile::TempDir,
    state: PathBuf,
}

fn cluster_yaml(t: &Path, name: &str, nodes: &[(&str, u8)], console: Option<&str>) -> String {
    let mut y = format!("cluster: {name}\nnodes:\n");
    for (n, i) in nodes {
        y += &format!(
            "  - {{ name: {n}, address: 127.0.0.{i}, mac: \"52:54:00:00:30:{i:02x}\" }}\n"
        );
    }
    y += &format!(
        "pxe:\n  tftp_root: {tftp}\n  http_root: {http}\n  http_base_url: http://127.0.0.1:9/\n  \
         profile_naming: mac\n  method: ipxe\n\
         commands:\n  reboot:\n    soft: \"true\"\n",
        tftp = t.join("tftp").display(),
        http = t.join("http").display(),
    );
    if let Some(c) = console {
        y += &format!("  console: {c}\n");
    }
    y += &format!(
        "coordinator: {{ address: 127.0.0.1, port: {port} }}\n\
         disk:\n  block_device: /dev/kd-no-such-disk\n  layout:\n    device: /dev/kd-no-such-disk\n    label: gpt\n    partitions:\n\
         \x20     - {{ number: 1, size: 1MiB, role: bios_grub }}\n\
         \x20     - {{ number: 2, size: 80MiB, role: deploy, fs: ext4 }}\n",
        port = free_udp_port(),
    );
    y
}

impl Lab {
    fn new() -> Lab {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path().to_path_buf();
        // Other users read the environment and its image.
        std::fs::set_permissions(&t, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::create_dir_all(t.join("tftp")).unwrap();
        write(&t.join("http/boot/vmlinuz"), "not a kernel\n");
        // The console: a banner, then its input echoed; its pid where the test finds it.
        let console = format!(
            "sh -c 'echo $$ > {}/HOSTNAME.console.pid; echo console of HOSTNAME; exec cat'",
            t.display()
        );
        write(
            &t.join("lab.yaml"),
            &cluster_yaml(&t, "lab", &[("node1", 31), ("node2", 32)], Some(&console)),
        );
        write(
            &t.join("bare.yaml"),
            &cluster_yaml(&t, "bare", &[("node9", 39)], None),
        );
        // An environment: a small tar.
        let root = t.join("root");
        write(&root.join("etc/kd-marker"), "env update test\n");
        let st = Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(t.join("image.tar"))
            .arg(".")
            .status()
            .unwrap();
        assert!(st.success());
        write(
            &t.join("env.yaml"),
            &format!(
                "name: kdtest\nversion: 1\ndescription: console and env test\n\
                 image:\n  file: {}\n  kind: tar\n\
                 boot:\n  kernel: /vmlinuz\nfilesystem: ext4\n",
                t.join("image.tar").display()
            ),
        );
        Lab {
            state: t.join("state"),
            tmp,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// Starts `kd-coord serve` and waits for its socket to answer.
    fn serve(&self) -> Daemon {
        daemon::serve(&self.state, &self.path("daemon.log"), &[])
    }

    fn kd_cmd(&self, uid: Option<u32>, args: &[&str]) -> Command {
        daemon::kd_cmd(&self.state, uid, args)
    }

    /// Runs a `kd-coord` client command as `uid` (None: root), bounded.
    fn kd(&self, uid: Option<u32>, args: &[&str]) -> Output {
        daemon::kd(&self.state, uid, args, LIMIT).unwrap()
    }

    /// Runs `kd-coord console NODE` as `uid` with `input` on its stdin (a pipe, closed after).
    fn console(&self, uid: Option<u32>, node: &str, input: &str) -> Output {
        let mut child = self
            .kd_cmd(uid, &["console", node])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let input = input.to_string();
        // Written while the output is read (a pipe holds 64 KiB); a refused console closes
        // early: its stdin may be gone.
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(input.as_bytes());
        });
        let out = wait_child(&mut child, LIMIT).unwrap();
        writer.join().unwrap();
        out
    }
}

/// One raw HTTP/1.1 request as root: (status line, body). Reads the head and the body its
/// Content-Length announces (a 101 has none).
fn http(lab: &Lab, method: &str, path: &str, headers: &str, body: &str) -> (String, String) {
    use std::io::Read;
    let s = std::os::unix::net::UnixStream::connect(lab.state.join("kd.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut w = &s;
    write!(
        w,
        "{method} {path} HTTP/1.1\r\nHost: kd\r\n{headers}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut r = BufReader::new(&s);
    let mut status = String::new();
    r.read_line(&mut status).unwrap();
    let mut len = 0usize;
    loop {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        if l.trim().is_empty() {
            break;
        }
        if let Some(v) = l.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
    }
    let mut b = vec![0u8; len];
    r.read_exact(&mut b).unwrap();
    (
        status.trim_end().to_string(),
        String::from_utf8_lossy(&b).into_owned(),
    )
}

fn needs_root() -> bool {
    kd_disk::testenv::skip_unless(
        nix::unistd::geteuid().is_root(),
        "needs root (the test runs clients as other users)",
    )
}

/// Waits (10 s at most) until the process `pid` is gone (a zombie counts as gone); fails with
/// `what` otherwise.
fn assert_gone(pid: u32, what: &str) {
    let t0 = Instant::now();
    while kd_disk::procstat::alive(pid) {
        assert!(t0.elapsed() < Duration::from_secs(10), "{what} ({pid})");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn console_through_the_daemon_with_rights() {
    if needs_root() {
        return;
    }
    let (alice, bob) = (64021u32, 64022u32);
    let lab = Lab::new();
    let daemon = lab.serve();
    for c in ["lab.yaml", "bare.yaml"] {
        let o = lab.kd(
            None,
            &["cluster", "add", &lab.path(c).display().to_string()],
        );
        assert!(o.status.success(), "{}", text(&o));
    }
    // Alice may deploy node1 (on partition 2 only: any right on the node gives its console).
    let o = lab.kd(
        None,
        &["rights", "add", "-u", "uid64021", "-m", "node1", "-p", "2"],
    );
    assert!(o.status.success(), "{}", text(&o));

    // Non-terminal input is streamed, its end forwarded: the command ends, so does the client.
    let o = lab.console(Some(alice), "node1", "hello kd\nsecond line\n");
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "console of node1\nhello kd\nsecond line\n",
        "{}",
        text(&o)
    );

    // Much input while much output comes back: every byte, in order.
    let big: String = (0..40_000).map(|i| format!("line {i}\n")).collect();
    let o = lab.console(Some(alice), "node1", &big);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        o.stdout == format!("console of node1\n{big}").as_bytes(),
        "{} bytes back for {}",
        o.stdout.len(),
        big.len()
    );

    // Interactive: a line goes, comes back; the client goes away, the command is stopped.
    let mut child = lab
        .kd_cmd(Some(alice), &["console", "node1"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "console of node1\n");
    stdin.write_all(b"ping 1\n").unwrap();
    stdin.flush().unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "ping 1\n");
    let pid: u32 = std::fs::read_to_string(lab.path("node1.console.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(kd_disk::procstat::alive(pid));
    child.kill().unwrap();
    child.wait().unwrap();
    assert_gone(pid, "the console command outlived its client");

    // Bob has no right on node1: 403, the CLI's exit code 4, the node and the right named.
    let o = lab.console(Some(bob), "node1", "nothing\n");
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(
        text(&o).contains(
            "uid64022 may not use the console of node1: it needs a right on node1 \
             (an administrator grants it with kd-coord rights add -u uid64022 -m node1)"
        ),
        "{}",
        text(&o)
    );
    // Alice's right is on node1 only.
    let o = lab.console(Some(alice), "node2", "");
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(text(&o).contains("console of node2"), "{}", text(&o));
    // An administrator opens any console.
    let o = lab.console(None, "node2", "as root\n");
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "console of node2\nas root\n"
    );

    // An unknown node; a cluster without a console command.
    let o = lab.console(Some(alice), "node77", "");
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("unknown node(s) node77 (known: node[1-2,9])"),
        "{}",
        text(&o)
    );
    let o = lab.console(None, "node9", "");
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains(
            "cluster bare has no console command (commands.console in its configuration)"
        ),
        "{}",
        text(&o)
    );

    // The statuses, as the API gives them.
    let upgrade = "Upgrade: kd-console\r\nConnection: Upgrade\r\n";
    let (status, body) = http(&lab, "POST", "/api/v1/nodes/node9/console", upgrade, "");
    assert_eq!(status, "HTTP/1.1 400 Bad Request", "{body}");
    let (status, body) = http(&lab, "POST", "/api/v1/nodes/node77/console", upgrade, "");
    assert_eq!(status, "HTTP/1.1 400 Bad Request", "{body}");
    let (status, body) = http(&lab, "POST", "/api/v1/nodes/node1/console", "", "");
    assert_eq!(status, "HTTP/1.1 400 Bad Request", "{body}");
    assert!(body.contains("Upgrade: kd-console"), "{body}");
    let (status, _) = http(&lab, "POST", "/api/v1/nodes/node1/console", upgrade, "");
    assert_eq!(status, "HTTP/1.1 101 Switching Protocols");

    // The daemon's log: who opened which console, and how each ended (no command line: it
    // may hold a BMC's credentials).
    let log = std::fs::read_to_string(&daemon.log).unwrap();
    assert!(
        log.contains("console of node1 opened for uid64021"),
        "{log}"
    );
    let has = |a: &str, b: &str| log.lines().any(|l| l.contains(a) && l.contains(b));
    assert!(
        has("console of node1 closed for uid64021", "exit status 0"),
        "{log}"
    );
    assert!(
        has("console of node1 closed for uid64021", "the client left"),
        "{log}"
    );
    assert!(
        has("console of node2 closed for root", "exit status 0"),
        "{log}"
    );
    assert!(!log.contains("exec cat"), "{log}");

    // The daemon stopping (SIGTERM) stops the consoles it runs; their clients end.
    let mut child = lab
        .kd_cmd(Some(alice), &["console", "node1"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "console of node1\n");
    let pid: u32 = std::fs::read_to_string(lab.path("node1.console.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let o = wait_child(&mut child, LIMIT).unwrap();
    drop(stdin);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("the console of node1 closed without its command's end"),
        "{}",
        text(&o)
    );
    assert_gone(pid, "the console command outlived the daemon");
}

#[test]
fn env_update_by_its_owner_or_an_administrator() {
    if needs_root() {
        return;
    }
    let (alice, bob) = (64023u32, 64024u32);
    let lab = Lab::new();
    let _daemon = lab.serve();
    let env = lab.path("env.yaml").display().to_string();
    let o = lab.kd(Some(alice), &["env", "add", &env]);
    assert!(o.status.success(), "{}", text(&o));
    let list = |uid: u32| -> serde_json::Value {
        let o = lab.kd(Some(uid), &["env", "list", "-u", "uid64023", "--json"]);
        assert!(o.status.success(), "{}", text(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    assert_eq!(list(bob)["environments"], serde_json::json!([]));

    // Alice shares hers, with a new description.
    let o = lab.kd(
        Some(alice),
        &[
            "env",
            "update",
            "kdtest",
            "--visibility",
            "shared",
            "--description",
            "shared now",
            "--json",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let fields: Vec<&String> = v.as_object().unwrap().keys().collect();
    assert_eq!(
        fields,
        [
            "added",
            "description",
            "name",
            "user",
            "version",
            "visibility"
        ]
    );
    assert_eq!(v["name"], "kdtest");
    assert_eq!(v["version"], 1);
    assert_eq!(v["user"], "uid64023");
    assert_eq!(v["visibility"], "shared");
    assert_eq!(v["description"], "shared now");
    assert!(v["added"].as_i64().unwrap() > 1_700_000_000, "{v}");
    // Bob sees it now, as the listing says.
    let seen = list(bob);
    let e = &seen["environments"][0];
    assert_eq!(
        (
            &e["name"],
            &e["version"],
            &e["user"],
            &e["visibility"],
            &e["description"]
        ),
        (
            &serde_json::json!("kdtest"),
            &serde_json::json!(1),
            &serde_json::json!("uid64023"),
            &serde_json::json!("shared"),
            &serde_json::json!("shared now")
        ),
        "{seen}"
    );

    // Bob may not change it; Alice may not make it public; nor may anyone change its image.
    let o = lab.kd(
        Some(bob),
        &[
            "env",
            "update",
            "kdtest",
            "-u",
            "uid64023",
            "--visibility",
            "private",
        ],
    );
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(
        text(&o).contains("kdtest is uid64023's: uid64024 may not update it"),
        "{}",
        text(&o)
    );
    let o = lab.kd(
        Some(alice),
        &["env", "update", "kdtest", "--visibility", "public"],
    );
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(
        text(&o).contains("only an administrator makes environments public"),
        "{}",
        text(&o)
    );
    let (status, body) = http(
        &lab,
        "PATCH",
        "/api/v1/environments/kdtest?user=uid64023",
        "",
        r#"{"image": {"file": "/etc/shadow"}}"#,
    );
    assert_eq!(status, "HTTP/1.1 400 Bad Request", "{body}");
    assert!(body.contains("image cannot change"), "{body}");
    let o = lab.kd(
        Some(alice),
        &["env", "update", "kdtest@7", "--description", "x"],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("uid64023 has no environment kdtest@7"),
        "{}",
        text(&o)
    );
    let o = lab.kd(Some(alice), &["env", "update", "kdtest"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("nothing to update"), "{}", text(&o));

    // An administrator makes it public; its description text says so, its image is the same.
    let o = lab.kd(
        None,
        &[
            "env",
            "update",
            "kdtest@1",
            "-u",
            "uid64023",
            "--visibility",
            "public",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "kdtest@1 of uid64023: public, \"shared now\""
    );
    let o = lab.kd(Some(bob), &["env", "show", "kdtest", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["visibility"], "public");
    assert_eq!(v["user"], "uid64023");
    let yaml = v["yaml"].as_str().unwrap();
    assert!(yaml.contains("visibility: public"), "{yaml}");
    assert!(yaml.contains("description: shared now"), "{yaml}");
    assert!(
        yaml.contains(&lab.path("image.tar").display().to_string()),
        "{yaml}"
    );
}

#[test]
fn console_on_a_terminal_is_raw_and_tilde_dot_disconnects() {
    use nix::sys::termios::{tcgetattr, LocalFlags};
    use std::io::Read;
    use std::sync::{Arc, Mutex};
    if needs_root() {
        return;
    }
    let lab = Lab::new();
    let _daemon = lab.serve();
    let o = lab.kd(
        None,
        &[
            "cluster",
            "add",
            &lab.path("lab.yaml").display().to_string(),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let pty = nix::pty::openpty(None, None).unwrap();
    let before = tcgetattr(&pty.slave).unwrap();
    assert!(before
        .local_flags
        .contains(LocalFlags::ECHO | LocalFlags::ICANON));
    let mut child = lab
        .kd_cmd(None, &["console", "node1"])
        .stdin(Stdio::from(pty.slave.try_clone().unwrap()))
        .stdout(Stdio::from(pty.slave.try_clone().unwrap()))
        .stderr(Stdio::from(pty.slave.try_clone().unwrap()))
        .spawn()
        .unwrap();
    let seen = Arc::new(Mutex::new(Vec::<u8>::new()));
    {
        let seen = seen.clone();
        let mut master = std::fs::File::from(pty.master.try_clone().unwrap());
        std::thread::spawn(move || {
            let mut b = [0u8; 1024];
            while let Ok(n) = master.read(&mut b) {
                if n == 0 {
                    break;
                }
                seen.lock().unwrap().extend_from_slice(&b[..n]);
            }
        });
    }
    let wait_for = |needle: &str| {
        let t0 = Instant::now();
        loop {
            let s = String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
            if s.contains(needle) {
                return s;
            }
            assert!(t0.elapsed() < LIMIT, "no {needle:?} in {s:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let mut master = std::fs::File::from(pty.master.try_clone().unwrap());
    // Raw: the output is not translated ("\n" stays "\n"), the input is neither echoed by the
    // terminal nor turned into "\n": the console's cat sends back exactly "abc\r".
    let s = wait_for("console of node1\n");
    assert!(!s.contains("console of node1\r\n"), "{s:?}");
    master.write_all(b"abc\r").unwrap();
    let s = wait_for("abc\r");
    std::thread::sleep(Duration::from_millis(300));
    let s2 = String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
    assert!(!s2.contains("abc\r\n"), "{s:?} then {s2:?}");
    let pid: u32 = std::fs::read_to_string(lab.path("node1.console.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // "~." after "\r" (the start of a line): the client leaves, the terminal is restored.
    master.write_all(b"~.").unwrap();
    let out = wait_child(&mut child, LIMIT).unwrap();
    assert_eq!(out.status.code(), Some(0));
    let s = wait_for("disconnected from the console of node1\r\n");
    let tail = &s[s.find("abc").unwrap()..];
    assert_eq!(
        tail, "abc\r\r\nkd-coord: disconnected from the console of node1\r\n",
        "{s:?}"
    );
    let after = tcgetattr(&pty.slave).unwrap();
    assert_eq!(after.local_flags, before.local_flags);
    assert_eq!(after.input_flags, before.input_flags);
    assert_eq!(after.output_flags, before.output_flags);
    assert_gone(pid, "the console command lives on");

    // SIGTERM in raw mode: the terminal is restored too, the exit code says which signal.
    let mut child = lab
        .kd_cmd(None, &["console", "node1"])
        .stdin(Stdio::from(pty.slave.try_clone().unwrap()))
        .stdout(Stdio::from(pty.slave.try_clone().unwrap()))
        .stderr(Stdio::from(pty.slave.try_clone().unwrap()))
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while String::from_utf8_lossy(&seen.lock().unwrap())
        .matches("console of node1\n")
        .count()
        < 2
    {
        assert!(t0.elapsed() < LIMIT, "no second banner");
        std::thread::sleep(Duration::from_millis(10));
    }
    let raw = tcgetattr(&pty.slave).unwrap();
    assert!(!raw.local_flags.contains(LocalFlags::ECHO));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = wait_child(&mut child, LIMIT).unwrap();
    assert_eq!(out.status.code(), Some(143));
    wait_for("SIGTERM: disconnected from the console of node1");
    let after = tcgetattr(&pty.slave).unwrap();
    assert_eq!(after.local_flags, before.local_flags);
    assert_eq!(after.input_flags, before.input_flags);
}
