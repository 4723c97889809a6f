//! The daemon's database: one SQLite file (`STATE/kd.db`, WAL), migrations in code.
//!
//! What lasts across restarts lives here: clusters (their YAML), nodes (state, what runs on
//! them, who deployed it, the deployment that holds them), deployments (who, what, where,
//! each node's result with per-step times), environments and rights. Packed images are files
//! named by their content hash in `STATE/images` (`deploy::image_for`). Taking nodes for a
//! deployment is one `IMMEDIATE` transaction: two requests for overlapping nodes cannot both
//! win. Plain functions over a [`rusqlite::Connection`]; the daemon serialises calls.

use std::path::Path;

use anyhow::{bail, Context, Result};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::Serialize;

/// Schema steps, applied in order; `PRAGMA user_version` counts those applied.
const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    "CREATE TABLE clusters (
         name TEXT PRIMARY KEY,
         yaml TEXT NOT NULL,
         added INTEGER NOT NULL
     );
     CREATE TABLE nodes (
         name TEXT PRIMARY KEY,
         cluster TEXT NOT NULL REFERENCES clusters(name) ON DELETE CASCADE,
         state TEXT NOT NULL DEFAULT 'unknown',
         environment TEXT,
         user TEXT,
         deployment INTEGER,
         locked_by INTEGER,
         updated INTEGER NOT NULL
     );
     CREATE INDEX nodes_locked ON nodes(locked_by);
     CREATE TABLE deployments (
         id INTEGER PRIMARY KEY AUTOINCREMENT,
         user TEXT NOT NULL,
         uid INTEGER NOT NULL,
         environment TEXT NOT NULL,
         nodes TEXT NOT NULL,
         node_count INTEGER NOT NULL,
         state TEXT NOT NULL,
         reason TEXT,
         created INTEGER NOT NULL,
         finished INTEGER,
         ok INTEGER NOT NULL DEFAULT 0,
         ko INTEGER NOT NULL DEFAULT 0
     );
     CREATE INDEX deployments_user ON deployments(user, id);
     CREATE INDEX deployments_state ON deployments(state);
     CREATE TABLE deployment_nodes (
         deployment INTEGER NOT NULL REFERENCES deployments(id) ON DELETE CASCADE,
         node TEXT NOT NULL,
         result TEXT NOT NULL DEFAULT 'running',
         step TEXT,
         reason TEXT,
         total_secs REAL,
         steps TEXT,
         PRIMARY KEY (deployment, node)
     );
     CREATE TABLE rights (
         user TEXT NOT NULL,
         nodes TEXT NOT NULL,
         partition TEXT NOT NULL,
         PRIMARY KEY (user, nodes, partition)
     );",
    // 2: the environment registry.
    "CREATE TABLE environments (
         name TEXT NOT NULL,
         version INTEGER NOT NULL,
         user TEXT NOT NULL,
         visibility TEXT NOT NULL,
         description TEXT NOT NULL,
         yaml TEXT NOT NULL,
         dir TEXT NOT NULL,
         added INTEGER NOT NULL,
         PRIMARY KEY (name, version, user)
     );",
    // 3: a finished deployment's event lines (what `/events` replays).
    "CREATE TABLE deployment_log (
         deployment INTEGER NOT NULL REFERENCES deployments(id) ON DELETE CASCADE,
         seq INTEGER NOT NULL,
         line TEXT NOT NULL,
         PRIMARY KEY (deployment, seq)
     );",
    // 4: remote operations (reboot, power) are jobs of the same table.
    "ALTER TABLE deployments ADD COLUMN kind TEXT NOT NULL DEFAULT 'deploy';",
    // 5: API tokens of remote users (only their BLAKE3 hash is kept).
    "CREATE TABLE api_tokens (
         id INTEGER PRIMARY KEY AUTOINCREMENT,
         user TEXT NOT NULL,
         name TEXT NOT NULL,
         hash TEXT NOT NULL UNIQUE,
         created INTEGER NOT NULL,
         last_used INTEGER
     );",
];

/// What a job of the `deployments` table does.
pub mod kind {
    /// A deployment.
    pub const DEPLOY: &str = "deploy";
    /// `kd-coord reboot`.
    pub const REBOOT: &str = "reboot";
    /// `kd-coord power on`.
    pub const POWER_ON: &str = "power_on";
    /// `kd-coord power off`.
    pub const POWER_OFF: &str = "power_off";

    /// The node states a job of this kind leaves: (while it runs, on success, on failure).
    pub fn states(kind: &str) -> (&'static str, &'static str, &'static str) {
        use super::state::*;
        match kind {
            REBOOT => (REBOOTING, DEPLOYED, UNKNOWN),
            POWER_ON => (REBOOTING, POWERED_ON, UNKNOWN),
            POWER_OFF => (REBOOTING, POWERED_OFF, UNKNOWN),
            _ => (DEPLOYING, DEPLOYED, DEPLOY_FAILED),
        }
    }
}

/// A node's state.
pub mod state {
    /// The last deployment put an environment on it.
    pub const DEPLOYED: &str = "deployed";
    /// The last deployment failed on it.
    pub const DEPLOY_FAILED: &str = "deploy_failed";
    /// A deployment holds it now.
    pub const DEPLOYING: &str = "deploying";
    /// Being rebooted outside a deployment.
    pub const REBOOTING: &str = "rebooting";
    /// Powered off by an operator.
    pub const POWERED_OFF: &str = "powered_off";
    /// Powered on by an operator (what it runs is not known).
    pub const POWERED_ON: &str = "powered_on";
    /// Never deployed by this daemon.
    pub const UNKNOWN: &str = "unknown";
}

/// One node as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeRow {
    /// Name.
    pub name: String,
    /// Cluster it belongs to.
    pub cluster: String,
    /// One of [`state`].
    pub state: String,
    /// Environment deployed (or being deployed), `name:version`.
    pub environment: Option<String>,
    /// Who deployed it last.
    pub user: Option<String>,
    /// Its last (or current) deployment.
    pub deployment: Option<i64>,
    /// How that deployment ended on it: `ok`, `ko` or `running`.
    pub result: Option<String>,
    /// Why it failed there (`STEP: reason`).
    pub reason: Option<String>,
    /// Last change, seconds since the epoch.
    pub updated: i64,
}

/// One deployment as the API lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeploymentRow {
    /// Identifier.
    pub id: i64,
    /// What it does: `deploy`, `reboot`, `power_on`, `power_off` (see [`kind`]).
    pub kind: String,
    /// Who asked.
    pub user: String,
    /// Environment, `name:version` (for an operation: what it does, `reboot:recorded_env`).
    pub environment: String,
    /// Node set (folded).
    pub nodes: String,
    /// How many nodes.
    pub node_count: i64,
    /// `running`, `done`, `cancelled` or `failed`.
    pub state: String,
    /// Why it ended as it did (cancelled, failed, coordinator restarted).
    pub reason: Option<String>,
    /// Start, seconds since the epoch.
    pub created: i64,
    /// End, seconds since the epoch.
    pub finished: Option<i64>,
    /// Nodes deployed.
    pub ok: i64,
    /// Nodes failed.
    pub ko: i64,
}

