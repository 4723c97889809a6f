//! Running inputs. The parent (`kd-fuzz run`, `kd-fuzz replay`) starts child processes
//! (`kd-fuzz batch`) that run a range of inputs each and print what they found; the parent
//! writes the findings. A child runs under an address-space limit, so an allocation bomb aborts
//! it instead of swapping the machine; when a child dies that way, the parent runs its batch
//! again with `--trace` (the child prints each input's index before running it) to learn which
//! input killed it. A watchdog thread in the child reports an input that runs for more than
//! [`HANG_SECS`] and exits.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::mutate;
use crate::targets::{self, Outcome, Target};

/// An input that takes more CPU time than this (all threads, user + system: on a loaded
/// machine wall time says little) is a finding.
pub const SLOW: Duration = Duration::from_secs(1);
/// An input still running after this many seconds is a hang: the child reports it and exits
/// (`KD_FUZZ_HANG_SECS` overrides it, for the harness's own test).
pub const HANG_SECS: u64 = 20;

fn hang_secs() -> u64 {
    std::env::var("KD_FUZZ_HANG_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(HANG_SECS)
}
/// The address space of a child (an unchecked allocation of a few GiB aborts it).
pub const MEMORY_LIMIT: u64 = 4 << 30;
/// Exit code of a child whose watchdog saw a hang.
const HANG_EXIT: i32 = 3;

/// Where a child's inputs come from.
#[derive(Debug, Clone)]
pub enum Inputs {
    /// Generated: inputs `start..start + count` of run `seed`.
    Generated {
        /// The run's seed.
        seed: u64,
        /// First input.
        start: u64,
        /// Number of inputs.
        count: u64,
    },
    /// Files (replay of saved findings); input `i` is the `i`-th file.
    Files(Vec<PathBuf>),
}

/// Builds input `index` of `inputs` (the parent does it again for a finding).
fn input(t: &Target, corpus: &[Vec<u8>], inputs: &Inputs, index: u64) -> Result<Vec<u8>> {
    match inputs {
        Inputs::Generated { seed, .. } => {
            Ok(mutate::generate(corpus, t.dict, t.arbitrary, *seed, index))
        }
        Inputs::Files(files) => {
            let f = usize::try_from(index)
                .ok()
                .and_then(|i| files.get(i))
                .context("input index out of range")?;
            std::fs::read(f).with_context(|| format!("read {}", f.display()))
        }
    }
}

fn range(inputs: &Inputs) -> std::ops::Range<u64> {
    match inputs {
        Inputs::Generated { start, count, .. } => *start..start.saturating_add(*count),
        Inputs::Files(f) => 0..f.len() as u64,
    }
}

/// The panic message and location of the last panic (from any thread).
static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);

fn one_line(s: &str) -> String {
    s.replace('\n', "\\n")
}

/// The child: runs the inputs, printing `FINDING <index> <kind> <message>` lines and a final
/// `DONE <inputs> <accepted>` on `out`; with `trace`, `AT <index>` before each input.
pub fn batch(
    t: &Target,
    inputs: &Inputs,
    max_secs: f64,
    trace: bool,
    out: &mut impl Write,
) -> Result<()> {
    use nix::sys::resource::{setrlimit, Resource};
    setrlimit(Resource::RLIMIT_AS, MEMORY_LIMIT, MEMORY_LIMIT).context("setrlimit")?;
    let corpus = (t.seeds)();
    (t.setup)().with_context(|| format!("setting up the {} target", t.name))?;
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        if let Ok(mut p) = LAST_PANIC.lock() {
            *p = Some(format!("{at}: {msg}"));
        }
    }));
    // Watchdog: the index of the running input and when it started (ms since `t0`).
    const IDLE: u64 = u64::MAX;
    let t0 = Instant::now();
    let current = Arc::new(AtomicU64::new(IDLE));
    let since = Arc::new(AtomicU64::new(0));
    let hang = hang_secs();
    {
        let (current, since) = (current.clone(), since.clone());
        std::thread::Builder::new()
            .name("kd-fuzz-watchdog".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(200));
                let i = current.load(Ordering::SeqCst);
                let start = since.load(Ordering::SeqCst);
                let now = t0.elapsed().as_millis() as u64;
                if i != IDLE && now.saturating_sub(start) > hang * 1000 {
                    let mut o = std::io::stdout().lock();
                    let _ = writeln!(o, "HANG {i}");
                    let _ = o.flush();
                    std::process::exit(HANG_EXIT);
                }
            })
            .context("watchdog thread")?;
    }
    let (mut done, mut accepted) = (0u64, 0u64);
    for i in range(inputs) {
        if t0.elapsed().as_secs_f64() > max_secs {
            break;
        }
        let data = input(t, &corpus, inputs, i)?;
        if trace {
            writeln!(out, "AT {i}")?;
            out.flush()?;
        }
        since.store(t0.elapsed().as_millis() as u64, Ordering::SeqCst);
        current.store(i, Ordering::SeqCst);
        let started = Instant::now();
        let cpu0 = cpu_time();
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| (t.run)(&data)));
        let cpu = cpu_time().saturating_sub(cpu0);
        let took = started.elapsed();
        current.store(IDLE, Ordering::SeqCst);
        match r {
            Ok(Outcome::Accepted) => accepted += 1,
            Ok(Outcome::Rejected) => {}
            Err(_) => {
                let msg = LAST_PANIC
                    .lock()
                    .ok()
                    .and_then(|mut p| p.take())
                    .unwrap_or_default();
                writeln!(out, "FINDING {i} panic {}", one_line(&msg))?;
            }
        }
        if cpu > SLOW {
            writeln!(
                out,
                "FINDING {i} slow {} ms of CPU ({} ms)",
                cpu.as_millis(),
                took.as_millis()
            )?;
        }
        done += 1;
    }
    writeln!(out, "DONE {done} {accepted}")?;
    out.flush()?;
    Ok(())
}

