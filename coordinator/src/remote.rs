//! The CLI subcommands that are clients of the daemon (`kd-coord serve`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use hyper::Method;
use kd_coord::client::{Client, ClientError};
use kd_coord::service::DeployRequest;
use serde_json::{json, Value};

#[derive(Subcommand)]
pub(crate) enum DeploymentsCmd {
    /// List deployments, newest first.
    List {
        /// Only this user's.
        #[arg(long)]
        user: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one deployment and its nodes' results.
    Show {
        /// Deployment id.
        id: i64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Follow a deployment's progress until it ends.
    Follow {
        /// Deployment id.
        id: i64,
    },
    /// Cancel a running deployment (its nodes fail, their profiles boot the local disk).
    Cancel {
        /// Deployment id.
        id: i64,
    },
}

#[derive(Subcommand)]
pub(crate) enum ClusterCmd {
    /// Add (or replace) a cluster from its configuration file.
    Add {
        /// cluster.yaml.
        file: PathBuf,
    },
    /// List the clusters.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum EnvCmd {
    /// Register an environment from its description file (its image is packed once now).
    Add {
        /// The description (YAML: name, version, visibility, image, boot, ...).
        file: PathBuf,
    },
    /// List the environments you may use (yours, public ones; shared ones with --user or --all).
    List {
        /// Only this owner's.
        #[arg(short = 'u', long)]
        user: Option<String>,
        /// Shared ones of every owner too.
        #[arg(long)]
        all: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print an environment's description.
    Show {
        /// NAME or NAME@VERSION.
        name: String,
        /// Its owner.
        #[arg(short = 'u', long)]
        user: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change the visibility and/or description of one version (the last one without
    /// @VERSION): its owner, or an administrator; public ones by administrators. The image
    /// and the rest of a version stay as registered.
    Update {
        /// NAME or NAME@VERSION.
        name: String,
        /// Its owner (administrators).
        #[arg(short = 'u', long)]
        user: Option<String>,
        /// private, shared or public.
        #[arg(long, value_parser = ["private", "shared", "public"])]
        visibility: Option<String>,
        /// The new description.
        #[arg(long)]
        description: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove an environment (one version with NAME@VERSION, or all).
    Rm {
        /// NAME or NAME@VERSION.
        name: String,
        /// Its owner (administrators).
        #[arg(short = 'u', long)]
        user: Option<String>,
    },
}

fn env_query(name: &str, user: Option<&str>) -> Result<String> {
    let (n, v) = match name.split_once('@') {
        Some((n, v)) => (
            n,
            Some(
                v.parse::<u32>()
                    .with_context(|| format!("bad version in {name:?}: NAME@VERSION"))?,
            ),
        ),
        None => (name, None),
    };
    Ok(api_path(
        &format!("/api/v1/environments/{}", enc(n)),
        &[
            ("version", v.map(|v| v.to_string())),
            ("user", user.map(String::from)),
        ],
    ))
}

pub(crate) async fn env(c: &Client, cmd: EnvCmd) -> Result<i32> {
    match cmd {
        EnvCmd::Add { file } => {
            let yaml = std::fs::read_to_string(&file)
                .with_context(|| format!("read {}", file.display()))?;
            let dir = std::fs::canonicalize(&file)
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf))
                .unwrap_or_else(|| PathBuf::from("/"));
            let v = c
                .call(
                    Method::POST,
                    "/api/v1/environments",
                    Some(&json!({ "yaml": yaml, "dir": dir })),
                )
                .await?;
            println!(
                "{}@{} added for {} ({}), image {}",
                s(&v["name"]),
                s(&v["version"]),
                s(&v["user"]),
                s(&v["visibility"]),
                s(&v["image"])
            );
            Ok(0)
        }
        EnvCmd::List { user, all, json } => {
            let path = api_path(
                "/api/v1/environments",
                &[("all", Some(all.to_string())), ("user", user)],
            );
            let Some(v) = listing(c, &path, json).await? else {
                return Ok(0);
            };
            let mut rows = vec![["name", "version", "user", "visibility", "description"]
                .map(String::from)
                .to_vec()];
            rows.extend(json_rows(
                &v["environments"],
                &["name", "version", "user", "visibility", "description"],
            ));
            print!("{}", table(&rows));
            Ok(0)
        }
        EnvCmd::Show { name, user, json } => {
            let v = c
                .call(Method::GET, &env_query(&name, user.as_deref())?, None)
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "# {}@{} of {} ({})",
                    s(&v["name"]),
                    s(&v["version"]),
                    s(&v["user"]),
                    s(&v["visibility"])
                );
                print!("{}", v["yaml"].as_str().unwrap_or(""));
            }
            Ok(0)
        }
        EnvCmd::Update {
            name,
            user,
            visibility,
            description,
            json,
        } => {
            if visibility.is_none() && description.is_none() {
                bail!("nothing to update: give --visibility and/or --description");
            }
            let mut body = serde_json::Map::new();
            if let Some(v) = visibility {
                body.insert("visibility".into(), Value::String(v));
            }
            if let Some(d) = description {
                body.insert("description".into(), Value::String(d));
            }
            let v = c
                .call(
                    Method::PATCH,
                    &env_query(&name, user.as_deref())?,
                    Some(&Value::Object(body)),
                )
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{}@{} of {}: {}, {:?}",
                    s(&v["name"]),
                    s(&v["version"]),
                    s(&v["user"]),
                    s(&v["visibility"]),
                    v["description"].as_str().unwrap_or("")
                );
            }
            Ok(0)
        }
        EnvCmd::Rm { name, user } => {
            let v = c
                .call(Method::DELETE, &env_query(&name, user.as_deref())?, None)
                .await?;
            println!("{} version(s) removed", s(&v["removed"]));
            Ok(0)
        }
    }
}

