//! A minimal QMP (QEMU Machine Protocol) client over a Unix socket: the lab's virtual BMC.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use crate::Error;

/// An open QMP session, capabilities already negotiated.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connect, read the greeting and send `qmp_capabilities`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, Error> {
        let ctx = |e: std::io::Error| Error::Qmp(format!("{}: {e}", path.display()));
        let stream = UnixStream::connect(path).map_err(ctx)?;
        stream.set_read_timeout(Some(timeout)).map_err(ctx)?;
        stream.set_write_timeout(Some(timeout)).map_err(ctx)?;
        let writer = stream.try_clone().map_err(ctx)?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(Error::Qmp(format!("unexpected greeting {greeting}")));
        }
        qmp.execute("qmp_capabilities")?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<Value, Error> {
        let mut line = String::new();
        // Bounded: at most 100 asynchronous events are skipped by callers.
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| Error::Qmp(format!("read: {e}")))?;
        if n == 0 {
            return Err(Error::Qmp("connection closed".into()));
        }
        serde_json::from_str(&line).map_err(|e| Error::Qmp(format!("bad json {line:?}: {e}")))
    }

    /// Run a command without arguments and return its `return` value.
    pub fn execute(&mut self, command: &str) -> Result<Value, Error> {
        let msg = json!({ "execute": command }).to_string() + "\n";
        self.writer
            .write_all(msg.as_bytes())
            .map_err(|e| Error::Qmp(format!("write {command}: {e}")))?;
        for _ in 0..100 {
            let v = self.read_message()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(Error::Qmp(format!("{command}: {e}")));
            }
            // an asynchronous event: skip it
        }
        Err(Error::Qmp(format!("{command}: no reply")))
    }

    /// `query-status`: the run state (`running`, `paused`, `shutdown`, ...).
    pub fn run_state(&mut self) -> Result<String, Error> {
        let r = self.execute("query-status")?;
        Ok(r.get("status")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string())
    }

    /// `quit`: QEMU exits; the connection may close before the reply arrives.
    pub fn quit(mut self) -> Result<(), Error> {
        match self.execute("quit") {
            Ok(_) => Ok(()),
            Err(Error::Qmp(m)) if m.contains("closed") || m.contains("reset") => Ok(()),
            Err(e) => Err(e),
        }
    }
}
