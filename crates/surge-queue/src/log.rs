//! The log on disk: numbered segment files in the queue's folder, appended to by one writer
//! thread. Appends that arrive while the writer syncs wait and go together in the next write
//! and the next sync (group commit): each caller still waits for its own records to be
//! durable, and the cost of a sync is shared by every publish that arrived during the last.
//!
//! Writes are positional, at the end of the last good record, so a write or sync that fails
//! (a full disk) leaves nothing the next write builds on: the file is cut back, and should that
//! fail too, recovery drops whatever follows the last whole record as a torn tail.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::record::{self, Read, Record};
use crate::state::Location;

/// A segment is closed once it holds this much and the next one is started.
pub const SEGMENT_SIZE: u64 = 64 * 1024 * 1024;
/// One write takes at most about this much.
const BATCH_BYTES: usize = 8 * 1024 * 1024;

/// Where appended bytes landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub segment: u64,
    pub offset: u64,
}

struct Append {
    bytes: Vec<u8>,
    /// `None`: nobody waits (acks, retries: losing one in a crash only repeats a delivery).
    done: Option<oneshot::Sender<io::Result<Appended>>>,
}

/// Problems found when a queue's folder is opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "{path}: damaged at offset {offset} ({why}); the records after it cannot be trusted. With surge \
         stopped, `surge queues repair QUEUE` keeps every intact record"
    )]
    Damaged { path: PathBuf, offset: u64, why: &'static str },
    #[error("{path}: another process has this queue open (two surges sharing a data folder?)")]
    Locked { path: PathBuf },
    #[error("the RabbitMQ broker at {url}: {cause}")]
    Broker { url: String, cause: String },
}

/// What recovery found besides the state.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovered {
    pub segments: usize,
    pub records: u64,
    /// Bytes dropped from the end of the last segment: a write cut short by a crash.
    pub torn_tail: Option<(PathBuf, u64, u64)>,
    /// The last segment, repaired: damage with whole records after it.
    pub repaired: Option<Repaired>,
}

pub struct Log {
    dir: PathBuf,
    /// `None` once closing.
    appends: Option<mpsc::Sender<Append>>,
    writer: Option<std::thread::JoinHandle<()>>,
    /// Open segment files, for reading payloads.
    readers: Mutex<Vec<(u64, Arc<File>)>>,
    /// Held while the log is open: one process per queue folder.
    _lock: File,
}

