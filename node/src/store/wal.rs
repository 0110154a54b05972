//! The write-ahead log: every write is appended here and `fdatasync`ed before it is acknowledged; the
//! redb index is brought up to date from it later, in large batches (see `writer.rs`).
//!
//! Files are `<dir>/<first lsn, 20 digits>.wal`. A record is
//! `len: u32 LE | crc32(lsn ‖ body): u32 LE | lsn: u64 LE | body`, `len` counting the body; every op gets
//! the next lsn. A crash can leave a torn record at the end of the last segment — never one that was
//! acknowledged, since acks wait for `fdatasync` — and [`Wal::open`] cuts it off. A bad record anywhere
//! else is corruption and stops start-up with [`Error::Corrupt`].
//!
//! Segments are zero-filled to [`SEGMENT_BYTES`] ahead of use by a background thread, and appends overwrite
//! the zeros. So an append changes no file metadata and its `fdatasync` flushes only the log's own pages:
//! on ext4 (data=ordered) an append that grows the file forces a journal commit, which first writes out
//! every other dirty file's data — here the redb index's large batches — and the ack would wait for that.
//! A zero header ends a segment's records. From start-up until the first spare is ready (a fraction of a
//! second after the first append) the log runs on an ordinary growing segment.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use super::Op;
use crate::error::{Error, Result};

/// Size of a preallocated segment; a new one is started when the next append would not fit.
pub const SEGMENT_BYTES: u64 = 16 << 20;
const HEADER: usize = 16;
/// Larger than any op the node writes (frames are capped far below this); a bigger `len` is corruption.
const MAX_BODY: usize = 16 << 20;
/// A zero-filled segment, ready to be renamed into place.
const SPARE: &str = "spare.wal.tmp";
const SPARE_PARTIAL: &str = "spare.wal.partial";

/// The open log, appended to by the store writer thread only.
pub struct Wal {
    dir: PathBuf,
    file: File,
    /// Bytes of records in the open segment.
    segment_bytes: u64,
    /// The open segment was zero-filled ahead (else it grows with each append).
    preallocated: bool,
    next_lsn: u64,
    buf: Vec<u8>,
    /// The thread preparing the next spare segment, if one runs.
    preparing: Option<JoinHandle<std::io::Result<()>>>,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal").field("dir", &self.dir).field("next_lsn", &self.next_lsn).finish()
    }
}