#[derive(Subcommand)]
pub(crate) enum RightsCmd {
    /// Let USER deploy NODESET (or '*') on a partition (number, 'deploy' or '*').
    Add {
        /// User name.
        #[arg(short = 'u', long)]
        user: String,
        /// Node set, or '*' for every node.
        #[arg(short = 'm', long = "machines")]
        nodes: String,
        /// Partition number, 'deploy' (the layout's deploy partition) or '*'.
        #[arg(short = 'p', long, default_value = "*")]
        partition: String,
    },
    /// List rights.
    List(ListArgs),
    /// Remove USER's rights (all, or the one on NODESET).
    Rm {
        /// User name.
        #[arg(short = 'u', long)]
        user: String,
        /// Only the right on this node set (as it was added).
        #[arg(short = 'm', long = "machines")]
        nodes: Option<String>,
    },
}

#[derive(Subcommand)]
pub(crate) enum TokenCmd {
    /// Make a token for the HTTPS API (printed once; the daemon keeps only its hash). Only on
    /// the daemon's host, through its socket; another user's token needs an administrator.
    Add {
        /// Whose (default: yours).
        #[arg(short = 'u', long)]
        user: Option<String>,
        /// What it is for (shown by `token list`).
        #[arg(long, default_value = "")]
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List tokens (yours; an administrator's: everyone's, or USER's), without their secrets.
    #[command(mut_arg("user", |a| a.help("Only this user's (administrators)")))]
    List(ListArgs),
    /// Revoke a token by its id (`token list`).
    Rm {
        /// Its id.
        id: i64,
    },
}

/// The flags of `rights list` and `token list`.
#[derive(Args)]
pub(crate) struct ListArgs {
    /// Only this user's.
    #[arg(short = 'u', long)]
    user: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// An API path with its query: `base?k=v&...`, each value percent-encoded, the absent ones
/// left out.
fn api_path(base: &str, query: &[(&str, Option<String>)]) -> String {
    let mut path = base.to_string();
    for (i, (k, v)) in query
        .iter()
        .filter_map(|(k, v)| Some((k, v.as_deref()?)))
        .enumerate()
    {
        path.push(if i == 0 { '?' } else { '&' });
        path.push_str(&format!("{k}={}", enc(v)));
    }
    path
}

/// `GET path`; printed and `None` with `--json`, the answer otherwise (to print as a table).
async fn listing(c: &Client, path: &str, json: bool) -> Result<Option<Value>> {
    let v = c.call(Method::GET, path, None).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(None);
    }
    Ok(Some(v))
}

pub(crate) async fn token(c: &Client, cmd: TokenCmd) -> Result<i32> {
    match cmd {
        TokenCmd::Add { user, name, json } => {
            let v = c
                .call(
                    Method::POST,
                    "/api/v1/tokens",
                    Some(&json!({ "user": user, "name": name })),
                )
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                eprintln!(
                    "token {} for {} (shown once: keep it in a file of mode 0600 and give it \
                     with KD_TOKEN_FILE or KD_TOKEN):",
                    s(&v["id"]),
                    s(&v["user"])
                );
                println!("{}", s(&v["token"]));
            }
            Ok(0)
        }
        TokenCmd::List(a) => {
            let path = api_path("/api/v1/tokens", &[("user", a.user)]);
            let Some(v) = listing(c, &path, a.json).await? else {
                return Ok(0);
            };
            let mut rows = vec![["id", "user", "name", "created", "last used"]
                .map(String::from)
                .to_vec()];
            for t in v["tokens"].as_array().into_iter().flatten() {
                rows.push(vec![
                    s(&t["id"]),
                    s(&t["user"]),
                    s(&t["name"]),
                    when(&t["created"]),
                    if t["last_used"].is_null() {
                        "never".into()
                    } else {
                        when(&t["last_used"])
                    },
                ]);
            }
            print!("{}", table(&rows));
            Ok(0)
        }
        TokenCmd::Rm { id } => {
            c.call(Method::DELETE, &format!("/api/v1/tokens/{id}"), None)
                .await?;
            println!("token {id} revoked");
            Ok(0)
        }
    }
}

/// What `deploy` sends to the daemon.
pub(crate) struct DeployOpts {
    pub(crate) env: String,
    pub(crate) env_user: Option<String>,
    pub(crate) nodes: String,
    pub(crate) ssh_key: Option<PathBuf>,
    pub(crate) arity: String,
    pub(crate) partition: Option<u32>,
    pub(crate) ok_file: Option<PathBuf>,
    pub(crate) ko_file: Option<PathBuf>,
    pub(crate) json: bool,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Left-aligned columns, two spaces apart.
pub(crate) fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map(|s| s.chars().count()).unwrap_or(0))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == r.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[c]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Percent-encodes a query value.
fn enc(v: &str) -> String {
    v.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~*".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn when(v: &Value) -> String {
    let Some(t) = v.as_i64() else {
        return "-".into();
    };
    let ago = kd_coord::service::epoch_now() as i64 - t;
    match ago {
        i64::MIN..=59 => format!("{}s ago", ago.max(0)),
        60..=3599 => format!("{}m ago", ago / 60),
        3600..=86399 => format!("{}h ago", ago / 3600),
        _ => format!("{}d ago", ago / 86400),
    }
}

/// A table's rows from a JSON array: one cell per field, rendered by [`s`].
fn json_rows(list: &Value, fields: &[&str]) -> Vec<Vec<String>> {
    list.as_array()
        .map(|a| {
            a.iter()
                .map(|x| fields.iter().map(|f| s(&x[*f])).collect())
                .collect()
        })
        .unwrap_or_default()
}

/// Prints an API error the way the CLI prints errors, with exit code 2.
fn exit_code_of(e: &anyhow::Error) -> i32 {
    match e.downcast_ref::<ClientError>() {
        Some(ClientError::Api { status: 409, .. }) => 3,
        Some(ClientError::Api {
            status: 401 | 403, ..
        }) => 4,
        _ => 2,
    }
}

/// Runs a client command; errors are printed here so that their exit code can say what kind
/// they are (2 error, 3 busy nodes, 4 not allowed).
pub(crate) fn run_client<F>(f: F) -> Result<i32>
where
    F: std::future::Future<Output = Result<i32>>,
{
    match runtime()?.block_on(f) {
        Ok(c) => Ok(c),
        Err(e) => {
            eprintln!("kd-coord: error: {e:#}");
            Ok(exit_code_of(&e))
        }
    }
}

pub(crate) async fn nodes(
    c: &Client,
    set: Option<&str>,
    state: Option<&str>,
    json_out: bool,
) -> Result<i32> {
    let path = api_path(
        "/api/v1/nodes",
        &[
            ("nodes", set.map(String::from)),
            ("state", state.map(String::from)),
        ],
    );
    let v = c.call(Method::GET, &path, None).await?;
    if json_out {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    let list = v["nodes"].as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        if set.is_none() && state.is_none() {
            println!("no nodes configured: an administrator adds a cluster with kd-coord cluster add FILE.yaml");
        } else {
            println!("no such nodes");
        }
        return Ok(0);
    }
    let mut rows = vec![[
        "node",
        "state",
        "environment",
        "user",
        "deployment",
        "result",
        "updated",
        "reason",
    ]
    .map(String::from)
    .to_vec()];
    for n in &list {
        rows.push(vec![
            s(&n["name"]),
            s(&n["state"]),
            s(&n["environment"]),
            s(&n["user"]),
            s(&n["deployment"]),
            s(&n["result"]),
            when(&n["updated"]),
            n["reason"].as_str().unwrap_or("").to_string(),
        ]);
    }
    print!("{}", table(&rows));
    Ok(0)
}

/// What `stats` asks and prints.
pub(crate) struct StatsOpts {
    pub(crate) nodes: Option<String>,
    pub(crate) since: Option<i64>,
    pub(crate) failure_rate: bool,
    pub(crate) per_step: bool,
    pub(crate) csv: bool,
    pub(crate) json: bool,
}

/// `--since`: `YYYY-MM-DD` (UTC midnight), seconds since the epoch, or an age (`30m`, `12h`,
/// `7d`) before now.
pub(crate) fn parse_since(text: &str) -> Result<i64> {
    since_at(text, kd_coord::service::epoch_now() as i64)
}

fn since_at(text: &str, now: i64) -> Result<i64> {
    let t = text.trim();
    let bad = || {
        anyhow::anyhow!("bad --since {text:?}: YYYY-MM-DD, seconds since the epoch, or an age such as 30m, 12h, 7d")
    };
    if let Ok(secs) = t.parse::<i64>() {
        return Ok(secs);
    }
    if let Some((num, unit)) = t.split_at_checked(t.len().saturating_sub(1)) {
        let mult = match unit {
            "m" => Some(60),
            "h" => Some(3600),
            "d" => Some(86_400),
            "w" => Some(7 * 86_400),
            _ => None,
        };
        if let (Some(m), Ok(n)) = (mult, num.parse::<i64>()) {
            return n
                .checked_mul(m)
                .and_then(|d| now.checked_sub(d))
                .ok_or_else(bad);
        }
    }
    let parts: Vec<&str> = t.split('-').collect();
    if let [y, m, d] = parts[..] {
        let (y, m, d) = (
            y.parse::<i64>().map_err(|_| bad())?,
            m.parse::<i64>().map_err(|_| bad())?,
            d.parse::<i64>().map_err(|_| bad())?,
        );
        if !(1..=12).contains(&m) || !(1..=31).contains(&d) || !(1970..=9999).contains(&y) {
            return Err(bad());
        }
        // Days from the civil date (Howard Hinnant's algorithm).
        let y2 = if m <= 2 { y - 1 } else { y };
        let era = y2.div_euclid(400);
        let yoe = y2 - era * 400;
        let mp = (m + 9) % 12;
        let doy = (153 * mp + 2) / 5 + d - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        return Ok((era * 146_097 + doe - 719_468) * 86_400);
    }
    Err(bad())
}

/// Rows as CSV (quoted where needed).
fn csv(rows: &[Vec<String>]) -> String {
    let mut out = String::new();
    for r in rows {
        let cells: Vec<String> = r
            .iter()
            .map(|c| {
                if c.contains([',', '"', '\n']) {
                    format!("\"{}\"", c.replace('"', "\"\""))
                } else {
                    c.clone()
                }
            })
            .collect();
        out.push_str(&cells.join(","));
        out.push('\n');
    }
    out
}

fn secs_cell(v: &Value) -> String {
    v.as_f64()
        .map(|x| format!("{x:.1}"))
        .unwrap_or_else(|| "-".into())
}

/// The per-node table of `stats --failure-rate`.
fn node_stats_rows(v: &Value) -> Vec<Vec<String>> {
    let mut rows = vec![[
        "node",
        "deployments",
        "ok",
        "ko",
        "failure_rate",
        "mean_ok_secs",
        "last_failure",
    ]
    .map(String::from)
    .to_vec()];
    for n in v["per_node"].as_array().cloned().unwrap_or_default() {
        rows.push(vec![
            s(&n["node"]),
            s(&n["deployments"]),
            s(&n["ok"]),
            s(&n["ko"]),
            n["failure_rate"]
                .as_f64()
                .map(|x| format!("{:.0}%", x * 100.0))
                .unwrap_or_else(|| "-".into()),
            secs_cell(&n["mean_ok_secs"]),
            n["last_failure"].as_str().unwrap_or("").to_string(),
        ]);
    }
    rows
}

/// The per-step table of `stats --per-step`.
fn step_stats_rows(v: &Value) -> Vec<Vec<String>> {
    let mut rows = vec![[
        "step",
        "entered",
        "failed",
        "retries",
        "mean_secs",
        "max_secs",
    ]
    .map(String::from)
    .to_vec()];
    for st in v["per_step"].as_array().cloned().unwrap_or_default() {
        rows.push(vec![
            s(&st["step"]),
            s(&st["entered"]),
            s(&st["failed"]),
            s(&st["retries"]),
            secs_cell(&st["mean_secs"]),
            secs_cell(&st["max_secs"]),
        ]);
    }
    rows
}

pub(crate) async fn stats(c: &Client, o: StatsOpts) -> Result<i32> {
    let detail = o.failure_rate || o.per_step || o.nodes.is_some() || o.since.is_some();
    let path = api_path(
        "/api/v1/stats",
        &[
            ("detail", detail.then(|| "true".to_string())),
            ("nodes", o.nodes.clone()),
            ("since", o.since.map(|t| t.to_string())),
        ],
    );
    let v = c.call(Method::GET, &path, None).await?;
    if o.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    let print = |rows: Vec<Vec<String>>| {
        if o.csv {
            print!("{}", csv(&rows));
        } else {
            print!("{}", table(&rows));
        }
    };
    if o.failure_rate || o.per_step {
        if o.failure_rate {
            print(node_stats_rows(&v));
        }
        if o.failure_rate && o.per_step && !o.csv {
            println!();
        }
        if o.per_step {
            print(step_stats_rows(&v));
        }
        return Ok(0);
    }
    let mut rows = Vec::new();
    let map = |k: &str| -> String {
        v[k].as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| "none".into())
    };
    rows.push(vec!["nodes".into(), map("nodes_by_state")]);
    rows.push(vec!["deployments".into(), map("deployments_by_state")]);
    rows.push(vec![
        "node deployments".into(),
        format!(
            "{} ok, {} ko",
            s(&v["node_deployments_ok"]),
            s(&v["node_deployments_ko"])
        ),
    ]);
    rows.push(vec!["failures by step".into(), map("failures_by_step")]);
    rows.push(vec![
        "mean deployed node".into(),
        v["mean_ok_secs"]
            .as_f64()
            .map(|x| format!("{x:.1} s"))
            .unwrap_or_else(|| "-".into()),
    ]);
    rows.push(vec!["running now".into(), s(&v["deployments_running"])]);
    print(rows);
    Ok(0)
}

