//! A lean Redis client: RESP2 over one TCP stream, just the commands the suites need.
//!
//! Why not a general Redis crate: the lookup suite compares hopps against `MGET`, so the Redis
//! side must not be slowed by a client that builds a value tree per reply. `mget_into` encodes
//! the request into a reused buffer and decodes the reply straight into the caller's row
//! buffer: no allocation per key, the same work the hopps client does on its side (it decodes
//! into one `Vec<f32>` per batch).
//!
//! Keys are `<prefix>:<id>` with `id` in decimal, values are the row as packed little-endian
//! `f32` bytes, as a team that keeps embeddings in Redis stores them.

use std::io::Write as _;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Why a Redis command failed.
#[derive(Debug, thiserror::Error)]
pub enum RespError {
    /// The connection failed while sending or receiving.
    #[error("redis connection: {0}")]
    Io(#[from] std::io::Error),
    /// Redis answered with an error reply.
    #[error("redis answered {command}: {message}")]
    Server {
        command: &'static str,
        message: String,
    },
    /// The reply does not have the shape the command returns.
    #[error("unexpected redis reply to {command}: {reason}")]
    Protocol {
        command: &'static str,
        reason: String,
    },
}

/// One reply, for the commands whose replies are small (`INFO`, `PING`, `DEL`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Integer(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Reply>),
}

/// A connection to one Redis server.
pub struct RespConnection<S> {
    stream: S,
    /// Encoded commands not yet sent.
    out: Vec<u8>,
    /// Received bytes; `buf[pos..end]` are not yet parsed.
    buf: Vec<u8>,
    pos: usize,
    end: usize,
}

/// Appends one bulk string `$<len>\r\n<bytes>\r\n`.
fn put_bulk(out: &mut Vec<u8>, bytes: &[u8]) {
    // Writing to a Vec cannot fail.
    let _ = write!(out, "${}\r\n", bytes.len());
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\r\n");
}

