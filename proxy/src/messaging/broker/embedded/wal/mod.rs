//! The write-ahead log: what makes a write durable, before redb holds it.
//!
//! Each group commit of the writer thread is one record ([`frame`]), appended to the current
//! segment and flushed with one `fdatasync`; its callers are answered after that. The segments
//! are files `data_dir/wal/<first lsn>.wal`, written ahead with zeros a step at a time
//! ([`PREPARE_STEP`]), so that a flush writes the record's blocks and nothing about the file's
//! size or allocation. A segment is closed past [`SEGMENT_BYTES`] and a new one begun.
//!
//! Once redb holds every record up to some number durably (a checkpoint), the segments holding
//! only such records are no longer needed: one is kept as a spare, renamed to begin the next
//! segment (its blocks already allocated), the others deleted. So the log takes about two
//! segments of disk whatever went through it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub(crate) mod frame;

/// A segment is closed once it holds this much, and the next record begins a new one.
pub(crate) const SEGMENT_BYTES: u64 = 16 << 20;
/// Zeros written ahead of the records at a time.
pub(crate) const PREPARE_STEP: u64 = 1 << 20;
const SUFFIX: &str = ".wal";
const SPARE: &str = "spare.wal.tmp";

/// The log, open for appending after its last whole record.
#[derive(Debug)]
pub(crate) struct Log {
    dir: PathBuf,
    /// The segments by first record, oldest first; the last one is written.
    segments: Vec<Segment>,
    /// The last segment's file, once a record has needed it.
    file: Option<File>,
    /// Where the next record goes in the last segment.
    tail: u64,
    /// How far the last segment's file reaches (records, then zeros written ahead).
    prepared: u64,
    next_lsn: u64,
    /// The last record appended, (offset, length), until the next: what [`Log::undo`] erases.
    last: Option<(u64, usize)>,
    /// A segment no longer needed, kept to begin the next one.
    spare: Option<PathBuf>,
    buf: Vec<u8>,
}

#[derive(Debug)]
struct Segment {
    first: u64,
    path: PathBuf,
}

/// Why the log cannot be read back whole.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("cannot read the log in {}", dir.display())]
    Io {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Records after the checkpoint are missing: replaying around them would build a store
    /// that never was.
    #[error(
        "the log in {} is damaged: record {missing} is missing, and {} records after it are \
         there; move the directory aside to start from the last checkpoint (what was published \
         or settled since is then lost) or restore it from a backup",
        dir.display(), found
    )]
    Gap { dir: PathBuf, missing: u64, found: usize },
}

