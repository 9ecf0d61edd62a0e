//! The write-ahead log of online writes (upsert, delete, push), one per model.
//!
//! Layout: `<data_dir>/wal/<model>/<first sequence, 20 digits>.wal`, segments named by the
//! sequence number of their first record. A record is
//!
//! ```text
//! len u32 LE | crc32c(payload) u32 LE | payload (len bytes)
//! payload = seq u64 | version u64 | op u8 | table_len u16 | table utf-8 |
//!           count u32 | keys count*u64 | value_count u32 | values value_count*f32   (all LE)
//! ```
//!
//! Invariants:
//! - Sequence numbers are strictly increasing across segments; a segment holds the records from
//!   its name up to (excluding) the next segment's name.
//! - Only the syncer thread writes to a segment file, in the order records were appended, so
//!   the file is always a prefix of the appended records; a crash leaves at most a torn tail,
//!   which [`Wal::open`] cuts off. A bad record anywhere but the tail of the newest segment is
//!   corruption and stops the replay with an error naming the file and offset.
//! - A write is acknowledged only once the record is fsynced ([`Wal::wait_durable`]). Many
//!   writers share one fsync (group commit).
//! - Every open starts a fresh segment, so an old segment is never appended to after a crash.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

use crate::config::WalSync;
use crate::error::{EngineError, Result};

/// What an online write does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalOp {
    Upsert = 1,
    Delete = 2,
    Push = 3,
}

impl WalOp {
    fn from_u8(b: u8) -> Option<WalOp> {
        match b {
            1 => Some(WalOp::Upsert),
            2 => Some(WalOp::Delete),
            3 => Some(WalOp::Push),
            _ => None,
        }
    }
}

/// One logged online write, as replayed.
#[derive(Debug, Clone, PartialEq)]
pub struct WalRecord {
    pub seq: u64,
    /// The model version the write was applied on top of; a rollback past that version makes
    /// the record dead (it is skipped on replay).
    pub version: u64,
    pub op: WalOp,
    pub table: String,
    pub keys: Vec<u64>,
    /// `keys.len() * dim` values for upsert and push, empty for delete.
    pub values: Vec<f32>,
}

const HEADER: usize = 8;
/// A record longer than this is not one we wrote: treat it as a torn or damaged length.
const MAX_RECORD: usize = 1 << 30;

#[derive(Debug, Clone)]
struct Segment {
    first_seq: u64,
    path: PathBuf,
}

struct WalState {
    /// Encoded records not yet handed to the syncer.
    pending: Vec<u8>,
    /// Sequence of the newest record in `pending` (or handed over).
    appended: u64,
    /// Sequence of the newest record handed to the syncer (written to `file` or being written).
    handed: u64,
    file: Arc<File>,
    segments: Vec<Segment>,
    closed: bool,
}

#[derive(Debug, Clone, Default)]
struct SyncState {
    synced: u64,
    error: Option<String>,
}

struct Shared {
    dir: PathBuf,
    mode: WalSync,
    state: Mutex<WalState>,
    wake: Condvar,
    synced: tokio::sync::watch::Sender<SyncState>,
    bytes: AtomicU64,
}

/// A model's write-ahead log. Dropping it flushes and fsyncs what was appended.
pub struct Wal {
    shared: Arc<Shared>,
    syncer: Option<std::thread::JoinHandle<()>>,
    /// Holds the directory's exclusive lock until dropped.
    _lock: File,
}

fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}.wal")
}

