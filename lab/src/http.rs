//! A tiny std-only HTTP/1.0 static file server (GET and HEAD), one thread per connection.
//! File bodies go out through `std::io::copy`, which uses `sendfile` on Linux.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Most connections served at once; others get 503.
const MAX_CONNECTIONS: usize = 128;
/// Longest request head accepted.
const MAX_HEAD: usize = 16 * 1024;

/// A parsed request line.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    /// `GET` or `HEAD`.
    pub method: String,
    /// Decoded path, without query string.
    pub path: String,
}

/// Parse `GET /a%20b?x HTTP/1.1` into method and decoded path.
pub fn parse_request_line(line: &str) -> Option<Request> {
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?;
    let version = parts.next()?;
    if !version.starts_with("HTTP/") {
        return None;
    }
    let raw = target.split(['?', '#']).next()?;
    Some(Request {
        method,
        path: percent_decode(raw)?,
    })
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Map a request path to a file under `root`, refusing anything that leaves it.
pub fn resolve(root: &Path, path: &str) -> Option<PathBuf> {
    let rel = path.strip_prefix('/')?;
    let mut out = root.to_path_buf();
    for c in Path::new(rel).components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(out)
}

/// Serve files under `root` on `listener` forever; one log line per request to `log`.
pub fn serve(root: PathBuf, listener: TcpListener, log: Box<dyn Write + Send>) -> io::Result<()> {
    let log = Arc::new(Mutex::new(log));
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            let _ = (&stream).write_all(b"HTTP/1.0 503 Busy\r\nContent-Length: 0\r\n\r\n");
            continue;
        }
        let (root, log, active) = (root.clone(), log.clone(), active.clone());
        std::thread::spawn(move || {
            let start = Instant::now();
            let peer = stream
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            let line = match handle(&root, stream) {
                Ok((req, status, bytes)) => format!("{req} {status} {bytes}"),
                Err(e) => format!("error {e}"),
            };
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64();
            if let Ok(mut l) = log.lock() {
                let _ = writeln!(
                    l,
                    "{now:.3} {peer} {line} {:.3}s",
                    start.elapsed().as_secs_f64()
                );
                let _ = l.flush();
            }
            active.fetch_sub(1, Ordering::SeqCst);
        });
    }
    Ok(())
}

fn respond(stream: &mut TcpStream, status: &str) -> io::Result<()> {
    write!(
        stream,
        "HTTP/1.0 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
}

fn handle(root: &Path, mut stream: TcpStream) -> io::Result<(String, u16, u64)> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.set_write_timeout(Some(Duration::from_secs(300)))?;
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut first = String::new();
    reader.read_line(&mut first)?;
    // Drain the header lines (bounded).
    let mut total = first.len();
    loop {
        let mut l = String::new();
        let n = reader.read_line(&mut l)?;
        total += n;
        if n == 0 || l == "\r\n" || l == "\n" || total > MAX_HEAD {
            break;
        }
    }
    let Some(req) = parse_request_line(first.trim_end()) else {
        respond(&mut stream, "400 Bad Request")?;
        return Ok((first.trim_end().to_string(), 400, 0));
    };
    let desc = format!("{} {}", req.method, req.path);
    if req.method != "GET" && req.method != "HEAD" {
        respond(&mut stream, "405 Method Not Allowed")?;
        return Ok((desc, 405, 0));
    }
    let file = resolve(root, &req.path).and_then(|p| {
        let f = File::open(&p).ok()?;
        let m = f.metadata().ok()?;
        m.is_file().then_some((f, m.len()))
    });
    let Some((mut file, len)) = file else {
        respond(&mut stream, "404 Not Found")?;
        return Ok((desc, 404, 0));
    };
    write!(
        stream,
        "HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {len}\r\nConnection: close\r\n\r\n"
    )?;
    let sent = if req.method == "GET" {
        io::copy(&mut file, &mut stream)?
    } else {
        0
    };
    stream.flush()?;
    Ok((desc, 200, sent))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn request_lines() {
        assert_eq!(
            parse_request_line("GET /nodes/a%2Db.ipxe?x=1 HTTP/1.1"),
            Some(Request {
                method: "GET".into(),
                path: "/nodes/a-b.ipxe".into()
            })
        );
        assert_eq!(parse_request_line("GET /x"), None);
        assert_eq!(parse_request_line("GET /%zz HTTP/1.0"), None);
    }

    #[test]
    fn no_escape_from_root() {
        let r = Path::new("/srv");
        assert_eq!(resolve(r, "/a/./b"), Some(PathBuf::from("/srv/a/b")));
        assert_eq!(resolve(r, "/a/../../etc/passwd"), None);
        assert_eq!(resolve(r, "a"), None);
    }

    fn get(addr: std::net::SocketAddr, path: &str) -> Vec<u8> {
        let mut s = TcpStream::connect(addr).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n"
        )
        .unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).unwrap();
        buf
    }

    #[test]
    fn serves_files_and_404() {
        let dir = tempfile::tempdir().unwrap();
        let body: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.path().join("big.bin"), &body).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let root = dir.path().to_path_buf();
        std::thread::spawn(move || serve(root, l, Box::new(io::sink())));
        let r = get(addr, "/big.bin");
        let head_end = r.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let head = String::from_utf8_lossy(&r[..head_end]);
        assert!(head.starts_with("HTTP/1.0 200 OK"));
        assert!(head.contains("Content-Length: 3000000"));
        assert_eq!(&r[head_end..], &body[..]);
        let r = get(addr, "/missing");
        assert!(r.starts_with(b"HTTP/1.0 404"));
        let r = get(addr, "/");
        assert!(r.starts_with(b"HTTP/1.0 404"));
    }
}