impl Log {
    /// Opens the log in `dir` (creating it), finding the end of its last whole record: a record
    /// torn by a crash is left behind (never answered, so never promised) and written over.
    pub(crate) fn open(dir: &Path) -> Result<Log, LogError> {
        let io = |source| LogError::Io { dir: dir.to_owned(), source };
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(io)?;
            // the directory's own name, durable before any record is promised in it
            if let Some(parent) = dir.parent() {
                File::open(parent).and_then(|d| d.sync_all()).map_err(io)?;
            }
        }
        let mut segments = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            match name.strip_suffix(SUFFIX).and_then(|n| n.parse::<u64>().ok()) {
                Some(first) => segments.push(Segment { first, path }),
                // a spare left by a crash: it holds nothing needed
                None if name == SPARE => std::fs::remove_file(&path).map_err(io)?,
                None => {}
            }
        }
        segments.sort_by_key(|s| s.first);
        let mut log = Log {
            dir: dir.to_owned(),
            segments,
            file: None,
            tail: 0,
            prepared: 0,
            next_lsn: 1,
            last: None,
            spare: None,
            buf: Vec::new(),
        };
        if let Some(segment) = log.segments.last() {
            let file = OpenOptions::new().read(true).write(true).open(&segment.path).map_err(io)?;
            let bytes = std::fs::read(&segment.path).map_err(io)?;
            let mut frames = frame::frames(&bytes, segment.first);
            frames.by_ref().for_each(drop);
            log.tail = frames.end() as u64;
            log.next_lsn = frames.next_lsn();
            log.prepared = bytes.len() as u64;
            // what follows the last whole record (a torn one) is zeroed, so that no part of it
            // can ever be read as a record after a shorter one is written over its start
            if bytes[frames.end()..].iter().any(|&b| b != 0) {
                file.write_all_at(&vec![0; bytes.len() - frames.end()], log.tail).map_err(io)?;
                file.sync_data().map_err(io)?;
            }
            log.file = Some(file);
        }
        Ok(log)
    }

    /// The number the next record gets.
    pub(crate) fn next_lsn(&self) -> u64 {
        self.next_lsn
    }

    /// Makes the next record `lsn` (after a checkpoint beyond the log's end: its records were
    /// all applied and the log removed, or a store from before the log).
    pub(crate) fn continue_at(&mut self, lsn: u64) {
        if lsn != self.next_lsn {
            self.file = None;
            self.next_lsn = lsn;
        }
    }

    /// Calls `apply` with every record after `checkpoint`, in order.
    pub(crate) fn replay<E: From<LogError>>(
        &self,
        checkpoint: u64,
        mut apply: impl FnMut(u64, &[u8]) -> Result<(), E>,
    ) -> Result<u64, E> {
        let io = |source| LogError::Io { dir: self.dir.clone(), source };
        let mut expected = checkpoint + 1;
        let mut skipped = 0;
        for (n, segment) in self.segments.iter().enumerate() {
            // a segment whose successor starts at or before the checkpoint holds nothing after it
            if self.segments.get(n + 1).is_some_and(|next| next.first <= expected) {
                continue;
            }
            let bytes = std::fs::read(&segment.path).map_err(io)?;
            for record in frame::frames(&bytes, segment.first) {
                if record.lsn < expected {
                    continue;
                }
                if record.lsn > expected {
                    skipped += 1;
                    continue;
                }
                apply(record.lsn, record.payload)?;
                expected += 1;
            }
        }
        if skipped > 0 {
            let gap = LogError::Gap { dir: self.dir.clone(), missing: expected, found: skipped };
            return Err(gap.into());
        }
        Ok(expected - 1)
    }

    /// Appends `payload` as the next record and flushes it to the disk; its number once it is
    /// there. On an error nothing is appended: what may have been written is erased (best
    /// effort), and the next record is written at the same place with the same number.
    pub(crate) fn append(&mut self, payload: &[u8]) -> io::Result<u64> {
        if self.file.is_none() || self.tail >= SEGMENT_BYTES {
            self.begin_segment()?;
        }
        let lsn = self.next_lsn;
        self.buf.clear();
        frame::encode(&mut self.buf, lsn, payload);
        let end = self.tail + self.buf.len() as u64;
        if end > self.prepared {
            self.prepare(end);
        }
        let file = self.file.as_ref().expect("a segment was begun");
        let written = file.write_all_at(&self.buf, self.tail).and_then(|()| file.sync_data());
        if let Err(error) = written {
            // a failed flush may leave the record readable in the page cache: its callers are
            // told it failed, so it must not be found by a replay before it is written over
            let zeros = vec![0; self.buf.len()];
            let _ = file.write_all_at(&zeros, self.tail).and_then(|()| file.sync_data());
            return Err(error);
        }
        self.prepared = self.prepared.max(end);
        self.last = Some((self.tail, self.buf.len()));
        self.tail = end;
        self.next_lsn += 1;
        Ok(lsn)
    }

    /// Erases the last record appended (zeros over it, flushed), when what it holds could not
    /// be applied: as if it had never been written. An error leaves it in place, to be replayed.
    pub(crate) fn undo(&mut self) -> io::Result<()> {
        let (Some((at, length)), Some(file)) = (self.last, self.file.as_ref()) else {
            return Ok(());
        };
        file.write_all_at(&vec![0; length], at)?;
        file.sync_data()?;
        self.last = None;
        self.tail = at;
        self.next_lsn -= 1;
        Ok(())
    }

    /// Lets go of the segments holding no record after `checkpoint`: one is kept to begin the
    /// next segment, the rest deleted.
    pub(crate) fn forget_through(&mut self, checkpoint: u64) -> io::Result<()> {
        // the first segment is done when the next one starts at most one after the checkpoint;
        // the last one (written) never is
        while self.segments.len() > 1 && self.segments[1].first <= checkpoint + 1 {
            let path = &self.segments[0].path;
            if self.spare.is_none() {
                let spare = self.dir.join(SPARE);
                std::fs::rename(path, &spare)?;
                self.spare = Some(spare);
            } else {
                std::fs::remove_file(path)?;
            }
            self.segments.remove(0);
        }
        Ok(())
    }

    /// The segments' files, oldest first.
    #[cfg(test)]
    pub(crate) fn files(&self) -> Vec<PathBuf> {
        self.segments.iter().map(|s| s.path.clone()).collect()
    }

    /// Begins a segment at the next record: the spare renamed, or a new file; its name made
    /// durable before any record is written in it.
    ///
    /// Safe to call again after an error at any step: the file may already be there (its
    /// old records, if any, are numbered lower and read as the end), and is listed once.
    fn begin_segment(&mut self) -> io::Result<()> {
        let path = self.dir.join(format!("{:020}{SUFFIX}", self.next_lsn));
        if let Some(spare) = self.spare.take()
            && let Err(error) = std::fs::rename(&spare, &path)
        {
            self.spare = Some(spare);
            return Err(error);
        }
        let file =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path)?;
        if self.segments.last().map(|s| s.first) != Some(self.next_lsn) {
            self.segments.push(Segment { first: self.next_lsn, path });
        }
        File::open(&self.dir)?.sync_all()?;
        self.prepared = file.metadata()?.len();
        self.tail = 0;
        self.last = None;
        self.file = Some(file);
        Ok(())
    }

    /// Writes zeros ahead of the records, up to at least `end`, and flushes them, so that the
    /// flushes of the records do not change the file's size. Best effort: on a disk too full
    /// for a step ahead, the record is written all the same (and its flush writes the size).
    fn prepare(&mut self, end: u64) {
        let file = self.file.as_ref().expect("a segment was begun");
        let target = end.div_ceil(PREPARE_STEP) * PREPARE_STEP;
        let zeros = vec![0; (target - self.prepared) as usize];
        if file.write_all_at(&zeros, self.prepared).and_then(|()| file.sync_data()).is_ok() {
            self.prepared = target;
        } else if let Ok(meta) = file.metadata() {
            // part of the step may have been written: it is zeros, and the file reaches there
            self.prepared = meta.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replayed(log: &Log, checkpoint: u64) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        log.replay(checkpoint, |lsn, payload| {
            out.push((lsn, payload.to_vec()));
            Ok::<_, LogError>(())
        })
        .expect("the log replays");
        out
    }

    use crate::messaging::scratch::Scratch;

    /// An empty log in a directory of its own (removed with the `Scratch`).
    fn fresh() -> (Scratch, Log) {
        let scratch = Scratch::new("wal");
        let log = Log::open(&scratch.0).unwrap();
        (scratch, log)
    }

    #[test]
    fn records_appended_are_replayed_after_a_reopen_from_the_checkpoint_on() {
        let (scratch, mut log) = fresh();
        let dir = scratch.0.clone();
        for n in 1..=5u8 {
            assert_eq!(log.append(&[n; 10]).unwrap(), u64::from(n));
        }
        drop(log);
        let log = Log::open(&dir).unwrap();
        assert_eq!(log.next_lsn(), 6);
        let after_two: Vec<u64> = replayed(&log, 2).into_iter().map(|(lsn, _)| lsn).collect();
        assert_eq!(after_two, vec![3, 4, 5]);
        assert_eq!(replayed(&log, 5), vec![]);
    }

    #[test]
    fn a_torn_tail_is_dropped_and_written_over() {
        let (scratch, mut log) = fresh();
        let dir = scratch.0.clone();
        log.append(b"kept").unwrap();
        log.append(b"torn by a crash").unwrap();
        let file = log.files()[0].clone();
        drop(log);
        // the crash: the second record's last bytes never reached the disk
        let bytes = std::fs::read(&file).unwrap();
        let cut = frame::HEADER + 4 + frame::HEADER + 5;
        std::fs::write(&file, &bytes[..cut]).unwrap();

        let mut log = Log::open(&dir).unwrap();
        assert_eq!(replayed(&log, 0), vec![(1, b"kept".to_vec())]);
        assert_eq!(log.append(b"x").unwrap(), 2);
        drop(log);
        let log = Log::open(&dir).unwrap();
        assert_eq!(replayed(&log, 0), vec![(1, b"kept".to_vec()), (2, b"x".to_vec())]);
    }

    #[test]
    fn an_undone_record_is_never_replayed() {
        let (scratch, mut log) = fresh();
        let dir = scratch.0.clone();
        log.append(b"one").unwrap();
        log.append(b"not applied").unwrap();
        log.undo().unwrap();
        assert_eq!(log.append(b"two").unwrap(), 2);
        drop(log);
        let log = Log::open(&dir).unwrap();
        assert_eq!(replayed(&log, 0), vec![(1, b"one".to_vec()), (2, b"two".to_vec())]);
    }

    #[test]
    fn segments_rotate_and_those_behind_the_checkpoint_are_let_go_of() {
        let (scratch, mut log) = fresh();
        let dir = scratch.0.clone();
        let big = vec![7u8; (SEGMENT_BYTES / 2) as usize];
        for _ in 0..5 {
            log.append(&big).unwrap();
        }
        // 16 MiB segments of two 8 MiB records each (and a header): 1-2, 3-4, 5
        assert_eq!(log.files().len(), 3);
        log.forget_through(4).unwrap();
        assert_eq!(log.files().len(), 1);
        // the spare begins the next segment; the one before it was deleted
        let on_disk = || std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(on_disk(), 2);
        log.append(&big).unwrap();
        log.append(&big).unwrap();
        assert_eq!(on_disk(), 2, "the spare was reused");
        drop(log);
        let log = Log::open(&dir).unwrap();
        let lsns: Vec<u64> = replayed(&log, 4).into_iter().map(|(lsn, _)| lsn).collect();
        assert_eq!(lsns, vec![5, 6, 7]);
    }

    #[test]
    fn a_missing_record_after_the_checkpoint_refuses_the_replay() {
        let (scratch, mut log) = fresh();
        let dir = scratch.0.clone();
        let big = vec![7u8; (SEGMENT_BYTES / 2) as usize];
        for _ in 0..5 {
            log.append(&big).unwrap();
        }
        std::fs::remove_file(&log.files()[1]).unwrap();
        drop(log);
        let log = Log::open(&dir).unwrap();
        let err = log.replay(0, |_, _| Ok::<_, LogError>(())).unwrap_err();
        assert!(matches!(err, LogError::Gap { missing: 3, found: 1, .. }), "{err}");
    }

    #[test]
    fn a_checkpoint_past_the_end_continues_the_numbers_in_a_new_segment() {
        let (scratch, mut log) = fresh();
        let dir = scratch.0.clone();
        log.append(b"one").unwrap();
        log.continue_at(10);
        assert_eq!(log.append(b"ten").unwrap(), 10);
        drop(log);
        let log = Log::open(&dir).unwrap();
        assert_eq!(replayed(&log, 9), vec![(10, b"ten".to_vec())]);
    }

    #[test]
    fn a_segment_begun_again_after_an_error_is_listed_once() {
        let (scratch, mut log) = fresh();
        let dir = scratch.0.clone();
        log.append(b"one").unwrap();
        log.continue_at(5);
        // the first try made the file, then failed before taking it
        log.begin_segment().unwrap();
        log.file = None;
        assert_eq!(log.append(b"five").unwrap(), 5);
        assert_eq!(log.files().len(), 2);
        drop(log);
        let log = Log::open(&dir).unwrap();
        assert_eq!(replayed(&log, 4), vec![(5, b"five".to_vec())]);
    }
}