/// One node of one deployment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeploymentNode {
    /// Node.
    pub node: String,
    /// `running`, `ok` or `ko`.
    pub result: String,
    /// Step it failed in.
    pub step: Option<String>,
    /// Why it failed.
    pub reason: Option<String>,
    /// From the deployment's start to this node's end.
    pub total_secs: Option<f64>,
    /// Per-step records (step, ok, attempts, secs, reboots).
    pub steps: serde_json::Value,
}

/// An API token, without its secret.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TokenRow {
    /// Its id (what `token rm` takes).
    pub id: i64,
    /// Whose it is.
    pub user: String,
    /// What its owner called it.
    pub name: String,
    /// When it was made (seconds since the epoch).
    pub created: i64,
    /// When it was last used, if ever.
    pub last_used: Option<i64>,
}

/// A right: `user` may deploy `nodes` (a node set, or `*`) on `partition` (a number, `deploy`
/// for the layout's deploy partition, or `*`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Right {
    /// User name.
    pub user: String,
    /// Node set or `*`.
    pub nodes: String,
    /// Partition or `*`.
    pub partition: String,
}

/// A registered environment (one version of one user's environment).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EnvRow {
    /// Name.
    pub name: String,
    /// Version.
    pub version: u32,
    /// Owner.
    pub user: String,
    /// `private`, `shared` or `public`.
    pub visibility: String,
    /// Description.
    pub description: String,
    /// The description file's text.
    pub yaml: String,
    /// Directory its relative paths are resolved against.
    pub dir: String,
    /// When it was added.
    pub added: i64,
}

impl EnvRow {
    /// Whether `viewer` may see and deploy it.
    pub fn visible_to(&self, viewer: &str, admin: bool) -> bool {
        admin || self.user == viewer || self.visibility != "private"
    }
}

/// A node another deployment holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Busy {
    /// Node.
    pub node: String,
    /// The deployment holding it.
    pub deployment: i64,
    /// Its user.
    pub user: String,
}

/// What a new deployment records.
#[derive(Debug, Clone)]
pub struct NewDeployment<'a> {
    /// Who asks.
    pub user: &'a str,
    /// Their uid.
    pub uid: u32,
    /// Environment, `name:version` (for an operation: what it does).
    pub environment: &'a str,
    /// Nodes.
    pub nodes: &'a [String],
    /// What it does (see [`kind`]).
    pub kind: &'a str,
}

/// Counters for `/stats` and `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Stats {
    /// Nodes per state.
    pub nodes_by_state: std::collections::BTreeMap<String, i64>,
    /// Deployments per state.
    pub deployments_by_state: std::collections::BTreeMap<String, i64>,
    /// Node deployments that succeeded, over all deployments.
    pub node_deployments_ok: i64,
    /// Node deployments that failed.
    pub node_deployments_ko: i64,
    /// Failures per step.
    pub failures_by_step: std::collections::BTreeMap<String, i64>,
    /// Mean time of a successful node deployment.
    pub mean_ok_secs: Option<f64>,
}

/// One node's deployments (`kd-coord stats --failure-rate`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeStats {
    /// Node.
    pub node: String,
    /// Finished deployments of it.
    pub deployments: i64,
    /// Those that deployed it.
    pub ok: i64,
    /// Those that failed on it.
    pub ko: i64,
    /// `ko / deployments`.
    pub failure_rate: f64,
    /// Mean seconds of its successful deployments.
    pub mean_ok_secs: Option<f64>,
    /// Failures per step.
    pub failures_by_step: std::collections::BTreeMap<String, i64>,
    /// Its last failure's step and reason.
    pub last_failure: Option<String>,
}

/// One step over the nodes of finished deployments (`kd-coord stats --per-step`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepStats {
    /// Step.
    pub step: String,
    /// Node deployments that entered it.
    pub entered: i64,
    /// Those that failed in it.
    pub failed: i64,
    /// Retries over all of them.
    pub retries: i64,
    /// Mean seconds of a passed step.
    pub mean_secs: Option<f64>,
    /// Longest passed step.
    pub max_secs: Option<f64>,
}

/// The database.
pub struct Db {
    conn: Connection,
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Db {
    /// Opens (creating and migrating) the database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let conn = Connection::open(path)
            .with_context(|| format!("cannot open the database {}", path.display()))?;
        // Only the daemon reads it (users go through the API); SQLite gives the WAL and
        // shared-memory files the database's mode.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot make {} private", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        Self::setup(conn).with_context(|| format!("database {}", path.display()))
    }

    /// An in-memory database (tests, benches).
    pub fn open_in_memory() -> Result<Self> {
        Self::setup(Connection::open_in_memory()?)
    }

    fn setup(conn: Connection) -> Result<Self> {
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let mut db = Db { conn };
        db.migrate()?;
        Ok(db)
    }