pub(crate) async fn deployments(c: &Client, cmd: DeploymentsCmd) -> Result<i32> {
    match cmd {
        DeploymentsCmd::List { user, limit, json } => {
            let path = api_path(
                "/api/v1/deployments",
                &[("limit", Some(limit.to_string())), ("user", user)],
            );
            let v = c.call(Method::GET, &path, None).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(0);
            }
            let mut rows = vec![[
                "id",
                "user",
                "environment",
                "nodes",
                "state",
                "ok",
                "ko",
                "started",
                "reason",
            ]
            .map(String::from)
            .to_vec()];
            for d in v["deployments"].as_array().cloned().unwrap_or_default() {
                rows.push(vec![
                    s(&d["id"]),
                    s(&d["user"]),
                    s(&d["environment"]),
                    s(&d["nodes"]),
                    s(&d["state"]),
                    s(&d["ok"]),
                    s(&d["ko"]),
                    when(&d["created"]),
                    d["reason"].as_str().unwrap_or("").to_string(),
                ]);
            }
            print!("{}", table(&rows));
            Ok(0)
        }
        DeploymentsCmd::Show { id, json } => {
            let v = c
                .call(Method::GET, &format!("/api/v1/deployments/{id}"), None)
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(0);
            }
            println!(
                "deployment {}: {} on {} by {}, {} ({} ok, {} ko){}",
                s(&v["id"]),
                s(&v["environment"]),
                s(&v["nodes"]),
                s(&v["user"]),
                s(&v["state"]),
                s(&v["ok"]),
                s(&v["ko"]),
                v["reason"]
                    .as_str()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            );
            print!("{}", results_table(&v["node_results"]));
            Ok(0)
        }
        DeploymentsCmd::Follow { id } => {
            let end = follow(c, id, None).await?;
            print!("{}", results_table(&end["node_results"]));
            Ok(exit_for(&end))
        }
        DeploymentsCmd::Cancel { id } => {
            c.call(
                Method::POST,
                &format!("/api/v1/deployments/{id}/cancel"),
                None,
            )
            .await?;
            eprintln!("kd-coord: deployment {id}: cancelling (kd-coord deployments follow {id} shows its end)");
            Ok(0)
        }
    }
}

