//! The `.hps` segment format: checkpoints hopps writes itself.
//!
//! Byte-level definition in the project's `docs/format.md`. In short (all integers little
//! endian):
//!
//! ```text
//! header (64 bytes)
//!   0  magic "HOPPSSEG"        8  format_version u32 (=1)   12 header_bytes u32 (=64)
//!   16 rows u64                24 dim u32                   28 row_bytes u32
//!   32 block_rows u32          36 dtype, 8 bytes ASCII, NUL padded
//!   44 reserved, 16 zero bytes 60 crc32c of bytes 0..60
//! blocks, ceil(rows / block_rows) of them; block i holds n = min(block_rows, rows - i*block_rows) rows
//!   n keys u64 | n rows of row_bytes | crc32c u32 of the keys and rows | zero padding to 8 bytes
//! footer (16 bytes)
//!   "HOPPSEND" | rows u64
//! ```
//!
//! Invariants: the file length is a function of the header alone, so a reader detects
//! truncation before it reads a block; every block is fixed-size except the last; blocks start
//! 8-byte aligned.

use std::io::Read;

use crate::error::{FormatError, Result};

/// Magic bytes at offset 0.
pub const MAGIC: &[u8; 8] = b"HOPPSSEG";
/// Magic bytes of the footer.
pub const FOOTER_MAGIC: &[u8; 8] = b"HOPPSEND";
/// The segment format version this build writes and reads.
pub const SEGMENT_VERSION: u32 = 1;
pub const HEADER_BYTES: usize = 64;
pub const FOOTER_BYTES: usize = 16;
/// Target bytes per block (keys + rows): big enough to stream at disk speed, small enough to
/// stay in L2 while its checksum is verified.
pub const BLOCK_TARGET_BYTES: usize = 1 << 20;

/// The header of a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentHeader {
    pub rows: u64,
    pub dim: u32,
    pub row_bytes: u32,
    pub block_rows: u32,
    /// The dtype tag of the rows (`f32`, `f16`, `bf16`, `int8`); rows are opaque to this crate.
    pub dtype: String,
}

impl SegmentHeader {
    /// A header for `rows` rows with the default block size.
    pub fn new(dtype: &str, dim: u32, row_bytes: u32, rows: u64) -> Result<SegmentHeader> {
        if dtype.is_empty() || dtype.len() > 8 || !dtype.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(FormatError::invalid(format!(
                "segment dtype tag {dtype:?} must be 1 to 8 printable ASCII characters"
            )));
        }
        if row_bytes == 0 {
            return Err(FormatError::invalid("segment row_bytes must be > 0"));
        }
        let block_rows = (BLOCK_TARGET_BYTES / (8 + row_bytes as usize)).max(1) as u32;
        Ok(SegmentHeader {
            rows,
            dim,
            row_bytes,
            block_rows,
            dtype: dtype.to_string(),
        })
    }

    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut h = [0u8; HEADER_BYTES];
        h[0..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&(HEADER_BYTES as u32).to_le_bytes());
        h[16..24].copy_from_slice(&self.rows.to_le_bytes());
        h[24..28].copy_from_slice(&self.dim.to_le_bytes());
        h[28..32].copy_from_slice(&self.row_bytes.to_le_bytes());
        h[32..36].copy_from_slice(&self.block_rows.to_le_bytes());
        h[36..36 + self.dtype.len()].copy_from_slice(self.dtype.as_bytes());
        let crc = crc32c::crc32c(&h[..60]);
        h[60..64].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Parses and validates a header; `what` names the file in errors.
    pub fn decode(h: &[u8], what: &str) -> Result<SegmentHeader> {
        let corrupt = |why: String| FormatError::corrupt(format!("segment {what}: {why}"));
        if h.len() < HEADER_BYTES {
            return Err(corrupt(format!(
                "{} bytes is shorter than the {HEADER_BYTES}-byte header; the file is truncated",
                h.len()
            )));
        }
        if &h[0..8] != MAGIC {
            return Err(corrupt("bad magic; this is not a .hps segment".into()));
        }
        let u32_at = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
        let version = u32_at(8);
        if version != SEGMENT_VERSION {
            return Err(FormatError::invalid(format!(
                "segment {what} has format version {version}; this hopps reads version \
                 {SEGMENT_VERSION}: upgrade hopps, or write a new checkpoint"
            )));
        }
        let stored = u32_at(60);
        let computed = crc32c::crc32c(&h[..60]);
        if stored != computed {
            return Err(corrupt(format!(
                "header checksum {stored:08x} != computed {computed:08x}; the file is damaged, \
                 delete this checkpoint and write a new one"
            )));
        }
        if u32_at(12) as usize != HEADER_BYTES {
            return Err(corrupt(format!(
                "header_bytes {} is not {HEADER_BYTES}",
                u32_at(12)
            )));
        }
        let rows = u64::from_le_bytes(h[16..24].try_into().unwrap_or_default());
        let dim = u32_at(24);
        let row_bytes = u32_at(28);
        let block_rows = u32_at(32);
        let tag = &h[36..44];
        let len = tag.iter().position(|&b| b == 0).unwrap_or(8);
        let dtype = std::str::from_utf8(&tag[..len])
            .ok()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| corrupt("dtype tag is not ASCII".into()))?
            .to_string();
        if row_bytes == 0 || block_rows == 0 {
            return Err(corrupt("row_bytes and block_rows must be > 0".into()));
        }
        if h[44..60].iter().any(|&b| b != 0) {
            return Err(corrupt("reserved header bytes are not zero".into()));
        }
        Ok(SegmentHeader {
            rows,
            dim,
            row_bytes,
            block_rows,
            dtype,
        })
    }

    fn block_len(&self, n: u64) -> u64 {
        (n * (8 + u64::from(self.row_bytes)) + 4).next_multiple_of(8)
    }

    /// The exact length of a segment with this header.
    pub fn file_len(&self) -> u64 {
        let br = u64::from(self.block_rows);
        let full = self.rows / br;
        let rest = self.rows % br;
        let mut len = (HEADER_BYTES + FOOTER_BYTES) as u64 + full * self.block_len(br);
        if rest > 0 {
            len += self.block_len(rest);
        }
        len
    }
}

