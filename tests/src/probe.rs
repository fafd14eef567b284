//! What `k2i-probe` reports, and running it.
//!
//! The probe prints one JSON line: `{"ok":bool,"errno":int|null,"error":str|null,
//! "peer":"ip:port"|null,"body":str|null}`. Both sides live here so they agree; the encoder and
//! the parser handle exactly that flat shape.

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader, Read as _},
    net::SocketAddr,
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use crate::process::{ChildGuard, output_within};

/// The outcome of one probe connection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProbeResult {
    /// Connected, sent the request and read the response to EOF.
    pub ok: bool,
    /// The errno of the failing call.
    pub errno: Option<i32>,
    /// Which call failed and why.
    pub error: Option<String>,
    /// `getpeername` of the connected socket (`ip:port`, `[ip6]:port`).
    pub peer: Option<String>,
    /// Everything read after the request (status line, headers, body).
    pub body: Option<String>,
}

impl ProbeResult {
    pub fn to_json(&self) -> String {
        let mut out = String::from("{");
        let _ = write!(out, "\"ok\":{}", self.ok);
        out.push_str(",\"errno\":");
        match self.errno {
            Some(errno) => {
                let _ = write!(out, "{errno}");
            }
            None => out.push_str("null"),
        }
        for (key, value) in [
            ("error", &self.error),
            ("peer", &self.peer),
            ("body", &self.body),
        ] {
            let _ = write!(out, ",\"{key}\":");
            match value {
                Some(s) => encode_str(&mut out, s),
                None => out.push_str("null"),
            }
        }
        out.push('}');
        out
    }

    /// Parses a line printed by [`ProbeResult::to_json`].
    pub fn from_json(line: &str) -> Result<Self, String> {
        let mut p = Parser {
            s: line.trim().as_bytes(),
            i: 0,
        };
        let mut result = ProbeResult::default();
        p.expect(b'{')?;
        loop {
            p.ws();
            if p.peek() == Some(b'}') {
                break;
            }
            let key = p.string()?;
            p.ws();
            p.expect(b':')?;
            p.ws();
            match key.as_str() {
                "ok" => result.ok = p.boolean()?,
                "errno" => result.errno = p.null_or(|p| p.int())?,
                "error" => result.error = p.null_or(|p| p.string())?,
                "peer" => result.peer = p.null_or(|p| p.string())?,
                "body" => result.body = p.null_or(|p| p.string())?,
                other => return Err(format!("unexpected key {other:?}")),
            }
            p.ws();
            match p.peek() {
                Some(b',') => p.i += 1,
                Some(b'}') => {}
                _ => return Err(format!("expected , or }} at byte {}", p.i)),
            }
        }
        Ok(result)
    }

    /// The HTTP status of the response, if one was read.
    pub fn status(&self) -> Option<u16> {
        let line = self.body.as_deref()?.lines().next()?;
        let mut words = line.split_whitespace();
        words.next().filter(|v| v.starts_with("HTTP/"))?;
        words.next()?.parse().ok()
    }

    /// The response body (after the blank line), if any.
    pub fn http_body(&self) -> Option<&str> {
        let body = self.body.as_deref()?;
        Some(body.split_once("\r\n\r\n").map_or(body, |(_, b)| b))
    }

    /// Whether the response came from the agent stand-in.
    pub fn reached_agent_stub(&self) -> bool {
        self.http_body()
            .is_some_and(|b| b.starts_with("agent-stub peer="))
    }

    /// Whether the response came from the IMDS stand-in.
    pub fn reached_imds_stub(&self) -> bool {
        self.http_body()
            .is_some_and(|b| b.starts_with("imds-stub peer="))
    }

    /// The peer IP the answering stub saw (`... peer=<ip>`).
    pub fn seen_as(&self) -> Option<std::net::IpAddr> {
        self.http_body()?
            .rsplit_once("peer=")?
            .1
            .trim()
            .parse()
            .ok()
    }
}

fn encode_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn expect(&mut self, b: u8) -> Result<(), String> {
        if self.peek() == Some(b) {
            self.i += 1;
            Ok(())
        } else {
            Err(format!("expected {:?} at byte {}", b as char, self.i))
        }
    }

    fn literal(&mut self, word: &str) -> bool {
        if self.s[self.i..].starts_with(word.as_bytes()) {
            self.i += word.len();
            true
        } else {
            false
        }
    }

    fn boolean(&mut self) -> Result<bool, String> {
        if self.literal("true") {
            Ok(true)
        } else if self.literal("false") {
            Ok(false)
        } else {
            Err(format!("expected a boolean at byte {}", self.i))
        }
    }

    fn null_or<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, String>,
    ) -> Result<Option<T>, String> {
        if self.literal("null") {
            Ok(None)
        } else {
            f(self).map(Some)
        }
    }

    fn int(&mut self) -> Result<i32, String> {
        let start = self.i;
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.i += 1;
        }
        std::str::from_utf8(&self.s[start..self.i])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("expected an integer at byte {start}"))
    }

    fn string(&mut self) -> Result<String, String> {
        self.expect(b'"')?;
        let mut out = Vec::new();
        loop {
            let b = self
                .peek()
                .ok_or_else(|| "unterminated string".to_owned())?;
            self.i += 1;
            match b {
                b'"' => break,
                b'\\' => {
                    let e = self
                        .peek()
                        .ok_or_else(|| "unterminated escape".to_owned())?;
                    self.i += 1;
                    match e {
                        b'"' => out.push(b'"'),
                        b'\\' => out.push(b'\\'),
                        b'/' => out.push(b'/'),
                        b'n' => out.push(b'\n'),
                        b'r' => out.push(b'\r'),
                        b't' => out.push(b'\t'),
                        b'u' => {
                            let hex = self
                                .s
                                .get(self.i..self.i + 4)
                                .and_then(|h| std::str::from_utf8(h).ok())
                                .and_then(|h| u32::from_str_radix(h, 16).ok())
                                .ok_or_else(|| format!("bad \\u escape at byte {}", self.i))?;
                            self.i += 4;
                            let c = char::from_u32(hex).unwrap_or('\u{fffd}');
                            let mut tmp = [0u8; 4];
                            out.extend_from_slice(c.encode_utf8(&mut tmp).as_bytes());
                        }
                        other => return Err(format!("bad escape \\{}", other as char)),
                    }
                }
                b => out.push(b),
            }
        }
        String::from_utf8(out).map_err(|e| format!("string is not UTF-8: {e}"))
    }
}