impl Drop for Log {
    /// Waits for the writer to write what it was handed, so the folder is free when it returns.
    fn drop(&mut self) {
        self.appends = None;
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl Log {
    /// Opens the log in `dir` (made if missing), handing every record to `replay` in order,
    /// with the segment it is in and, for a publish, where its payload is.
    pub fn open(
        dir: &Path,
        segment_size: u64,
        mut replay: impl FnMut(&Record, u64, Option<Location>),
    ) -> Result<(Log, Recovered), OpenError> {
        let io_error = |path: &Path| {
            let path = path.to_owned();
            move |source| OpenError::Io { path, source }
        };
        fs::create_dir_all(dir).map_err(io_error(dir))?;
        let lock = lock(dir)?;
        let mut numbers = segment_numbers(dir).map_err(io_error(dir))?;
        if numbers.is_empty() {
            create_segment(dir, 1).map_err(io_error(dir))?;
            numbers.push(1);
        }
        let mut recovered = Recovered { segments: numbers.len(), ..Recovered::default() };
        let mut end = 0;
        for (index, &number) in numbers.iter().enumerate() {
            let path = segment_path(dir, number);
            let mut bytes = fs::read(&path).map_err(io_error(&path))?;
            let mut at = 0usize;
            let last = index + 1 == numbers.len();
            loop {
                match record::read_without_payload(&bytes[at..]) {
                    Read::Record { record, length, payload_at } => {
                        recovered.records += 1;
                        let location = payload_at.map(|payload_at| Location {
                            segment: number,
                            offset: (at + payload_at) as u64,
                            len: payload_len(&bytes[at..], payload_at),
                        });
                        replay(&record, number, location);
                        at += length;
                    }
                    Read::Short if at == bytes.len() => break,
                    Read::Damaged(why) if !last => {
                        return Err(OpenError::Damaged { path, offset: at as u64, why });
                    }
                    Read::Short | Read::Damaged(_) if last && next_record(&bytes[at + 1..]).is_some() => {
                        // Whole records after damage in the last segment: a write a power loss
                        // left with holes, or damage. Either way every whole record is kept
                        // (the segment is repaired, the file as it was kept aside), and reading
                        // goes on where the repaired file has the next one.
                        let Some(done) = repair_segment(dir, &path, &bytes).map_err(io_error(&path))? else {
                            return Err(OpenError::Damaged { path, offset: at as u64, why: "unrepairable" });
                        };
                        bytes = fs::read(&path).map_err(io_error(&path))?;
                        recovered.repaired = Some(done);
                    }
                    Read::Short | Read::Damaged(_) if last => {
                        // The tail of the last segment: a write the crash cut short.
                        let file = OpenOptions::new().write(true).open(&path).map_err(io_error(&path))?;
                        file.set_len(at as u64).and_then(|()| file.sync_all()).map_err(io_error(&path))?;
                        recovered.torn_tail = Some((path.clone(), at as u64, (bytes.len() - at) as u64));
                        break;
                    }
                    Read::Short => {
                        return Err(OpenError::Damaged { path, offset: at as u64, why: "cut short" })
                    }
                    Read::Damaged(why) => return Err(OpenError::Damaged { path, offset: at as u64, why }),
                }
            }
            if last {
                end = at as u64;
            }
        }
        let current = *numbers.last().unwrap_or(&1);
        let path = segment_path(dir, current);
        let file = OpenOptions::new().read(true).write(true).open(&path).map_err(io_error(&path))?;
        let (appends, receive) = mpsc::channel();
        let writer = Writer { dir: dir.to_owned(), file, segment: current, end, segment_size };
        let writer = std::thread::Builder::new()
            .name("surge-queue-log".to_owned())
            .spawn(move || writer.run(receive))
            .map_err(io_error(dir))?;
        let log = Log {
            dir: dir.to_owned(),
            appends: Some(appends),
            writer: Some(writer),
            readers: Mutex::new(Vec::new()),
            _lock: lock,
        };
        Ok((log, recovered))
    }

    /// Hands `bytes` to the writer now (so they follow everything handed over before), and
    /// returns what waits until they are on disk.
    pub fn submit(&self, bytes: Vec<u8>) -> impl std::future::Future<Output = io::Result<Appended>> {
        let (done, durable) = oneshot::channel();
        let sent = self.send(Append { bytes, done: Some(done) });
        async move {
            let stopped = || io::Error::other("the queue's log writer has stopped");
            sent.map_err(|()| stopped())?;
            durable.await.map_err(|_| stopped())?
        }
    }

    /// Appends `bytes` without waiting: they go with the next sync.
    pub fn append_later(&self, bytes: Vec<u8>) {
        let _ = self.send(Append { bytes, done: None });
    }

    fn send(&self, append: Append) -> Result<(), ()> {
        self.appends.as_ref().ok_or(())?.send(append).map_err(drop)
    }

    /// Reads a payload back from its segment.
    pub fn read(&self, location: Location) -> io::Result<Bytes> {
        let file = self.reader(location.segment)?;
        let mut payload = vec![0u8; location.len as usize];
        file.read_exact_at(&mut payload, location.offset)?;
        Ok(Bytes::from(payload))
    }

    /// Deletes the segments before `segment` (none of their messages is held any more), but
    /// never the one being written.
    pub fn delete_before(&self, segment: u64) -> io::Result<usize> {
        let mut deleted = 0;
        let numbers = segment_numbers(&self.dir)?;
        let newest = numbers.last().copied().unwrap_or(0);
        for number in numbers.into_iter().filter(|n| *n < segment && *n < newest) {
            fs::remove_file(segment_path(&self.dir, number))?;
            deleted += 1;
        }
        if let Ok(mut readers) = self.readers.lock() {
            readers.retain(|(number, _)| *number >= segment || *number == newest);
        }
        Ok(deleted)
    }

    fn reader(&self, segment: u64) -> io::Result<Arc<File>> {
        let mut readers = self.readers.lock().map_err(|_| io::Error::other("reader table poisoned"))?;
        if let Some((_, file)) = readers.iter().find(|(number, _)| *number == segment) {
            return Ok(Arc::clone(file));
        }
        let file = Arc::new(File::open(segment_path(&self.dir, segment))?);
        readers.push((segment, Arc::clone(&file)));
        Ok(file)
    }
}

/// The payload's length, from the u32 just before it.
fn payload_len(record: &[u8], payload_at: usize) -> u32 {
    let field = &record[payload_at - 4..payload_at];
    u32::from_le_bytes([field[0], field[1], field[2], field[3]])
}

struct Writer {
    dir: PathBuf,
    file: File,
    segment: u64,
    /// The end of the last record known good.
    end: u64,
    segment_size: u64,
}

impl Writer {
    fn run(mut self, appends: mpsc::Receiver<Append>) {
        while let Ok(first) = appends.recv() {
            let mut batch = vec![first];
            let mut size = batch[0].bytes.len();
            while size < BATCH_BYTES {
                match appends.try_recv() {
                    Ok(next) => {
                        size += next.bytes.len();
                        batch.push(next);
                    }
                    Err(_) => break,
                }
            }
            let written = self.write(&batch, size);
            if let Err(err) = &written {
                let unanswered = batch.iter().filter(|append| append.done.is_none()).count();
                if unanswered > 0 {
                    tracing::warn!(
                        "{}: {unanswered} acks or retries were not written ({err}); those messages may be delivered again",
                        self.dir.display()
                    );
                }
            }
            for (index, append) in batch.into_iter().enumerate() {
                if let Some(done) = append.done {
                    let _ = done.send(match &written {
                        Ok(offsets) => Ok(offsets[index]),
                        Err(err) => Err(io::Error::new(err.kind(), err.to_string())),
                    });
                }
            }
        }
    }

    /// Writes the batch at the end and syncs it; returns where each append landed.
    fn write(&mut self, batch: &[Append], size: usize) -> io::Result<Vec<Appended>> {
        if self.end >= self.segment_size {
            self.roll()?;
        }
        let mut joined = Vec::with_capacity(size);
        let mut offsets = Vec::with_capacity(batch.len());
        for append in batch {
            offsets.push(Appended { segment: self.segment, offset: self.end + joined.len() as u64 });
            joined.extend_from_slice(&append.bytes);
        }
        let written = self.file.write_all_at(&joined, self.end).and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => {
                self.end += joined.len() as u64;
                Ok(offsets)
            }
            Err(err) => {
                // Cut back what may have reached the file; recovery drops it should this fail.
                let _ = self.file.set_len(self.end).and_then(|()| self.file.sync_data());
                Err(err)
            }
        }
    }

    fn roll(&mut self) -> io::Result<()> {
        let next = self.segment + 1;
        self.file = create_segment(&self.dir, next)?;
        self.segment = next;
        self.end = 0;
        Ok(())
    }
}

/// What a repair did to one segment that had damage in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repaired {
    pub path: PathBuf,
    /// Whole records kept.
    pub kept: u64,
    /// Where damaged bytes were cut out, and how many.
    pub cut: Vec<(u64, u64)>,
    /// The segment as it was, kept beside it.
    pub original: PathBuf,
}