/// A decoded segment: keys and their opaque fixed-size rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub dtype: String,
    pub dim: u32,
    pub row_bytes: u32,
    pub keys: Vec<u64>,
    /// `keys.len() * row_bytes` bytes.
    pub rows: Vec<u8>,
}

impl Segment {
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The row of the `i`-th key.
    pub fn row(&self, i: usize) -> &[u8] {
        let rb = self.row_bytes as usize;
        &self.rows[i * rb..(i + 1) * rb]
    }
}

/// Encodes a segment a chunk of whole blocks at a time, so a writer can stream a large
/// segment to storage holding one chunk, not the whole encoded file.
pub struct SegmentEncoder<'a> {
    header: SegmentHeader,
    keys: &'a [u64],
    rows: &'a [u8],
    next_row: usize,
    chunk_bytes: usize,
    started: bool,
    finished: bool,
    crc: u32,
}

impl<'a> SegmentEncoder<'a> {
    /// Checks that `keys` and `rows` match `header`; `chunk_bytes` is the target chunk size.
    pub fn new(
        header: &SegmentHeader,
        keys: &'a [u64],
        rows: &'a [u8],
        chunk_bytes: usize,
    ) -> Result<Self> {
        let rb = header.row_bytes as usize;
        if keys.len() as u64 != header.rows || rows.len() != keys.len() * rb {
            return Err(FormatError::invalid(format!(
                "segment: {} keys and {} row bytes do not match {} rows of {rb} bytes",
                keys.len(),
                rows.len(),
                header.rows
            )));
        }
        Ok(SegmentEncoder {
            header: header.clone(),
            keys,
            rows,
            next_row: 0,
            chunk_bytes: chunk_bytes.max(1),
            started: false,
            finished: false,
            crc: 0,
        })
    }

