//! `kd-coord serve`: the daemon. One process holds the database (`STATE/kd.db`), one QUIC
//! endpoint per coordinator address (every deployment of a cluster shares it; agents are
//! routed by node), and serves the HTTP/1.1 JSON API on `STATE/kd.sock`, where the caller is
//! the Unix user the kernel names (`SO_PEERCRED`): no password, no token.
//!
//! Who may do what: root and the daemon's own user administer (clusters, rights, any
//! deployment); others deploy the nodes their rights name and see, follow and cancel their
//! own deployments. The API is described in `docs/api.md` and at `GET /api/v1`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use axum::extract::{ConnectInfo, Path as UrlPath, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{broadcast as bcast, mpsc, watch};

use crate::config::{ClusterConfig, Level, Operation};
use crate::db::{self, Db, NewDeployment, Right};
use crate::deploy::{self, DeployConfig, Hooks, SharedEndpoint, Update};
use crate::env::Environment;
use crate::pki::CoordIdentity;
use crate::workflow::NodeResult;

/// The API's socket in the state directory.
pub const SOCKET: &str = "kd.sock";

/// Lines a running deployment keeps for followers that join late.
const LOG_LINES: usize = 20_000;

/// The API reference served at `GET /api/v1`.
pub const API_DOC: &str = include_str!("../../docs/api.md");

/// A deployment request, as the CLI sends it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeployRequest {
    /// The environment description (YAML text); or empty with `environment_name`.
    #[serde(default)]
    pub environment: String,
    /// Directory that relative paths of the environment are resolved against (the
    /// environment file's directory on the caller's side).
    #[serde(default)]
    pub environment_dir: PathBuf,
    /// A registered environment instead: `NAME` or `NAME@VERSION`.
    #[serde(default)]
    pub environment_name: Option<String>,
    /// Its owner (default: the caller's own, then public, then shared ones).
    #[serde(default)]
    pub environment_user: Option<String>,
    /// Nodes, in node-set syntax.
    pub nodes: String,
    /// Public SSH key text for root on the deployed system.
    #[serde(default)]
    pub ssh_key: Option<String>,
    /// Tree: chain, star or a fan-out.
    #[serde(default = "default_arity")]
    pub arity: String,
    /// Deploy on this partition instead of the layout's deploy partition.
    #[serde(default)]
    pub partition: Option<u32>,
}

fn default_arity() -> String {
    "auto".into()
}

/// How a request came in: the Unix socket (the kernel names the uid) or the HTTPS API (the
/// request names a bearer token).
#[derive(Debug, Clone, Copy)]
pub enum Conn {
    /// `STATE/kd.sock`, from this uid.
    Local {
        /// Unix uid (`SO_PEERCRED`).
        uid: u32,
    },
    /// The HTTPS API, from this address.
    Remote {
        /// The client's address.
        addr: SocketAddr,
    },
}

impl
    axum::extract::connect_info::Connected<
        axum::serve::IncomingStream<'_, tokio::net::UnixListener>,
    > for Conn
{
    fn connect_info(s: axum::serve::IncomingStream<'_, tokio::net::UnixListener>) -> Self {
        // An unreadable credential is nobody (uid u32::MAX), who may do nothing.
        let uid = s.io().peer_cred().map(|c| c.uid()).unwrap_or(u32::MAX);
        Conn::Local { uid }
    }
}

impl
    axum::extract::connect_info::Connected<
        axum::serve::IncomingStream<'_, crate::https::TlsListener>,
    > for Conn
{
    fn connect_info(s: axum::serve::IncomingStream<'_, crate::https::TlsListener>) -> Self {
        Conn::Remote {
            addr: *s.remote_addr(),
        }
    }
}

/// Who is calling: set on every request by [`authenticate`] (a remote request without a valid
/// token never reaches a handler).
#[derive(Debug, Clone)]
pub struct Peer {
    /// The user name rights, environments and deployments are recorded under.
    pub user: String,
    /// The local account the daemon reads files as (a remote user's account of the same name
    /// on the daemon's host, if there is one).
    pub uid: Option<u32>,
    /// Whether this caller administers the daemon (root, the daemon's user, an almighty user).
    pub admin: bool,
    /// Whether the request came over the HTTPS API.
    pub remote: bool,
}

impl Peer {
    /// The uid the daemon reads the caller's files as; a remote user without a local account
    /// has none, and names registered environments instead of files.
    fn files_as(&self) -> ApiResult<u32> {
        self.uid.ok_or_else(|| {
            ApiError::forbidden(format!(
                "{} has no account on the daemon's host, so the daemon reads no file for them: \
                 deploy a registered environment by name (kd-coord env list)",
                self.user
            ))
        })
    }
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Peer {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Peer>()
            .cloned()
            .ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "no caller"))
    }
}

/// Names the caller of every request (and refuses a remote one without a valid token).
async fn authenticate(
    State(d): State<Arc<Daemon>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let conn = req
        .extensions()
        .get::<ConnectInfo<Conn>>()
        .map(|c| c.0)
        // A request that came through no listener (an in-process call) is nobody.
        .unwrap_or(Conn::Local { uid: u32::MAX });
    let peer = match conn {
        Conn::Local { uid } => {
            let user = user_name(uid);
            Peer {
                admin: d.is_admin(Some(uid), &user),
                user,
                uid: Some(uid),
                remote: false,
            }
        }
        Conn::Remote { addr } => {
            let token = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(crate::https::bearer);
            let Some(token) = token else {
                return unauthorized(
                    "this API needs a token: Authorization: Bearer TOKEN (an administrator \
                     makes one with kd-coord token add -u USER on the daemon's host)",
                );
            };
            let found = d.db().token_user(&crate::https::token_hash(token));
            let user = match found {
                Ok(Some(u)) => u,
                Ok(None) => {
                    tracing::info!("HTTPS API: {addr} presented an unknown token");
                    return unauthorized("unknown or revoked token");
                }
                Err(e) => return ApiError::from(e).into_response(),
            };
            let uid = nix::unistd::User::from_name(&user)
                .ok()
                .flatten()
                .map(|u| u.uid.as_raw());
            Peer {
                admin: d.is_admin(uid, &user),
                user,
                uid,
                remote: true,
            }
        }
    };
    req.extensions_mut().insert(peer);
    next.run(req).await
}

fn unauthorized(msg: &str) -> Response {
    let mut r = ApiError::new(StatusCode::UNAUTHORIZED, msg).into_response();
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer realm=\"kd\""),
    );
    r
}

struct Running {
    user: String,
    log: Vec<String>,
    lines: bcast::Sender<String>,
    cancel: watch::Sender<Option<String>>,
}

/// The daemon's state, shared by every request and deployment.
pub struct Daemon {
    dir: PathBuf,
    db: Mutex<Db>,
    identity: CoordIdentity,
    admin_uid: u32,
    almighty: Vec<String>,
    endpoints: tokio::sync::Mutex<HashMap<SocketAddr, SharedEndpoint>>,
    running: Mutex<HashMap<i64, Running>>,
    started: Instant,
    requests: AtomicU64,
    /// Image bytes the nodes of this process's deployments received and verified.
    received: AtomicU64,
    /// Per step: seconds spent in it and how many times, over the nodes finished in this
    /// process (`kd_step_seconds`).
    step_secs: Mutex<std::collections::BTreeMap<&'static str, (f64, u64)>>,
    refused_tx: mpsc::UnboundedSender<crate::broadcast::Event>,
}

/// An API error: a status and a message (and details, for a busy node set).
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: Value,
}

impl ApiError {
    fn new(status: StatusCode, msg: impl std::fmt::Display) -> Self {
        ApiError {
            status,
            body: json!({ "error": msg.to_string() }),
        }
    }
    fn bad(msg: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::BAD_REQUEST, msg)
    }
    fn forbidden(msg: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::FORBIDDEN, msg)
    }
    fn not_found(msg: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::NOT_FOUND, msg)
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

type ApiResult<T> = std::result::Result<T, ApiError>;

/// The name of `uid` (its number when it has none).
pub fn user_name(uid: u32) -> String {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| format!("uid{uid}"))
}

fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Daemon {
    /// Opens the state directory: database (migrated), identity, and recovery from a previous
    /// run that stopped mid-deployment (its deployments fail with "coordinator restarted",
    /// their nodes are released and their PXE profiles boot the local disk).
    pub fn open(dir: &Path, opts: &ServeOptions) -> Result<Arc<Self>> {
        crate::state::create_dir(dir)?;
        // Packed images are served over QUIC, never read by users from the disk: private
        // (an image of a private environment must not be readable by others).
        for sub in ["images", "image-sources"] {
            crate::state::create_dir(&dir.join(sub))?;
        }
        let mut db = Db::open(&dir.join("kd.db"))?;
        let identity = CoordIdentity::load_or_create(dir)?;
        let recovered = db.recover("coordinator restarted")?;
        let clusters = parse_clusters(&db)?;
        for (id, nodes) in &recovered {
            tracing::warn!(
                deployment = id,
                "deployment {id} was running when the coordinator stopped: nodes {} failed",
                kd_proto::nodeset::fold(nodes)
            );
            for n in nodes {
                if let Some(c) = clusters.iter().find(|c| c.node(n).is_some()) {
                    if let Err(e) = deploy::write_local_profile(c, n) {
                        tracing::warn!("{n}: {e:#}");
                    }
                }
            }
        }
        let (refused_tx, mut refused_rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(e) = refused_rx.recv().await {
                if let crate::broadcast::Event::Refused { addr, reason } = e {
                    tracing::info!("refused an agent from {addr}: {reason}");
                }
            }
        });
        Ok(Arc::new(Daemon {
            dir: dir.to_path_buf(),
            db: Mutex::new(db),
            identity,
            admin_uid: nix::unistd::geteuid().as_raw(),
            almighty: opts.almighty.clone(),
            endpoints: tokio::sync::Mutex::new(HashMap::new()),
            running: Mutex::new(HashMap::new()),
            started: Instant::now(),
            requests: AtomicU64::new(0),
            received: AtomicU64::new(0),
            step_secs: Mutex::new(std::collections::BTreeMap::new()),
            refused_tx,
        }))
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Db> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers job `id` (just created in the database) as running for `user` and sends its
    /// first line; returns its cancel switch and start time.
    fn start_job(
        &self,
        id: i64,
        user: &str,
        note: String,
    ) -> (watch::Receiver<Option<String>>, Instant) {
        let (lines, _) = bcast::channel(4096);
        let (cancel_tx, cancel_rx) = watch::channel(None);
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                id,
                Running {
                    user: user.to_string(),
                    log: Vec::new(),
                    lines,
                    cancel: cancel_tx,
                },
            );
        self.push_line(id, json!({ "time": 0.0, "note": note }));
        (cancel_rx, Instant::now())
    }

    fn is_admin(&self, uid: Option<u32>, user: &str) -> bool {
        uid == Some(0) || uid == Some(self.admin_uid) || self.almighty.iter().any(|a| a == user)
    }

    fn admin(&self, p: &Peer) -> ApiResult<()> {
        if p.admin {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "{} is not an administrator of this kd daemon (root, uid {}{} are)",
                p.user,
                self.admin_uid,
                if self.almighty.is_empty() {
                    String::new()
                } else {
                    format!(" and the almighty users {}", self.almighty.join(", "))
                }
            )))
        }
    }

    async fn endpoint(&self, addr: SocketAddr) -> Result<SharedEndpoint> {
        let mut eps = self.endpoints.lock().await;
        if let Some(e) = eps.get(&addr) {
            return Ok(e.clone());
        }
        let e = SharedEndpoint::bind(addr, &self.identity, self.refused_tx.clone())?;
        eps.insert(addr, e.clone());
        Ok(e)
    }

    fn push_line(&self, id: i64, line: Value) {
        let text = line.to_string();
        let mut r = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(run) = r.get_mut(&id) {
            if run.log.len() < LOG_LINES {
                run.log.push(text.clone());
            }
            let _ = run.lines.send(text);
        }
    }

    /// Cancels every running deployment and waits (bounded) for them to end.
    pub async fn shutdown(&self, reason: &str, wait: std::time::Duration) {
        {
            let r = self.running.lock().unwrap_or_else(|p| p.into_inner());
            for run in r.values() {
                let _ = run.cancel.send(Some(reason.to_string()));
            }
        }
        let t0 = Instant::now();
        while t0.elapsed() < wait {
            if self
                .running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty()
            {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let eps: Vec<SharedEndpoint> = self.endpoints.lock().await.values().cloned().collect();
        for e in eps {
            e.close().await;
        }
    }
}

fn parse_clusters(db: &Db) -> Result<Vec<ClusterConfig>> {
    db.clusters()?
        .into_iter()
        .map(|(name, yaml)| {
            ClusterConfig::parse(&yaml).with_context(|| format!("cluster {name} in the database"))
        })
        .collect()
}

/// The API router.
pub fn router(d: Arc<Daemon>) -> Router {
    Router::new()
        .route("/", get(doc))
        .route("/api/v1", get(doc))
        .route("/api/v1/nodes", get(nodes))
        .route("/api/v1/nodes/{name}/console", post(node_console))
        .route("/api/v1/clusters", get(clusters).post(add_cluster))
        .route(
            "/api/v1/deployments",
            get(list_deployments).post(create_deployment),
        )
        .route("/api/v1/deployments/{id}", get(show_deployment))
        .route("/api/v1/deployments/{id}/events", get(follow_deployment))
        .route("/api/v1/deployments/{id}/cancel", post(cancel_deployment))
        .route(
            "/api/v1/rights",
            get(list_rights).post(add_right).delete(remove_rights),
        )
        .route(
            "/api/v1/environments",
            get(list_environments).post(add_environment),
        )
        .route(
            "/api/v1/environments/{name}",
            get(show_environment)
                .delete(remove_environment)
                .patch(update_environment),
        )
        .route("/api/v1/operations", post(create_operation))
        .route("/api/v1/power", get(power_status))
        .route("/api/v1/stats", get(stats))
        .route("/api/v1/tokens", get(list_tokens).post(add_token))
        .route("/api/v1/tokens/{id}", axum::routing::delete(remove_token))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError::not_found("no such API path: see GET /api/v1 for the reference")
        })
        .layer(axum::middleware::from_fn_with_state(
            d.clone(),
            authenticate,
        ))
        .layer(axum::middleware::from_fn_with_state(d.clone(), count))
        .with_state(d)
}

async fn count(
    State(d): State<Arc<Daemon>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    d.requests.fetch_add(1, Ordering::Relaxed);
    next.run(req).await
}

/// How the daemon runs (`kd-coord serve`'s flags).
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// Also serve the API over TLS with bearer tokens on this address.
    pub listen: Option<SocketAddr>,
    /// Users who administer the daemon besides root and the daemon's own user.
    pub almighty: Vec<String>,
}