impl Wal {
    /// Open the log in `dir`: read back every op with an lsn above `applied` (in lsn order), cut off a torn
    /// tail, and start a fresh segment for new appends.
    pub fn open(dir: &Path, applied: u64) -> Result<(Wal, Vec<(u64, Op)>)> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("create WAL dir {}", dir.display()), e))?;
        let _ = std::fs::remove_file(dir.join(SPARE_PARTIAL));
        let segments = segments(dir)?;
        let mut replay = Vec::new();
        let mut expected: Option<u64> = None;
        for (i, (first, path)) in segments.iter().enumerate() {
            let last_segment = i + 1 == segments.len();
            if let Some(want) = expected {
                if *first != want {
                    return Err(corrupt(format!("{} starts at lsn {first}, expected {want}", path.display())));
                }
            }
            let bytes = std::fs::read(path).map_err(|e| Error::io(format!("read {}", path.display()), e))?;
            let mut next = *first;
            let mut at = 0;
            while at < bytes.len() {
                match parse_record(&bytes[at..], next) {
                    Some((op, used)) => {
                        if next > applied {
                            replay.push((next, op));
                        }
                        next += 1;
                        at += used;
                    }
                    // The zero-filled rest of a preallocated segment: a clean end.
                    None if bytes[at..].iter().all(|b| *b == 0) => break,
                    None if last_segment => {
                        tracing::warn!(
                            segment = %path.display(),
                            offset = at,
                            dropped_bytes = bytes.len() - at,
                            "cutting off a torn write at the end of the log (never acknowledged)"
                        );
                        truncate(path, at as u64)?;
                        break;
                    }
                    None => {
                        return Err(corrupt(format!("bad record at byte {at} of {}", path.display())));
                    }
                }
            }
            expected = Some(next);
        }
        let next_lsn = expected.unwrap_or(applied + 1).max(applied + 1);
        let file = create_segment(dir, next_lsn)?;
        let wal = Wal {
            dir: dir.to_owned(),
            file,
            segment_bytes: 0,
            preallocated: false,
            next_lsn,
            buf: Vec::new(),
            preparing: None,
        };
        Ok((wal, replay))
    }

    /// Append `ops` (one record each) and make them durable; returns the lsn of the first.
    pub fn append(&mut self, ops: &[Op]) -> Result<u64> {
        let first = self.next_lsn;
        if ops.is_empty() {
            return Ok(first);
        }
        self.buf.clear();
        for (i, op) in ops.iter().enumerate() {
            encode_record(&mut self.buf, first + i as u64, op);
        }
        let len = self.buf.len() as u64;
        if !self.preallocated && self.preparing.is_none() && !self.dir.join(SPARE).exists() {
            // First append since start (the CLI opens the store without ever appending): get a spare ready.
            self.prepare_spare();
        }
        let full = self.segment_bytes > 0 && self.segment_bytes + len > SEGMENT_BYTES;
        if full || (!self.preallocated && self.spare_ready()) {
            self.rotate(first)?;
        }
        self.file.write_all(&self.buf).map_err(|e| Error::io("append to the write-ahead log", e))?;
        self.file.sync_data().map_err(|e| Error::io("fdatasync the write-ahead log", e))?;
        self.segment_bytes += len;
        self.next_lsn += ops.len() as u64;
        if self.buf.capacity() > 4 << 20 {
            self.buf = Vec::new();
        }
        Ok(first)
    }

    /// Whether a zero-filled spare segment is ready (a failed preparation is logged and retried later).
    fn spare_ready(&mut self) -> bool {
        if self.preparing.as_ref().is_some_and(|h| !h.is_finished()) {
            return false;
        }
        if let Some(h) = self.preparing.take() {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "could not preallocate a WAL segment; appends grow files"),
                Err(_) => tracing::warn!("the WAL segment preallocation thread panicked"),
            }
        }
        self.dir.join(SPARE).exists()
    }

    /// Start the next segment at lsn `first`: the spare when one is ready, else a growing file.
    fn rotate(&mut self, first: u64) -> Result<()> {
        let path = self.dir.join(format!("{first:020}.wal"));
        if self.spare_ready() {
            std::fs::rename(self.dir.join(SPARE), &path)
                .map_err(|e| Error::io(format!("rename the spare WAL segment to {}", path.display()), e))?;
            sync_dir(&self.dir)?;
            self.file = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| Error::io(format!("open WAL segment {}", path.display()), e))?;
            self.preallocated = true;
        } else {
            self.file = create_segment(&self.dir, first)?;
            self.preallocated = false;
        }
        self.segment_bytes = 0;
        self.prepare_spare();
        Ok(())
    }

    /// Zero-fill the next segment on a background thread (unless that is already under way).
    fn prepare_spare(&mut self) {
        if self.preparing.is_some() {
            return;
        }
        let dir = self.dir.clone();
        let spawned = std::thread::Builder::new().name("kefu-wal-prealloc".into()).spawn(move || {
            let partial = dir.join(SPARE_PARTIAL);
            let mut f = File::create(&partial)?;
            let zeros = vec![0u8; 1 << 20];
            for _ in 0..SEGMENT_BYTES / zeros.len() as u64 {
                f.write_all(&zeros)?;
            }
            f.sync_all()?;
            std::fs::rename(&partial, dir.join(SPARE))
        });
        match spawned {
            Ok(h) => self.preparing = Some(h),
            Err(e) => tracing::warn!(error = %e, "could not start WAL segment preallocation"),
        }
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        // Let a preparation finish rather than leave a half-written spare behind (open removes one anyway).
        if let Some(h) = self.preparing.take() {
            let _ = h.join();
        }
    }
}