/// Runs a prepared `k2i-probe` command (from [`crate::Pod::command`] etc.) with `args` and
/// parses its JSON line; panics with its output if it misbehaves.
pub fn run(mut command: Command, args: &[&str]) -> ProbeResult {
    command.args(args);
    let output = output_within(&mut command, Duration::from_secs(20), "k2i-probe");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "k2i-probe {args:?} failed ({}):\nstdout: {stdout}\nstderr: {stderr}",
        output.status
    );
    let line = stdout.lines().last().unwrap_or_default();
    ProbeResult::from_json(line).unwrap_or_else(|e| {
        panic!("k2i-probe {args:?} printed unparsable JSON ({e}): {stdout:?}; stderr: {stderr}")
    })
}

/// A `k2i-probe --hold` run: connected, and waiting with its request until [`HeldProbe::finish`],
/// so a test can look at the kernel's state for the open connection.
pub struct HeldProbe {
    child: ChildGuard,
    /// The connected socket's own address (the client side of the connection).
    pub local: SocketAddr,
    stdout: thread::JoinHandle<Vec<u8>>,
    stderr: mpsc::Receiver<String>,
}

impl HeldProbe {
    /// Starts a prepared `k2i-probe` command with `args` plus `--hold` and waits until it has
    /// connected; panics with its output if it does not.
    pub fn start(mut command: Command, args: &[&str]) -> HeldProbe {
        command
            .args(args)
            .arg("--hold")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = ChildGuard::spawn(&mut command, "k2i-probe --hold");
        let stdout = child.child_mut().stdout.take();
        let stdout = thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut out) = stdout {
                let _ = out.read_to_end(&mut buf);
            }
            buf
        });
        let (tx, stderr) = mpsc::channel();
        if let Some(err) = child.child_mut().stderr.take() {
            thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let mut seen = Vec::new();
        let local = loop {
            match stderr.recv_timeout(Duration::from_secs(20)) {
                Ok(line) => {
                    if let Some(addr) = line.strip_prefix("connected ") {
                        break addr.trim().parse().unwrap_or_else(|e| {
                            panic!("k2i-probe {args:?} reported {line:?}: {e}")
                        });
                    }
                    seen.push(line);
                }
                Err(_) => {
                    child.kill9();
                    let out = stdout.join().unwrap_or_default();
                    panic!(
                        "k2i-probe {args:?} never connected; stdout: {}; stderr: {seen:?}",
                        String::from_utf8_lossy(&out)
                    );
                }
            }
        };
        HeldProbe {
            child,
            local,
            stdout,
            stderr,
        }
    }

    /// Lets the probe send its request and read the answer, and returns what it reports.
    pub fn finish(mut self) -> ProbeResult {
        drop(self.child.child_mut().stdin.take());
        let status = self.child.wait_timeout(Duration::from_secs(20));
        if status.is_none() {
            self.child.kill9();
        }
        let stdout = self.stdout.join().unwrap_or_default();
        let stdout = String::from_utf8_lossy(&stdout);
        let stderr: Vec<String> = self.stderr.try_iter().collect();
        assert!(
            status.is_some_and(|s| s.success()),
            "k2i-probe --hold did not finish cleanly ({status:?}):\nstdout: {stdout}\nstderr: \
             {stderr:?}"
        );
        let line = stdout.lines().last().unwrap_or_default();
        ProbeResult::from_json(line).unwrap_or_else(|e| {
            panic!("k2i-probe --hold printed unparsable JSON ({e}): {stdout:?}; stderr: {stderr:?}")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip() {
        let result = ProbeResult {
            ok: true,
            errno: None,
            error: None,
            peer: Some("[fd00:ec2::254]:80".into()),
            body: Some("HTTP/1.1 200 OK\r\n\r\nagent-stub peer=\"x\"\\\u{1}é".into()),
        };
        assert_eq!(ProbeResult::from_json(&result.to_json()), Ok(result));
        let failed = ProbeResult {
            ok: false,
            errno: Some(1),
            error: Some("connect: Operation not permitted".into()),
            peer: None,
            body: None,
        };
        assert_eq!(ProbeResult::from_json(&failed.to_json()), Ok(failed));
    }

    #[test]
    fn body_helpers() {
        let result = ProbeResult {
            ok: true,
            body: Some("HTTP/1.1 200 OK\r\nA: b\r\n\r\nagent-stub peer=198.51.100.2".into()),
            ..Default::default()
        };
        assert!(result.reached_agent_stub());
        assert!(!result.reached_imds_stub());
        assert_eq!(result.seen_as(), Some("198.51.100.2".parse().unwrap()));
    }
}
