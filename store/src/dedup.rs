//! The dedup journal: ids of stored messages, remembered until their queue's dedup window ends, so
//! a producer's retry after a restart is still recognised — even once the message itself was acked
//! and its log segment deleted.
//!
//! ```text
//!   publish stored ──remember──▶ side buffer ──writer thread──▶ data-dir/log/<n>.ids
//!                                  (written, and synced, before any later settlement of the log)
//!   restart ──▶ replay every journal segment, keep what has not expired ──▶ Remembered
//!   segments rolled every minute (or 4 MiB) and deleted once their newest id has expired
//! ```
//!
//! Records are framed like the log's ([`super::record`]); a torn tail is cut off at replay.

use std::{
    collections::VecDeque,
    fs::{self, File, OpenOptions},
    io::{Read, Write},
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use super::record::{self, Body};
use crate::Remembered;

/// A journal segment is rolled after this long …
const ROLL_AFTER: Duration = Duration::from_secs(60);
/// … or this many bytes.
const ROLL_BYTES: u64 = 4 * 1024 * 1024;

/// Milliseconds since the Unix epoch.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

struct JournalSegment {
    id: u64,
    /// The latest `until` of any id in it: deletable after that.
    newest_until_ms: u64,
}

/// The journal's writer side (owned by the log's writer thread).
pub struct DedupJournal {
    dir: PathBuf,
    segments: VecDeque<JournalSegment>,
    active: File,
    active_size: u64,
    active_since: Instant,
    dirty: bool,
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.ids"))
}

impl DedupJournal {
    /// Opens the journal in `dir` (the log's directory: its files are `<n>.ids`), returning the ids
    /// not yet expired.
    pub fn open(dir: PathBuf) -> std::io::Result<(Self, Vec<Remembered>)> {
        fs::create_dir_all(&dir)?;
        let mut ids: Vec<u64> = fs::read_dir(&dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_suffix(".ids")?
                    .parse::<u64>()
                    .ok()
            })
            .collect();
        ids.sort_unstable();
        let now_ms = unix_ms(SystemTime::now());
        let mut remembered = Vec::new();
        let mut segments = VecDeque::new();
        for id in ids {
            let path = segment_path(&dir, id);
            let mut bytes = Vec::new();
            File::open(&path)?.read_to_end(&mut bytes)?;
            let mut pos = 0;
            let mut newest_until_ms = 0;
            while pos < bytes.len() {
                match record::decode(&bytes[pos..]) {
                    Ok((
                        _,
                        Body::Remember {
                            queue,
                            id,
                            target,
                            until_ms,
                        },
                        used,
                    )) => {
                        newest_until_ms = newest_until_ms.max(until_ms);
                        if until_ms > now_ms {
                            remembered.push(Remembered {
                                queue,
                                id,
                                sequence: target,
                                until: SystemTime::UNIX_EPOCH + Duration::from_millis(until_ms),
                            });
                        }
                        pos += used;
                    }
                    Ok((_, _, used)) => pos += used,
                    Err(error) => {
                        tracing::warn!(segment = %path.display(), offset = pos, ?error, "dedup journal replay stopped at a torn or corrupt record; truncating there");
                        let f = OpenOptions::new().write(true).open(&path)?;
                        f.set_len(pos as u64)?;
                        break;
                    }
                }
            }
            segments.push_back(JournalSegment {
                id,
                newest_until_ms,
            });
        }
        let next = segments.back().map_or(1, |s| s.id + 1);
        let active = OpenOptions::new()
            .create(true)
            .append(true)
            .open(segment_path(&dir, next))?;
        segments.push_back(JournalSegment {
            id: next,
            newest_until_ms: 0,
        });
        let mut journal = Self {
            dir,
            segments,
            active,
            active_size: 0,
            active_since: Instant::now(),
            dirty: false,
        };
        journal.collect(now_ms);
        Ok((journal, remembered))
    }

    /// Appends `Remember` records (written, not yet synced).
    pub fn write(&mut self, records: &[Body], buf: &mut Vec<u8>) -> std::io::Result<()> {
        buf.clear();
        let mut newest = 0;
        for body in records {
            if let Body::Remember { until_ms, .. } = body {
                newest = newest.max(*until_ms);
                record::encode(0, body, buf);
            }
        }
        if buf.is_empty() {
            return Ok(());
        }
        self.active.write_all(buf)?;
        self.active_size += buf.len() as u64;
        self.dirty = true;
        if let Some(s) = self.segments.back_mut() {
            s.newest_until_ms = s.newest_until_ms.max(newest);
        }
        Ok(())
    }

    /// Makes what was written durable (before the log syncs anything written after it).
    pub fn sync(&mut self) -> std::io::Result<()> {
        if self.dirty {
            self.active.sync_data()?;
            self.dirty = false;
        }
        Ok(())
    }

    /// Rolls the active segment when it is old or big, and deletes segments whose ids all expired.
    pub fn collect(&mut self, now_ms: u64) {
        if (self.active_since.elapsed() >= ROLL_AFTER || self.active_size >= ROLL_BYTES)
            && self.active_size > 0
            && self.sync().is_ok()
        {
            let id = self.segments.back().map_or(1, |s| s.id + 1);
            if let Ok(file) = OpenOptions::new()
                .create(true)
                .append(true)
                .open(segment_path(&self.dir, id))
            {
                self.active = file;
                self.active_size = 0;
                self.active_since = Instant::now();
                self.segments.push_back(JournalSegment {
                    id,
                    newest_until_ms: 0,
                });
            }
        }
        while self.segments.len() > 1
            && self
                .segments
                .front()
                .is_some_and(|s| s.newest_until_ms <= now_ms)
        {
            let Some(s) = self.segments.pop_front() else {
                break;
            };
            if let Err(error) = fs::remove_file(segment_path(&self.dir, s.id)) {
                tracing::warn!(%error, "could not delete an expired dedup journal segment");
                self.segments.push_front(s);
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remember(id: &str, until: SystemTime) -> Body {
        Body::Remember {
            queue: "orders".into(),
            id: id.into(),
            target: 1,
            until_ms: unix_ms(until),
        }
    }

    #[test]
    fn ids_survive_a_reopen_until_they_expire() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dedup");
        let (mut journal, before) = DedupJournal::open(path.clone()).unwrap();
        assert!(before.is_empty());
        let later = SystemTime::now() + Duration::from_secs(300);
        let past = SystemTime::now() - Duration::from_secs(1);
        let mut buf = Vec::new();
        journal
            .write(&[remember("a", later), remember("b", past)], &mut buf)
            .unwrap();
        journal.sync().unwrap();
        drop(journal);
        let (_, after) = DedupJournal::open(path).unwrap();
        let ids: Vec<&str> = after.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["a"]);
        assert_eq!(after[0].queue, "orders");
    }

    #[test]
    fn a_torn_tail_is_cut_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dedup");
        let (mut journal, _) = DedupJournal::open(path.clone()).unwrap();
        let later = SystemTime::now() + Duration::from_secs(300);
        let mut buf = Vec::new();
        journal.write(&[remember("kept", later)], &mut buf).unwrap();
        journal.active.write_all(&[7, 0, 0]).unwrap();
        drop(journal);
        let (_, after) = DedupJournal::open(path).unwrap();
        assert_eq!(after.len(), 1);
        assert_eq!(after[0].id, "kept");
    }
}