/// Serves the API on `STATE/kd.sock` (and on `opts.listen` over TLS) until SIGTERM or SIGINT;
/// then cancels running deployments (each node ends deploy_failed, its profile on the local
/// disk) and exits.
pub async fn serve(dir: &Path, opts: &ServeOptions) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    crate::state::create_dir(dir)?;
    // One daemon per state directory.
    let lock_path = dir.join(".daemon.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("cannot open {}", lock_path.display()))?;
    if lock.try_lock().is_err() {
        anyhow::bail!(
            "another kd-coord serve runs on {} (it holds {})",
            dir.display(),
            lock_path.display()
        );
    }
    let d = Daemon::open(dir, opts)?;
    let sock = dir.join(SOCKET);
    let _ = std::fs::remove_file(&sock);
    let listener = tokio::net::UnixListener::bind(&sock)
        .with_context(|| format!("cannot listen on {}", sock.display()))?;
    // Every local user may connect (the kernel tells who they are); the directory lets them
    // reach the socket without listing what else it holds.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666))?;
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o7777;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o011))?;
    eprintln!("kd-coord: serving the API on {}", sock.display());
    let (quit_tx, quit_rx) = tokio::sync::watch::channel(false);
    let remote = match opts.listen {
        None => None,
        Some(addr) => {
            let tls =
                kd_net::tls::api_server(d.identity.cert_der.clone(), d.identity.key_der.clone())?;
            let listener = crate::https::TlsListener::bind(addr, tls).await?;
            let local = axum::serve::Listener::local_addr(&listener)?;
            eprintln!(
                "kd-coord: serving the API on https://{local} (certificate pin {}; tokens: kd-coord token add)",
                kd_proto::manifest::hex(&kd_net::cert_sha256(&d.identity.cert_der))
            );
            let app = router(d.clone()).into_make_service_with_connect_info::<Conn>();
            let mut quit = quit_rx.clone();
            Some(tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = quit.wait_for(|q| *q).await;
                    })
                    .await
            }))
        }
    };
    let app = router(d.clone()).into_make_service_with_connect_info::<Conn>();
    let stop = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
    };
    let mut quit = quit_rx.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        let _ = quit.wait_for(|q| *q).await;
    });
    let server = std::future::IntoFuture::into_future(server);
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => r.context("API server")?,
        _ = stop => {
            // Deployments first (their followers' streams end with them), then the server,
            // which waits for open connections: bounded.
            eprintln!("kd-coord: stopping: cancelling running deployments");
            d.shutdown(
                "the coordinator is stopping",
                std::time::Duration::from_secs(60),
            )
            .await;
            let _ = quit_tx.send(true);
            if tokio::time::timeout(std::time::Duration::from_secs(10), &mut server)
                .await
                .is_err()
            {
                eprintln!("kd-coord: some API connections stayed open: closing them");
            }
            if let Some(r) = remote {
                if tokio::time::timeout(std::time::Duration::from_secs(5), r).await.is_err() {
                    eprintln!("kd-coord: some HTTPS API connections stayed open: closing them");
                }
            }
        }
    }
    let _ = std::fs::remove_file(&sock);
    drop(lock);
    Ok(())
}

async fn doc() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/markdown; charset=utf-8")],
        API_DOC,
    )
}

#[derive(Deserialize)]
struct NodesQuery {
    /// Only these (a node set).
    nodes: Option<String>,
    /// Only nodes in this state.
    state: Option<String>,
}

async fn nodes(
    State(d): State<Arc<Daemon>>,
    Query(q): Query<NodesQuery>,
) -> ApiResult<Json<Value>> {
    let want: Option<std::collections::HashSet<String>> = match &q.nodes {
        None => None,
        Some(set) => Some(parse_nodes(set)?.into_iter().collect()),
    };
    let rows: Vec<db::NodeRow> = d
        .db()
        .nodes()?
        .into_iter()
        .filter(|r| want.as_ref().is_none_or(|w| w.contains(&r.name)))
        .filter(|r| q.state.as_ref().is_none_or(|s| &r.state == s))
        .collect();
    Ok(Json(json!({ "nodes": rows })))
}

async fn clusters(State(d): State<Arc<Daemon>>) -> ApiResult<Json<Value>> {
    let cs = parse_clusters(&d.db())?;
    let out: Vec<Value> = cs
        .iter()
        .map(|c| {
            json!({
                "name": c.cluster,
                "nodes": kd_proto::nodeset::fold(&c.nodes.iter().map(|n| n.name.clone()).collect::<Vec<_>>()),
                "node_count": c.nodes.len(),
                "coordinator": c.coordinator.socket_addr().to_string(),
            })
        })
        .collect();
    Ok(Json(json!({ "clusters": out })))
}

#[derive(Deserialize)]
struct ClusterBody {
    yaml: String,
}

async fn add_cluster(
    State(d): State<Arc<Daemon>>,
    p: Peer,
    Json(b): Json<ClusterBody>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    d.admin(&p)?;
    let c = ClusterConfig::parse(&b.yaml)
        .map_err(|e| ApiError::bad(format!("bad cluster configuration: {e}")))?;
    let names: Vec<String> = c.nodes.iter().map(|n| n.name.clone()).collect();
    d.db()
        .put_cluster(&c.cluster, &b.yaml, &names)
        .map_err(|e| ApiError::new(StatusCode::CONFLICT, format!("{e:#}")))?;
    Ok((
        StatusCode::CREATED,
        Json(
            json!({ "name": c.cluster, "nodes": kd_proto::nodeset::fold(&names), "node_count": names.len() }),
        ),
    ))
}

#[derive(Deserialize)]
struct ListQuery {
    user: Option<String>,
    limit: Option<u32>,
    before: Option<i64>,
}

async fn list_deployments(
    State(d): State<Arc<Daemon>>,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Value>> {
    let limit = q.limit.unwrap_or(100).min(10_000);
    let rows = d.db().deployments(q.user.as_deref(), limit, q.before)?;
    Ok(Json(json!({ "deployments": rows })))
}

async fn show_deployment(
    State(d): State<Arc<Daemon>>,
    UrlPath(id): UrlPath<i64>,
) -> ApiResult<Json<Value>> {
    let (row, nodes) = d
        .db()
        .deployment(id)?
        .ok_or_else(|| ApiError::not_found(format!("no deployment {id}")))?;
    let mut v = serde_json::to_value(&row).map_err(anyhow::Error::from)?;
    v["node_results"] = serde_json::to_value(&nodes).map_err(anyhow::Error::from)?;
    Ok(Json(v))
}

async fn follow_deployment(
    State(d): State<Arc<Daemon>>,
    UrlPath(id): UrlPath<i64>,
) -> ApiResult<Response> {
    let (log, rx) = {
        let r = d.running.lock().unwrap_or_else(|p| p.into_inner());
        match r.get(&id) {
            Some(run) => (run.log.clone(), Some(run.lines.subscribe())),
            None => (Vec::new(), None),
        }
    };
    let end_line = |d: &Daemon| -> ApiResult<String> {
        let (row, nodes) = d
            .db()
            .deployment(id)?
            .ok_or_else(|| ApiError::not_found(format!("no deployment {id}")))?;
        Ok(end_json(&row, &nodes).to_string())
    };
    let Some(rx) = rx else {
        // Over: its saved lines (the end is the last one), or its end only (a deployment the
        // coordinator did not see end: killed).
        let mut lines = d.db().log(id)?;
        if lines.is_empty() {
            lines.push(end_line(&d)?);
        }
        return Ok(ndjson(futures_util::stream::iter(lines)));
    };
    let replay = futures_util::stream::iter(log);
    let live = futures_util::stream::unfold(Some(rx), |rx| async move {
        let mut rx = rx?;
        match rx.recv().await {
            Ok(l) => Some((l, Some(rx))),
            Err(bcast::error::RecvError::Lagged(n)) => Some((
                json!({ "note": format!("({n} lines dropped: this follower was slow)") })
                    .to_string(),
                Some(rx),
            )),
            Err(bcast::error::RecvError::Closed) => None,
        }
    });
    use futures_util::StreamExt;
    Ok(ndjson(replay.chain(live)))
}

fn ndjson(s: impl futures_util::Stream<Item = String> + Send + 'static) -> Response {
    use futures_util::StreamExt;
    let body = axum::body::Body::from_stream(s.map(|mut l| {
        l.push('\n');
        Ok::<_, std::convert::Infallible>(l)
    }));
    ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
}

fn end_json(row: &db::DeploymentRow, nodes: &[db::DeploymentNode]) -> Value {
    let ok: Vec<&str> = nodes
        .iter()
        .filter(|n| n.result == "ok")
        .map(|n| n.node.as_str())
        .collect();
    let ko: Vec<Value> = nodes
        .iter()
        .filter(|n| n.result != "ok")
        .map(|n| json!({ "node": n.node, "step": n.step, "reason": n.reason }))
        .collect();
    json!({ "end": row.state, "id": row.id, "reason": row.reason, "ok": ok, "ko": ko, "node_results": nodes })
}

async fn cancel_deployment(
    State(d): State<Arc<Daemon>>,
    p: Peer,
    UrlPath(id): UrlPath<i64>,
) -> ApiResult<Json<Value>> {
    let who = p.user.clone();
    let r = d.running.lock().unwrap_or_else(|p| p.into_inner());
    let Some(run) = r.get(&id) else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("deployment {id} is not running"),
        ));
    };
    if run.user != who && !p.admin {
        return Err(ApiError::forbidden(format!(
            "deployment {id} is {}'s: {who} may not cancel it",
            run.user
        )));
    }
    let _ = run.cancel.send(Some(format!("cancelled by {who}")));
    Ok(Json(json!({ "id": id, "cancelling": true })))
}