    /// The next chunk of the file, or `None` after the footer.
    pub fn next_chunk(&mut self) -> Option<Vec<u8>> {
        if self.finished {
            return None;
        }
        let rb = self.header.row_bytes as usize;
        let br = self.header.block_rows as usize;
        let cap = self.chunk_bytes.min(64 << 20) + BLOCK_TARGET_BYTES + HEADER_BYTES + FOOTER_BYTES;
        let mut out = Vec::with_capacity(cap.min(self.header.file_len() as usize));
        if !self.started {
            out.extend_from_slice(&self.header.encode());
            self.started = true;
        }
        while self.next_row < self.keys.len() && out.len() < self.chunk_bytes {
            let end = (self.next_row + br).min(self.keys.len());
            let start = out.len();
            for k in &self.keys[self.next_row..end] {
                out.extend_from_slice(&k.to_le_bytes());
            }
            out.extend_from_slice(&self.rows[self.next_row * rb..end * rb]);
            let crc = crc32c::crc32c(&out[start..]);
            out.extend_from_slice(&crc.to_le_bytes());
            out.resize(out.len().next_multiple_of(8), 0);
            self.next_row = end;
        }
        if self.next_row >= self.keys.len() {
            out.extend_from_slice(FOOTER_MAGIC);
            out.extend_from_slice(&self.header.rows.to_le_bytes());
            self.finished = true;
        }
        self.crc = crc32c::crc32c_append(self.crc, &out);
        Some(out)
    }

    /// CRC-32C of all chunks returned so far (of the whole file once `next_chunk` returned None).
    pub fn crc(&self) -> u32 {
        self.crc
    }
}

/// Encodes a whole segment into memory.
pub fn encode_segment_to_vec(header: &SegmentHeader, keys: &[u64], rows: &[u8]) -> Result<Vec<u8>> {
    let mut enc = SegmentEncoder::new(header, keys, rows, usize::MAX)?;
    let mut all = Vec::with_capacity(header.file_len() as usize);
    while let Some(chunk) = enc.next_chunk() {
        all.extend_from_slice(&chunk);
    }
    Ok(all)
}