fn list_segments(dir: &Path) -> Result<Vec<Segment>> {
    let entries = fs::read_dir(dir)
        .map_err(|e| EngineError::wal_io(format!("listing {}", dir.display()), e))?;
    let mut segments = Vec::new();
    for entry in entries {
        let entry =
            entry.map_err(|e| EngineError::wal_io(format!("listing {}", dir.display()), e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name.strip_suffix(".wal") else {
            continue;
        };
        let Ok(first_seq) = stem.parse::<u64>() else {
            continue;
        };
        segments.push(Segment {
            first_seq,
            path: entry.path(),
        });
    }
    segments.sort_by_key(|s| s.first_seq);
    Ok(segments)
}

/// Appends one encoded record to `buf`.
pub(crate) fn encode_record(
    buf: &mut Vec<u8>,
    seq: u64,
    version: u64,
    op: WalOp,
    table: &str,
    keys: &[u64],
    values: &[f32],
) {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; HEADER]);
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(&version.to_le_bytes());
    buf.push(op as u8);
    // Table names are validated by the model spec; a name this long never reaches the WAL.
    let name = &table.as_bytes()[..table.len().min(u16::MAX as usize)];
    buf.extend_from_slice(&(name.len() as u16).to_le_bytes());
    buf.extend_from_slice(name);
    buf.extend_from_slice(&(keys.len() as u32).to_le_bytes());
    for k in keys {
        buf.extend_from_slice(&k.to_le_bytes());
    }
    buf.extend_from_slice(&(values.len() as u32).to_le_bytes());
    for v in values {
        buf.extend_from_slice(&v.to_le_bytes());
    }
    let len = (buf.len() - start - HEADER) as u32;
    let crc = crc32c::crc32c(&buf[start + HEADER..]);
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.b.get(self.at..end)?;
        self.at = end;
        Some(s)
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
}

fn decode_payload(p: &[u8]) -> Option<WalRecord> {
    let mut c = Cursor { b: p, at: 0 };
    let seq = c.u64()?;
    let version = c.u64()?;
    let op = WalOp::from_u8(c.take(1)?[0])?;
    let name_len = c.u16()? as usize;
    let table = String::from_utf8(c.take(name_len)?.to_vec()).ok()?;
    let count = c.u32()? as usize;
    let key_bytes = c.take(count.checked_mul(8)?)?;
    let keys = key_bytes
        .chunks_exact(8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
        .collect();
    let nvalues = c.u32()? as usize;
    let value_bytes = c.take(nvalues.checked_mul(4)?)?;
    let values = value_bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap_or([0; 4])))
        .collect();
    if c.at != p.len() {
        return None;
    }
    Some(WalRecord {
        seq,
        version,
        op,
        table,
        keys,
        values,
    })
}

/// Parses the records of one segment; returns them and the length of the valid prefix.
fn parse_segment(bytes: &[u8]) -> (Vec<WalRecord>, usize) {
    let mut records = Vec::new();
    let mut at = 0usize;
    while at + HEADER <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or([0; 4])) as usize;
        let crc = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap_or([0; 4]));
        if len > MAX_RECORD || at + HEADER + len > bytes.len() {
            break;
        }
        let payload = &bytes[at + HEADER..at + HEADER + len];
        if crc32c::crc32c(payload) != crc {
            break;
        }
        let Some(record) = decode_payload(payload) else {
            break;
        };
        records.push(record);
        at += HEADER + len;
    }
    (records, at)
}

/// Every intact record of the log in `dir`, without changing it (a rebuild reads the log
/// while the node keeps writing to it; a record being written is simply not there yet).
pub fn read_all(dir: &Path) -> Result<Vec<WalRecord>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut records: Vec<WalRecord> = Vec::new();
    for seg in list_segments(dir)? {
        let bytes = fs::read(&seg.path).map_err(|e| {
            EngineError::wal_io(format!("reading WAL segment {}", seg.path.display()), e)
        })?;
        let (recs, _) = parse_segment(&bytes);
        let last = records.last().map(|l| l.seq).unwrap_or(0);
        records.extend(recs.into_iter().filter(|r| r.seq > last));
    }
    Ok(records)
}

