//! A minimal blocking HTTP/1.1 client for talking to this server on loopback: the demo's queries
//! and the end-to-end test. One request per connection (`Connection: close`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// Sends one request with `headers` and a JSON `body`; returns the status and the body (chunked
/// transfer encoding undone).
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes())?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let resp = String::from_utf8(resp).context("the answer is not UTF-8")?;
    let (head, body) = resp.split_once("\r\n\r\n").context("no HTTP header")?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no HTTP status")?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> Result<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = s.split_once("\r\n").context("a chunk has no size line")?;
        let n = usize::from_str_radix(size.trim(), 16).context("a chunk size is not hex")?;
        if n == 0 {
            return Ok(out);
        }
        if rest.len() < n + 2 {
            bail!("a chunk is cut short");
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
}