/// Delete every closed segment whose records all have lsn ≤ `applied` (the open segment always stays).
pub fn remove_through(dir: &Path, applied: u64) -> Result<usize> {
    let segments = segments(dir)?;
    let mut removed = 0;
    for pair in segments.windows(2) {
        let (next_first, _) = &pair[1];
        if *next_first <= applied + 1 {
            std::fs::remove_file(&pair[0].1)
                .map_err(|e| Error::io(format!("remove applied WAL segment {}", pair[0].1.display()), e))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Segments in `dir`, by first lsn.
fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(format!("list WAL dir {}", dir.display()), e))?;
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(format!("list WAL dir {}", dir.display()), e))?;
        let name = entry.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".wal")) else { continue };
        if let Ok(first) = stem.parse::<u64>() {
            out.push((first, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// A new, growing segment starting at lsn `first`. A file of that name can only exist without valid records
/// (the log's next lsn is `first`), e.g. a spare renamed into place just before a crash: start it empty.
fn create_segment(dir: &Path, first: u64) -> Result<File> {
    let path = dir.join(format!("{first:020}.wal"));
    let file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&path)
        .map_err(|e| Error::io(format!("create WAL segment {}", path.display()), e))?;
    sync_dir(dir)?;
    Ok(file)
}

/// Make a new or renamed name durable, or a crash could lose the file with its acknowledged records.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(format!("fsync WAL dir {}", dir.display()), e))
}

fn truncate(path: &Path, len: u64) -> Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Error::io(format!("open {} to cut a torn tail", path.display()), e))?;
    f.set_len(len).and_then(|_| f.sync_all()).map_err(|e| Error::io(format!("truncate {}", path.display()), e))
}

fn corrupt(reason: String) -> Error {
    Error::Corrupt { table: "write-ahead log", reason }
}

// --- record encoding ---

const T_ENTRY: u8 = 1;
const T_CONVERSATION: u8 = 2;
const T_AGENT: u8 = 3;
const T_CANNED: u8 = 4;
const T_DELETE_CANNED: u8 = 5;