impl Wal {
    /// Opens (creating) the log in `dir`, returns it with every intact record, in sequence order.
    /// A torn tail of the newest segment is cut off; damage elsewhere is an error.
    pub fn open(dir: &Path, mode: WalSync) -> Result<(Wal, Vec<WalRecord>)> {
        fs::create_dir_all(dir).map_err(|e| {
            EngineError::wal_io(format!("creating WAL directory {}", dir.display()), e)
        })?;
        // Two writers of one log would interleave sequence numbers: hold an exclusive lock on
        // the directory for the life of this `Wal`.
        let lock_path = dir.join("LOCK");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| EngineError::wal_io(format!("opening {}", lock_path.display()), e))?;
        if let Err(e) = lock.try_lock() {
            return Err(EngineError::precondition(format!(
                "the write-ahead log in {} is in use by another hopps engine ({e}); give each \
                 node its own data directory",
                dir.display()
            )));
        }
        let mut segments = list_segments(dir)?;
        let mut records: Vec<WalRecord> = Vec::new();
        let mut total = 0u64;
        let mut contents = Vec::with_capacity(segments.len());
        for seg in &segments {
            let bytes = fs::read(&seg.path).map_err(|e| {
                EngineError::wal_io(format!("reading WAL segment {}", seg.path.display()), e)
            })?;
            contents.push(bytes);
        }
        // The tail is the newest segment holding bytes: later ones are empty fresh segments
        // (a rotation or an open that wrote nothing before the crash).
        let tail = contents.iter().rposition(|b| !b.is_empty());
        for (i, (seg, bytes)) in segments.iter().zip(&contents).enumerate() {
            let (mut recs, valid) = parse_segment(bytes);
            if valid < bytes.len() {
                if Some(i) == tail {
                    // A crash mid-write: the tail was never acknowledged. Cut it off so the
                    // segment is a clean prefix again.
                    tracing::warn!(
                        segment = %seg.path.display(),
                        offset = valid,
                        dropped_bytes = bytes.len() - valid,
                        "cutting torn tail of write-ahead log"
                    );
                    let f = OpenOptions::new()
                        .write(true)
                        .open(&seg.path)
                        .map_err(|e| {
                            EngineError::wal_io(
                                format!("opening WAL segment {}", seg.path.display()),
                                e,
                            )
                        })?;
                    f.set_len(valid as u64).map_err(|e| {
                        EngineError::wal_io(
                            format!("truncating WAL segment {}", seg.path.display()),
                            e,
                        )
                    })?;
                    f.sync_all().map_err(|e| {
                        EngineError::wal_io(
                            format!("syncing WAL segment {}", seg.path.display()),
                            e,
                        )
                    })?;
                } else {
                    return Err(EngineError::internal(format!(
                        "write-ahead log segment {} is damaged at byte {valid} and newer segments \
                         follow it; move the directory aside to start without these online writes, \
                         or restore it from a backup",
                        seg.path.display()
                    )));
                }
            }
            if let (Some(last), Some(first)) = (records.last(), recs.first())
                && first.seq <= last.seq
            {
                return Err(EngineError::internal(format!(
                    "write-ahead log segment {} repeats sequence {}; the directory mixes two logs; \
                     move it aside",
                    seg.path.display(),
                    first.seq
                )));
            }
            total += valid as u64;
            records.append(&mut recs);
        }
        let last_seq = records.last().map(|r| r.seq).unwrap_or(0);
        let last_named = segments
            .last()
            .map(|s| s.first_seq.saturating_sub(1))
            .unwrap_or(0);
        let next = last_seq.max(last_named) + 1;
        let path = dir.join(segment_name(next));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| {
                EngineError::wal_io(format!("creating WAL segment {}", path.display()), e)
            })?;
        sync_dir(dir)?;
        // An empty newest segment of an earlier run has this very name: it is reused.
        if segments.last().map(|s| s.first_seq) != Some(next) {
            segments.push(Segment {
                first_seq: next,
                path,
            });
        }
        let (synced, _) = tokio::sync::watch::channel(SyncState {
            synced: next - 1,
            error: None,
        });
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            mode,
            state: Mutex::new(WalState {
                pending: Vec::with_capacity(1 << 16),
                appended: next - 1,
                handed: next - 1,
                file: Arc::new(file),
                segments,
                closed: false,
            }),
            wake: Condvar::new(),
            synced,
            bytes: AtomicU64::new(total),
        });
        let worker = shared.clone();
        let syncer = std::thread::Builder::new()
            .name("hopps-wal-sync".into())
            .spawn(move || run_syncer(&worker))
            .map_err(|e| EngineError::wal_io("starting the WAL sync thread", e))?;
        Ok((
            Wal {
                shared,
                syncer: Some(syncer),
                _lock: lock,
            },
            records,
        ))
    }

    /// Appends a record (not yet durable) and returns its sequence number. The caller holds the
    /// model's write lock, so the order of sequence numbers is the order writes were applied.
    pub fn append(
        &self,
        version: u64,
        op: WalOp,
        table: &str,
        keys: &[u64],
        values: &[f32],
    ) -> Result<u64> {
        let err = self.shared.synced.borrow().error.clone();
        if let Some(err) = err {
            return Err(EngineError::new(
                crate::ErrorKind::Unavailable,
                format!(
                    "the write-ahead log in {} failed ({err}); online writes are refused until \
                     the node restarts",
                    self.shared.dir.display()
                ),
            ));
        }
        let mut st = self.shared.state.lock();
        if st.closed {
            return Err(EngineError::new(
                crate::ErrorKind::Unavailable,
                "the write-ahead log is closed; the node is shutting down",
            ));
        }
        let seq = st.appended + 1;
        encode_record(&mut st.pending, seq, version, op, table, keys, values);
        st.appended = seq;
        drop(st);
        if self.shared.mode == WalSync::Always {
            self.shared.wake.notify_one();
        }
        Ok(seq)
    }

    /// Waits until the record `seq` is fsynced.
    pub async fn wait_durable(&self, seq: u64) -> Result<()> {
        let mut rx = self.shared.synced.subscribe();
        let state = rx
            .wait_for(|s| s.synced >= seq || s.error.is_some())
            .await
            .map_err(|_| EngineError::internal("the WAL sync thread stopped"))?
            .clone();
        if state.synced >= seq {
            return Ok(());
        }
        Err(EngineError::new(
            crate::ErrorKind::Unavailable,
            format!(
                "write {seq} was not made durable: the write-ahead log in {} failed ({}); check the \
                 disk and restart the node",
                self.shared.dir.display(),
                state.error.unwrap_or_default()
            ),
        ))
    }

    /// Sequence of the newest appended record.
    pub fn last_sequence(&self) -> u64 {
        self.shared.state.lock().appended
    }

    /// Sequence of the oldest record the log can still hold: older ones were truncated.
    pub fn first_sequence(&self) -> u64 {
        self.shared
            .state
            .lock()
            .segments
            .first()
            .map(|s| s.first_seq)
            .unwrap_or(1)
    }

    /// Bytes of the log on disk.
    pub fn bytes(&self) -> u64 {
        self.shared.bytes.load(Ordering::Relaxed)
    }

    /// Starts a new segment and deletes the segments whose records all have a sequence
    /// `<= covered` (a checkpoint holds their effect). Never deletes a record not yet fsynced.
    pub async fn truncate_through(&self, covered: u64) -> Result<()> {
        self.wait_durable(covered.min(self.last_sequence())).await?;
        let shared = self.shared.clone();
        let doomed = {
            let mut st = shared.state.lock();
            // Records in `pending` go to the new segment; those handed to the syncer are at most
            // `synced`, which `wait_durable` made `>= covered`.
            let synced = shared.synced.borrow().synced;
            let first_of_new = st.handed + 1;
            if st.segments.last().map(|s| s.first_seq) != Some(first_of_new) {
                let path = shared.dir.join(segment_name(first_of_new));
                let file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(|e| {
                        EngineError::wal_io(format!("creating WAL segment {}", path.display()), e)
                    })?;
                st.file = Arc::new(file);
                st.segments.push(Segment {
                    first_seq: first_of_new,
                    path,
                });
            }
            let mut doomed = Vec::new();
            let mut keep = Vec::new();
            let n = st.segments.len();
            for i in 0..n {
                let seg = st.segments[i].clone();
                let next_first = st.segments.get(i + 1).map(|s| s.first_seq);
                match next_first {
                    Some(next) if next - 1 <= covered && next - 1 <= synced => doomed.push(seg),
                    _ => keep.push(seg),
                }
            }
            st.segments = keep;
            doomed
        };
        let mut removed = 0u64;
        for seg in doomed {
            let len = fs::metadata(&seg.path).map(|m| m.len()).unwrap_or(0);
            fs::remove_file(&seg.path)
                .or_else(|e| {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })
                .map_err(|e| {
                    EngineError::wal_io(format!("deleting WAL segment {}", seg.path.display()), e)
                })?;
            removed += len;
        }
        sync_dir(&shared.dir)?;
        shared.bytes.fetch_sub(
            removed.min(shared.bytes.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
        Ok(())
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    // Make segment creation and deletion durable (POSIX needs the directory fsynced).
    let d = File::open(dir)
        .map_err(|e| EngineError::wal_io(format!("opening {}", dir.display()), e))?;
    d.sync_all()
        .map_err(|e| EngineError::wal_io(format!("syncing {}", dir.display()), e))
}

fn run_syncer(shared: &Shared) {
    let mut spare: Vec<u8> = Vec::with_capacity(1 << 16);
    loop {
        let (mut batch, last, file, closing) = {
            let mut st = shared.state.lock();
            match shared.mode {
                WalSync::Always => {
                    while st.pending.is_empty() && !st.closed {
                        shared.wake.wait(&mut st);
                    }
                }
                WalSync::Interval(every) => {
                    if !st.closed {
                        shared.wake.wait_for(&mut st, every);
                    }
                }
            }
            if st.pending.is_empty() {
                if st.closed {
                    return;
                }
                continue;
            }
            spare.clear();
            let batch = std::mem::replace(&mut st.pending, std::mem::take(&mut spare));
            st.handed = st.appended;
            (batch, st.appended, st.file.clone(), st.closed)
        };
        let started = Instant::now();
        let outcome = (&*file).write_all(&batch).and_then(|()| file.sync_data());
        metrics::histogram!("hopps_wal_fsync_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        match outcome {
            Ok(()) => {
                shared
                    .bytes
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                shared.synced.send_modify(|s| s.synced = last);
            }
            Err(e) => {
                // A failed fsync leaves the file in an unknown state: refuse further writes
                // (they could not be acknowledged honestly) until a restart replays the log.
                tracing::error!(error = %e, dir = %shared.dir.display(), "write-ahead log fsync failed");
                shared.synced.send_modify(|s| s.error = Some(e.to_string()));
                return;
            }
        }
        batch.clear();
        spare = batch;
        if closing {
            let st = shared.state.lock();
            if st.pending.is_empty() {
                return;
            }
        }
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.shared.state.lock().closed = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.syncer.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn write_some(dir: &Path, n: u64) -> Vec<u64> {
        let (wal, recs) = Wal::open(dir, WalSync::Always).unwrap();
        assert!(recs.is_empty());
        let mut seqs = Vec::new();
        for i in 0..n {
            let seq = wal
                .append(
                    7,
                    WalOp::Upsert,
                    "emb",
                    &[i, i + 1],
                    &[i as f32, 1.0, 2.0, 3.0],
                )
                .unwrap();
            seqs.push(seq);
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(wal.wait_durable(*seqs.last().unwrap()))
            .unwrap();
        seqs
    }

    #[test]
    fn replays_what_was_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let seqs = write_some(dir.path(), 20);
        assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
        let (_wal, recs) = Wal::open(dir.path(), WalSync::Always).unwrap();
        assert_eq!(recs.len(), 20);
        for (i, r) in recs.iter().enumerate() {
            assert_eq!(r.seq, i as u64 + 1);
            assert_eq!(r.version, 7);
            assert_eq!(r.keys, vec![i as u64, i as u64 + 1]);
            assert_eq!(r.values[0], i as f32);
            assert_eq!(r.table, "emb");
        }
    }

    #[test]
    fn torn_tail_at_every_offset_keeps_a_prefix() {
        let dir = tempfile::tempdir().unwrap();
        write_some(dir.path(), 5);
        let seg = list_segments(dir.path())
            .unwrap()
            .into_iter()
            .find(|s| fs::metadata(&s.path).unwrap().len() > 0)
            .unwrap();
        let full = fs::read(&seg.path).unwrap();
        // Record boundaries, to know how many records each cut must keep.
        let (_, valid) = parse_segment(&full);
        assert_eq!(valid, full.len());
        let mut bounds = vec![0usize];
        let mut at = 0;
        while at < full.len() {
            let len = u32::from_le_bytes(full[at..at + 4].try_into().unwrap()) as usize;
            at += HEADER + len;
            bounds.push(at);
        }
        for cut in 0..=full.len() {
            let d = tempfile::tempdir().unwrap();
            fs::write(d.path().join(seg.path.file_name().unwrap()), &full[..cut]).unwrap();
            let (wal, recs) = Wal::open(d.path(), WalSync::Always).unwrap();
            let expect = bounds.iter().filter(|&&b| b <= cut).count() - 1;
            assert_eq!(recs.len(), expect, "cut at {cut}");
            // New writes continue after the intact prefix.
            let seq = wal.append(8, WalOp::Delete, "emb", &[1], &[]).unwrap();
            assert_eq!(seq, expect as u64 + 1, "cut at {cut}");
        }
    }

    #[test]
    fn flipped_byte_in_the_tail_record_drops_only_it() {
        let dir = tempfile::tempdir().unwrap();
        write_some(dir.path(), 3);
        let seg = list_segments(dir.path())
            .unwrap()
            .into_iter()
            .find(|s| fs::metadata(&s.path).unwrap().len() > 0)
            .unwrap();
        let mut bytes = fs::read(&seg.path).unwrap();
        let n = bytes.len();
        bytes[n - 3] ^= 0x40;
        fs::write(&seg.path, &bytes).unwrap();
        let (_wal, recs) = Wal::open(dir.path(), WalSync::Always).unwrap();
        assert_eq!(recs.len(), 2);
    }

    #[test]
    fn damage_before_the_newest_segment_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        write_some(dir.path(), 3);
        // A second open starts a new segment; write into it so the first is no longer the tail.
        {
            let (wal, recs) = Wal::open(dir.path(), WalSync::Always).unwrap();
            assert_eq!(recs.len(), 3);
            let s = wal.append(9, WalOp::Delete, "emb", &[4], &[]).unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(wal.wait_durable(s)).unwrap();
        }
        let first = &list_segments(dir.path()).unwrap()[0];
        let mut bytes = fs::read(&first.path).unwrap();
        bytes[10] ^= 1;
        fs::write(&first.path, &bytes).unwrap();
        let err = Wal::open(dir.path(), WalSync::Always).err().unwrap();
        assert!(err.to_string().contains("damaged"), "{err}");
    }

    #[tokio::test]
    async fn truncation_deletes_only_covered_segments() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = Wal::open(dir.path(), WalSync::Interval(Duration::from_millis(2))).unwrap();
        for i in 0..10u64 {
            wal.append(1, WalOp::Upsert, "t", &[i], &[1.0]).unwrap();
        }
        wal.wait_durable(10).await.unwrap();
        wal.truncate_through(10).await.unwrap();
        for i in 10..15u64 {
            wal.append(1, WalOp::Upsert, "t", &[i], &[1.0]).unwrap();
        }
        wal.wait_durable(15).await.unwrap();
        drop(wal);
        let (_wal, recs) = Wal::open(dir.path(), WalSync::Always).unwrap();
        let seqs: Vec<u64> = recs.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (11..=15).collect::<Vec<_>>());
    }

    #[test]
    fn a_second_open_of_the_same_log_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_wal, _) = Wal::open(dir.path(), WalSync::Always).unwrap();
        let err = Wal::open(dir.path(), WalSync::Always).err().unwrap();
        assert_eq!(err.kind(), crate::ErrorKind::FailedPrecondition);
        assert!(err.to_string().contains("in use"), "{err}");
    }

    #[tokio::test]
    async fn interval_mode_groups_many_writes() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = Wal::open(dir.path(), WalSync::Interval(Duration::from_millis(5))).unwrap();
        let mut last = 0;
        for i in 0..1000u64 {
            last = wal.append(1, WalOp::Upsert, "t", &[i], &[0.5]).unwrap();
        }
        wal.wait_durable(last).await.unwrap();
        assert!(wal.bytes() > 1000 * 20);
    }
}