/// Appends the key `<prefix>:<id>` as a bulk string, without an intermediate String.
pub fn put_key(out: &mut Vec<u8>, prefix: &str, id: u64) {
    let mut digits = [0u8; 20];
    let mut n = id;
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let len = prefix.len() + 1 + (digits.len() - i);
    let _ = write!(out, "${len}\r\n");
    out.extend_from_slice(prefix.as_bytes());
    out.push(b':');
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

fn put_array_header(out: &mut Vec<u8>, items: usize) {
    let _ = write!(out, "*{items}\r\n");
}

impl<S: AsyncRead + AsyncWrite + Unpin> RespConnection<S> {
    /// Wraps a connected stream.
    pub fn new(stream: S) -> Self {
        RespConnection {
            stream,
            out: Vec::with_capacity(64 << 10),
            buf: vec![0; 256 << 10],
            pos: 0,
            end: 0,
        }
    }

    /// Sends a command of arbitrary arguments and reads its reply.
    pub async fn command(
        &mut self,
        name: &'static str,
        args: &[&[u8]],
    ) -> Result<Reply, RespError> {
        self.out.clear();
        put_array_header(&mut self.out, args.len() + 1);
        put_bulk(&mut self.out, name.as_bytes());
        for arg in args {
            put_bulk(&mut self.out, arg);
        }
        self.flush().await?;
        self.read_reply(name).await
    }

    /// `PING`, expecting `PONG`.
    pub async fn ping(&mut self) -> Result<(), RespError> {
        match self.command("PING", &[]).await? {
            Reply::Simple(s) if s == "PONG" => Ok(()),
            other => Err(RespError::Protocol {
                command: "PING",
                reason: format!("{other:?}"),
            }),
        }
    }

    /// `FLUSHALL SYNC`: drops every key (memory is returned before the reply).
    pub async fn flushall(&mut self) -> Result<(), RespError> {
        self.expect_ok("FLUSHALL", &[b"SYNC"]).await
    }

    /// `INFO <section>` parsed into `field -> value` pairs.
    pub async fn info(&mut self, section: &str) -> Result<Vec<(String, String)>, RespError> {
        match self.command("INFO", &[section.as_bytes()]).await? {
            Reply::Bulk(Some(text)) => Ok(parse_info(&String::from_utf8_lossy(&text))),
            other => Err(RespError::Protocol {
                command: "INFO",
                reason: format!("{other:?}"),
            }),
        }
    }

    /// A numeric field of `INFO <section>`, e.g. `used_memory` of `memory`.
    pub async fn info_u64(&mut self, section: &str, field: &str) -> Result<u64, RespError> {
        let fields = self.info(section).await?;
        fields
            .iter()
            .find(|(k, _)| k == field)
            .and_then(|(_, v)| v.parse().ok())
            .ok_or_else(|| RespError::Protocol {
                command: "INFO",
                reason: format!("no numeric field {field:?} in section {section:?}"),
            })
    }

    /// Number of keys in the selected database.
    pub async fn dbsize(&mut self) -> Result<u64, RespError> {
        match self.command("DBSIZE", &[]).await? {
            Reply::Integer(n) if n >= 0 => Ok(n as u64),
            other => Err(RespError::Protocol {
                command: "DBSIZE",
                reason: format!("{other:?}"),
            }),
        }
    }

    async fn expect_ok(&mut self, name: &'static str, args: &[&[u8]]) -> Result<(), RespError> {
        match self.command(name, args).await? {
            Reply::Simple(s) if s == "OK" => Ok(()),
            other => Err(RespError::Protocol {
                command: name,
                reason: format!("expected OK, got {other:?}"),
            }),
        }
    }

    /// `MSET` of `keys` with `rows` (`keys.len()` rows of equal length, back to back), sent as
    /// pipelined commands of at most `per_command` keys each so that one command stays a few
    /// megabytes at most.
    pub async fn mset(
        &mut self,
        prefix: &str,
        keys: &[u64],
        rows: &[u8],
        per_command: usize,
    ) -> Result<(), RespError> {
        if keys.is_empty() {
            return Ok(());
        }
        let row_bytes = rows.len() / keys.len();
        if row_bytes * keys.len() != rows.len() {
            return Err(RespError::Protocol {
                command: "MSET",
                reason: format!("{} row bytes for {} keys", rows.len(), keys.len()),
            });
        }
        let per_command = per_command.max(1);
        // Pipelining a few commands at a time keeps both the socket and Redis busy without
        // buffering the whole data set in the client.
        const IN_FLIGHT: usize = 4;
        let mut pending = 0usize;
        self.out.clear();
        for (chunk_keys, chunk_rows) in keys
            .chunks(per_command)
            .zip(rows.chunks(per_command * row_bytes))
        {
            put_array_header(&mut self.out, 1 + 2 * chunk_keys.len());
            put_bulk(&mut self.out, b"MSET");
            for (key, row) in chunk_keys.iter().zip(chunk_rows.chunks_exact(row_bytes)) {
                put_key(&mut self.out, prefix, *key);
                put_bulk(&mut self.out, row);
            }
            pending += 1;
            if pending == IN_FLIGHT {
                self.flush().await?;
                for _ in 0..pending {
                    self.expect_simple_ok("MSET").await?;
                }
                pending = 0;
            }
        }
        self.flush().await?;
        for _ in 0..pending {
            self.expect_simple_ok("MSET").await?;
        }
        Ok(())
    }

    /// `MGET` of `keys`; row `i` is written to `out[i * row_bytes..]` and `found[i]` set, where
    /// `row_bytes = out.len() / keys.len()`. Rows of missing keys are zeroed. A stored value of
    /// another length than `row_bytes` is a protocol error (the data set is not the one loaded).
    /// Returns the number of keys found. Allocates nothing once the buffers have grown.
    pub async fn mget_into(
        &mut self,
        prefix: &str,
        keys: &[u64],
        out: &mut [u8],
        found: &mut [bool],
    ) -> Result<usize, RespError> {
        const CMD: &str = "MGET";
        if keys.is_empty() {
            return Ok(0);
        }
        let row_bytes = out.len() / keys.len();
        if row_bytes * keys.len() != out.len() || found.len() != keys.len() {
            return Err(RespError::Protocol {
                command: CMD,
                reason: format!(
                    "buffers of {} bytes and {} flags for {} keys",
                    out.len(),
                    found.len(),
                    keys.len()
                ),
            });
        }
        self.out.clear();
        put_array_header(&mut self.out, 1 + keys.len());
        put_bulk(&mut self.out, CMD.as_bytes());
        for key in keys {
            put_key(&mut self.out, prefix, *key);
        }
        self.flush().await?;

        let header = self.read_line(CMD).await?;
        let count = match header {
            Line::Array(n) => n,
            Line::Error(message) => {
                return Err(RespError::Server {
                    command: CMD,
                    message,
                });
            }
            other => {
                return Err(RespError::Protocol {
                    command: CMD,
                    reason: format!("expected an array, got {other:?}"),
                });
            }
        };
        if count != keys.len() as i64 {
            return Err(RespError::Protocol {
                command: CMD,
                reason: format!("asked for {} keys, got {count} values", keys.len()),
            });
        }
        let mut hits = 0usize;
        for (i, (row, flag)) in out
            .chunks_exact_mut(row_bytes)
            .zip(found.iter_mut())
            .enumerate()
        {
            match self.read_line(CMD).await? {
                Line::Bulk(len) if len < 0 => {
                    row.fill(0);
                    *flag = false;
                }
                Line::Bulk(len) if len as usize == row_bytes => {
                    self.read_payload_into(row, CMD).await?;
                    *flag = true;
                    hits += 1;
                }
                other => {
                    return Err(RespError::Protocol {
                        command: CMD,
                        reason: format!(
                            "value {i} (key {}:{}): expected a bulk string of {row_bytes} bytes, got {other:?}",
                            prefix, keys[i]
                        ),
                    });
                }
            }
        }
        Ok(hits)
    }

    async fn flush(&mut self) -> Result<(), RespError> {
        self.stream.write_all(&self.out).await?;
        self.stream.flush().await?;
        self.out.clear();
        Ok(())
    }

    async fn expect_simple_ok(&mut self, command: &'static str) -> Result<(), RespError> {
        match self.read_line(command).await? {
            Line::Simple(s) if s == "OK" => Ok(()),
            Line::Error(message) => Err(RespError::Server { command, message }),
            other => Err(RespError::Protocol {
                command,
                reason: format!("expected OK, got {other:?}"),
            }),
        }
    }

    /// Reads more bytes into `buf`, compacting or growing it first when it is full.
    async fn fill(&mut self) -> Result<(), RespError> {
        if self.end == self.buf.len() {
            if self.pos > 0 {
                self.buf.copy_within(self.pos..self.end, 0);
                self.end -= self.pos;
                self.pos = 0;
            } else {
                let grown = self.buf.len() * 2;
                self.buf.resize(grown, 0);
            }
        }
        let n = self.stream.read(&mut self.buf[self.end..]).await?;
        if n == 0 {
            return Err(RespError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "redis closed the connection",
            )));
        }
        self.end += n;
        Ok(())
    }

    /// Reads one `\r\n`-terminated header line and classifies it.
    async fn read_line(&mut self, command: &'static str) -> Result<Line, RespError> {
        loop {
            if let Some(at) = self.buf[self.pos..self.end]
                .windows(2)
                .position(|w| w == b"\r\n")
            {
                let line = &self.buf[self.pos..self.pos + at];
                self.pos += at + 2;
                return parse_line(line, command);
            }
            self.fill().await?;
        }
    }

    /// Copies the next `dst.len()` payload bytes and the trailing `\r\n`.
    async fn read_payload_into(
        &mut self,
        dst: &mut [u8],
        command: &'static str,
    ) -> Result<(), RespError> {
        let mut copied = 0;
        while copied < dst.len() {
            if self.pos == self.end {
                self.pos = 0;
                self.end = 0;
                self.fill().await?;
            }
            let n = (dst.len() - copied).min(self.end - self.pos);
            dst[copied..copied + n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
            self.pos += n;
            copied += n;
        }
        while self.end - self.pos < 2 {
            self.fill().await?;
        }
        if &self.buf[self.pos..self.pos + 2] != b"\r\n" {
            return Err(RespError::Protocol {
                command,
                reason: "bulk string not terminated by CRLF".into(),
            });
        }
        self.pos += 2;
        Ok(())
    }

    /// Reads one whole reply (small replies only: it allocates).
    async fn read_reply(&mut self, command: &'static str) -> Result<Reply, RespError> {
        // An explicit stack instead of recursion: async recursion needs boxing.
        let mut stack: Vec<(usize, Vec<Reply>)> = Vec::new();
        loop {
            let mut reply = match self.read_line(command).await? {
                Line::Simple(s) => Reply::Simple(s),
                Line::Error(message) => return Err(RespError::Server { command, message }),
                Line::Integer(n) => Reply::Integer(n),
                Line::Bulk(len) if len < 0 => Reply::Bulk(None),
                Line::Bulk(len) => {
                    let mut data = vec![0u8; len as usize];
                    self.read_payload_into(&mut data, command).await?;
                    Reply::Bulk(Some(data))
                }
                Line::Array(n) if n <= 0 => Reply::Array(Vec::new()),
                Line::Array(n) => {
                    stack.push((n as usize, Vec::with_capacity(n as usize)));
                    continue;
                }
            };
            loop {
                match stack.last_mut() {
                    None => return Ok(reply),
                    Some((want, items)) => {
                        items.push(reply);
                        if items.len() < *want {
                            break;
                        }
                        let (_, items) = stack.pop().unwrap_or_default();
                        reply = Reply::Array(items);
                    }
                }
            }
        }
    }
}