#[derive(Deserialize)]
struct NewToken {
    /// Whose (default: the caller's own; another user's needs an administrator).
    #[serde(default)]
    user: Option<String>,
    /// What it is for ("laptop", "ci").
    #[serde(default)]
    name: Option<String>,
}

async fn add_token(
    State(d): State<Arc<Daemon>>,
    p: Peer,
    Json(t): Json<NewToken>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    if p.remote {
        return Err(ApiError::forbidden(
            "tokens are made on the daemon's host (kd-coord token add, through its Unix socket): \
             a token cannot make tokens",
        ));
    }
    let user = t.user.unwrap_or_else(|| p.user.clone());
    if user != p.user {
        d.admin(&p)?;
    }
    if user.is_empty()
        || user.len() > 64
        || user.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(ApiError::bad(format!("bad user name {user:?}")));
    }
    let name = t.name.unwrap_or_default();
    if name.len() > 200 || name.chars().any(char::is_control) {
        return Err(ApiError::bad(
            "a token's name is at most 200 printable characters",
        ));
    }
    let token = crate::https::new_token()?;
    let id = d
        .db()
        .add_token(&user, &name, &crate::https::token_hash(&token))?;
    tracing::info!("{} made API token {id} for {user}", p.user);
    Ok((
        StatusCode::CREATED,
        Json(json!({ "id": id, "user": user, "name": name, "token": token })),
    ))
}

async fn list_tokens(
    State(d): State<Arc<Daemon>>,
    p: Peer,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let user = match (p.admin, q.get("user")) {
        (true, u) => u.cloned(),
        (false, _) => Some(p.user.clone()),
    };
    let rows = d.db().tokens(user.as_deref())?;
    Ok(Json(json!({ "tokens": rows })))
}

async fn remove_token(
    State(d): State<Arc<Daemon>>,
    p: Peer,
    UrlPath(id): UrlPath<i64>,
) -> ApiResult<Json<Value>> {
    let owner = (!p.admin).then_some(p.user.as_str());
    if !d.db().remove_token(id, owner)? {
        return Err(ApiError::not_found(format!(
            "no token {id}{}: kd-coord token list shows them",
            owner.map(|o| format!(" of {o}")).unwrap_or_default()
        )));
    }
    tracing::info!("{} revoked API token {id}", p.user);
    Ok(Json(json!({ "id": id, "removed": true })))
}

async fn list_rights(
    State(d): State<Arc<Daemon>>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let rows = d.db().rights(q.get("user").map(String::as_str))?;
    Ok(Json(json!({ "rights": rows })))
}

async fn add_right(
    State(d): State<Arc<Daemon>>,
    p: Peer,
    Json(r): Json<Right>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    d.admin(&p)?;
    if r.nodes != "*" {
        parse_nodes(&r.nodes)?;
    }
    if r.partition != "*" && r.partition != "deploy" && r.partition.parse::<u32>().is_err() {
        return Err(ApiError::bad(format!(
            "bad partition {:?}: a number, deploy or *",
            r.partition
        )));
    }
    if r.user.is_empty() {
        return Err(ApiError::bad("a right needs a user"));
    }
    d.db().add_right(&r)?;
    Ok((StatusCode::CREATED, Json(json!({ "right": r }))))
}

async fn remove_rights(
    State(d): State<Arc<Daemon>>,
    p: Peer,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    d.admin(&p)?;
    let user = q
        .get("user")
        .ok_or_else(|| ApiError::bad("name the user: ?user=NAME"))?;
    let n = d
        .db()
        .remove_rights(user, q.get("nodes").map(String::as_str))?;
    Ok(Json(json!({ "removed": n })))
}

#[derive(Deserialize)]
struct StatsQuery {
    /// Only these nodes (per node and per step).
    nodes: Option<String>,
    /// Only deployments created at or after this time (seconds since the epoch).
    since: Option<i64>,
    /// Add `per_node` and `per_step`.
    #[serde(default)]
    detail: bool,
}

async fn stats(
    State(d): State<Arc<Daemon>>,
    Query(q): Query<StatsQuery>,
) -> ApiResult<Json<Value>> {
    let s = d.db().stats()?;
    let mut v = serde_json::to_value(&s).map_err(anyhow::Error::from)?;
    v["deployments_running"] = json!(d.running.lock().unwrap_or_else(|p| p.into_inner()).len());
    v["uptime_secs"] = json!(d.started.elapsed().as_secs());
    if q.detail || q.nodes.is_some() || q.since.is_some() {
        let nodes = match &q.nodes {
            Some(set) => Some(parse_nodes(set)?),
            None => None,
        };
        let (per_node, per_step) = d.db().detailed_stats(nodes.as_deref(), q.since)?;
        v["per_node"] = serde_json::to_value(per_node).map_err(anyhow::Error::from)?;
        v["per_step"] = serde_json::to_value(per_step).map_err(anyhow::Error::from)?;
    }
    Ok(Json(v))
}

async fn metrics(State(d): State<Arc<Daemon>>) -> ApiResult<Response> {
    use std::fmt::Write;
    let s = d.db().stats()?;
    let running = d.running.lock().unwrap_or_else(|p| p.into_inner()).len();
    let routed: usize = d.endpoints.lock().await.values().map(|e| e.routed()).sum();
    let mut t = String::new();
    let _ = writeln!(t, "# HELP kd_nodes Nodes by state.\n# TYPE kd_nodes gauge");
    for st in [
        db::state::DEPLOYED,
        db::state::DEPLOY_FAILED,
        db::state::DEPLOYING,
        db::state::REBOOTING,
        db::state::POWERED_OFF,
        db::state::UNKNOWN,
    ] {
        let n = s.nodes_by_state.get(st).copied().unwrap_or(0);
        let _ = writeln!(t, "kd_nodes{{state=\"{st}\"}} {n}");
    }
    let _ = writeln!(
        t,
        "# HELP kd_deployments Deployments by state.\n# TYPE kd_deployments gauge"
    );
    for (st, n) in &s.deployments_by_state {
        let _ = writeln!(t, "kd_deployments{{state=\"{st}\"}} {n}");
    }
    let _ = writeln!(t, "# HELP kd_deployments_running Deployments running in this process.\n# TYPE kd_deployments_running gauge\nkd_deployments_running {running}");
    let _ = writeln!(t, "# HELP kd_node_deployments_total Node deployments by result.\n# TYPE kd_node_deployments_total counter");
    let _ = writeln!(
        t,
        "kd_node_deployments_total{{result=\"ok\"}} {}\nkd_node_deployments_total{{result=\"ko\"}} {}",
        s.node_deployments_ok, s.node_deployments_ko
    );
    let _ = writeln!(t, "# HELP kd_node_failures_total Node failures by step.\n# TYPE kd_node_failures_total counter");
    for (step, n) in &s.failures_by_step {
        let _ = writeln!(t, "kd_node_failures_total{{step=\"{step}\"}} {n}");
    }
    let _ = writeln!(t, "# HELP kd_agents_routed Nodes whose agents the QUIC endpoints route now.\n# TYPE kd_agents_routed gauge\nkd_agents_routed {routed}");
    let received = d.received.load(Ordering::Relaxed);
    let served = crate::broadcast::SERVED_BYTES.load(Ordering::Relaxed);
    let _ = writeln!(
        t,
        "# HELP kd_image_bytes_received_total Image bytes (compressed) the nodes received and verified.\n\
         # TYPE kd_image_bytes_received_total counter\nkd_image_bytes_received_total {received}\n\
         # HELP kd_image_bytes_served_total Image bytes the coordinator sent itself (root streams, repairs).\n\
         # TYPE kd_image_bytes_served_total counter\nkd_image_bytes_served_total {served}\n\
         # HELP kd_image_bytes_relayed_total Image bytes the nodes received from other nodes.\n\
         # TYPE kd_image_bytes_relayed_total counter\nkd_image_bytes_relayed_total {}",
        received.saturating_sub(served)
    );
    let _ = writeln!(
        t,
        "# HELP kd_step_seconds Time nodes spent in each workflow step (nodes finished since the daemon started).\n# TYPE kd_step_seconds summary"
    );
    for (step, (sum, count)) in d.step_secs.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        let _ = writeln!(
            t,
            "kd_step_seconds_sum{{step=\"{step}\"}} {sum:.3}\nkd_step_seconds_count{{step=\"{step}\"}} {count}"
        );
    }
    let _ = writeln!(
        t,
        "# HELP kd_api_requests_total API requests served.\n# TYPE kd_api_requests_total counter\nkd_api_requests_total {}",
        d.requests.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        t,
        "# HELP kd_uptime_seconds Seconds since the daemon started.\n# TYPE kd_uptime_seconds gauge\nkd_uptime_seconds {}",
        d.started.elapsed().as_secs()
    );
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], t).into_response())
}

