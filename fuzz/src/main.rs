//! `kd-fuzz`: run the fuzz targets (see `fuzz/README.md`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use kd_fuzz::runner::{self, Inputs};

const USAGE: &str = "\
usage: kd-fuzz run TARGET|all --inputs N [--seed S] [--max-secs T] [--out DIR]
       kd-fuzz replay [TARGET|all] [--out DIR]
       kd-fuzz list
Findings are saved as DIR/TARGET/<blake3 prefix>.bin (DIR: fuzz/regressions).
Exit status 1 when something was found.";

struct Args {
    words: Vec<String>,
    inputs: u64,
    seed: u64,
    start: u64,
    count: u64,
    max_secs: f64,
    out: PathBuf,
    files: Vec<PathBuf>,
    trace: bool,
}

fn parse() -> Result<Args> {
    let mut a = Args {
        words: Vec::new(),
        inputs: 10_000,
        seed: 1,
        start: 0,
        count: 0,
        max_secs: f64::INFINITY,
        out: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/regressions")),
        files: Vec::new(),
        trace: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(w) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match w.as_str() {
            "--inputs" => a.inputs = value("--inputs")?.parse().context("--inputs")?,
            "--seed" => a.seed = value("--seed")?.parse().context("--seed")?,
            "--start" => a.start = value("--start")?.parse().context("--start")?,
            "--count" => a.count = value("--count")?.parse().context("--count")?,
            "--max-secs" => a.max_secs = value("--max-secs")?.parse().context("--max-secs")?,
            "--out" => a.out = value("--out")?.into(),
            "--file" => a.files.push(value("--file")?.into()),
            "--trace" => a.trace = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ if w.starts_with("--") => bail!("unknown option {w}\n{USAGE}"),
            _ => a.words.push(w),
        }
    }
    if a.max_secs.is_nan() || a.max_secs <= 0.0 {
        bail!("--max-secs must be positive");
    }
    Ok(a)
}

fn main() {
    match real_main() {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("kd-fuzz: {e:#}");
            std::process::exit(2);
        }
    }
}

/// `Ok(false)` when something was found.
fn real_main() -> Result<bool> {
    let a = parse()?;
    let exe = std::env::current_exe().context("current_exe")?;
    let words: Vec<&str> = a.words.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["list"] => {
            for t in kd_fuzz::targets::all() {
                println!("{}", t.name);
            }
            Ok(true)
        }
        ["batch", name] => {
            let t = kd_fuzz::targets::by_name(name).context("unknown target")?;
            let inputs = if a.files.is_empty() {
                Inputs::Generated {
                    seed: a.seed,
                    start: a.start,
                    count: a.count,
                }
            } else {
                Inputs::Files(a.files.clone())
            };
            runner::batch(&t, &inputs, a.max_secs, a.trace, &mut std::io::stdout())?;
            Ok(true)
        }
        ["run", name] => {
            let mut clean = true;
            for t in runner::select(name)? {
                let inputs = Inputs::Generated {
                    seed: a.seed,
                    start: 0,
                    count: a.inputs,
                };
                let s = runner::run(&exe, &t, inputs, a.max_secs, &a.out)?;
                println!(
                    "{}: {} inputs in {:.1} s ({:.0}/s), {} accepted, {} findings{} (seed {})",
                    t.name,
                    s.inputs,
                    s.secs,
                    s.inputs as f64 / s.secs.max(1e-9),
                    s.accepted,
                    s.findings.len(),
                    if s.repeated > 0 {
                        format!(" (+{} repeats)", s.repeated)
                    } else {
                        String::new()
                    },
                    a.seed
                );
                clean &= s.findings.is_empty();
            }
            Ok(clean)
        }
        ["replay"] | ["replay", _] => {
            let name = words.get(1).copied().unwrap_or("all");
            let mut clean = true;
            for t in runner::select(name)? {
                let files = runner::regression_files(&a.out, &t);
                if files.is_empty() {
                    continue;
                }
                let n = files.len();
                let out = std::env::temp_dir();
                let s = runner::run(&exe, &t, Inputs::Files(files), f64::INFINITY, &out)?;
                println!(
                    "{}: {n} regression inputs replayed, {} findings",
                    t.name,
                    s.findings.len()
                );
                clean &= s.findings.is_empty() && s.inputs == n as u64;
            }
            Ok(clean)
        }
        _ => bail!("{USAGE}"),
    }
}
