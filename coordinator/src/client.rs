//! The CLI's side of the API: HTTP/1.1 over the daemon's Unix socket (hyper, one connection
//! per request).

use std::path::{Path, PathBuf};

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
    socket: PathBuf,
}

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
            socket: state.join(crate::service::SOCKET),
        }
    }

    async fn connect(&self) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| self.no_daemon(e))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP handshake with the daemon")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
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
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "kd")
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
        let bytes = resp
            .into_body()
            .collect()
            .await
            .context("reading the daemon's answer")?
            .to_bytes();
        let v: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
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
            let stream = tokio::net::UnixStream::connect(&self.socket)
                .await
                .map_err(|e| self.no_daemon(e))?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .context("HTTP handshake with the daemon")?;
            tokio::spawn(async move {
                let _ = conn.with_upgrades().await;
            });
            let req = Request::builder()
                .method(Method::POST)
                .uri(path)
                .header(hyper::header::HOST, "kd")
                .header(hyper::header::CONNECTION, "upgrade")
                .header(hyper::header::UPGRADE, protocol)
                .body(Full::new(Bytes::new()))?;
            let resp = sender
                .send_request(req)
                .await
                .with_context(|| format!("request {path} to the daemon"))?;
            let status = resp.status();
            if status != StatusCode::SWITCHING_PROTOCOLS {
                let bytes = resp
                    .into_body()
                    .collect()
                    .await
                    .context("reading the daemon's answer")?
                    .to_bytes();
                let v = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                    Value::String(String::from_utf8_lossy(&bytes).into_owned())
                });
                return Err(api_error(status, v).into());
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

    fn no_daemon(&self, e: std::io::Error) -> ClientError {
        ClientError::NoDaemon {
            socket: self.socket.display().to_string(),
            state: self
                .socket
                .parent()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            cause: e.to_string(),
        }
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