async fn create_deployment(
    State(d): State<Arc<Daemon>>,
    p: Peer,
    Json(req): Json<DeployRequest>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let user = p.user.clone();
    let nodes = parse_nodes(&req.nodes)?;
    if nodes.is_empty() {
        return Err(ApiError::bad("no nodes to deploy"));
    }
    let arity: kd_proto::tree::Arity = req
        .arity
        .parse()
        .map_err(|e| ApiError::bad(format!("bad arity {:?}: {e}", req.arity)))?;
    let cluster = cluster_of(&d, &nodes)?;
    let partition = req
        .partition
        .map(|p| p.to_string())
        .unwrap_or_else(|| "deploy".into());
    if !p.admin {
        let denied = d.db().denied(&user, &nodes, &partition)?;
        if !denied.is_empty() {
            return Err(ApiError::forbidden(format!(
                "{user} may not deploy {} (partition {partition}): an administrator grants it with kd-coord rights add -u {user} -m '{}' -p {partition}",
                kd_proto::nodeset::fold(&denied),
                kd_proto::nodeset::fold(&denied)
            )));
        }
    }
    let mut req = req;
    // A registered environment's files were checked for its owner when it was added.
    let reader = match req.environment_name {
        Some(_) => None,
        None => Some(p.files_as()?),
    };
    if let Some(spec) = &req.environment_name {
        let (name, version) = parse_env_spec(spec)?;
        let row = d
            .db()
            .find_environment(
                &user,
                p.admin,
                &name,
                version,
                req.environment_user.as_deref(),
            )?
            .ok_or_else(|| {
                ApiError::not_found(format!(
                    "no environment {spec} that {user} may use{}: kd-coord env list shows them",
                    req.environment_user
                        .as_deref()
                        .map(|o| format!(" owned by {o}"))
                        .unwrap_or_default()
                ))
            })?;
        req.environment = row.yaml;
        req.environment_dir = PathBuf::from(row.dir);
    }
    let env = Environment::parse(&req.environment)
        .map_err(|e| ApiError::bad(format!("bad environment: {e}")))?;
    let env_name = format!("{}:{}", env.name, env.version);
    // A cheap early look (the transaction below decides): do not pack for busy nodes.
    busy_check(&d, &nodes)?;
    let prepared = {
        let d = d.clone();
        let cluster = cluster.clone();
        let env = env.clone();
        let req = req.clone();
        tokio::task::spawn_blocking(move || {
            deploy::prepare(
                &d.dir,
                &cluster,
                &deploy::JobInputs {
                    env: &env,
                    env_dir: &req.environment_dir,
                    ssh_key: req.ssh_key.clone(),
                    partition: req.partition,
                    reader,
                },
                &|l| tracing::info!("{l}"),
            )
        })
        .await
        .map_err(|e| anyhow::anyhow!("preparation task: {e}"))?
    };
    let (img, job) = prepared.map_err(|e| ApiError::bad(format!("{e:#}")))?;
    let id = new_job(&d, &p, &env_name, &nodes, db::kind::DEPLOY)?;
    let endpoint = match d.endpoint(cluster.coordinator.socket_addr()).await {
        Ok(e) => e,
        Err(e) => {
            let reason = format!("{e:#}");
            let _ = d.db().finish_deployment(id, "failed", Some(&reason));
            return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, reason));
        }
    };
    let wire_id = getrandom::u64().map_err(|e| anyhow::anyhow!("no random id: {e}"))?;
    let cfg = DeployConfig {
        cluster,
        nodes: nodes.clone(),
        job,
        arity,
        deployment: wire_id,
        listen: None,
    };
    let (cancel_rx, t0) = d.start_job(
        id,
        &user,
        format!(
            "deployment {id}: {env_name} on {} node(s) {} for {user}, tree {arity}",
            nodes.len(),
            kd_proto::nodeset::fold(&nodes)
        ),
    );
    tokio::spawn(run_deployment(
        d.clone(),
        id,
        JobRun::Deploy {
            img: Box::new(img),
            cfg: Box::new(cfg),
            endpoint,
        },
        cancel_rx,
        t0,
    ));
    Ok((
        StatusCode::CREATED,
        Json(
            json!({ "id": id, "user": user, "environment": env_name, "nodes": kd_proto::nodeset::fold(&nodes), "node_count": nodes.len() }),
        ),
    ))
}

/// `NAME` or `NAME@VERSION`.
fn parse_env_spec(spec: &str) -> ApiResult<(String, Option<u32>)> {
    match spec.split_once('@') {
        None => Ok((spec.to_string(), None)),
        Some((n, v)) => {
            let v = v.parse::<u32>().map_err(|_| {
                ApiError::bad(format!("bad environment {spec:?}: NAME or NAME@VERSION"))
            })?;
            Ok((n.to_string(), Some(v)))
        }
    }
}

#[derive(Deserialize)]
struct EnvQuery {
    user: Option<String>,
    version: Option<u32>,
    #[serde(default)]
    all: bool,
}

async fn list_environments(
    State(d): State<Arc<Daemon>>,
    p: Peer,
    Query(q): Query<EnvQuery>,
) -> ApiResult<Json<Value>> {
    let me = p.user.clone();
    let rows = d
        .db()
        .environments(&me, p.admin, q.user.as_deref(), q.all)?;
    let out: Vec<Value> = rows
        .iter()
        .map(|e| {
            json!({ "name": e.name, "version": e.version, "user": e.user,
                    "visibility": e.visibility, "description": e.description, "added": e.added })
        })
        .collect();
    Ok(Json(json!({ "environments": out })))
}

async fn show_environment(
    State(d): State<Arc<Daemon>>,
    p: Peer,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<EnvQuery>,
) -> ApiResult<Json<Value>> {
    let me = p.user.clone();
    let e = d
        .db()
        .find_environment(&me, p.admin, &name, q.version, q.user.as_deref())?
        .ok_or_else(|| ApiError::not_found(format!("no environment {name} that {me} may see")))?;
    Ok(Json(serde_json::to_value(&e).map_err(anyhow::Error::from)?))
}

#[derive(Deserialize)]
struct EnvBody {
    yaml: String,
    dir: PathBuf,
}