/// CPU time of this process so far (every thread, user + system).
pub fn cpu_time() -> Duration {
    use nix::sys::resource::{getrusage, UsageWho};
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(u) => {
            let tv = |t: nix::sys::time::TimeVal| {
                Duration::from_secs(t.tv_sec().max(0) as u64)
                    + Duration::from_micros(t.tv_usec().max(0) as u64)
            };
            tv(u.user_time()) + tv(u.system_time())
        }
        Err(_) => Duration::ZERO,
    }
}

/// A finding, as the parent saw it.
#[derive(Debug, Clone)]
pub struct Finding {
    /// `panic`, `slow`, `hang` or `crash`.
    pub kind: String,
    /// What happened.
    pub message: String,
    /// Where the input was saved.
    pub file: PathBuf,
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Inputs run.
    pub inputs: u64,
    /// Inputs the target accepted.
    pub accepted: u64,
    /// Findings (at most a few per distinct message).
    pub findings: Vec<Finding>,
    /// Findings left out because their message was already seen.
    pub repeated: u64,
    /// Wall-clock seconds.
    pub secs: f64,
}

/// What one child process reported.
struct ChildReport {
    done: u64,
    accepted: u64,
    findings: Vec<(u64, String, String)>,
    last_at: Option<u64>,
    hang: Option<u64>,
    status: std::process::ExitStatus,
}

fn child_args(t: &Target, inputs: &Inputs, max_secs: f64, trace: bool) -> Vec<String> {
    let mut a = vec!["batch".to_string(), t.name.to_string()];
    match inputs {
        Inputs::Generated { seed, start, count } => a.extend([
            "--seed".into(),
            seed.to_string(),
            "--start".into(),
            start.to_string(),
            "--count".into(),
            count.to_string(),
        ]),
        Inputs::Files(files) => {
            for f in files {
                a.push("--file".into());
                a.push(f.display().to_string());
            }
        }
    }
    a.extend(["--max-secs".into(), format!("{max_secs:.3}")]);
    if trace {
        a.push("--trace".into());
    }
    a
}

fn run_child(
    exe: &Path,
    t: &Target,
    inputs: &Inputs,
    max_secs: f64,
    trace: bool,
) -> Result<ChildReport> {
    let mut child = Command::new(exe)
        .args(child_args(t, inputs, max_secs, trace))
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("run {}", exe.display()))?;
    let pid = child.id();
    let stdout = child.stdout.take().context("child stdout")?;
    let mut r = ChildReport {
        done: 0,
        accepted: 0,
        findings: Vec::new(),
        last_at: None,
        hang: None,
        status: std::process::ExitStatus::from_raw(0),
    };
    for line in BufReader::new(stdout).lines() {
        let line = line.context("read child output")?;
        let mut w = line.splitn(4, ' ');
        match (w.next(), w.next(), w.next(), w.next()) {
            (Some("AT"), Some(i), _, _) => r.last_at = i.parse().ok(),
            (Some("HANG"), Some(i), _, _) => r.hang = i.parse().ok(),
            (Some("DONE"), Some(d), Some(a), _) => {
                r.done = d.parse().unwrap_or(0);
                r.accepted = a.parse().unwrap_or(0);
            }
            (Some("FINDING"), Some(i), Some(kind), msg) => {
                if let Ok(i) = i.parse() {
                    r.findings
                        .push((i, kind.to_string(), msg.unwrap_or("").to_string()));
                }
            }
            _ => eprintln!("kd-fuzz: child: {line}"),
        }
    }
    r.status = child.wait().context("wait for the child")?;
    // The child's scratch directory (its tmpfs went with its mount namespace).
    let _ = std::fs::remove_dir_all(Path::new("/dev/shm").join(format!("kd-fuzz-{pid}")));
    let _ = std::fs::remove_dir_all(std::env::temp_dir().join(format!("kd-fuzz-{pid}")));
    Ok(r)
}

/// The run's state in the parent: the corpus (to rebuild inputs) and the findings so far.
struct Recorder<'a> {
    t: &'a Target,
    corpus: Vec<Vec<u8>>,
    out_dir: PathBuf,
    summary: Summary,
    seen: std::collections::HashMap<String, u32>,
}

