//! A sealed segment's index: what replay needs from each of its records, without the message
//! payloads — so a start after a crash with a backlog of gigabytes reads megabytes.
//!
//! ```text
//!   segment 00…07.log ──(sealed: rolled, or replayed whole)──▶ 00…07.index
//!     Message record   ──▶ head: position, sequence, queue, owing subscriptions, publish time
//!     any other record ──▶ the record itself (settlements, spills, relocated copies: small or rare)
//!   trailer: how many entries, and the segment's size (an index of another size is not used)
//! ```
//!
//! An index is written whole (a temporary file, fsync, rename) and every entry carries a CRC-32C;
//! replay checks all of it before using any, and reads the segment itself when anything is off.
//! Messages replay finds held are read from the segment at their position once replay ends (only
//! those still held: bounded by what the owner held in memory).

use std::{
    fs::{self, File},
    io::{BufReader, BufWriter, ErrorKind, Read, Write},
    path::{Path, PathBuf},
};

use crate::record::{self, DecodeError, Reader, put_str};

const MAGIC: &[u8; 8] = b"QMIDX\0\0\x01";
const TAG_HEAD: u8 = 1;
const TAG_RECORD: u8 = 2;
const TAG_END: u8 = 0xff;
/// Largest entry accepted: a whole record plus its position.
const MAX_ENTRY: usize = record::MAX_RECORD + record::HEADER + 64;

pub(crate) fn index_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.index"))
}

/// A partial index of its own for each builder (two may index one segment at once: the background
/// thread of a log just closed, and the replay of the next open); the rename puts one in place.
fn partial_path(dir: &Path, id: u64) -> PathBuf {
    static BUILDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = BUILDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    dir.join(format!("{id:020}.index.tmp-{}-{n}", std::process::id()))
}

/// Whether a file of the log directory is an index (or a partial one) — not a segment.
pub(crate) fn is_index_file(name: &str) -> bool {
    name.ends_with(".index") || is_partial(name)
}

/// Whether a file of the log directory is a partial index (being written, or left by a crash).
pub(crate) fn is_partial(name: &str) -> bool {
    name.contains(".index.tmp")
}

/// Whether a partial index was left by another process (a crash): this process's own may still
/// be being written.
pub(crate) fn is_abandoned(name: &str) -> bool {
    name.split_once(".index.tmp-")
        .and_then(|(_, rest)| rest.split_once('-'))
        .and_then(|(pid, _)| pid.parse::<u32>().ok())
        .is_none_or(|pid| pid != std::process::id())
}

/// The segment id an index file belongs to.
pub(crate) fn indexed_segment(name: &str) -> Option<u64> {
    name.split_once(".index").and_then(|(n, _)| n.parse().ok())
}

/// Removes a segment's index (with the segment, or when the segment changed).
pub(crate) fn remove(dir: &Path, id: u64) {
    let path = index_path(dir, id);
    match fs::remove_file(&path) {
        Err(e) if e.kind() != ErrorKind::NotFound => {
            tracing::warn!(error = %e, index = %path.display(), "could not remove a segment index");
        }
        _ => {}
    }
}

/// One record of a segment as its index gives it.
pub(crate) enum Entry<'a> {
    /// A message record, without its message.
    Head {
        offset: u64,
        len: u32,
        seq: u64,
        queue: &'a str,
        published_ms: u64,
        pending: Vec<&'a str>,
    },
    /// Any other record, whole (framed, with its own checksum).
    Record { offset: u64, raw: &'a [u8] },
}

/// Writes an index while its segment is read record by record.
pub(crate) struct Builder {
    dir: PathBuf,
    id: u64,
    partial: PathBuf,
    out: BufWriter<File>,
    entries: u64,
    buf: Vec<u8>,
}