async fn add_environment(
    State(d): State<Arc<Daemon>>,
    p: Peer,
    Json(b): Json<EnvBody>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let me = p.user.clone();
    let env =
        Environment::parse(&b.yaml).map_err(|e| ApiError::bad(format!("bad environment: {e}")))?;
    let visibility = match env.visibility {
        crate::env::Visibility::Private => "private",
        crate::env::Visibility::Shared => "shared",
        crate::env::Visibility::Public => "public",
    };
    if visibility == "public" && !p.admin {
        return Err(ApiError::forbidden(format!(
            "only an administrator adds public environments: {me} may add it as private or shared"
        )));
    }
    // Its files, read as the caller may; the image packed once now.
    let packed = {
        let d = d.clone();
        let env = env.clone();
        let dir = b.dir.clone();
        let uid = p.files_as()?;
        tokio::task::spawn_blocking(move || -> Result<PathBuf> {
            for pi in &env.postinstalls {
                let path = deploy::env_path(&pi.archive, &dir)?;
                deploy::check_readable_by(&path, Some(uid))?;
            }
            let source = deploy::env_path(&env.image.file, &dir)?;
            deploy::check_readable_by(&source, Some(uid))?;
            deploy::image_for(&source, &d.dir.join("images"), &|l| tracing::info!("{l}"))
        })
        .await
        .map_err(|e| anyhow::anyhow!("preparation task: {e}"))?
        .map_err(|e| ApiError::bad(format!("{e:#}")))?
    };
    let row = db::EnvRow {
        name: env.name.clone(),
        version: env.version,
        user: me.clone(),
        visibility: visibility.into(),
        description: env.description.clone(),
        yaml: b.yaml,
        dir: b.dir.display().to_string(),
        added: 0,
    };
    if !d.db().add_environment(&row)? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "{me} already has {}@{}: a version is immutable; add it with a new version",
                env.name, env.version
            ),
        ));
    }
    Ok((
        StatusCode::CREATED,
        Json(
            json!({ "name": env.name, "version": env.version, "user": me,
                     "visibility": visibility, "image": packed.display().to_string() }),
        ),
    ))
}

async fn remove_environment(
    State(d): State<Arc<Daemon>>,
    p: Peer,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<EnvQuery>,
) -> ApiResult<Json<Value>> {
    let me = p.user.clone();
    let owner = q.user.clone().unwrap_or_else(|| me.clone());
    if owner != me && !p.admin {
        return Err(ApiError::forbidden(format!(
            "{name} is {owner}'s: {me} may not remove it"
        )));
    }
    let n = d.db().remove_environment(&name, q.version, &owner)?;
    if n == 0 {
        return Err(ApiError::not_found(format!(
            "{owner} has no environment {name}{}",
            q.version.map(|v| format!("@{v}")).unwrap_or_default()
        )));
    }
    Ok(Json(json!({ "removed": n })))
}

/// The one cluster that holds every node of `nodes` (not empty).
fn cluster_of(d: &Daemon, nodes: &[String]) -> ApiResult<ClusterConfig> {
    let clusters = parse_clusters(&d.db())?;
    if clusters.is_empty() {
        return Err(ApiError::bad(
            "no cluster is configured: an administrator adds one with kd-coord cluster add FILE.yaml",
        ));
    }
    let Some(cluster) = nodes
        .first()
        .and_then(|first| clusters.iter().find(|c| c.node(first).is_some()))
        .cloned()
    else {
        return Err(unknown_nodes(nodes, &clusters));
    };
    let outside: Vec<String> = nodes
        .iter()
        .filter(|n| cluster.node(n).is_none())
        .cloned()
        .collect();
    if !outside.is_empty() {
        if outside
            .iter()
            .all(|n| clusters.iter().any(|c| c.node(n).is_some()))
        {
            return Err(ApiError::bad(format!(
                "nodes {} are not in cluster {} with {}: one cluster at a time",
                kd_proto::nodeset::fold(&outside),
                cluster.cluster,
                nodes[0]
            )));
        }
        return Err(unknown_nodes(nodes, &clusters));
    }
    Ok(cluster)
}

/// `POST /api/v1/operations`: a reboot or power job.
#[derive(Deserialize)]
struct OperationRequest {
    /// `reboot`, `power_on` or `power_off`.
    op: String,
    /// Node set.
    nodes: String,
    /// Reboot kind: `simple` (the default) or `recorded_env`.
    #[serde(default)]
    kind: Option<String>,
    /// Lowest level: `soft` (the default), `hard` or `very_hard`.
    #[serde(default)]
    level: Option<String>,
}

fn parse_level(s: &str) -> ApiResult<Level> {
    Level::ALL
        .into_iter()
        .find(|l| l.as_str() == s)
        .ok_or_else(|| ApiError::bad(format!("bad level {s:?}: soft, hard or very_hard")))
}

/// Refuses a caller without a right on every node of `nodes` (any partition).
fn check_node_rights(
    d: &Daemon,
    p: &Peer,
    user: &str,
    nodes: &[String],
    what: &str,
) -> ApiResult<()> {
    if p.admin {
        return Ok(());
    }
    let denied = d.db().denied(user, nodes, "")?;
    if denied.is_empty() {
        return Ok(());
    }
    Err(ApiError::forbidden(format!(
        "{user} may not {what} {}: no right on them (an administrator grants one with kd-coord rights add -u {user} -m '{}')",
        kd_proto::nodeset::fold(&denied),
        kd_proto::nodeset::fold(&denied)
    )))
}

async fn create_operation(
    State(d): State<Arc<Daemon>>,
    p: Peer,
    Json(req): Json<OperationRequest>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let user = p.user.clone();
    let nodes = parse_nodes(&req.nodes)?;
    if nodes.is_empty() {
        return Err(ApiError::bad("no nodes"));
    }
    let (op, local_profile, check, kind, label) =
        match (req.op.as_str(), req.kind.as_deref().unwrap_or("simple")) {
            ("reboot", "simple") => (Operation::Reboot, false, true, db::kind::REBOOT, "reboot:simple"),
            ("reboot", "recorded_env") => (
                Operation::Reboot,
                true,
                true,
                db::kind::REBOOT,
                "reboot:recorded_env",
            ),
            ("reboot", "deploy_env") => {
                return Err(ApiError::bad(
                    "reboot -r deploy_env: kd's deploy environment runs no shell to log in to; kd-coord deploy boots it and does the work",
                ))
            }
            ("reboot", k) => {
                return Err(ApiError::bad(format!(
                    "bad reboot kind {k:?}: simple or recorded_env"
                )))
            }
            ("power_on", _) => (Operation::PowerOn, false, false, db::kind::POWER_ON, "power_on"),
            ("power_off", _) => (Operation::PowerOff, false, false, db::kind::POWER_OFF, "power_off"),
            (o, _) => {
                return Err(ApiError::bad(format!(
                    "bad operation {o:?}: reboot, power_on or power_off"
                )))
            }
        };
    let from = parse_level(req.level.as_deref().unwrap_or("soft"))?;
    let cluster = cluster_of(&d, &nodes)?;
    let what = label.replace(['_', ':'], " ");
    check_node_rights(&d, &p, &user, &nodes, &what)?;
    let levels: Vec<Level> = cluster
        .commands
        .of(op)
        .levels()
        .into_iter()
        .filter(|l| *l >= from)
        .collect();
    if levels.is_empty() {
        return Err(ApiError::bad(format!(
            "cluster {} has no {what} command at level {from} or above (commands.{} in its configuration)",
            cluster.cluster,
            op.key()
        )));
    }
    let id = new_job(&d, &p, label, &nodes, kind)?;
    let (cancel_rx, t0) = d.start_job(
        id,
        &user,
        format!(
            "job {id}: {what} of {} node(s) {} for {user}, from level {from}",
            nodes.len(),
            kd_proto::nodeset::fold(&nodes)
        ),
    );
    let cfg = deploy::OperateConfig {
        cluster,
        nodes: nodes.clone(),
        op,
        local_profile,
        check,
        from,
    };
    tokio::spawn(run_deployment(
        d.clone(),
        id,
        JobRun::Operate(Box::new(cfg)),
        cancel_rx,
        t0,
    ));
    Ok((
        StatusCode::CREATED,
        Json(
            json!({ "id": id, "kind": kind, "user": user, "environment": label, "nodes": kd_proto::nodeset::fold(&nodes), "node_count": nodes.len() }),
        ),
    ))
}

#[derive(Deserialize)]
struct PowerQuery {
    nodes: String,
}