/// Rewrites every damaged segment of the queue in `dir` with its intact records only: after
/// a damaged stretch, the next offset where a whole record with a good checksum starts is
/// where reading goes on. The segment as it was is kept beside it (`.damaged`). Takes the
/// folder's lock: surge must not have the queue open.
pub fn repair(dir: &Path) -> Result<Vec<Repaired>, OpenError> {
    let io_error = |path: &Path| {
        let path = path.to_owned();
        move |source| OpenError::Io { path, source }
    };
    let _lock = lock(dir)?;
    let mut repaired = Vec::new();
    for number in segment_numbers(dir).map_err(io_error(dir))? {
        let path = segment_path(dir, number);
        let bytes = fs::read(&path).map_err(io_error(&path))?;
        if let Some(done) = repair_segment(dir, &path, &bytes).map_err(io_error(&path))? {
            repaired.push(done);
        }
    }
    // The jobs' answers are a log of the same kind, in a folder of its own.
    let answers = dir.join("answers");
    if answers.is_dir() {
        repaired.extend(repair(&answers)?);
    }
    Ok(repaired)
}

/// Rewrites one segment (`bytes`, as read) with its intact records, if any of it is damaged.
fn repair_segment(dir: &Path, path: &Path, bytes: &[u8]) -> io::Result<Option<Repaired>> {
    let (kept, intact, cut) = intact_records(bytes);
    if cut.is_empty() {
        return Ok(None);
    }
    let fresh = path.with_extension("log.repairing");
    let original = keep_aside(path, "damaged");
    // The file as it was gets a second name first; then the repaired one takes its place in
    // one rename. A crash at any point leaves the segment whole under its own name.
    let mut file = File::create(&fresh)?;
    for range in &intact {
        io::Write::write_all(&mut file, &bytes[range.clone()])?;
    }
    file.sync_all()?;
    fs::hard_link(path, &original)?;
    File::open(dir)?.sync_all()?;
    fs::rename(&fresh, path)?;
    File::open(dir)?.sync_all()?;
    Ok(Some(Repaired { path: path.to_owned(), kept, cut, original }))
}