fn results_table(nodes: &Value) -> String {
    let steps = kd_coord::workflow::Step::ALL.map(|s| s.as_str());
    let mut h = vec!["node".to_string(), "result".to_string()];
    h.extend(steps.iter().map(|s| s.to_string()));
    h.extend(["retries", "total", "reason"].map(String::from));
    let mut rows = vec![h];
    for n in nodes.as_array().cloned().unwrap_or_default() {
        let mut row = vec![s(&n["node"]), s(&n["result"])];
        let recs = n["steps"].as_array().cloned().unwrap_or_default();
        for st in steps {
            row.push(
                recs.iter()
                    .find(|r| r["step"] == st)
                    .and_then(|r| r["secs"].as_f64())
                    .map(|x| format!("{x:.1}"))
                    .unwrap_or_else(|| "-".into()),
            );
        }
        let retries: u64 = recs
            .iter()
            .map(|r| r["attempts"].as_u64().unwrap_or(1).saturating_sub(1))
            .sum();
        row.push(retries.to_string());
        row.push(
            n["total_secs"]
                .as_f64()
                .map(|x| format!("{x:.1}"))
                .unwrap_or_else(|| "-".into()),
        );
        row.push(match (n["step"].as_str(), n["reason"].as_str()) {
            (Some(st), Some(r)) => format!("{st}: {r}"),
            (None, Some(r)) => r.to_string(),
            _ => String::new(),
        });
        rows.push(row);
    }
    table(&rows)
}