/// `GET /api/v1/power?nodes=SET`: each node's `commands.power_status` output (run by the
/// daemon, at most the cluster's reboot window at once, each within its command timeout).
async fn power_status(
    State(d): State<Arc<Daemon>>,
    p: Peer,
    Query(q): Query<PowerQuery>,
) -> ApiResult<Json<Value>> {
    let user = p.user.clone();
    let nodes = parse_nodes(&q.nodes)?;
    if nodes.is_empty() {
        return Err(ApiError::bad("no nodes"));
    }
    let cluster = cluster_of(&d, &nodes)?;
    check_node_rights(&d, &p, &user, &nodes, "read the power status of")?;
    let limit = std::time::Duration::from_secs(cluster.workflow.command_timeout.max(1));
    let slots = Arc::new(tokio::sync::Semaphore::new(
        cluster.workflow.reboot_window.max(1),
    ));
    let mut tasks = Vec::new();
    for n in &nodes {
        let cmd = cluster
            .node(n)
            .and_then(|nc| cluster.power_status_command(nc));
        let Some(cmd) = cmd else {
            return Err(ApiError::bad(format!(
                "cluster {} has no power status command (commands.power_status in its configuration)",
                cluster.cluster
            )));
        };
        let slots = slots.clone();
        let node = n.clone();
        tasks.push(tokio::spawn(async move {
            let _slot = slots.acquire_owned().await;
            let out = crate::deploy::run_shell_output(&cmd, limit).await;
            (node, out)
        }));
    }
    let mut rows = Vec::new();
    for t in tasks {
        let (node, out) = t
            .await
            .map_err(|e| anyhow::anyhow!("power status task: {e}"))?;
        rows.push(match out {
            Ok(text) => json!({ "node": node, "ok": true, "status": text.trim() }),
            Err(e) => json!({ "node": node, "ok": false, "error": e }),
        });
    }
    Ok(Json(json!({ "nodes": rows })))
}

fn unknown_nodes(nodes: &[String], clusters: &[ClusterConfig]) -> ApiError {
    let unknown: Vec<String> = nodes
        .iter()
        .filter(|n| !clusters.iter().any(|c| c.node(n).is_some()))
        .cloned()
        .collect();
    let known: Vec<String> = clusters
        .iter()
        .flat_map(|c| c.nodes.iter().map(|n| n.name.clone()))
        .collect();
    ApiError::bad(format!(
        "unknown node(s) {} (known: {})",
        kd_proto::nodeset::fold(&unknown),
        kd_proto::nodeset::fold(&known)
    ))
}

fn busy_check(d: &Daemon, nodes: &[String]) -> ApiResult<()> {
    let rows = d.db().nodes()?;
    let held: HashMap<&str, &db::NodeRow> = rows
        .iter()
        .filter(|r| r.state == db::state::DEPLOYING)
        .map(|r| (r.name.as_str(), r))
        .collect();
    let busy: Vec<db::Busy> = nodes
        .iter()
        .filter_map(|n| {
            held.get(n.as_str()).map(|r| db::Busy {
                node: n.clone(),
                deployment: r.deployment.unwrap_or(0),
                user: r.user.clone().unwrap_or_default(),
            })
        })
        .collect();
    if busy.is_empty() {
        Ok(())
    } else {
        Err(busy_error(busy))
    }
}

/// A node set of a request (ClusterShell syntax); 400, naming it, when it does not parse.
fn parse_nodes(set: &str) -> ApiResult<Vec<String>> {
    kd_proto::nodeset::parse(set).map_err(|e| ApiError::bad(format!("bad node set {set:?}: {e}")))
}

/// A new job (`kind`: a deployment or an operation) of `p` on `nodes`, its nodes taken in one
/// transaction: 409, naming the busy nodes, when one is held by another job.
fn new_job(
    d: &Daemon,
    p: &Peer,
    environment: &str,
    nodes: &[String],
    kind: &str,
) -> ApiResult<i64> {
    match d.db().create_deployment(&NewDeployment {
        user: &p.user,
        uid: p.uid.unwrap_or(u32::MAX),
        environment,
        nodes,
        kind,
    })? {
        Ok(id) => Ok(id),
        Err(busy) => Err(busy_error(busy)),
    }
}

fn busy_error(busy: Vec<db::Busy>) -> ApiError {
    let mut by: Vec<(i64, String, Vec<String>)> = Vec::new();
    for b in &busy {
        match by.iter_mut().find(|(id, _, _)| *id == b.deployment) {
            Some(e) => e.2.push(b.node.clone()),
            None => by.push((b.deployment, b.user.clone(), vec![b.node.clone()])),
        }
    }
    let text: Vec<String> = by
        .iter()
        .map(|(id, user, ns)| {
            format!(
                "{} (deployment {id} by {user})",
                kd_proto::nodeset::fold(ns)
            )
        })
        .collect();
    ApiError {
        status: StatusCode::CONFLICT,
        body: json!({
            "error": format!("nodes busy: {}", text.join(", ")),
            "busy": busy,
        }),
    }
}

/// What a job of the daemon runs with the one driver.
enum JobRun {
    /// A deployment on the daemon's shared endpoint.
    Deploy {
        img: Box<crate::image::ImageFile>,
        cfg: Box<DeployConfig>,
        endpoint: SharedEndpoint,
    },
    /// A remote operation (reboot, power).
    Operate(Box<deploy::OperateConfig>),
}

async fn run_deployment(
    d: Arc<Daemon>,
    id: i64,
    job: JobRun,
    cancel: watch::Receiver<Option<String>>,
    t0: Instant,
) {
    let (notes_tx, mut notes_rx) = mpsc::unbounded_channel::<String>();
    let (upd_tx, mut upd_rx) = mpsc::unbounded_channel::<Update>();
    let mut cancel_seen = cancel.clone();
    let hooks = Hooks {
        notes: notes_tx,
        updates: Some(upd_tx),
        cancel,
    };
    let relay = {
        let d = d.clone();
        tokio::spawn(async move {
            let mut notes_open = true;
            let mut upd_open = true;
            while notes_open || upd_open {
                tokio::select! {
                    n = notes_rx.recv(), if notes_open => match n {
                        Some(n) => d.push_line(id, json!({ "time": t0.elapsed().as_secs_f64(), "note": n })),
                        None => notes_open = false,
                    },
                    u = upd_rx.recv(), if upd_open => match u {
                        Some(Update::Node(r)) => {
                            let steps = serde_json::to_value(steps_json(&r)).unwrap_or(Value::Null);
                            let (failure, line) = match &r.result {
                                NodeResult::Deployed => (None, json!({ "time": t0.elapsed().as_secs_f64(), "node": r.node, "result": "ok", "secs": r.total.as_secs_f64() })),
                                NodeResult::Failed { step, reason } => (Some((step.as_str(), reason.as_str())), json!({ "time": t0.elapsed().as_secs_f64(), "node": r.node, "result": "ko", "step": step.as_str(), "reason": reason, "secs": r.total.as_secs_f64() })),
                            };
                            {
                                let mut t = d.step_secs.lock().unwrap_or_else(|p| p.into_inner());
                                for s in &r.steps {
                                    let e = t.entry(s.step.as_str()).or_insert((0.0, 0));
                                    e.0 += s.duration.as_secs_f64();
                                    e.1 += 1;
                                }
                            }
                            if let Err(e) = d.db().finish_node(id, &r.node, failure, r.total.as_secs_f64(), &steps) {
                                tracing::error!("deployment {id}: cannot record {}: {e:#}", r.node);
                            }
                            d.push_line(id, line);
                        }
                        Some(Update::Step { node, step, attempt }) => d.push_line(id, json!({ "time": t0.elapsed().as_secs_f64(), "node": node, "step": step.as_str(), "attempt": attempt })),
                        Some(Update::Received { bytes, .. }) => {
                            d.received.fetch_add(bytes, Ordering::Relaxed);
                        }
                        None => upd_open = false,
                    },
                }
            }
        })
    };
    let result = match job {
        JobRun::Deploy { img, cfg, endpoint } => {
            deploy::run_shared(*img, *cfg, &d.identity, &endpoint, hooks).await
        }
        JobRun::Operate(cfg) => deploy::operate(*cfg, &d.identity, hooks).await,
    };
    let _ = relay.await;
    let cancelled = cancel_seen.borrow_and_update().clone();
    let (end, reason) = match (&result, cancelled) {
        (Err(e), _) => ("failed", Some(format!("{e:#}"))),
        (Ok(_), Some(why)) => ("cancelled", Some(why)),
        (Ok(_), None) => ("done", None),
    };
    let left = d.db().finish_deployment(id, end, reason.as_deref());
    if let Err(e) = &left {
        tracing::error!("deployment {id}: cannot record its end: {e:#}");
    }
    let line = match d.db().deployment(id) {
        Ok(Some((row, nodes))) => end_json(&row, &nodes),
        _ => json!({ "end": end, "id": id, "reason": reason }),
    };
    d.push_line(id, line);
    // Saved before it leaves the running set: a follower always finds the lines somewhere.
    let log = d
        .running
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&id)
        .map(|r| r.log.clone())
        .unwrap_or_default();
    if let Err(e) = d.db().save_log(id, &log) {
        tracing::error!("deployment {id}: cannot save its log: {e:#}");
    }
    d.running
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
}