fn encode_record(buf: &mut Vec<u8>, lsn: u64, op: &Op) {
    let start = buf.len();
    buf.extend_from_slice(&[0; HEADER]);
    match op {
        Op::Entry { conv, seq, json, idem } => {
            buf.push(T_ENTRY);
            put(buf, conv.as_bytes());
            buf.extend_from_slice(&seq.to_le_bytes());
            put(buf, json);
            match idem {
                Some(i) => {
                    buf.push(1);
                    put(buf, i.as_bytes());
                }
                None => buf.push(0),
            }
        }
        Op::Conversation { id, json } => keyed(buf, T_CONVERSATION, id, json),
        Op::Agent { id, json } => keyed(buf, T_AGENT, id, json),
        Op::Canned { id, json } => keyed(buf, T_CANNED, id, json),
        Op::DeleteCanned { id } => {
            buf.push(T_DELETE_CANNED);
            put(buf, id.as_bytes());
        }
    }
    let body_len = (buf.len() - start - HEADER) as u32;
    buf[start + 8..start + 16].copy_from_slice(&lsn.to_le_bytes());
    let crc = crc32fast::hash(&buf[start + 8..]);
    buf[start..start + 4].copy_from_slice(&body_len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn keyed(buf: &mut Vec<u8>, tag: u8, id: &str, json: &[u8]) {
    buf.push(tag);
    put(buf, id.as_bytes());
    put(buf, json);
}

fn put(buf: &mut Vec<u8>, bytes: &[u8]) {
    buf.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    buf.extend_from_slice(bytes);
}

/// One record from the start of `bytes` with the expected lsn: the op and the bytes it used, or `None`
/// when the record is short, fails its checksum, carries another lsn or does not decode.
fn parse_record(bytes: &[u8], lsn: u64) -> Option<(Op, usize)> {
    let header = bytes.get(..HEADER)?;
    let len = u32::from_le_bytes(header[0..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(header[4..8].try_into().ok()?);
    if len > MAX_BODY {
        return None;
    }
    let covered = bytes.get(8..HEADER + len)?;
    if crc32fast::hash(covered) != crc || u64::from_le_bytes(header[8..16].try_into().ok()?) != lsn {
        return None;
    }
    let mut r = Reader(&bytes[HEADER..HEADER + len]);
    let op = match r.u8()? {
        T_ENTRY => {
            let conv = r.string()?;
            let seq = r.u64()?;
            let json = r.bytes()?.to_vec();
            let idem = match r.u8()? {
                0 => None,
                _ => Some(r.string()?),
            };
            Op::Entry { conv, seq, json, idem }
        }
        T_CONVERSATION => Op::Conversation { id: r.string()?, json: r.bytes()?.to_vec() },
        T_AGENT => Op::Agent { id: r.string()?, json: r.bytes()?.to_vec() },
        T_CANNED => Op::Canned { id: r.string()?, json: r.bytes()?.to_vec() },
        T_DELETE_CANNED => Op::DeleteCanned { id: r.string()? },
        _ => return None,
    };
    r.0.is_empty().then_some((op, HEADER + len))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = u32::from_le_bytes(self.take(4)?.try_into().ok()?) as usize;
        self.take(n)
    }
    fn string(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?.to_vec()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(conv: &str, seq: u64) -> Op {
        Op::Entry {
            conv: conv.into(),
            seq,
            json: format!("{{\"seq\":{seq}}}").into_bytes(),
            idem: Some(format!("c{seq}")),
        }
    }

    fn seqs(replay: &[(u64, Op)]) -> Vec<(u64, u64)> {
        replay
            .iter()
            .map(|(lsn, op)| match op {
                Op::Entry { seq, .. } => (*lsn, *seq),
                _ => (*lsn, 0),
            })
            .collect()
    }

    #[test]
    fn every_op_kind_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let ops = vec![
            entry("a", 1),
            Op::Entry { conv: "a".into(), seq: 2, json: b"{}".to_vec(), idem: None },
            Op::Conversation { id: "a".into(), json: b"{\"c\":1}".to_vec() },
            Op::Agent { id: "ag".into(), json: b"{\"a\":1}".to_vec() },
            Op::Canned { id: "k".into(), json: "{\"t\":\"你好\"}".as_bytes().to_vec() },
            Op::DeleteCanned { id: "k".into() },
        ];
        {
            let (mut wal, replay) = Wal::open(dir.path(), 0).unwrap();
            assert!(replay.is_empty());
            assert_eq!(wal.append(&ops).unwrap(), 1);
        }
        let (_, replay) = Wal::open(dir.path(), 0).unwrap();
        assert_eq!(replay.iter().map(|(l, _)| *l).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(
            format!("{:?}", replay.iter().map(|(_, o)| o).collect::<Vec<_>>()),
            format!("{:?}", ops.iter().collect::<Vec<_>>())
        );
    }

    #[test]
    fn reopen_skips_applied_records_and_continues_the_lsn() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut wal, _) = Wal::open(dir.path(), 0).unwrap();
            wal.append(&[entry("a", 1), entry("a", 2)]).unwrap();
            wal.append(&[entry("a", 3)]).unwrap();
        }
        let (mut wal, replay) = Wal::open(dir.path(), 2).unwrap();
        assert_eq!(seqs(&replay), vec![(3, 3)]);
        assert_eq!(wal.append(&[entry("a", 4)]).unwrap(), 4);
        drop(wal);
        let (_, replay) = Wal::open(dir.path(), 0).unwrap();
        assert_eq!(seqs(&replay), vec![(1, 1), (2, 2), (3, 3), (4, 4)]);
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_the_log_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut wal, _) = Wal::open(dir.path(), 0).unwrap();
            wal.append(&[entry("a", 1), entry("a", 2)]).unwrap();
        }
        // A crash in the middle of the next append: half a record at the end of the last segment.
        let last = segments(dir.path()).unwrap().pop().unwrap().1;
        let mut half = Vec::new();
        encode_record(&mut half, 3, &entry("a", 3));
        half.truncate(half.len() / 2);
        let mut f = OpenOptions::new().append(true).open(&last).unwrap();
        f.write_all(&half).unwrap();
        drop(f);
        let (mut wal, replay) = Wal::open(dir.path(), 0).unwrap();
        assert_eq!(seqs(&replay), vec![(1, 1), (2, 2)]);
        assert_eq!(wal.append(&[entry("a", 3)]).unwrap(), 3);
        drop(wal);
        let (_, replay) = Wal::open(dir.path(), 0).unwrap();
        assert_eq!(seqs(&replay), vec![(1, 1), (2, 2), (3, 3)]);
    }

    #[test]
    fn a_flipped_bit_in_a_closed_segment_stops_start_up() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut wal, _) = Wal::open(dir.path(), 0).unwrap();
            wal.append(&[entry("a", 1), entry("a", 2)]).unwrap();
        }
        {
            let (mut wal, _) = Wal::open(dir.path(), 0).unwrap();
            wal.append(&[entry("a", 3)]).unwrap();
        }
        let first = segments(dir.path()).unwrap().remove(0).1;
        let mut bytes = std::fs::read(&first).unwrap();
        bytes[HEADER + 3] ^= 0x40;
        std::fs::write(&first, bytes).unwrap();
        let err = Wal::open(dir.path(), 0).unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    }

    #[test]
    fn applied_closed_segments_are_removed_and_the_open_one_kept() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..3u64 {
            let (mut wal, _) = Wal::open(dir.path(), 0).unwrap();
            wal.append(&[entry("a", 2 * i + 1), entry("a", 2 * i + 2)]).unwrap();
        }
        drop(Wal::open(dir.path(), 0).unwrap());
        // Segments start at lsn 1, 3, 5, and an empty one at 7 (opened last).
        assert_eq!(segments(dir.path()).unwrap().iter().map(|s| s.0).collect::<Vec<_>>(), vec![1, 3, 5, 7]);
        assert_eq!(remove_through(dir.path(), 3).unwrap(), 1);
        assert_eq!(segments(dir.path()).unwrap().iter().map(|s| s.0).collect::<Vec<_>>(), vec![3, 5, 7]);
        assert_eq!(remove_through(dir.path(), 100).unwrap(), 3 - 1);
        assert_eq!(segments(dir.path()).unwrap().iter().map(|s| s.0).collect::<Vec<_>>(), vec![7]);
        let (_, replay) = Wal::open(dir.path(), 6).unwrap();
        assert!(replay.is_empty());
    }

    fn wait_for_spare(wal: &mut Wal) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !wal.spare_ready() {
            assert!(std::time::Instant::now() < deadline, "spare segment never became ready");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    #[test]
    fn appends_move_to_a_zero_filled_segment_whose_zero_tail_reads_as_a_clean_end() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut wal, _) = Wal::open(dir.path(), 0).unwrap();
            wal.append(&[entry("a", 1)]).unwrap();
            wait_for_spare(&mut wal);
            wal.append(&[entry("a", 2), entry("a", 3)]).unwrap();
            assert!(wal.preallocated, "the second append went to the spare");
            let len = std::fs::metadata(dir.path().join(format!("{:020}.wal", 2))).unwrap().len();
            assert_eq!(len, SEGMENT_BYTES, "appends overwrite the zeros; the file does not grow");
        }
        // Closed preallocated segments (zero tails) and the last one all replay cleanly.
        let (mut wal, replay) = Wal::open(dir.path(), 0).unwrap();
        assert_eq!(seqs(&replay), vec![(1, 1), (2, 2), (3, 3)]);
        wait_for_spare(&mut wal);
        wal.append(&[entry("a", 4)]).unwrap();
        drop(wal);
        let (_, replay) = Wal::open(dir.path(), 0).unwrap();
        assert_eq!(seqs(&replay).last(), Some(&(4, 4)));
    }

    #[test]
    fn a_torn_record_in_a_zero_filled_segment_is_cut_and_a_spare_renamed_without_records_is_reused_safely() {
        let dir = tempfile::tempdir().unwrap();
        let seg = {
            let (mut wal, _) = Wal::open(dir.path(), 0).unwrap();
            wal.append(&[entry("a", 1)]).unwrap();
            wait_for_spare(&mut wal);
            wal.append(&[entry("a", 2)]).unwrap();
            dir.path().join(format!("{:020}.wal", 2))
        };
        // A torn third record inside the zeros of the preallocated segment.
        let mut rec = Vec::new();
        encode_record(&mut rec, 2, &entry("a", 2));
        let at = rec.len();
        let mut torn = Vec::new();
        encode_record(&mut torn, 3, &entry("a", 3));
        torn.truncate(torn.len() - 3);
        let mut bytes = std::fs::read(&seg).unwrap();
        bytes[at..at + torn.len()].copy_from_slice(&torn);
        std::fs::write(&seg, &bytes).unwrap();
        let (mut wal, replay) = Wal::open(dir.path(), 0).unwrap();
        assert_eq!(seqs(&replay), vec![(1, 1), (2, 2)]);
        // The open segment starts at lsn 3; a crash right after a spare was renamed to that name, before
        // any record reached it, must not hide later appends behind its zeros.
        wait_for_spare(&mut wal);
        drop(wal);
        std::fs::rename(dir.path().join(SPARE), dir.path().join(format!("{:020}.wal", 3))).unwrap();
        let (mut wal, replay) = Wal::open(dir.path(), 0).unwrap();
        assert_eq!(replay.len(), 2);
        wal.append(&[entry("a", 3)]).unwrap();
        drop(wal);
        let (_, replay) = Wal::open(dir.path(), 0).unwrap();
        assert_eq!(seqs(&replay), vec![(1, 1), (2, 2), (3, 3)]);
    }
}