fn exit_for(end: &Value) -> i32 {
    let all_ok = end["end"] == "done" && end["ko"].as_array().is_none_or(|k| k.is_empty());
    if all_ok {
        0
    } else {
        1
    }
}

/// Follows deployment `id`, printing its lines; Ctrl-C cancels it (and keeps following until
/// it ends). Returns the end line.
async fn follow(c: &Client, id: i64, t0: Option<Instant>) -> Result<Value> {
    let t0 = t0.unwrap_or_else(Instant::now);
    let mut end = Value::Null;
    let path = format!("/api/v1/deployments/{id}/events");
    // On a terminal, a bar of the nodes done and where the others are, with the notes above
    // it; otherwise plain lines.
    let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        let total = c
            .call(Method::GET, &format!("/api/v1/deployments/{id}"), None)
            .await
            .ok()
            .and_then(|v| v["node_count"].as_u64())
            .unwrap_or(0);
        let pb = indicatif::ProgressBar::new(total);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} nodes done  {msg}",
        ) {
            pb.set_style(style.progress_chars("=> "));
        }
        pb.enable_steady_tick(std::time::Duration::from_millis(500));
        Some(pb)
    } else {
        None
    };
    let mut progress = JobProgress::default();
    {
        let printing = c.follow(&path, |v| {
            if let Some(n) = v["note"].as_str() {
                let t = v["time"].as_f64().unwrap_or(t0.elapsed().as_secs_f64());
                let line = format!("kd-coord: [{t:6.1} s] {n}");
                match &bar {
                    Some(pb) => pb.println(line),
                    None => eprintln!("{line}"),
                }
            } else if v.get("end").is_some() {
                end = v;
            } else if progress.take(&v) {
                if let Some(pb) = &bar {
                    pb.set_position(progress.done() as u64);
                    pb.set_message(progress.message());
                }
            }
        });
        tokio::pin!(printing);
        let mut cancelled = false;
        loop {
            tokio::select! {
                r = &mut printing => { r?; break; }
                r = tokio::signal::ctrl_c(), if !cancelled => {
                    cancelled = true;
                    if r.is_ok() {
                        eprintln!("kd-coord: interrupted: cancelling deployment {id} (every node stops)");
                        if let Err(e) = c.call(Method::POST, &format!("/api/v1/deployments/{id}/cancel"), None).await {
                            eprintln!("kd-coord: cannot cancel: {e:#}");
                        }
                    }
                }
            }
        }
    }
    if let Some(pb) = &bar {
        pb.finish_and_clear();
    }
    if end.is_null() {
        bail!("the daemon's event stream of deployment {id} ended without its end: kd-coord deployments show {id}");
    }
    Ok(end)
}

/// Where a job's nodes are, from its event lines (what the progress bar shows).
#[derive(Debug, Default)]
pub(crate) struct JobProgress {
    /// Node → the step it is in (nodes not done).
    at: std::collections::BTreeMap<String, String>,
    ok: usize,
    ko: usize,
}

impl JobProgress {
    /// Takes one event line: `{node, step, attempt}` (a step starts) or `{node, result}` (a
    /// node is done). Returns whether it changed anything.
    pub(crate) fn take(&mut self, v: &Value) -> bool {
        let Some(node) = v["node"].as_str() else {
            return false;
        };
        if let Some(result) = v["result"].as_str() {
            self.at.remove(node);
            if result == "ok" {
                self.ok += 1;
            } else {
                self.ko += 1;
            }
            return true;
        }
        match v["step"].as_str() {
            Some(step) => {
                self.at.insert(node.to_string(), step.to_string());
                true
            }
            None => false,
        }
    }

    /// Nodes done, ok or not.
    pub(crate) fn done(&self) -> usize {
        self.ok + self.ko
    }

    /// `Prepare 2, Broadcast 5 | 3 ok, 1 ko`: nodes per step in workflow order, then results.
    pub(crate) fn message(&self) -> String {
        let mut counts: Vec<(usize, &str, usize)> = Vec::new();
        for step in self.at.values() {
            let order = kd_coord::workflow::Step::ALL
                .iter()
                .position(|s| s.as_str() == step)
                .unwrap_or(usize::MAX);
            match counts.iter_mut().find(|(_, s, _)| *s == step.as_str()) {
                Some(c) => c.2 += 1,
                None => counts.push((order, step.as_str(), 1)),
            }
        }
        counts.sort();
        let mut parts: Vec<String> = counts.iter().map(|(_, s, n)| format!("{s} {n}")).collect();
        parts.push(format!("| {} ok, {} ko", self.ok, self.ko));
        parts.join(", ").replace(", |", " |")
    }
}