/// Reads a segment from a byte stream of known total `len`, verifying the header, every block
/// checksum, the footer and (if given) the CRC-32C of the whole file.
///
/// The stream is read block by block into one reusable buffer; keys and rows are copied once
/// into their final vectors, so memory is the segment plus one block.
pub fn read_segment_from<R: Read>(
    mut r: R,
    len: u64,
    expect_crc: Option<u32>,
    what: &str,
) -> Result<Segment> {
    let io = |e: std::io::Error, at: &str| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            FormatError::corrupt(format!(
                "segment {what} ends inside the {at}; the file is truncated"
            ))
        } else {
            FormatError::new(
                crate::ErrorKind::Io,
                format!("segment {what}: reading the {at}: {e}"),
            )
        }
    };
    let mut h = [0u8; HEADER_BYTES];
    r.read_exact(&mut h).map_err(|e| io(e, "header"))?;
    let header = SegmentHeader::decode(&h, what)?;
    let expected = header.file_len();
    if len != expected {
        return Err(FormatError::corrupt(format!(
            "segment {what} is {len} bytes, but its header ({} rows of {} bytes) requires {expected}; \
             the file is truncated or damaged, delete this checkpoint and write a new one",
            header.rows, header.row_bytes
        )));
    }
    let mut file_crc = crc32c::crc32c(&h);
    let rb = header.row_bytes as usize;
    let n_rows = usize::try_from(header.rows)
        .map_err(|_| FormatError::corrupt(format!("segment {what}: row count too large")))?;
    let mut keys = Vec::with_capacity(n_rows);
    let mut rows = vec![0u8; n_rows * rb];
    let br = header.block_rows as usize;
    // Keys go through a small buffer (they need decoding); rows are read straight into their
    // final place, so each row byte is copied once and checksummed once.
    let mut key_buf = vec![0u8; br.min(n_rows.max(1)) * 8];
    let mut done = 0usize;
    let mut block = 0u64;
    while done < n_rows {
        let n = br.min(n_rows - done);
        let kb = &mut key_buf[..n * 8];
        r.read_exact(kb)
            .map_err(|e| io(e, &format!("block {block}")))?;
        let dst = &mut rows[done * rb..(done + n) * rb];
        r.read_exact(dst)
            .map_err(|e| io(e, &format!("block {block}")))?;
        let mut tail = [0u8; 12];
        let tail_len = header.block_len(n as u64) as usize - n * (8 + rb);
        r.read_exact(&mut tail[..tail_len])
            .map_err(|e| io(e, &format!("block {block}")))?;
        let computed = crc32c::crc32c_append(crc32c::crc32c(kb), dst);
        let stored = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]);
        if stored != computed {
            return Err(FormatError::corrupt(format!(
                "segment {what}: block {block} (rows {done}..{}) checksum {stored:08x} != computed \
                 {computed:08x}; the file is damaged, delete this checkpoint and write a new one",
                done + n
            )));
        }
        // The whole-file CRC follows from the block's CRC without a second pass over it.
        let block_crc = crc32c::crc32c_append(computed, &tail[..tail_len]);
        file_crc = crc32c::crc32c_combine(file_crc, block_crc, n * (8 + rb) + tail_len);
        keys.extend(
            kb.chunks_exact(8)
                .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])),
        );
        done += n;
        block += 1;
    }
    let mut f = [0u8; FOOTER_BYTES];
    r.read_exact(&mut f).map_err(|e| io(e, "footer"))?;
    file_crc = crc32c::crc32c_append(file_crc, &f);
    if &f[..8] != FOOTER_MAGIC || f[8..16] != header.rows.to_le_bytes() {
        return Err(FormatError::corrupt(format!(
            "segment {what}: bad footer; the file was not completely written, write a new checkpoint"
        )));
    }
    if let Some(want) = expect_crc
        && want != file_crc
    {
        return Err(FormatError::corrupt(format!(
            "segment {what}: file checksum crc32c:{file_crc:08x} != crc32c:{want:08x} in the \
             manifest; the file was changed or damaged, delete this checkpoint and write a new one"
        )));
    }
    Ok(Segment {
        dtype: header.dtype,
        dim: header.dim,
        row_bytes: header.row_bytes,
        keys,
        rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize, rb: usize) -> (Vec<u64>, Vec<u8>) {
        let keys: Vec<u64> = (0..n as u64)
            .map(|k| k.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .collect();
        let rows: Vec<u8> = (0..n * rb).map(|i| (i * 7 % 251) as u8).collect();
        (keys, rows)
    }

    #[test]
    fn roundtrip_many_blocks_and_empty() {
        for (n, rb) in [(0usize, 4usize), (1, 4), (100_000, 12), (3, 1 << 21)] {
            let (keys, rows) = sample(n, rb);
            let h = SegmentHeader::new("f32", (rb / 4) as u32, rb as u32, n as u64).unwrap();
            let bytes = encode_segment_to_vec(&h, &keys, &rows).unwrap();
            assert_eq!(bytes.len() as u64, h.file_len());
            let crc = crc32c::crc32c(&bytes);
            let seg =
                read_segment_from(&bytes[..], bytes.len() as u64, Some(crc), "t.hps").unwrap();
            assert_eq!(seg.keys, keys);
            assert_eq!(seg.rows, rows);
            assert_eq!(seg.dtype, "f32");
        }
    }

    #[test]
    fn detects_every_kind_of_damage() {
        let (keys, rows) = sample(1000, 8);
        let h = SegmentHeader::new("int8", 4, 8, 1000).unwrap();
        let good = encode_segment_to_vec(&h, &keys, &rows).unwrap();
        let read = |b: &[u8]| read_segment_from(b, b.len() as u64, None, "t.hps").unwrap_err();

        let err = read(&good[..good.len() - 5]);
        assert_eq!(err.kind(), crate::ErrorKind::Corrupt);
        assert!(err.to_string().contains("truncated"), "{err}");

        let mut flipped = good.clone();
        flipped[HEADER_BYTES + 100] ^= 1;
        assert!(read(&flipped).to_string().contains("block 0"));

        let mut hdr = good.clone();
        hdr[20] ^= 1;
        assert!(read(&hdr).to_string().contains("header checksum"));

        let mut v2 = good.clone();
        v2[8] = 2;
        let err = read(&v2);
        assert_eq!(err.kind(), crate::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("format version 2"), "{err}");

        let err = read_segment_from(&good[..], good.len() as u64, Some(1), "t.hps").unwrap_err();
        assert!(err.to_string().contains("manifest"), "{err}");
    }
}