    fn migrate(&mut self) -> Result<()> {
        let have: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?;
        if have as usize > MIGRATIONS.len() {
            bail!(
                "the database has schema version {have}, newer than this kd-coord knows ({}): \
                 run a newer kd-coord",
                MIGRATIONS.len()
            );
        }
        for (i, m) in MIGRATIONS.iter().enumerate().skip(have as usize) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(m)
                .with_context(|| format!("schema migration {}", i + 1))?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
        }
        Ok(())
    }

    /// Schema version.
    pub fn version(&self) -> Result<i64> {
        Ok(self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

    /// Adds or replaces a cluster and its nodes. A node of another cluster, or a node dropped
    /// from this one while a deployment holds it, is refused.
    pub fn put_cluster(&mut self, name: &str, yaml: &str, nodes: &[String]) -> Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut other = tx.prepare("SELECT cluster FROM nodes WHERE name = ?1")?;
            for n in nodes {
                let c: Option<String> = other.query_row([n], |r| r.get(0)).optional()?;
                if let Some(c) = c {
                    if c != name {
                        bail!("node {n} already belongs to cluster {c}");
                    }
                }
            }
            let mut held =
                tx.prepare("SELECT name FROM nodes WHERE cluster = ?1 AND locked_by IS NOT NULL")?;
            let held: Vec<String> = held
                .query_map([name], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            let dropped: Vec<String> = held.into_iter().filter(|n| !nodes.contains(n)).collect();
            if !dropped.is_empty() {
                bail!(
                    "nodes {} are being deployed: wait for their deployment before removing them",
                    kd_proto::nodeset::fold(&dropped)
                );
            }
        }
        tx.execute(
            "INSERT INTO clusters (name, yaml, added) VALUES (?1, ?2, ?3)
             ON CONFLICT(name) DO UPDATE SET yaml = excluded.yaml",
            params![name, yaml, now()],
        )?;
        {
            let mut ins = tx.prepare(
                "INSERT INTO nodes (name, cluster, updated) VALUES (?1, ?2, ?3)
                 ON CONFLICT(name) DO NOTHING",
            )?;
            for n in nodes {
                ins.execute(params![n, name, now()])?;
            }
            let keep: std::collections::HashSet<&String> = nodes.iter().collect();
            let mut all = tx.prepare("SELECT name FROM nodes WHERE cluster = ?1")?;
            let existing: Vec<String> = all
                .query_map([name], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            let mut del = tx.prepare("DELETE FROM nodes WHERE name = ?1")?;
            for n in existing.iter().filter(|n| !keep.contains(n)) {
                del.execute([n])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Every cluster: (name, YAML).
    pub fn clusters(&self) -> Result<Vec<(String, String)>> {
        let mut q = self
            .conn
            .prepare("SELECT name, yaml FROM clusters ORDER BY name")?;
        let rows = q
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    /// Every node, by name.
    pub fn nodes(&self) -> Result<Vec<NodeRow>> {
        let mut q = self.conn.prepare(
            "SELECT n.name, n.cluster, n.state, n.environment, n.user, n.deployment, n.updated,
                    dn.result, dn.step, dn.reason
             FROM nodes n
             LEFT JOIN deployment_nodes dn ON dn.deployment = n.deployment AND dn.node = n.name",
        )?;
        let mut rows: Vec<NodeRow> = q
            .query_map([], |r| {
                let step: Option<String> = r.get(8)?;
                let reason: Option<String> = r.get(9)?;
                Ok(NodeRow {
                    name: r.get(0)?,
                    cluster: r.get(1)?,
                    state: r.get(2)?,
                    environment: r.get(3)?,
                    user: r.get(4)?,
                    deployment: r.get(5)?,
                    updated: r.get(6)?,
                    result: r.get(7)?,
                    reason: match (step, reason) {
                        (Some(st), Some(why)) => Some(format!("{st}: {why}")),
                        (None, why) => why,
                        (Some(st), None) => Some(st),
                    },
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        rows.sort_by(|a, b| kd_proto::nodeset::natural_cmp(&a.name, &b.name));
        Ok(rows)
    }

    /// Sets a node's state outside a deployment (reboot, power).
    pub fn set_node_state(&mut self, node: &str, state: &str) -> Result<()> {
        self.conn.execute(
            "UPDATE nodes SET state = ?2, updated = ?3 WHERE name = ?1",
            params![node, state, now()],
        )?;
        Ok(())
    }

    /// Takes `d.nodes` for a new deployment in one transaction: `Err(busy)` names the nodes
    /// another deployment holds (nothing is taken then); `Ok(id)` the new deployment.
    pub fn create_deployment(&mut self, d: &NewDeployment<'_>) -> Result<Result<i64, Vec<Busy>>> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut busy = Vec::new();
        {
            let mut q = tx.prepare(
                "SELECT n.locked_by, d.user FROM nodes n JOIN deployments d ON d.id = n.locked_by
                 WHERE n.name = ?1",
            )?;
            for n in d.nodes {
                let held: Option<(i64, String)> = q
                    .query_row([n], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?;
                if let Some((deployment, user)) = held {
                    busy.push(Busy {
                        node: n.clone(),
                        deployment,
                        user,
                    });
                }
            }
        }
        if !busy.is_empty() {
            return Ok(Err(busy));
        }
        let t = now();
        tx.execute(
            "INSERT INTO deployments (user, uid, environment, nodes, node_count, state, created,
                                      kind)
             VALUES (?1, ?2, ?3, ?4, ?5, 'running', ?6, ?7)",
            params![
                d.user,
                d.uid,
                d.environment,
                kd_proto::nodeset::fold(d.nodes),
                d.nodes.len() as i64,
                t,
                d.kind
            ],
        )?;
        let id = tx.last_insert_rowid();
        {
            // A deployment makes the node its environment's and its user's; an operation
            // only holds it (its last deployment, environment and user stay).
            let (running, _, _) = kind::states(d.kind);
            let mut take = if d.kind == kind::DEPLOY {
                tx.prepare(
                    "UPDATE nodes SET locked_by = ?2, deployment = ?2, state = ?6,
                     environment = ?3, user = ?4, updated = ?5 WHERE name = ?1",
                )?
            } else {
                tx.prepare(
                    "UPDATE nodes SET locked_by = ?2, state = ?6, updated = ?5
                     WHERE name = ?1 AND ?3 IS NOT NULL AND ?4 IS NOT NULL",
                )?
            };
            let mut row = tx.prepare(
                "INSERT INTO deployment_nodes (deployment, node, steps) VALUES (?1, ?2, '[]')",
            )?;
            for n in d.nodes {
                if take.execute(params![n, id, d.environment, d.user, t, running])? != 1 {
                    bail!("unknown node {n}");
                }
                row.execute(params![id, n])?;
            }
        }
        tx.commit()?;
        Ok(Ok(id))
    }

    /// Records one node's end in deployment `id` and releases the node.
    pub fn finish_node(
        &mut self,
        id: i64,
        node: &str,
        failure: Option<(&str, &str)>,
        total_secs: f64,
        steps: &serde_json::Value,
    ) -> Result<()> {
        let tx = self.conn.transaction()?;
        let (result, step, reason) = match failure {
            None => ("ok", None, None),
            Some((s, r)) => ("ko", Some(s), Some(r)),
        };
        tx.execute(
            "UPDATE deployment_nodes SET result = ?3, step = ?4, reason = ?5, total_secs = ?6,
             steps = ?7 WHERE deployment = ?1 AND node = ?2",
            params![
                id,
                node,
                result,
                step,
                reason,
                total_secs,
                steps.to_string()
            ],
        )?;
        let job_kind: String =
            tx.query_row("SELECT kind FROM deployments WHERE id = ?1", [id], |r| {
                r.get(0)
            })?;
        let (_, ok_state, ko_state) = kind::states(&job_kind);
        let st = if failure.is_none() {
            ok_state
        } else {
            ko_state
        };
        tx.execute(
            "UPDATE nodes SET state = ?3, locked_by = NULL, updated = ?4
             WHERE name = ?1 AND locked_by = ?2",
            params![node, id, st, now()],
        )?;
        let col = if failure.is_none() { "ok" } else { "ko" };
        tx.execute(
            &format!("UPDATE deployments SET {col} = {col} + 1 WHERE id = ?1"),
            [id],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Ends deployment `id` (`done`, `cancelled`, `failed`): a node it still holds fails with
    /// `reason` and is released. Returns those nodes.
    pub fn finish_deployment(
        &mut self,
        id: i64,
        end: &str,
        reason: Option<&str>,
    ) -> Result<Vec<String>> {
        let tx = self.conn.transaction()?;
        let left: Vec<String> = {
            let mut q = tx.prepare(
                "SELECT node FROM deployment_nodes WHERE deployment = ?1 AND result = 'running'",
            )?;
            let rows = q
                .query_map([id], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            rows
        };
        let why = reason.unwrap_or("the deployment ended");
        tx.execute(
            "UPDATE deployment_nodes SET result = 'ko', reason = ?2
             WHERE deployment = ?1 AND result = 'running'",
            params![id, why],
        )?;
        let job_kind: String = tx
            .query_row("SELECT kind FROM deployments WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?
            .unwrap_or_else(|| kind::DEPLOY.to_string());
        let (_, _, ko_state) = kind::states(&job_kind);
        tx.execute(
            "UPDATE nodes SET state = ?3, locked_by = NULL, updated = ?2
             WHERE locked_by = ?1",
            params![id, now(), ko_state],
        )?;
        tx.execute(
            "UPDATE deployments SET state = ?2, reason = ?3, finished = ?4, ko = ko + ?5
             WHERE id = ?1",
            params![id, end, reason, now(), left.len() as i64],
        )?;
        tx.commit()?;
        Ok(left)
    }

    /// After a restart: every deployment still `running` failed with `reason`; returns the
    /// nodes that were held (their profiles must boot the local disk again).
    pub fn recover(&mut self, reason: &str) -> Result<Vec<(i64, Vec<String>)>> {
        let running: Vec<i64> = {
            let mut q = self
                .conn
                .prepare("SELECT id FROM deployments WHERE state = 'running' ORDER BY id")?;
            let rows = q
                .query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            rows
        };
        let mut out = Vec::new();
        for id in running {
            let left = self.finish_deployment(id, "failed", Some(reason))?;
            out.push((id, left));
        }
        Ok(out)
    }

    /// Deployments, newest first: of `user` if given, at most `limit`, older than `before`.
    pub fn deployments(
        &self,
        user: Option<&str>,
        limit: u32,
        before: Option<i64>,
    ) -> Result<Vec<DeploymentRow>> {
        // Plain conditions (no `?1 IS NULL OR ...`): SQLite then uses the (user, id) index.
        let mut sql = String::from(
            "SELECT id, user, environment, nodes, node_count, state, reason, created, finished,
                    ok, ko, kind
             FROM deployments WHERE 1",
        );
        let mut args: Vec<rusqlite::types::Value> = Vec::new();
        if let Some(u) = user {
            args.push(u.to_string().into());
            sql += &format!(" AND user = ?{}", args.len());
        }
        if let Some(b) = before {
            args.push(b.into());
            sql += &format!(" AND id < ?{}", args.len());
        }
        args.push(i64::from(limit).into());
        sql += &format!(" ORDER BY id DESC LIMIT ?{}", args.len());
        let mut q = self.conn.prepare(&sql)?;
        let rows = q
            .query_map(rusqlite::params_from_iter(args), row_to_deployment)?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    /// One deployment and its nodes.
    pub fn deployment(&self, id: i64) -> Result<Option<(DeploymentRow, Vec<DeploymentNode>)>> {
        let d = self
            .conn
            .query_row(
                "SELECT id, user, environment, nodes, node_count, state, reason, created,
                        finished, ok, ko, kind
                 FROM deployments WHERE id = ?1",
                [id],
                row_to_deployment,
            )
            .optional()?;
        let Some(d) = d else { return Ok(None) };
        let mut q = self.conn.prepare(
            "SELECT node, result, step, reason, total_secs, steps FROM deployment_nodes
             WHERE deployment = ?1",
        )?;
        let mut nodes: Vec<DeploymentNode> = q
            .query_map([id], |r| {
                let steps: Option<String> = r.get(5)?;
                Ok(DeploymentNode {
                    node: r.get(0)?,
                    result: r.get(1)?,
                    step: r.get(2)?,
                    reason: r.get(3)?,
                    total_secs: r.get(4)?,
                    steps: steps
                        .and_then(|s| serde_json::from_str(&s).ok())
                        .unwrap_or(serde_json::Value::Array(Vec::new())),
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        nodes.sort_by(|a, b| kd_proto::nodeset::natural_cmp(&a.node, &b.node));
        Ok(Some((d, nodes)))
    }

    /// Keeps a deployment's event lines (JSON text, in order).
    pub fn save_log(&mut self, id: i64, lines: &[String]) -> Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut ins = tx.prepare(
                "INSERT OR REPLACE INTO deployment_log (deployment, seq, line) VALUES (?1, ?2, ?3)",
            )?;
            for (i, l) in lines.iter().enumerate() {
                ins.execute(params![id, i as i64, l])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// A deployment's saved event lines.
    pub fn log(&self, id: i64) -> Result<Vec<String>> {
        let mut q = self
            .conn
            .prepare("SELECT line FROM deployment_log WHERE deployment = ?1 ORDER BY seq")?;
        let rows = q
            .query_map([id], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    /// Grants a right.
    pub fn add_right(&mut self, r: &Right) -> Result<()> {
        self.conn.execute(
            "INSERT OR IGNORE INTO rights (user, nodes, partition) VALUES (?1, ?2, ?3)",
            params![r.user, r.nodes, r.partition],
        )?;
        Ok(())
    }

    /// Revokes rights of `user` (all of them, or those on `nodes`); returns how many.
    pub fn remove_rights(&mut self, user: &str, nodes: Option<&str>) -> Result<usize> {
        Ok(self.conn.execute(
            "DELETE FROM rights WHERE user = ?1 AND (?2 IS NULL OR nodes = ?2)",
            params![user, nodes],
        )?)
    }

    /// Every right (of `user` if given).
    pub fn rights(&self, user: Option<&str>) -> Result<Vec<Right>> {
        let mut q = self.conn.prepare(
            "SELECT user, nodes, partition FROM rights WHERE (?1 IS NULL OR user = ?1)
             ORDER BY user, nodes, partition",
        )?;
        let rows = q
            .query_map(params![user], |r| {
                Ok(Right {
                    user: r.get(0)?,
                    nodes: r.get(1)?,
                    partition: r.get(2)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    /// The nodes of `nodes` that `user` may not deploy on `partition` (`""`: on any partition,
    /// what a reboot or a power command needs).
    pub fn denied(&self, user: &str, nodes: &[String], partition: &str) -> Result<Vec<String>> {
        let rights = self.rights(Some(user))?;
        let mut sets: Vec<std::collections::HashSet<String>> = Vec::new();
        let mut all = false;
        for r in rights
            .iter()
            .filter(|r| partition.is_empty() || r.partition == "*" || r.partition == partition)
        {
            if r.nodes == "*" {
                all = true;
            } else if let Ok(ns) = kd_proto::nodeset::parse(&r.nodes) {
                sets.push(ns.into_iter().collect());
            }
        }
        if all {
            return Ok(Vec::new());
        }
        Ok(nodes
            .iter()
            .filter(|n| !sets.iter().any(|s| s.contains(*n)))
            .cloned()
            .collect())
    }

    /// Records an API token of `user` by its hash; returns its id.
    pub fn add_token(&mut self, user: &str, name: &str, hash: &str) -> Result<i64> {
        self.conn.execute(
            "INSERT INTO api_tokens (user, name, hash, created) VALUES (?1, ?2, ?3, ?4)",
            params![user, name, hash, now()],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    /// The user whose token has this hash, if any. Its use is noted at most once a minute (a
    /// remote client's every request must not be a database write).
    pub fn token_user(&mut self, hash: &str) -> Result<Option<String>> {
        let found: Option<(String, Option<i64>)> = self
            .conn
            .query_row(
                "SELECT user, last_used FROM api_tokens WHERE hash = ?1",
                params![hash],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((user, last_used)) = found else {
            return Ok(None);
        };
        let t = now();
        if last_used.is_none_or(|u| t - u >= 60) {
            self.conn.execute(
                "UPDATE api_tokens SET last_used = ?2 WHERE hash = ?1",
                params![hash, t],
            )?;
        }
        Ok(Some(user))
    }

    /// The tokens (of `user` if given), without their secrets.
    pub fn tokens(&self, user: Option<&str>) -> Result<Vec<TokenRow>> {
        let mut q = self.conn.prepare(
            "SELECT id, user, name, created, last_used FROM api_tokens
             WHERE (?1 IS NULL OR user = ?1) ORDER BY id",
        )?;
        let rows = q
            .query_map(params![user], |r| {
                Ok(TokenRow {
                    id: r.get(0)?,
                    user: r.get(1)?,
                    name: r.get(2)?,
                    created: r.get(3)?,
                    last_used: r.get(4)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    /// Revokes token `id` (only if it is `user`'s, when given); whether it existed.
    pub fn remove_token(&mut self, id: i64, user: Option<&str>) -> Result<bool> {
        Ok(self.conn.execute(
            "DELETE FROM api_tokens WHERE id = ?1 AND (?2 IS NULL OR user = ?2)",
            params![id, user],
        )? > 0)
    }

    /// Registers an environment version; `Ok(false)` if that name, version and owner exist
    /// (a version is immutable).
    pub fn add_environment(&mut self, e: &EnvRow) -> Result<bool> {
        let n = self.conn.execute(
            "INSERT OR IGNORE INTO environments
             (name, version, user, visibility, description, yaml, dir, added)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                e.name,
                e.version,
                e.user,
                e.visibility,
                e.description,
                e.yaml,
                e.dir,
                now()
            ],
        )?;
        Ok(n == 1)
    }

    /// Environments `viewer` may see (of `owner` if given; shared ones only when their owner
    /// is named or with `all`), by name, owner and version.
    pub fn environments(
        &self,
        viewer: &str,
        admin: bool,
        owner: Option<&str>,
        all: bool,
    ) -> Result<Vec<EnvRow>> {
        let mut q = self.conn.prepare(
            "SELECT name, version, user, visibility, description, yaml, dir, added
             FROM environments ORDER BY name, user, version",
        )?;
        let rows: Vec<EnvRow> = q
            .query_map([], row_to_env)?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows
            .into_iter()
            .filter(|e| e.visible_to(viewer, admin))
            .filter(|e| owner.is_none_or(|o| e.user == o))
            .filter(|e| all || owner.is_some() || e.visibility != "shared" || e.user == viewer)
            .collect())
    }

    /// The environment `viewer` means by `name` (and `version`, `owner`): among those visible,
    /// the viewer's own first, then public ones, then shared ones; the last version.
    pub fn find_environment(
        &self,
        viewer: &str,
        admin: bool,
        name: &str,
        version: Option<u32>,
        owner: Option<&str>,
    ) -> Result<Option<EnvRow>> {
        let mut cands: Vec<EnvRow> = self
            .environments(viewer, admin, owner, true)?
            .into_iter()
            .filter(|e| e.name == name && version.is_none_or(|v| e.version == v))
            .collect();
        let rank = |e: &EnvRow| -> u8 {
            if e.user == viewer {
                0
            } else if e.visibility == "public" {
                1
            } else {
                2
            }
        };
        cands.sort_by(|a, b| rank(a).cmp(&rank(b)).then(b.version.cmp(&a.version)));
        Ok(cands.into_iter().next())
    }

    /// Sets the visibility, description and description text of `owner`'s `name@version`
    /// (what may change of a registered version); `Ok(false)` if there is no such version.
    pub fn update_environment(
        &mut self,
        name: &str,
        version: u32,
        owner: &str,
        visibility: &str,
        description: &str,
        yaml: &str,
    ) -> Result<bool> {
        let n = self.conn.execute(
            "UPDATE environments SET visibility = ?4, description = ?5, yaml = ?6
             WHERE name = ?1 AND version = ?2 AND user = ?3",
            params![name, version, owner, visibility, description, yaml],
        )?;
        Ok(n == 1)
    }

    /// Removes `owner`'s environment `name` (one version, or all); returns how many.
    pub fn remove_environment(
        &mut self,
        name: &str,
        version: Option<u32>,
        owner: &str,
    ) -> Result<usize> {
        Ok(self.conn.execute(
            "DELETE FROM environments WHERE name = ?1 AND user = ?2
             AND (?3 IS NULL OR version = ?3)",
            params![name, owner, version],
        )?)
    }

    /// Counters.
    pub fn stats(&self) -> Result<Stats> {
        let mut s = Stats::default();
        let mut q = self
            .conn
            .prepare("SELECT state, COUNT(*) FROM nodes GROUP BY state")?;
        for r in q.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
            let (k, v) = r?;
            s.nodes_by_state.insert(k, v);
        }
        let mut q = self
            .conn
            .prepare("SELECT state, COUNT(*) FROM deployments GROUP BY state")?;
        for r in q.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
            let (k, v) = r?;
            s.deployments_by_state.insert(k, v);
        }
        let mut q = self.conn.prepare(
            "SELECT dn.result, dn.step, COUNT(*), AVG(dn.total_secs)
             FROM deployment_nodes dn JOIN deployments d ON d.id = dn.deployment
             WHERE dn.result != 'running' AND d.kind = 'deploy' GROUP BY dn.result, dn.step",
        )?;
        for r in q.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, Option<f64>>(3)?,
            ))
        })? {
            let (result, step, n, avg) = r?;
            if result == "ok" {
                s.node_deployments_ok += n;
                s.mean_ok_secs = avg;
            } else {
                s.node_deployments_ko += n;
                *s.failures_by_step
                    .entry(step.unwrap_or_else(|| "none".into()))
                    .or_default() += n;
            }
        }
        Ok(s)
    }

    /// Per node and per step, over finished deployments created at or after `since` (seconds
    /// since the epoch), of `nodes` if given: nodes sorted by failure rate, highest first (then
    /// by name); steps in workflow order.
    pub fn detailed_stats(
        &self,
        nodes: Option<&[String]>,
        since: Option<i64>,
    ) -> Result<(Vec<NodeStats>, Vec<StepStats>)> {
        use std::collections::{BTreeMap, HashSet};
        let wanted: Option<HashSet<&str>> = nodes.map(|n| n.iter().map(String::as_str).collect());
        let mut q = self.conn.prepare(
            "SELECT dn.node, dn.result, dn.step, dn.reason, dn.total_secs, dn.steps
             FROM deployment_nodes dn JOIN deployments d ON d.id = dn.deployment
             WHERE dn.result != 'running' AND d.kind = 'deploy' AND d.created >= ?1
             ORDER BY d.id",
        )?;
        struct Acc {
            ok: i64,
            ko: i64,
            ok_secs: f64,
            by_step: BTreeMap<String, i64>,
            last: Option<String>,
        }
        let mut per_node: BTreeMap<String, Acc> = BTreeMap::new();
        // step → (entered, failed, retries, passed secs)
        let mut per_step: BTreeMap<String, (i64, i64, i64, Vec<f64>)> = BTreeMap::new();
        let rows = q.query_map([since.unwrap_or(i64::MIN)], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, Option<String>>(3)?,
                r.get::<_, Option<f64>>(4)?,
                r.get::<_, Option<String>>(5)?,
            ))
        })?;
        for row in rows {
            let (node, result, step, reason, secs, steps) = row?;
            if wanted.as_ref().is_some_and(|w| !w.contains(node.as_str())) {
                continue;
            }
            let a = per_node.entry(node).or_insert(Acc {
                ok: 0,
                ko: 0,
                ok_secs: 0.0,
                by_step: BTreeMap::new(),
                last: None,
            });
            if result == "ok" {
                a.ok += 1;
                a.ok_secs += secs.unwrap_or(0.0);
            } else {
                a.ko += 1;
                let st = step.unwrap_or_else(|| "none".into());
                *a.by_step.entry(st.clone()).or_default() += 1;
                a.last = Some(format!("{st}: {}", reason.unwrap_or_default()));
            }
            let recs: Vec<serde_json::Value> = steps
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or_default();
            for rec in recs {
                let Some(name) = rec["step"].as_str() else {
                    continue;
                };
                let e = per_step.entry(name.to_string()).or_default();
                e.0 += 1;
                let passed = rec["ok"].as_bool().unwrap_or(false);
                if !passed {
                    e.1 += 1;
                }
                e.2 += rec["attempts"].as_i64().unwrap_or(1).saturating_sub(1);
                if let (true, Some(x)) = (passed, rec["secs"].as_f64()) {
                    e.3.push(x);
                }
            }
        }
        let mut nodes_out: Vec<NodeStats> = per_node
            .into_iter()
            .map(|(node, a)| {
                let n = a.ok + a.ko;
                NodeStats {
                    node,
                    deployments: n,
                    ok: a.ok,
                    ko: a.ko,
                    failure_rate: if n > 0 { a.ko as f64 / n as f64 } else { 0.0 },
                    mean_ok_secs: (a.ok > 0).then(|| a.ok_secs / a.ok as f64),
                    failures_by_step: a.by_step,
                    last_failure: a.last,
                }
            })
            .collect();
        nodes_out.sort_by(|a, b| {
            b.failure_rate
                .total_cmp(&a.failure_rate)
                .then_with(|| kd_proto::nodeset::natural_cmp(&a.node, &b.node))
        });
        let order = |s: &str| {
            crate::workflow::Step::ALL
                .iter()
                .position(|x| x.as_str() == s)
                .unwrap_or(usize::MAX)
        };
        let mut steps_out: Vec<StepStats> = per_step
            .into_iter()
            .map(|(step, (entered, failed, retries, secs))| StepStats {
                mean_secs: (!secs.is_empty()).then(|| secs.iter().sum::<f64>() / secs.len() as f64),
                max_secs: secs.iter().copied().reduce(f64::max),
                step,
                entered,
                failed,
                retries,
            })
            .collect();
        steps_out.sort_by_key(|s| order(&s.step));
        Ok((nodes_out, steps_out))
    }

    /// Writes many rows at once (benches): `count` finished deployments of one node each.
    pub fn bulk_history(&mut self, user: &str, nodes: &[String], count: usize) -> Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut d = tx.prepare(
                "INSERT INTO deployments (user, uid, environment, nodes, node_count, state,
                 created, finished, ok) VALUES (?1, 1000, 'debian12:1', ?2, 1, 'done', ?3, ?3, 1)",
            )?;
            let mut n = tx.prepare(
                "INSERT INTO deployment_nodes (deployment, node, result, total_secs, steps)
                 VALUES (?1, ?2, 'ok', 60.0, '[]')",
            )?;
            for i in 0..count {
                let node = &nodes[i % nodes.len().max(1)];
                d.execute(params![user, node, now()])?;
                n.execute(params![tx.last_insert_rowid(), node])?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

fn row_to_env(r: &rusqlite::Row<'_>) -> rusqlite::Result<EnvRow> {
    Ok(EnvRow {
        name: r.get(0)?,
        version: r.get(1)?,
        user: r.get(2)?,
        visibility: r.get(3)?,
        description: r.get(4)?,
        yaml: r.get(5)?,
        dir: r.get(6)?,
        added: r.get(7)?,
    })
}

fn row_to_deployment(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeploymentRow> {
    Ok(DeploymentRow {
        id: r.get(0)?,
        kind: r.get(11)?,
        user: r.get(1)?,
        environment: r.get(2)?,
        nodes: r.get(3)?,
        node_count: r.get(4)?,
        state: r.get(5)?,
        reason: r.get(6)?,
        created: r.get(7)?,
        finished: r.get(8)?,
        ok: r.get(9)?,
        ko: r.get(10)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(s: &str) -> Vec<String> {
        kd_proto::nodeset::parse(s).unwrap()
    }

    fn db() -> Db {
        let mut db = Db::open_in_memory().unwrap();
        db.put_cluster("lab", "yaml", &names("node[1-6]")).unwrap();
        db
    }

    fn new<'a>(user: &'a str, nodes: &'a [String]) -> NewDeployment<'a> {
        NewDeployment {
            user,
            uid: 1000,
            environment: "debian12:1",
            nodes,
            kind: kind::DEPLOY,
        }
    }

    #[test]
    fn operations_hold_nodes_without_taking_their_environment_and_leave_their_own_states() {
        let mut db = db();
        let n = names("node[1-2]");
        let dep = db.create_deployment(&new("alice", &n)).unwrap().unwrap();
        db.finish_node(dep, "node1", None, 1.0, &serde_json::json!([]))
            .unwrap();
        db.finish_node(dep, "node2", None, 1.0, &serde_json::json!([]))
            .unwrap();
        db.finish_deployment(dep, "done", None).unwrap();
        let op = NewDeployment {
            user: "bob",
            uid: 1001,
            environment: "reboot:recorded_env",
            nodes: &n,
            kind: kind::REBOOT,
        };
        let id = db.create_deployment(&op).unwrap().unwrap();
        let node = |db: &Db, name: &str| {
            db.nodes()
                .unwrap()
                .into_iter()
                .find(|r| r.name == name)
                .unwrap()
        };
        let r = node(&db, "node1");
        assert_eq!(
            (
                r.state.as_str(),
                r.environment.as_deref(),
                r.user.as_deref(),
                r.deployment
            ),
            ("rebooting", Some("debian12:1"), Some("alice"), Some(dep))
        );
        // Busy for anyone else meanwhile.
        let busy = db
            .create_deployment(&new("carol", &names("node2")))
            .unwrap()
            .unwrap_err();
        assert_eq!((busy[0].deployment, busy[0].user.as_str()), (id, "bob"));
        db.finish_node(id, "node1", None, 2.0, &serde_json::json!([]))
            .unwrap();
        db.finish_node(
            id,
            "node2",
            Some(("BootNewEnv", "no answer")),
            2.0,
            &serde_json::json!([]),
        )
        .unwrap();
        assert_eq!(node(&db, "node1").state, "deployed");
        assert_eq!(node(&db, "node2").state, "unknown");
        let (row, _) = db.deployment(id).unwrap().unwrap();
        assert_eq!((row.kind.as_str(), row.ok, row.ko), ("reboot", 1, 1));
        // A power-off that ends with a node still held: that node's state is unknown.
        let off = NewDeployment {
            kind: kind::POWER_OFF,
            environment: "power_off",
            ..op
        };
        let id = db.create_deployment(&off).unwrap().unwrap();
        db.finish_node(id, "node1", None, 1.0, &serde_json::json!([]))
            .unwrap();
        db.finish_deployment(id, "cancelled", Some("operator"))
            .unwrap();
        assert_eq!(node(&db, "node1").state, "powered_off");
        assert_eq!(node(&db, "node2").state, "unknown");
        assert_eq!(node(&db, "node1").deployment, Some(dep));
    }

    #[test]
    fn detailed_stats_rank_nodes_by_failure_rate_and_sum_steps() {
        let mut db = db();
        let st = |prep_ok: bool, secs: f64, attempts: u32| {
            serde_json::json!([
                {"step": "SetDeploymentEnv", "ok": true, "attempts": attempts, "secs": 10.0, "reboots": ["soft"]},
                {"step": "Prepare", "ok": prep_ok, "attempts": 1, "secs": secs, "reboots": []},
            ])
        };
        // node1: 2 ok; node2: 1 ok, 2 ko (in Prepare); a reboot job does not count.
        for round in 0..3 {
            let n = names("node[1-2]");
            let id = db.create_deployment(&new("alice", &n)).unwrap().unwrap();
            if round < 2 {
                db.finish_node(
                    id,
                    "node1",
                    None,
                    60.0 + f64::from(round),
                    &st(true, 4.0, 1),
                )
                .unwrap();
            }
            if round == 0 {
                db.finish_node(id, "node2", None, 70.0, &st(true, 6.0, 2))
                    .unwrap();
            } else {
                db.finish_node(
                    id,
                    "node2",
                    Some(("Prepare", "sfdisk: busy")),
                    20.0,
                    &st(false, 2.0, 1),
                )
                .unwrap();
            }
            db.finish_deployment(id, "done", Some("the rest")).unwrap();
        }
        let one = names("node1");
        let op = NewDeployment {
            kind: kind::REBOOT,
            environment: "reboot:simple",
            ..new("bob", &one)
        };
        let id = db.create_deployment(&op).unwrap().unwrap();
        db.finish_node(
            id,
            "node1",
            Some(("BootNewEnv", "no answer")),
            30.0,
            &serde_json::json!([]),
        )
        .unwrap();
        let (nodes, steps) = db.detailed_stats(None, None).unwrap();
        let row = |n: &str| nodes.iter().find(|r| r.node == n).unwrap().clone();
        // node1's third deployment ended with "the rest" (ko, no step).
        assert_eq!(nodes[0].node, "node2");
        let n2 = row("node2");
        assert_eq!((n2.deployments, n2.ok, n2.ko), (3, 1, 2));
        assert!((n2.failure_rate - 2.0 / 3.0).abs() < 1e-9);
        assert_eq!(n2.mean_ok_secs, Some(70.0));
        assert_eq!(n2.failures_by_step.get("Prepare"), Some(&2));
        assert_eq!(n2.last_failure.as_deref(), Some("Prepare: sfdisk: busy"));
        let n1 = row("node1");
        assert_eq!((n1.ok, n1.ko, n1.mean_ok_secs), (2, 1, Some(60.5)));
        assert_eq!(n1.last_failure.as_deref(), Some("none: the rest"));
        // Steps in workflow order; the failed Prepares are not in its mean.
        assert_eq!(
            steps.iter().map(|s| s.step.as_str()).collect::<Vec<_>>(),
            vec!["SetDeploymentEnv", "Prepare"]
        );
        assert_eq!(
            (steps[0].entered, steps[0].failed, steps[0].retries),
            (5, 0, 1)
        );
        assert_eq!((steps[1].entered, steps[1].failed), (5, 2));
        assert_eq!(steps[1].mean_secs, Some((4.0 + 6.0 + 4.0) / 3.0));
        assert_eq!(steps[1].max_secs, Some(6.0));
        // Only some nodes; only later deployments.
        let (only, _) = db.detailed_stats(Some(&names("node1")), None).unwrap();
        assert_eq!(only.len(), 1);
        let (later, _) = db.detailed_stats(None, Some(now() + 3600)).unwrap();
        assert!(later.is_empty());
    }

    #[test]
    fn tokens_are_found_by_hash_listed_without_secrets_and_revoked_by_their_owner() {
        let mut db = Db::open_in_memory().unwrap();
        let a = db.add_token("carol", "laptop", "h1").unwrap();
        let b = db.add_token("dave", "", "h2").unwrap();
        assert!(db.add_token("erin", "", "h1").is_err(), "hashes are unique");
        assert_eq!(db.token_user("h1").unwrap().as_deref(), Some("carol"));
        assert_eq!(db.token_user("nope").unwrap(), None);
        let all = db.tokens(None).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(
            (all[0].id, &*all[0].user, &*all[0].name),
            (a, "carol", "laptop")
        );
        assert!(all[0].last_used.is_some() && all[1].last_used.is_none());
        assert_eq!(db.tokens(Some("dave")).unwrap()[0].id, b);
        // Only its owner (or anyone, for an administrator: no owner given) revokes it.
        assert!(!db.remove_token(b, Some("carol")).unwrap());
        assert!(db.remove_token(b, Some("dave")).unwrap());
        assert!(db.remove_token(a, None).unwrap());
        assert_eq!(db.token_user("h1").unwrap(), None);
    }

    #[test]
    fn migrations_run_once_and_a_newer_schema_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("kd.db");
        let db = Db::open(&p).unwrap();
        assert_eq!(db.version().unwrap(), MIGRATIONS.len() as i64);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        drop(db);
        let db = Db::open(&p).unwrap();
        assert_eq!(db.version().unwrap(), MIGRATIONS.len() as i64);
        db.conn.pragma_update(None, "user_version", 99).unwrap();
        drop(db);
        let e = Db::open(&p).err().unwrap();
        assert!(
            format!("{e:#}").contains("newer than this kd-coord"),
            "{e:#}"
        );
    }

    #[test]
    fn overlapping_deployments_are_refused_naming_the_busy_nodes() {
        let mut db = db();
        let a = names("node[1-3]");
        let id = db.create_deployment(&new("alice", &a)).unwrap().unwrap();
        let b = names("node[3-5]");
        let busy = db.create_deployment(&new("bob", &b)).unwrap().unwrap_err();
        assert_eq!(
            busy,
            vec![Busy {
                node: "node3".into(),
                deployment: id,
                user: "alice".into()
            }]
        );
        // Nothing of the refused one was taken.
        let nodes = db.nodes().unwrap();
        assert_eq!(nodes[3].state, state::UNKNOWN);
        assert_eq!(db.deployments(None, 10, None).unwrap().len(), 1);
        // Disjoint nodes go.
        let c = names("node[4-5]");
        db.create_deployment(&new("bob", &c)).unwrap().unwrap();
        assert_eq!(nodes[0].state, state::DEPLOYING);
        assert_eq!(nodes[0].user.as_deref(), Some("alice"));
    }

    #[test]
    fn finishing_records_results_and_releases_nodes() {
        let mut db = db();
        let a = names("node[1-3]");
        let id = db.create_deployment(&new("alice", &a)).unwrap().unwrap();
        let steps = serde_json::json!([{"step": "broadcast", "ok": true, "secs": 3.5}]);
        db.finish_node(id, "node1", None, 42.0, &steps).unwrap();
        db.finish_node(id, "node2", Some(("broadcast", "disk full")), 10.0, &steps)
            .unwrap();
        let left = db
            .finish_deployment(id, "cancelled", Some("cancelled by alice"))
            .unwrap();
        assert_eq!(left, vec!["node3".to_string()]);
        let (d, nodes) = db.deployment(id).unwrap().unwrap();
        assert_eq!(d.state, "cancelled");
        assert_eq!((d.ok, d.ko), (1, 2));
        assert_eq!(nodes[0].result, "ok");
        assert_eq!(nodes[0].steps, steps);
        assert_eq!(nodes[1].step.as_deref(), Some("broadcast"));
        assert_eq!(nodes[1].reason.as_deref(), Some("disk full"));
        assert_eq!(nodes[2].reason.as_deref(), Some("cancelled by alice"));
        let n = db.nodes().unwrap();
        assert_eq!(n[0].state, state::DEPLOYED);
        assert_eq!(n[1].state, state::DEPLOY_FAILED);
        assert_eq!(n[2].state, state::DEPLOY_FAILED);
        // Released: a new deployment takes them.
        db.create_deployment(&new("bob", &a)).unwrap().unwrap();
        let s = db.stats().unwrap();
        assert_eq!(s.node_deployments_ok, 1);
        assert_eq!(s.failures_by_step.get("broadcast"), Some(&1));
    }

    #[test]
    fn recovery_fails_running_deployments_and_frees_their_nodes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("kd.db");
        let mut db = Db::open(&p).unwrap();
        db.put_cluster("lab", "yaml", &names("node[1-6]")).unwrap();
        let a = names("node[1-2]");
        let id = db.create_deployment(&new("alice", &a)).unwrap().unwrap();
        db.finish_node(id, "node1", None, 1.0, &serde_json::json!([]))
            .unwrap();
        drop(db);
        let mut db = Db::open(&p).unwrap();
        db.save_log(id, &["a".to_string(), "b".to_string()])
            .unwrap();
        assert_eq!(db.log(id).unwrap(), ["a", "b"]);
        let rec = db.recover("coordinator restarted").unwrap();
        assert_eq!(rec, vec![(id, vec!["node2".to_string()])]);
        let (d, nodes) = db.deployment(id).unwrap().unwrap();
        assert_eq!(d.state, "failed");
        assert_eq!(d.reason.as_deref(), Some("coordinator restarted"));
        assert_eq!(nodes[1].reason.as_deref(), Some("coordinator restarted"));
        assert!(db.nodes().unwrap().iter().all(|n| n.state != "deploying"));
        assert!(db.recover("again").unwrap().is_empty());
    }

    #[test]
    fn rights_cover_node_sets_and_partitions() {
        let mut db = db();
        db.add_right(&Right {
            user: "alice".into(),
            nodes: "node[1-3]".into(),
            partition: "*".into(),
        })
        .unwrap();
        db.add_right(&Right {
            user: "bob".into(),
            nodes: "node4".into(),
            partition: "deploy".into(),
        })
        .unwrap();
        assert!(db
            .denied("alice", &names("node[1-3]"), "deploy")
            .unwrap()
            .is_empty());
        assert_eq!(
            db.denied("alice", &names("node[3-4]"), "3").unwrap(),
            vec!["node4"]
        );
        assert!(db
            .denied("bob", &names("node4"), "deploy")
            .unwrap()
            .is_empty());
        assert_eq!(
            db.denied("bob", &names("node4"), "3").unwrap(),
            vec!["node4"]
        );
        assert_eq!(
            db.denied("carol", &names("node1"), "deploy").unwrap(),
            vec!["node1"]
        );
        assert_eq!(db.remove_rights("alice", None).unwrap(), 1);
        assert_eq!(
            db.denied("alice", &names("node1"), "deploy").unwrap(),
            vec!["node1"]
        );
    }

    #[test]
    fn environments_are_seen_by_visibility_and_found_by_name() {
        let mut db = db();
        let env = |name: &str, version: u32, user: &str, vis: &str| EnvRow {
            name: name.into(),
            version,
            user: user.into(),
            visibility: vis.into(),
            description: String::new(),
            yaml: format!("{name} {version} {user}"),
            dir: "/".into(),
            added: 0,
        };
        assert!(db
            .add_environment(&env("deb", 1, "alice", "private"))
            .unwrap());
        assert!(db
            .add_environment(&env("deb", 2, "alice", "private"))
            .unwrap());
        assert!(db
            .add_environment(&env("deb", 1, "root", "public"))
            .unwrap());
        assert!(db
            .add_environment(&env("tools", 1, "bob", "shared"))
            .unwrap());
        // A version is immutable.
        assert!(!db
            .add_environment(&env("deb", 2, "alice", "public"))
            .unwrap());
        let names = |v: Vec<EnvRow>| -> Vec<String> {
            v.iter()
                .map(|e| format!("{}@{}/{}", e.name, e.version, e.user))
                .collect()
        };
        assert_eq!(
            names(db.environments("alice", false, None, false).unwrap()),
            ["deb@1/alice", "deb@2/alice", "deb@1/root"]
        );
        // Bob sees the public one and his own shared one, not Alice's private ones.
        assert_eq!(
            names(db.environments("bob", false, None, false).unwrap()),
            ["deb@1/root", "tools@1/bob"]
        );
        // Shared ones show when their owner is named.
        assert_eq!(
            names(db.environments("carol", false, Some("bob"), false).unwrap()),
            ["tools@1/bob"]
        );
        let f = |db: &Db, viewer: &str, name: &str, v: Option<u32>, o: Option<&str>| {
            db.find_environment(viewer, false, name, v, o)
                .unwrap()
                .map(|e| format!("{}@{}/{}", e.name, e.version, e.user))
        };
        assert_eq!(
            f(&db, "alice", "deb", None, None).as_deref(),
            Some("deb@2/alice")
        );
        assert_eq!(
            f(&db, "alice", "deb", Some(1), None).as_deref(),
            Some("deb@1/alice")
        );
        assert_eq!(
            f(&db, "bob", "deb", None, None).as_deref(),
            Some("deb@1/root")
        );
        assert_eq!(f(&db, "bob", "deb", None, Some("alice")), None);
        assert_eq!(
            f(&db, "carol", "tools", None, None).as_deref(),
            Some("tools@1/bob")
        );
        assert_eq!(db.remove_environment("deb", Some(2), "alice").unwrap(), 1);
        assert_eq!(
            f(&db, "alice", "deb", None, None).as_deref(),
            Some("deb@1/alice")
        );
        // Visibility and description change; another owner's or a missing version does not.
        assert!(db
            .update_environment("deb", 1, "alice", "shared", "now shared", "y")
            .unwrap());
        assert_eq!(
            f(&db, "bob", "deb", None, Some("alice")).as_deref(),
            Some("deb@1/alice")
        );
        let e = db
            .find_environment("bob", false, "deb", Some(1), Some("alice"))
            .unwrap()
            .unwrap();
        assert_eq!(
            (e.description.as_str(), e.yaml.as_str()),
            ("now shared", "y")
        );
        assert!(!db
            .update_environment("deb", 9, "alice", "shared", "", "y")
            .unwrap());
        assert!(!db
            .update_environment("tools", 1, "alice", "public", "", "y")
            .unwrap());
    }

    #[test]
    fn a_cluster_cannot_steal_nodes_nor_drop_busy_ones() {
        let mut db = db();
        let e = db
            .put_cluster("other", "y", &names("node[6-7]"))
            .unwrap_err();
        assert!(format!("{e}").contains("node6 already belongs to cluster lab"));
        let a = names("node1");
        db.create_deployment(&new("alice", &a)).unwrap().unwrap();
        let e = db
            .put_cluster("lab", "y2", &names("node[2-6]"))
            .unwrap_err();
        assert!(format!("{e}").contains("being deployed"), "{e}");
        db.put_cluster("lab", "y3", &names("node[1-4]")).unwrap();
        assert_eq!(db.nodes().unwrap().len(), 4);
        assert_eq!(db.clusters().unwrap(), vec![("lab".into(), "y3".into())]);
    }
}