pub(crate) async fn deploy(c: &Client, o: DeployOpts) -> Result<i32> {
    let t0 = Instant::now();
    // A file is sent as text; anything else names a registered environment (NAME[@VERSION]).
    let env_file = PathBuf::from(&o.env);
    let (environment, environment_dir, environment_name) = if env_file.is_file() {
        let text = std::fs::read_to_string(&env_file)
            .with_context(|| format!("read {}", env_file.display()))?;
        let dir = std::fs::canonicalize(&env_file)
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_else(|| PathBuf::from("/"));
        (text, dir, None)
    } else if o.env.contains('/') || o.env.ends_with(".yaml") {
        bail!("no environment file {}", o.env);
    } else {
        (String::new(), PathBuf::new(), Some(o.env.clone()))
    };
    let ssh_key = match &o.ssh_key {
        None => None,
        Some(k) => {
            let text =
                std::fs::read_to_string(k).with_context(|| format!("read {}", k.display()))?;
            kd_coord::deploy::check_ssh_key(&text).with_context(|| k.display().to_string())?;
            Some(text)
        }
    };
    let req = DeployRequest {
        environment,
        environment_dir,
        environment_name,
        environment_user: o.env_user.clone(),
        nodes: o.nodes.clone(),
        ssh_key,
        arity: o.arity.clone(),
        partition: o.partition,
    };
    let created = c
        .call(
            Method::POST,
            "/api/v1/deployments",
            Some(&serde_json::to_value(&req)?),
        )
        .await?;
    let id = created["id"]
        .as_i64()
        .context("the daemon answered without a deployment id")?;
    eprintln!(
        "kd-coord: deployment {id}: {} on {} ({} node(s)); Ctrl-C cancels it",
        s(&created["environment"]),
        s(&created["nodes"]),
        s(&created["node_count"])
    );
    let end = follow(c, id, Some(t0)).await?;
    let names = |f: &dyn Fn(&Value) -> Option<String>| -> Vec<String> {
        end["node_results"]
            .as_array()
            .map(|a| a.iter().filter_map(f).collect())
            .unwrap_or_default()
    };
    let ok = names(&|n| (n["result"] == "ok").then(|| s(&n["node"])));
    let ko = names(&|n| (n["result"] != "ok").then(|| s(&n["node"])));
    let write_list = |path: &Option<PathBuf>, list: &[String]| -> Result<()> {
        if let Some(p) = path {
            let mut text = list.join("\n");
            if !text.is_empty() {
                text.push('\n');
            }
            std::fs::write(p, text).with_context(|| format!("write {}", p.display()))?;
        }
        Ok(())
    };
    write_list(&o.ok_file, &ok)?;
    write_list(&o.ko_file, &ko)?;
    if o.json {
        println!("{}", serde_json::to_string_pretty(&end)?);
    } else {
        print!("{}", results_table(&end["node_results"]));
        let total = ok.len() + ko.len();
        match end["reason"].as_str() {
            Some(r) => println!(
                "{}/{total} nodes deployed (deployment {id} {}: {r})",
                ok.len(),
                s(&end["end"])
            ),
            None => println!("{}/{total} nodes deployed (deployment {id})", ok.len()),
        }
    }
    Ok(exit_for(&end))
}

/// What `reboot` and `power on|off` send to the daemon.
pub(crate) struct OpOpts {
    pub(crate) op: &'static str,
    pub(crate) kind: Option<String>,
    pub(crate) level: String,
    pub(crate) nodes: String,
    pub(crate) ok_file: Option<PathBuf>,
    pub(crate) ko_file: Option<PathBuf>,
    pub(crate) json: bool,
}

/// `kd-coord reboot` and `kd-coord power on|off`: a job of the daemon, followed to its end.
pub(crate) async fn operate(c: &Client, o: OpOpts) -> Result<i32> {
    let t0 = Instant::now();
    let req = serde_json::json!({
        "op": o.op,
        "kind": o.kind,
        "level": o.level,
        "nodes": o.nodes,
    });
    let created = c
        .call(Method::POST, "/api/v1/operations", Some(&req))
        .await?;
    let id = created["id"]
        .as_i64()
        .context("the daemon answered without a job id")?;
    eprintln!(
        "kd-coord: job {id}: {} of {} ({} node(s)); Ctrl-C cancels it",
        s(&created["environment"]).replace(':', " "),
        s(&created["nodes"]),
        s(&created["node_count"])
    );
    let end = follow(c, id, Some(t0)).await?;
    let names = |want_ok: bool| -> Vec<String> {
        end["node_results"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|n| (n["result"] == "ok") == want_ok)
                    .map(|n| s(&n["node"]))
                    .collect()
            })
            .unwrap_or_default()
    };
    let (ok, ko) = (names(true), names(false));
    for (path, list) in [(&o.ok_file, &ok), (&o.ko_file, &ko)] {
        if let Some(p) = path {
            let mut text = list.join("\n");
            if !text.is_empty() {
                text.push('\n');
            }
            std::fs::write(p, text).with_context(|| format!("write {}", p.display()))?;
        }
    }
    if o.json {
        println!("{}", serde_json::to_string_pretty(&end)?);
    } else {
        let mut rows = vec![["node", "result", "secs", "levels", "reason"]
            .map(String::from)
            .to_vec()];
        for n in end["node_results"].as_array().cloned().unwrap_or_default() {
            let levels: Vec<String> = n["steps"]
                .as_array()
                .map(|st| {
                    st.iter()
                        .flat_map(|r| r["reboots"].as_array().cloned().unwrap_or_default())
                        .map(|l| s(&l))
                        .collect()
                })
                .unwrap_or_default();
            rows.push(vec![
                s(&n["node"]),
                s(&n["result"]),
                n["total_secs"]
                    .as_f64()
                    .map(|x| format!("{x:.1}"))
                    .unwrap_or_else(|| "-".into()),
                levels.join(","),
                n["reason"].as_str().unwrap_or("").to_string(),
            ]);
        }
        print!("{}", table(&rows));
        let done = match o.op {
            "power_on" => "powered on",
            "power_off" => "powered off",
            _ => "rebooted",
        };
        let total = ok.len() + ko.len();
        match end["reason"].as_str() {
            Some(r) => println!(
                "{}/{total} nodes {done} (job {id} {}: {r})",
                ok.len(),
                s(&end["end"])
            ),
            None => println!("{}/{total} nodes {done} (job {id})", ok.len()),
        }
    }
    Ok(exit_for(&end))
}