/// A RESP header line.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    Simple(String),
    Error(String),
    Integer(i64),
    /// Length of a bulk string; negative = nil.
    Bulk(i64),
    /// Item count of an array; negative = nil.
    Array(i64),
}

fn parse_line(line: &[u8], command: &'static str) -> Result<Line, RespError> {
    let number = |rest: &[u8]| -> Result<i64, RespError> {
        std::str::from_utf8(rest)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| RespError::Protocol {
                command,
                reason: format!("bad number in {:?}", String::from_utf8_lossy(line)),
            })
    };
    match line.split_first() {
        Some((b'+', rest)) => Ok(Line::Simple(String::from_utf8_lossy(rest).into_owned())),
        Some((b'-', rest)) => Ok(Line::Error(String::from_utf8_lossy(rest).into_owned())),
        Some((b':', rest)) => Ok(Line::Integer(number(rest)?)),
        Some((b'$', rest)) => Ok(Line::Bulk(number(rest)?)),
        Some((b'*', rest)) => Ok(Line::Array(number(rest)?)),
        _ => Err(RespError::Protocol {
            command,
            reason: format!("unknown reply line {:?}", String::from_utf8_lossy(line)),
        }),
    }
}

/// `field:value` lines of an `INFO` reply; section headers and blank lines are skipped.
pub fn parse_info(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.trim_end().split_once(':'))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    /// Runs `client` against a scripted server that expects `request` and answers `reply`,
    /// delivered in small pieces so that the reader's refill paths run.
    async fn scripted<T>(
        request: Vec<u8>,
        reply: Vec<u8>,
        client: impl AsyncFnOnce(&mut RespConnection<tokio::io::DuplexStream>) -> T,
    ) -> T {
        let (near, mut far) = duplex(1 << 20);
        let server = tokio::spawn(async move {
            let mut got = vec![0u8; request.len()];
            far.read_exact(&mut got).await.expect("request");
            assert_eq!(
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(&request),
                "request bytes"
            );
            for piece in reply.chunks(7) {
                far.write_all(piece).await.expect("reply");
            }
            far
        });
        let mut conn = RespConnection::new(near);
        // A tiny buffer forces compaction and growth.
        conn.buf = vec![0; 16];
        let out = client(&mut conn).await;
        drop(server.await.expect("server task"));
        out
    }

    #[test]
    fn keys_are_prefix_colon_decimal() {
        let mut out = Vec::new();
        put_key(&mut out, "t", 0);
        put_key(&mut out, "t", u64::MAX);
        assert_eq!(out, b"$3\r\nt:0\r\n$22\r\nt:18446744073709551615\r\n");
    }

    #[tokio::test]
    async fn mget_decodes_rows_and_misses() {
        let request = b"*3\r\n$4\r\nMGET\r\n$4\r\nt:12\r\n$3\r\nt:7\r\n".to_vec();
        let reply = b"*2\r\n$-1\r\n$8\r\n\x01\x02\x03\x04\r\n\x05\x06\r\n".to_vec();
        let (hits, out, found) = scripted(request, reply, async |c| {
            let mut out = [0xAAu8; 16];
            let mut found = [true, false];
            let hits = c
                .mget_into("t", &[12, 7], &mut out, &mut found)
                .await
                .expect("mget");
            (hits, out, found)
        })
        .await;
        assert_eq!(hits, 1);
        assert_eq!(found, [false, true]);
        assert_eq!(&out[..8], &[0u8; 8], "a miss is zeroed");
        assert_eq!(
            &out[8..],
            b"\x01\x02\x03\x04\r\n\x05\x06",
            "payload may contain CRLF"
        );
    }

    #[tokio::test]
    async fn mget_rejects_a_row_of_the_wrong_length() {
        let request = b"*2\r\n$4\r\nMGET\r\n$3\r\nt:1\r\n".to_vec();
        let reply = b"*1\r\n$2\r\nab\r\n".to_vec();
        let err = scripted(request, reply, async |c| {
            let mut out = [0u8; 4];
            let mut found = [false];
            c.mget_into("t", &[1], &mut out, &mut found)
                .await
                .expect_err("short row")
        })
        .await;
        assert!(err.to_string().contains("t:1"), "{err}");
    }

    #[tokio::test]
    async fn server_errors_are_values() {
        let request = b"*2\r\n$4\r\nMGET\r\n$3\r\nt:1\r\n".to_vec();
        let reply = b"-OOM command not allowed\r\n".to_vec();
        let err = scripted(request, reply, async |c| {
            let mut out = [0u8; 4];
            let mut found = [false];
            c.mget_into("t", &[1], &mut out, &mut found)
                .await
                .expect_err("error reply")
        })
        .await;
        assert!(matches!(err, RespError::Server { .. }), "{err}");
        assert!(err.to_string().contains("OOM"), "{err}");
    }

    #[tokio::test]
    async fn mset_pipelines_chunks() {
        let mut request = Vec::new();
        request.extend_from_slice(
            b"*5\r\n$4\r\nMSET\r\n$3\r\nt:1\r\n$2\r\nab\r\n$3\r\nt:2\r\n$2\r\ncd\r\n",
        );
        request.extend_from_slice(b"*3\r\n$4\r\nMSET\r\n$3\r\nt:3\r\n$2\r\nef\r\n");
        let reply = b"+OK\r\n+OK\r\n".to_vec();
        scripted(request, reply, async |c| {
            c.mset("t", &[1, 2, 3], b"abcdef", 2).await.expect("mset")
        })
        .await;
    }

    #[tokio::test]
    async fn nested_replies_parse() {
        let request = b"*2\r\n$4\r\nINFO\r\n$6\r\nmemory\r\n".to_vec();
        let reply = b"*2\r\n:5\r\n*2\r\n+a\r\n$1\r\nb\r\n".to_vec();
        let reply = scripted(request, reply, async |c| {
            c.command("INFO", &[b"memory"]).await.expect("reply")
        })
        .await;
        assert_eq!(
            reply,
            Reply::Array(vec![
                Reply::Integer(5),
                Reply::Array(vec![
                    Reply::Simple("a".into()),
                    Reply::Bulk(Some(b"b".to_vec()))
                ]),
            ])
        );
    }

    #[test]
    fn info_fields_parse() {
        let fields = parse_info("# Memory\r\nused_memory:1024\r\nused_memory_human:1.00K\r\n\r\n");
        assert_eq!(fields[0], ("used_memory".to_string(), "1024".to_string()));
        assert_eq!(fields.len(), 2);
    }
}
