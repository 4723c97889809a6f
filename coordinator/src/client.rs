//! The CLI's side of the API: HTTP/1.1 over the daemon's Unix socket, or over TLS to its
//! HTTPS API with a bearer token (hyper, one connection per request).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// How long an API call may take.
pub const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// How long creating a deployment may take (its image may be packed first).
pub const CREATE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

/// A client of one daemon.
#[derive(Debug, Clone)]
pub struct Client {
    target: Target,
}

#[derive(Clone)]
enum Target {
    /// `STATE/kd.sock`: the kernel tells the daemon who we are.
    Local { socket: PathBuf },
    /// `https://HOST:PORT`: the daemon's certificate pinned, a bearer token.
    Remote {
        url: String,
        authority: String,
        host: String,
        tls: Arc<rustls::ClientConfig>,
        token: Option<String>,
    },
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Local { socket } => write!(f, "Local({})", socket.display()),
            // Never the token.
            Target::Remote { url, .. } => write!(f, "Remote({url})"),
        }
    }
}

/// The byte stream under one HTTP connection.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// What went wrong talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No daemon answers on the socket.
    #[error(
        "no kd daemon answers on {socket} ({cause}): start one with `kd-coord --state {state} serve` \
         (as root), or run this deployment in this process \
         with `kd-coord deploy --standalone`"
    )]
    NoDaemon {
        /// The socket.
        socket: String,
        /// The state directory.
        state: String,
        /// Why connecting failed.
        cause: String,
    },
    /// The remote daemon could not be reached or did not prove itself.
    #[error("cannot reach the kd daemon at {url}: {cause}")]
    Unreachable {
        /// The API's URL.
        url: String,
        /// Why.
        cause: String,
    },
    /// The daemon refused the request.
    #[error("{message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The daemon's message.
        message: String,
        /// The whole error body.
        body: Value,
    },
}

impl Client {
    /// A client of the daemon serving `STATE/kd.sock`.
    pub fn new(state: &Path) -> Self {
        Client {
            target: Target::Local {
                socket: state.join(crate::service::SOCKET),
            },
        }
    }

    /// A client of a daemon's HTTPS API at `url` (`https://HOST:PORT`), whose certificate has
    /// SHA-256 `pin` (`kd-coord pin` on the daemon's host), proving `token`.
    pub fn remote(url: &str, pin: &str, token: Option<String>) -> Result<Self> {
        let rest = url.strip_prefix("https://").ok_or_else(|| {
            anyhow::anyhow!("--api {url:?}: the daemon's API is https://HOST:PORT")
        })?;
        let authority = rest.trim_end_matches('/').to_string();
        if authority.is_empty() || authority.contains('/') {
            bail!("--api {url:?}: expected https://HOST:PORT, without a path");
        }
        let host = match authority.rsplit_once(':') {
            Some((h, p)) if p.parse::<u16>().is_ok() => h,
            _ => bail!(
                "--api {url:?}: expected https://HOST:PORT (the port of kd-coord serve --listen)"
            ),
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let pin = kd_net::parse_sha256_hex(pin).ok_or_else(|| {
            anyhow::anyhow!(
                "--api-pin {pin:?}: expected the 64 hex digits `kd-coord pin` prints on the daemon's host"
            )
        })?;
        let tls = kd_net::tls::api_client(pin)?;
        Ok(Client {
            target: Target::Remote {
                url: format!("https://{authority}"),
                authority,
                host,
                tls: Arc::new(tls),
                token: token
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty()),
            },
        })
    }

    /// Where this client goes, for messages.
    pub fn describe(&self) -> String {
        match &self.target {
            Target::Local { socket } => socket.display().to_string(),
            Target::Remote { url, .. } => url.clone(),
        }
    }

    async fn stream(&self) -> Result<Box<dyn Io>> {
        match &self.target {
            Target::Local { socket } => {
                let s = tokio::net::UnixStream::connect(socket)
                    .await
                    .map_err(|e| no_daemon(socket, e))?;
                Ok(Box::new(s))
            }
            Target::Remote {
                url,
                authority,
                host,
                tls,
                ..
            } => {
                let unreachable = |cause: String| ClientError::Unreachable {
                    url: url.clone(),
                    cause,
                };
                let tcp = tokio::net::TcpStream::connect(authority.as_str())
                    .await
                    .map_err(|e| unreachable(e.to_string()))?;
                let name = rustls_pki_types::ServerName::try_from(host.clone())
                    .map_err(|e| unreachable(format!("bad host name {host:?}: {e}")))?;
                let s = tokio_rustls::TlsConnector::from(tls.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| unreachable(format!("TLS: {e} (is --api-pin the pin `kd-coord pin` prints on the daemon's host?)")))?;
                Ok(Box::new(s))
            }
        }
    }