/// `kd-coord power status`.
pub(crate) async fn power_status(c: &Client, nodes: &str, json_out: bool) -> Result<i32> {
    let v = c
        .call(
            Method::GET,
            &api_path("/api/v1/power", &[("nodes", Some(nodes.to_string()))]),
            None,
        )
        .await?;
    if json_out {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    let mut rows = vec![["node", "status"].map(String::from).to_vec()];
    let mut failed = false;
    for n in v["nodes"].as_array().cloned().unwrap_or_default() {
        let status = if n["ok"] == true {
            s(&n["status"])
        } else {
            failed = true;
            format!("error: {}", s(&n["error"]))
        };
        rows.push(vec![s(&n["node"]), status]);
    }
    print!("{}", table(&rows));
    Ok(if failed { 1 } else { 0 })
}

pub(crate) async fn cluster(c: &Client, cmd: ClusterCmd) -> Result<i32> {
    match cmd {
        ClusterCmd::Add { file } => {
            let yaml = std::fs::read_to_string(&file)
                .with_context(|| format!("read {}", file.display()))?;
            let v = c
                .call(
                    Method::POST,
                    "/api/v1/clusters",
                    Some(&json!({ "yaml": yaml })),
                )
                .await?;
            println!(
                "cluster {}: {} node(s) {}",
                s(&v["name"]),
                s(&v["node_count"]),
                s(&v["nodes"])
            );
            Ok(0)
        }
        ClusterCmd::List { json } => {
            let v = c.call(Method::GET, "/api/v1/clusters", None).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(0);
            }
            let mut rows = vec![["cluster", "nodes", "count", "coordinator"]
                .map(String::from)
                .to_vec()];
            rows.extend(json_rows(
                &v["clusters"],
                &["name", "nodes", "node_count", "coordinator"],
            ));
            print!("{}", table(&rows));
            Ok(0)
        }
    }
}

pub(crate) async fn rights(c: &Client, cmd: RightsCmd) -> Result<i32> {
    match cmd {
        RightsCmd::Add {
            user,
            nodes,
            partition,
        } => {
            c.call(
                Method::POST,
                "/api/v1/rights",
                Some(&json!({ "user": user, "nodes": nodes, "partition": partition })),
            )
            .await?;
            println!("{user} may deploy {nodes} (partition {partition})");
            Ok(0)
        }
        RightsCmd::List(a) => {
            let path = api_path("/api/v1/rights", &[("user", a.user)]);
            let Some(v) = listing(c, &path, a.json).await? else {
                return Ok(0);
            };
            let mut rows = vec![["user", "nodes", "partition"].map(String::from).to_vec()];
            rows.extend(json_rows(&v["rights"], &["user", "nodes", "partition"]));
            print!("{}", table(&rows));
            Ok(0)
        }
        RightsCmd::Rm { user, nodes } => {
            let path = api_path("/api/v1/rights", &[("user", Some(user)), ("nodes", nodes)]);
            let v = c.call(Method::DELETE, &path, None).await?;
            println!("{} right(s) removed", s(&v["removed"]));
            Ok(0)
        }
    }
}

/// Puts a terminal in raw mode until dropped (every way out of `console`, panics included).
struct RawMode {
    saved: nix::sys::termios::Termios,
}

impl RawMode {
    fn enter() -> Result<RawMode> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin).context("reading the terminal's settings")?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSADRAIN, &raw).context("putting the terminal in raw mode")?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        use nix::sys::termios::{tcsetattr, SetArg};
        let _ = tcsetattr(std::io::stdin(), SetArg::TCSADRAIN, &self.saved);
    }
}