impl Recorder<'_> {
    /// Saves input `index` as a finding (at most 3 per distinct message).
    fn record(&mut self, inputs: &Inputs, index: u64, kind: &str, message: &str) -> Result<()> {
        // Digits vary between inputs of the same bug (sizes, indices): not in the key.
        let key: String = format!("{kind} {message}")
            .chars()
            .filter(|c| !c.is_ascii_digit())
            .take(200)
            .collect();
        let n = self.seen.entry(key).or_insert(0);
        *n += 1;
        if *n > 3 {
            self.summary.repeated += 1;
            return Ok(());
        }
        let data = input(self.t, &self.corpus, inputs, index)?;
        let dir = self.out_dir.join(self.t.name);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let file = match inputs {
            Inputs::Files(files) => files
                .get(usize::try_from(index).unwrap_or(usize::MAX))
                .cloned()
                .unwrap_or_default(),
            Inputs::Generated { .. } => {
                let hash = blake3::hash(&data).to_hex();
                let f = dir.join(format!("{}.bin", &hash.as_str()[..16]));
                std::fs::write(&f, &data).with_context(|| format!("write {}", f.display()))?;
                f
            }
        };
        eprintln!(
            "kd-fuzz: {}: FINDING ({kind}) input {index}: {message}\n  saved as {}",
            self.t.name,
            file.display()
        );
        self.summary.findings.push(Finding {
            kind: kind.into(),
            message: message.into(),
            file,
        });
        Ok(())
    }
}

/// Runs `inputs` of target `t` in child processes of `exe` (this program), `max_secs` at most;
/// findings are saved under `out_dir/<target>/`.
pub fn run(
    exe: &Path,
    t: &Target,
    inputs: Inputs,
    max_secs: f64,
    out_dir: &Path,
) -> Result<Summary> {
    let t0 = Instant::now();
    let mut rec = Recorder {
        t,
        corpus: (t.seeds)(),
        out_dir: out_dir.to_path_buf(),
        summary: Summary::default(),
        seen: Default::default(),
    };
    if rec.corpus.is_empty() {
        bail!("{}: no seeds", t.name);
    }
    let all = range(&inputs);
    let mut next = all.start;
    let mut batch = 1000u64;
    while next < all.end {
        let left = max_secs - t0.elapsed().as_secs_f64();
        if left <= 0.0 {
            break;
        }
        let part = match &inputs {
            Inputs::Generated { seed, .. } => Inputs::Generated {
                seed: *seed,
                start: next,
                count: batch.min(all.end - next),
            },
            Inputs::Files(_) => inputs.clone(),
        };
        let offset = match &part {
            Inputs::Generated { .. } => 0,
            Inputs::Files(_) => next,
        };
        let part = match part {
            Inputs::Files(files) => Inputs::Files(files[usize::try_from(next)?..].to_vec()),
            g => g,
        };
        let started = Instant::now();
        let r = run_child(exe, t, &part, left, false)?;
        for (i, kind, msg) in &r.findings {
            rec.record(&inputs, i + offset, kind, msg)?;
        }
        rec.summary.inputs += r.done;
        rec.summary.accepted += r.accepted;
        let part_start = range(&part).start;
        if r.status.success() {
            if r.done == 0 {
                break; // out of time
            }
            next += r.done;
        } else if let Some(i) = r.hang {
            rec.record(
                &inputs,
                i + offset,
                "hang",
                &format!("still running after {HANG_SECS} s"),
            )?;
            rec.summary.inputs += i - part_start + 1;
            next = i + offset + 1;
        } else {
            // Killed (abort on an allocation over the memory limit, stack overflow, signal):
            // run the batch again, tracing, to learn which input it was.
            let how = match r.status.signal() {
                Some(s) => format!("killed by signal {s}"),
                None => format!("exited with {}", r.status),
            };
            let left = max_secs - t0.elapsed().as_secs_f64();
            let again = run_child(exe, t, &part, left.max(hang_secs() as f64 * 2.0), true)?;
            match again.last_at {
                Some(i) if !again.status.success() => {
                    rec.record(&inputs, i + offset, "crash", &how)?;
                    rec.summary.inputs += i - part_start + 1;
                    next = i + offset + 1;
                }
                _ => {
                    eprintln!(
                        "kd-fuzz: {}: a child {how} on inputs from {next} but not when run again",
                        t.name
                    );
                    next = range(&part).end + offset;
                }
            }
        }
        if started.elapsed() < Duration::from_secs(2) {
            batch = (batch * 2).min(1 << 20);
        }
    }
    rec.summary.secs = t0.elapsed().as_secs_f64();
    targets::remove_scratch();
    Ok(rec.summary)
}

/// Every `*.bin` file under `dir/<target>/`, sorted.
pub fn regression_files(dir: &Path, t: &Target) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join(t.name))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "bin"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// The targets named (`all` for every one).
pub fn select(name: &str) -> Result<Vec<Target>> {
    if name == "all" {
        return Ok(targets::all());
    }
    match targets::by_name(name) {
        Some(t) => Ok(vec![t]),
        None => bail!(
            "unknown target {name:?}; targets: all {}",
            targets::all()
                .iter()
                .map(|t| t.name)
                .collect::<Vec<_>>()
                .join(" ")
        ),
    }
}