/// A name beside `path` for a copy of it, `NNN.log.WHAT`, numbered when one is there already.
fn keep_aside(path: &Path, what: &str) -> PathBuf {
    let first = path.with_extension(format!("log.{what}"));
    (1..)
        .map(|n| if n == 1 { first.clone() } else { path.with_extension(format!("log.{what}.{n}")) })
        .find(|candidate| !candidate.exists())
        .unwrap_or(first)
}

/// The whole records of a segment (how many, and their byte ranges) and the damaged stretches
/// between them (offset, length).
fn intact_records(bytes: &[u8]) -> (u64, Vec<std::ops::Range<usize>>, Vec<(u64, u64)>) {
    let (mut kept, mut intact, mut cut) = (0, Vec::new(), Vec::new());
    let mut at = 0;
    while at < bytes.len() {
        if let Read::Record { length, .. } = record::read(&bytes[at..]) {
            kept += 1;
            intact.push(at..at + length);
            at += length;
            continue;
        }
        let start = at;
        at = next_record(&bytes[at + 1..]).map_or(bytes.len(), |next| at + 1 + next);
        cut.push((start as u64, (at - start) as u64));
    }
    (kept, intact, cut)
}

/// The first offset in `bytes` where a whole record with a good checksum starts.
fn next_record(bytes: &[u8]) -> Option<usize> {
    (0..bytes.len()).find(|&at| record::starts_whole(&bytes[at..]))
}

/// Takes the folder's lock file, without waiting.
fn lock(dir: &Path) -> Result<File, OpenError> {
    let path = dir.join("LOCK");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| OpenError::Io { path: path.clone(), source })?;
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor this function owns; no memory is involved.
    #[allow(unsafe_code)]
    let taken = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if taken != 0 {
        return Err(OpenError::Locked { path });
    }
    Ok(file)
}

fn segment_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{number:020}.log"))
}

/// A new empty segment, its name made durable in the folder.
fn create_segment(dir: &Path, number: u64) -> io::Result<File> {
    // Not create_new: a roll whose folder sync failed left this file, empty, to retry on.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(segment_path(dir, number))?;
    File::open(dir)?.sync_all()?;
    Ok(file)
}

fn segment_numbers(dir: &Path) -> io::Result<Vec<u64>> {
    let mut numbers: Vec<u64> = fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.strip_suffix(".log")?.parse().ok())
        .collect();
    numbers.sort_unstable();
    Ok(numbers)
}