/// `kd-coord console NODE`: the node's console through the daemon. A terminal is put in raw
/// mode (restored on the way out) and `~.` at the start of a line disconnects; other input
/// is streamed, its end forwarded. Exit 0 when the console command ended well or the user
/// disconnected, 1 when it failed, 128+N after signal N (SIGTERM, SIGHUP, SIGINT: the
/// terminal restored first).
pub(crate) async fn console(c: &Client, node: &str) -> Result<i32> {
    use kd_coord::console::{self, Escape};
    use std::io::{IsTerminal, Read, Write};
    let io = c
        .upgrade(
            &format!("/api/v1/nodes/{}/console", enc(node)),
            console::PROTOCOL,
        )
        .await?;
    let (rd, mut wr) = tokio::io::split(hyper_util::rt::TokioIo::new(io));
    let tty = std::io::stdin().is_terminal();
    eprintln!(
        "kd-coord: console of {node}{}",
        if tty {
            " (~. at the start of a line disconnects)"
        } else {
            ""
        }
    );
    let raw = if tty { Some(RawMode::enter()?) } else { None };
    // A thread of its own: a blocking read that cannot be cancelled must not hold up the
    // runtime's end (the process exits with it still reading).
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        let mut stdin = std::io::stdin();
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let mut escape = Escape::default();
    let mut input_open = true;
    let mut status = None;
    // Frames from a stream that keeps a frame half read when another branch wins the select
    // (read_frame itself must not be cancelled mid-frame).
    let frames = futures_util::stream::unfold(Some(rd), |rd| async move {
        let mut rd = rd?;
        match console::read_frame(&mut rd).await {
            Ok(Some(f)) => Some((Ok(f), Some(rd))),
            Ok(None) => None,
            Err(e) => Some((Err(e), None)),
        }
    });
    tokio::pin!(frames);
    // A signal ends the session the way ~. does: the terminal is restored on the way out.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut int = signal(SignalKind::interrupt())?;
    enum How {
        Disconnected,
        Signal(&'static str, i32),
        Ended,
    }
    let how = loop {
        tokio::select! {
            chunk = rx.recv(), if input_open => match chunk {
                Some(bytes) => {
                    let (send, quit) = if tty { escape.feed(&bytes) } else { (bytes, false) };
                    if !send.is_empty() {
                        console::write_frame(&mut wr, console::INPUT, &send).await.context("sending to the console")?;
                    }
                    if quit {
                        break How::Disconnected;
                    }
                }
                None => {
                    input_open = false;
                    console::write_frame(&mut wr, console::CLOSE_INPUT, b"").await.context("sending to the console")?;
                }
            },
            frame = futures_util::StreamExt::next(&mut frames) => match frame.transpose().context("reading the console")? {
                Some((console::STDOUT, data)) => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&data)?;
                    out.flush()?;
                }
                Some((console::STDERR, data)) => {
                    let mut err = std::io::stderr().lock();
                    err.write_all(&data)?;
                    err.flush()?;
                }
                Some((console::EXIT, data)) => {
                    status = serde_json::from_slice::<console::ExitStatus>(&data).ok();
                }
                Some((k, _)) => bail!("the daemon sent an unknown console frame kind {k:#04x}"),
                None => break How::Ended,
            },
            _ = term.recv() => break How::Signal("SIGTERM", 15),
            _ = hup.recv() => break How::Signal("SIGHUP", 1),
            _ = int.recv() => break How::Signal("SIGINT", 2),
        }
    };
    // Cooked again: "\n" is a new line.
    drop(raw);
    match (how, status) {
        (How::Disconnected, _) => {
            eprintln!("\nkd-coord: disconnected from the console of {node}");
            Ok(0)
        }
        (How::Signal(name, n), _) => {
            eprintln!("\nkd-coord: {name}: disconnected from the console of {node}");
            Ok(128 + n)
        }
        (How::Ended, Some(st)) if st.code == Some(0) => Ok(0),
        (How::Ended, Some(st)) => {
            eprintln!("kd-coord: the console command of {node} ended: {st}");
            Ok(1)
        }
        (How::Ended, None) => {
            eprintln!("kd-coord: the console of {node} closed without its command's end");
            Ok(1)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod stats_tests {
    use super::*;

    #[test]
    fn api_paths_encode_values_and_leave_out_absent_ones() {
        assert_eq!(
            api_path("/api/v1/nodes", &[("nodes", None)]),
            "/api/v1/nodes"
        );
        assert_eq!(
            api_path(
                "/api/v1/environments",
                &[
                    ("all", Some("true".into())),
                    ("version", None),
                    ("user", Some("a b&c".into())),
                ],
            ),
            "/api/v1/environments?all=true&user=a%20b%26c"
        );
        assert_eq!(
            api_path(
                "/api/v1/rights",
                &[("user", None), ("nodes", Some("n[1-2]".into()))]
            ),
            "/api/v1/rights?nodes=n%5B1-2%5D"
        );
    }

    #[test]
    fn since_takes_dates_epochs_and_ages() {
        assert_eq!(since_at("2026-12-06", 0).unwrap(), 1_796_515_200);
        assert_eq!(since_at("1970-01-01", 0).unwrap(), 0);
        assert_eq!(since_at("2000-03-01", 0).unwrap(), 951_868_800);
        assert_eq!(since_at("1700000000", 0).unwrap(), 1_700_000_000);
        assert_eq!(since_at("7d", 1_000_000).unwrap(), 1_000_000 - 7 * 86_400);
        assert_eq!(since_at("12h", 100_000).unwrap(), 100_000 - 12 * 3600);
        for bad in [
            "yesterday",
            "2026-13-01",
            "2026-12",
            "5x",
            "",
            "99999999999999999999d",
        ] {
            let e = since_at(bad, 0).unwrap_err().to_string();
            assert!(e.contains("bad --since"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_progress_bar_counts_nodes_per_step_and_results() {
        let mut p = JobProgress::default();
        assert_eq!(p.message(), "| 0 ok, 0 ko");
        for (n, st) in [
            ("n1", "SetDeploymentEnv"),
            ("n2", "SetDeploymentEnv"),
            ("n3", "SetDeploymentEnv"),
        ] {
            assert!(p.take(&serde_json::json!({"node": n, "step": st, "attempt": 0})));
        }
        p.take(&serde_json::json!({"node": "n2", "step": "Broadcast", "attempt": 0}));
        p.take(&serde_json::json!({"node": "n1", "step": "Prepare", "attempt": 0}));
        assert_eq!(
            p.message(),
            "SetDeploymentEnv 1, Prepare 1, Broadcast 1 | 0 ok, 0 ko"
        );
        // A failed node's line names its step too: it is done.
        p.take(&serde_json::json!({"node": "n3", "result": "ko", "step": "SetDeploymentEnv", "reason": "x"}));
        p.take(&serde_json::json!({"node": "n2", "result": "ok", "secs": 1.0}));
        assert_eq!(p.done(), 2);
        assert_eq!(p.message(), "Prepare 1 | 1 ok, 1 ko");
        assert!(!p.take(&serde_json::json!({"note": "hello"})));
    }

    #[test]
    fn csv_quotes_what_needs_it() {
        let rows = vec![
            vec!["node".to_string(), "last_failure".to_string()],
            vec![
                "n1".to_string(),
                "Prepare: sfdisk said \"busy\", twice".to_string(),
            ],
        ];
        assert_eq!(
            csv(&rows),
            "node,last_failure\nn1,\"Prepare: sfdisk said \"\"busy\"\", twice\"\n"
        );
    }
}