fn steps_json(r: &crate::workflow::NodeReport) -> Vec<Value> {
    r.steps
        .iter()
        .map(|s| {
            json!({
                "step": s.step.as_str(),
                "ok": s.ok,
                "attempts": s.attempts,
                "secs": s.duration.as_secs_f64(),
                "reboots": s.reboots.iter().map(|l| l.as_str()).collect::<Vec<_>>(),
            })
        })
        .collect()
}

/// Seconds since the epoch, for clients formatting times.
pub fn epoch_now() -> f64 {
    now_secs()
}

/// `POST /api/v1/nodes/NAME/console` with `Upgrade: kd-console`: the caller's rights on the
/// node checked, the cluster's console command started by the daemon and relayed
/// ([`crate::console`]) over the upgraded connection.
async fn node_console(
    State(d): State<Arc<Daemon>>,
    p: Peer,
    UrlPath(name): UrlPath<String>,
    mut req: axum::extract::Request,
) -> ApiResult<Response> {
    use crate::console::PROTOCOL;
    let user = p.user.clone();
    let wants = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(PROTOCOL));
    if !wants {
        return Err(ApiError::bad(format!(
            "a console is an HTTP/1.1 upgrade: send Connection: Upgrade and Upgrade: {PROTOCOL} (kd-coord console NODE does)"
        )));
    }
    let clusters = parse_clusters(&d.db())?;
    let Some((cluster, node)) = clusters.iter().find_map(|c| c.node(&name).map(|n| (c, n))) else {
        return Err(unknown_nodes(std::slice::from_ref(&name), &clusters));
    };
    if !p.admin {
        // The deployments' check (db::denied), on any partition the user has a right on:
        // whoever may deploy the node may see its console.
        let db = d.db();
        let rights = db.rights(Some(&user))?;
        let mut allowed = false;
        for r in &rights {
            if db
                .denied(&user, std::slice::from_ref(&name), &r.partition)?
                .is_empty()
            {
                allowed = true;
                break;
            }
        }
        if !allowed {
            return Err(ApiError::forbidden(format!(
                "{user} may not use the console of {name}: it needs a right on {name} (an administrator grants it with kd-coord rights add -u {user} -m {name})"
            )));
        }
    }
    let Some(template) = &cluster.commands.console else {
        return Err(ApiError::bad(format!(
            "cluster {} has no console command (commands.console in its configuration)",
            cluster.cluster
        )));
    };
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return Err(ApiError::bad(
            "this connection cannot be upgraded (HTTP/1.1 only)",
        ));
    };
    let command = crate::config::render_template(template, node, &cluster.cluster);
    let child = crate::console::spawn(&command)?;
    // The command line is not logged: it may hold a BMC's credentials.
    let pid = child.id().unwrap_or(0);
    tracing::info!("console of {name} opened for {user} (pid {pid})");
    tokio::spawn(async move {
        let t0 = Instant::now();
        let end = match on_upgrade.await {
            Ok(io) => crate::console::relay(hyper_util::rt::TokioIo::new(io), child).await,
            Err(e) => crate::console::End::ClientLeft(format!("upgrade failed: {e}")),
        };
        tracing::info!(
            "console of {name} closed for {user} after {:.1} s: {end}",
            t0.elapsed().as_secs_f64()
        );
    });
    Ok(Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, PROTOCOL)
        .body(axum::body::Body::empty())
        .map_err(anyhow::Error::from)?)
}

/// `PATCH /api/v1/environments/NAME?version=V&user=OWNER` `{"visibility", "description"}`:
/// the owner or an administrator changes these two of one version (the last one without
/// `version`); its image and content stay as registered.
async fn update_environment(
    State(d): State<Arc<Daemon>>,
    p: Peer,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<EnvQuery>,
    Json(body): Json<serde_json::Map<String, Value>>,
) -> ApiResult<Json<Value>> {
    let me = p.user.clone();
    let owner = q.user.clone().unwrap_or_else(|| me.clone());
    if owner != me && !p.admin {
        return Err(ApiError::forbidden(format!(
            "{name} is {owner}'s: {me} may not update it"
        )));
    }
    let mut visibility = None;
    let mut description = None;
    for (k, v) in &body {
        match (k.as_str(), v) {
            ("visibility", Value::String(s)) => visibility = Some(s.clone()),
            ("description", Value::String(s)) => description = Some(s.clone()),
            ("visibility" | "description", other) => {
                return Err(ApiError::bad(format!("{k} must be a string, not {other}")))
            }
            _ => {
                return Err(ApiError::bad(format!(
                    "{k} cannot change: a version is immutable but for its visibility and description (add a new version)"
                )))
            }
        }
    }
    if visibility.is_none() && description.is_none() {
        return Err(ApiError::bad(
            "nothing to update: give visibility and/or description",
        ));
    }
    if let Some(v) = &visibility {
        if !["private", "shared", "public"].contains(&v.as_str()) {
            return Err(ApiError::bad(format!(
                "bad visibility {v:?}: private, shared or public"
            )));
        }
        if v == "public" && !p.admin {
            return Err(ApiError::forbidden(format!(
                "only an administrator makes environments public: {me} may make it private or shared"
            )));
        }
    }
    let spec = format!(
        "{name}{}",
        q.version.map(|v| format!("@{v}")).unwrap_or_default()
    );
    let mut db = d.db();
    let row = db
        .find_environment(&me, p.admin, &name, q.version, Some(&owner))?
        .filter(|e| e.user == owner)
        .ok_or_else(|| ApiError::not_found(format!("{owner} has no environment {spec}")))?;
    let yaml = with_fields(&row.yaml, visibility.as_deref(), description.as_deref())
        .map_err(|e| anyhow::anyhow!("{}@{}: {e:#}", row.name, row.version))?;
    let visibility = visibility.unwrap_or(row.visibility);
    let description = description.unwrap_or(row.description);
    if !db.update_environment(
        &row.name,
        row.version,
        &owner,
        &visibility,
        &description,
        &yaml,
    )? {
        return Err(ApiError::not_found(format!(
            "{owner} has no environment {}@{} any more",
            row.name, row.version
        )));
    }
    tracing::info!(
        "environment {}@{} of {owner} updated by {me}: visibility {visibility}",
        row.name,
        row.version
    );
    Ok(Json(
        json!({ "name": row.name, "version": row.version, "user": owner,
                "visibility": visibility, "description": description, "added": row.added }),
    ))
}

/// The description `yaml` with its `visibility` and/or `description` replaced; everything
/// else must read the same (checked by parsing both). Comments are not kept.
fn with_fields(yaml: &str, visibility: Option<&str>, description: Option<&str>) -> Result<String> {
    let before = Environment::parse(yaml).context("the registered description")?;
    let mut doc: serde_norway::Value =
        serde_norway::from_str(yaml).context("the registered description")?;
    let map = doc
        .as_mapping_mut()
        .context("the registered description is not a mapping")?;
    if let Some(v) = visibility {
        map.insert("visibility".into(), v.into());
    }
    if let Some(d) = description {
        map.insert("description".into(), d.into());
    }
    let text = serde_norway::to_string(&doc).context("writing the description")?;
    let after = Environment::parse(&text).context("the updated description")?;
    let mut expect = before;
    if let Some(v) = visibility {
        expect.visibility = serde_norway::from_str(v).context("visibility")?;
    }
    if let Some(d) = description {
        expect.description = d.to_string();
    }
    anyhow::ensure!(
        after == expect,
        "updating visibility/description would change something else"
    );
    Ok(text)
}