impl Builder {
    pub fn new(dir: &Path, id: u64) -> std::io::Result<Self> {
        let partial = partial_path(dir, id);
        let mut out = BufWriter::with_capacity(256 * 1024, File::create(&partial)?);
        out.write_all(MAGIC)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            id,
            partial,
            out,
            entries: 0,
            buf: Vec::new(),
        })
    }

    /// Adds the record `raw` (framed, already checked) found at `offset`.
    pub fn add(&mut self, offset: u64, raw: &[u8]) -> std::io::Result<()> {
        self.buf.clear();
        self.buf.extend_from_slice(&[0u8; record::HEADER]);
        self.buf.extend_from_slice(&offset.to_le_bytes());
        match record::peek_message(raw) {
            Ok(Some(head)) => {
                self.buf
                    .extend_from_slice(&(raw.len() as u32).to_le_bytes());
                self.buf.push(TAG_HEAD);
                self.buf.extend_from_slice(&head.seq.to_le_bytes());
                put_str(&mut self.buf, head.queue);
                self.buf
                    .extend_from_slice(&record::published_ms_of(head.message).to_le_bytes());
                self.buf
                    .extend_from_slice(&(head.pending.len() as u32).to_le_bytes());
                for p in &head.pending {
                    put_str(&mut self.buf, p);
                }
            }
            _ => {
                self.buf
                    .extend_from_slice(&(raw.len() as u32).to_le_bytes());
                self.buf.push(TAG_RECORD);
                self.buf.extend_from_slice(raw);
            }
        }
        self.entries += 1;
        self.seal_entry()
    }

    /// Ends the index of a segment of `size` bytes and puts it in place, durably.
    pub fn finish(mut self, size: u64) -> std::io::Result<()> {
        self.buf.clear();
        self.buf.extend_from_slice(&[0u8; record::HEADER]);
        self.buf.extend_from_slice(&size.to_le_bytes());
        self.buf.extend_from_slice(&0u32.to_le_bytes());
        self.buf.push(TAG_END);
        self.buf.extend_from_slice(&self.entries.to_le_bytes());
        self.seal_entry()?;
        let done = self
            .out
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|file| file.sync_data())
            .and_then(|()| fs::rename(&self.partial, index_path(&self.dir, self.id)));
        if done.is_err() {
            let _ = fs::remove_file(&self.partial);
        }
        done
    }

    fn seal_entry(&mut self) -> std::io::Result<()> {
        let data_len = (self.buf.len() - record::HEADER) as u32;
        let crc = crc32c::crc32c(&self.buf[record::HEADER..]);
        self.buf[..4].copy_from_slice(&data_len.to_le_bytes());
        self.buf[4..8].copy_from_slice(&crc.to_le_bytes());
        self.out.write_all(&self.buf)
    }
}