    async fn connect(&self) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
        let stream = self.stream().await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP handshake with the daemon")?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok(sender)
    }

    fn request(&self, method: Method, path: &str) -> hyper::http::request::Builder {
        let mut b = Request::builder().method(method).uri(path);
        match &self.target {
            Target::Local { .. } => b = b.header(hyper::header::HOST, "kd"),
            Target::Remote {
                authority, token, ..
            } => {
                b = b.header(hyper::header::HOST, authority.as_str());
                if let Some(t) = token {
                    b = b.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
                }
            }
        }
        b
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<hyper::Response<hyper::body::Incoming>> {
        let mut sender = self.connect().await?;
        let bytes = match body {
            Some(b) => Bytes::from(serde_json::to_vec(b)?),
            None => Bytes::new(),
        };
        let req = self
            .request(method, path)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(bytes))?;
        sender
            .send_request(req)
            .await
            .with_context(|| format!("request {path} to the daemon"))
    }

    /// One request; a JSON answer on success, [`ClientError::Api`] otherwise. Bounded by
    /// [`CALL_TIMEOUT`] ([`CREATE_TIMEOUT`] for a new deployment, which may pack its image).
    pub async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value> {
        let limit = if method == Method::POST && path == "/api/v1/deployments" {
            CREATE_TIMEOUT
        } else {
            CALL_TIMEOUT
        };
        match tokio::time::timeout(limit, self.call_unbounded(method, path, body)).await {
            Ok(r) => r,
            Err(_) => bail!(
                "the daemon did not answer {path} within {} s: is it stuck? (kd-coord serve's log)",
                limit.as_secs()
            ),
        }
    }

    async fn call_unbounded(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value> {
        let resp = self.send(method, path, body).await?;
        let status = resp.status();
        let v = answer(resp).await?;
        if !status.is_success() {
            return Err(api_error(status, v).into());
        }
        Ok(v)
    }

    /// A text answer (the API reference, metrics).
    pub async fn text(&self, path: &str) -> Result<String> {
        let resp = tokio::time::timeout(CALL_TIMEOUT, self.send(Method::GET, path, None))
            .await
            .map_err(|_| anyhow::anyhow!("the daemon did not answer {path} in time"))??;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        if !status.is_success() {
            bail!("{path}: {status}: {text}");
        }
        Ok(text)
    }

    /// Follows an ndjson stream, calling `line` for each object until the stream ends.
    pub async fn follow(&self, path: &str, mut line: impl FnMut(Value)) -> Result<()> {
        let resp = self.send(Method::GET, path, None).await?;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let bytes = body.collect().await?.to_bytes();
            let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            return Err(api_error(status, v).into());
        }
        let mut buf: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.context("the daemon's event stream broke")?;
            if let Some(data) = frame.data_ref() {
                buf.extend_from_slice(data);
                while let Some(i) = buf.iter().position(|&b| b == b'\n') {
                    let l: Vec<u8> = buf.drain(..=i).collect();
                    if let Ok(v) = serde_json::from_slice::<Value>(&l) {
                        line(v);
                    }
                }
            }
        }
        Ok(())
    }
}

impl Client {
    /// `POST path` asking to switch to `protocol` (HTTP/1.1 `Upgrade`); the upgraded
    /// connection on `101 Switching Protocols`, [`ClientError::Api`] otherwise. The answer is
    /// bounded by [`CALL_TIMEOUT`]; the connection then lasts as long as its user wants.
    pub async fn upgrade(&self, path: &str, protocol: &str) -> Result<hyper::upgrade::Upgraded> {
        let ask = async {
            let mut sender = self.connect().await?;
            let req = self
                .request(Method::POST, path)
                .header(hyper::header::CONNECTION, "upgrade")
                .header(hyper::header::UPGRADE, protocol)
                .body(Full::new(Bytes::new()))?;
            let resp = sender
                .send_request(req)
                .await
                .with_context(|| format!("request {path} to the daemon"))?;
            let status = resp.status();
            if status != StatusCode::SWITCHING_PROTOCOLS {
                return Err(api_error(status, answer(resp).await?).into());
            }
            hyper::upgrade::on(resp)
                .await
                .context("switching the connection to the console")
        };
        match tokio::time::timeout(CALL_TIMEOUT, ask).await {
            Ok(r) => r,
            Err(_) => bail!(
                "the daemon did not answer {path} within {} s: is it stuck? (kd-coord serve's log)",
                CALL_TIMEOUT.as_secs()
            ),
        }
    }
}

/// An answer's body: its JSON, `Null` when empty, a string when it is not JSON.
async fn answer(resp: hyper::Response<hyper::body::Incoming>) -> Result<Value> {
    let bytes = resp
        .into_body()
        .collect()
        .await
        .context("reading the daemon's answer")?
        .to_bytes();
    Ok(if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
    })
}

fn no_daemon(socket: &Path, e: std::io::Error) -> ClientError {
    ClientError::NoDaemon {
        socket: socket.display().to_string(),
        state: socket
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        cause: e.to_string(),
    }
}

fn api_error(status: StatusCode, body: Value) -> ClientError {
    let message = body
        .get("error")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| format!("the daemon answered {status}"));
    ClientError::Api {
        status: status.as_u16(),
        message,
        body,
    }
}