/// Indexes the sealed segment `id` of `dir` by reading it whole. A segment gone meanwhile (garbage
/// collected) leaves no index behind.
pub(crate) fn build(dir: &Path, id: u64) -> std::io::Result<()> {
    let path = crate::pages::segment_path(dir, id);
    let mut reader = match crate::replay::SegmentReader::open(&path) {
        Ok(r) => r,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut builder = Builder::new(dir, id)?;
    loop {
        let offset = reader.pos;
        match reader.next()? {
            Ok(Some(raw)) => builder.add(offset, raw)?,
            Ok(None) => break,
            Err(error) => {
                // Replay truncates a segment there; a sealed one is left to it, unindexed.
                tracing::warn!(segment = %path.display(), offset, ?error, "not indexing a segment with a bad record");
                let _ = fs::remove_file(&builder.partial);
                return Ok(());
            }
        }
    }
    builder.finish(reader.size)?;
    if !path.exists() {
        remove(dir, id);
    }
    Ok(())
}

/// Reads the index of segment `id`, entry by entry.
struct IndexFile {
    file: BufReader<File>,
    buf: Vec<u8>,
}

impl IndexFile {
    fn open(dir: &Path, id: u64) -> std::io::Result<Option<Self>> {
        let file = match File::open(index_path(dir, id)) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut file = BufReader::with_capacity(256 * 1024, file);
        let mut magic = [0u8; 8];
        if file.read_exact(&mut magic).is_err() || &magic != MAGIC {
            return Ok(None);
        }
        Ok(Some(Self {
            file,
            buf: Vec::new(),
        }))
    }

    /// The next entry's checked bytes (after its frame), `None` at the end of the file.
    fn next(&mut self) -> std::io::Result<Option<Result<&[u8], DecodeError>>> {
        let mut header = [0u8; record::HEADER];
        match self.file.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if !(13..=MAX_ENTRY).contains(&len) {
            return Ok(Some(Err(DecodeError::Corrupt(
                "index entry length out of range",
            ))));
        }
        self.buf.resize(len, 0);
        if let Err(e) = self.file.read_exact(&mut self.buf) {
            return if e.kind() == ErrorKind::UnexpectedEof {
                Ok(Some(Err(DecodeError::Torn)))
            } else {
                Err(e)
            };
        }
        if crc32c::crc32c(&self.buf) != crc {
            return Ok(Some(Err(DecodeError::Corrupt(
                "index entry checksum mismatch",
            ))));
        }
        Ok(Some(Ok(&self.buf)))
    }
}

/// Whether segment `id` (of `size` bytes) has a whole, intact index of that size: every entry's
/// checksum, and the trailer's count and size.
pub(crate) fn usable(dir: &Path, id: u64, size: u64) -> std::io::Result<bool> {
    let Some(mut reader) = IndexFile::open(dir, id)? else {
        return Ok(false);
    };
    let mut entries = 0u64;
    while let Some(entry) = reader.next()? {
        let Ok(data) = entry else {
            return Ok(false);
        };
        if data[12] == TAG_END {
            let mut r = Reader::new(data);
            let (indexed, _, _, count) = (r.u64(), r.u32(), r.u8(), r.u64());
            return Ok(indexed == Ok(size)
                && count == Ok(entries)
                && r.pos == data.len()
                && reader.next()?.is_none());
        }
        entries += 1;
    }
    Ok(false)
}

/// Calls `each` with every entry of segment `id`'s index, in log order. Only for an index
/// [`usable`] found whole: an entry that does not decode is an error.
pub(crate) fn for_each(
    dir: &Path,
    id: u64,
    mut each: impl FnMut(Entry<'_>) -> Result<(), DecodeError>,
) -> std::io::Result<Result<(), DecodeError>> {
    let Some(mut reader) = IndexFile::open(dir, id)? else {
        return Ok(Err(DecodeError::Corrupt("index gone")));
    };
    while let Some(entry) = reader.next()? {
        let data = match entry {
            Ok(data) => data,
            Err(e) => return Ok(Err(e)),
        };
        let mut r = Reader::new(data);
        let decoded = (|| {
            let offset = r.u64()?;
            let len = r.u32()?;
            let entry = match r.u8()? {
                TAG_END => return Ok(None),
                TAG_HEAD => {
                    let seq = r.u64()?;
                    let queue = r.str()?;
                    let published_ms = r.u64()?;
                    let n = r.u32()? as usize;
                    let mut pending = Vec::with_capacity(n.min(1024));
                    for _ in 0..n {
                        pending.push(r.str()?);
                    }
                    Entry::Head {
                        offset,
                        len,
                        seq,
                        queue,
                        published_ms,
                        pending,
                    }
                }
                TAG_RECORD => Entry::Record {
                    offset,
                    raw: r.take(len as usize)?,
                },
                _ => return Err(DecodeError::Corrupt("unknown index entry")),
            };
            if r.pos != data.len() {
                return Err(DecodeError::Corrupt("trailing bytes in index entry"));
            }
            Ok(Some(entry))
        })();
        match decoded {
            Ok(Some(entry)) => {
                if let Err(e) = each(entry) {
                    return Ok(Err(e));
                }
            }
            Ok(None) => return Ok(Ok(())),
            Err(e) => return Ok(Err(e)),
        }
    }
    Ok(Err(DecodeError::Torn))
}
