//! One log segment: `<base_offset>.log` holding Kafka batches byte-for-byte, a sparse offset index
//! (`.index`) and a sparse time index (`.timeindex`).
//!
//! Writes go through an O_DIRECT glommio `DmaFile`. Because O_DIRECT writes whole aligned blocks,
//! the segment keeps its last partial block (`tail`) in memory and rewrites it together with the new
//! bytes; the already written prefix of that block is rewritten with identical bytes, so a torn write
//! can only damage bytes not yet acknowledged. The file may therefore end in zero padding past the
//! logical size: recovery stops at the first invalid batch and truncates there.
//!
//! Index entries are kept in memory and written to disk when the segment is closed (rolled). The
//! active segment's indexes are rebuilt by the recovery scan, which reads that segment anyway.
//! Offset index entry: (offset - base as u32, position as u32), big-endian, as Kafka's. Time index
//! entry: (max timestamp of all batches *before* the entry's batch, offset - base): every batch
//! before an entry whose timestamp is below a target is also below it, so a search may start there.

use std::path::{Path, PathBuf};
use std::rc::Rc;

use anyhow::{Context, Result};
use glommio::io::{DmaFile, OpenOptions};

use super::batch::{self, BatchError, BatchHeader};
use super::files::{self, GlommioResultExt};
use super::open_files::FileSlot;
use crate::model::Offset;

/// Bytes read at once when scanning a segment.
const SCAN_CHUNK_BYTES: usize = 1 << 20;

pub fn log_path(dir: &Path, base: Offset) -> PathBuf {
    dir.join(format!("{:020}.log", base.0))
}

fn index_path(dir: &Path, base: Offset) -> PathBuf {
    dir.join(format!("{:020}.index", base.0))
}

fn time_index_path(dir: &Path, base: Offset) -> PathBuf {
    dir.join(format!("{:020}.timeindex", base.0))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub relative_offset: u32,
    pub position: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeIndexEntry {
    pub prior_max_timestamp: i64,
    pub relative_offset: u32,
}

/// A batch found by a scan: where it starts and its header.
#[derive(Clone, Copy, Debug)]
pub struct ScannedBatch {
    pub position: u64,
    pub header: BatchHeader,
}

pub struct Segment {
    pub base_offset: Offset,
    /// The `.log` file, opened on demand within the shard's fd budget.
    pub file: Rc<FileSlot>,
    /// The file's O_DIRECT alignment.
    alignment: u64,
    dir: PathBuf,
    /// Logical size: bytes of whole batches written. The file may be longer (zero padding).
    pub size_bytes: u64,
    /// The bytes of the last partial alignment block, from `align_down(size_bytes)`.
    tail: Vec<u8>,
    pub index: Vec<IndexEntry>,
    pub time_index: Vec<TimeIndexEntry>,
    bytes_since_index: u64,
    pub max_timestamp: i64,
    /// The offset after the last batch in this segment (== base when empty).
    pub end_offset: Offset,
    pub created_ms: u64,
}

/// What a write of new batches needs: an aligned buffer at an aligned file position.
pub struct PreparedWrite {
    pub file: Rc<DmaFile>,
    pub position: u64,
    pub buffer: glommio::io::DmaBuffer,
}

impl Segment {
    pub async fn create(dir: &Path, base: Offset, now_ms: u64) -> Result<Segment> {
        let path = log_path(dir, base);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .dma_open(&path)
            .await
            .io()
            .with_context(|| format!("creating segment {}", path.display()))?;
        files::sync_dir(dir).await?;
        let alignment = file.alignment();
        Ok(Segment {
            base_offset: base,
            file: FileSlot::with_file(path, true, Rc::new(file)),
            alignment,
            dir: dir.to_path_buf(),
            size_bytes: 0,
            tail: Vec::new(),
            index: Vec::new(),
            time_index: Vec::new(),
            bytes_since_index: 0,
            max_timestamp: -1,
            end_offset: base,
            created_ms: now_ms,
        })
    }

    /// Opens an existing segment. A closed one loads its index files, and is scanned only where
    /// they are missing or inconsistent. The active (last) segment is scanned in full with CRC
    /// checks and truncated at the first torn or corrupt batch, unless `clean` says the broker
    /// stopped cleanly: then the segment was truncated to its last batch and its indexes written
    /// at shutdown, and it loads like a closed one (falling back to the scan if they disagree).
    /// Returns the batches scanned (`None` when the indexes were trusted), so that the caller can
    /// rebuild producer state from the active segment.
    pub async fn open(
        dir: &Path,
        base: Offset,
        active: bool,
        clean: bool,
        index_interval_bytes: u64,
        now_ms: u64,
    ) -> Result<(Segment, Option<Vec<ScannedBatch>>)> {
        let path = log_path(dir, base);
        let file = OpenOptions::new()
            .read(true)
            .write(active)
            .dma_open(&path)
            .await
            .io()
            .with_context(|| format!("opening segment {}", path.display()))?;
        let file_size = file.file_size().await.io()?;
        let alignment = file.alignment();
        let file = Rc::new(file);
        let mut segment = Segment {
            base_offset: base,
            file: FileSlot::with_file(path.clone(), active, file.clone()),
            alignment,
            dir: dir.to_path_buf(),
            size_bytes: 0,
            tail: Vec::new(),
            index: Vec::new(),
            time_index: Vec::new(),
            bytes_since_index: 0,
            max_timestamp: -1,
            end_offset: base,
            created_ms: now_ms,
        };
        if !active || clean {
            if let Some(()) = segment.load_indexes(&file, file_size).await? {
                if !active {
                    return Ok((segment, None));
                }
                if segment.size_bytes == file_size {
                    segment.load_tail(&file).await?;
                    return Ok((segment, None));
                }
                tracing::info!(
                    segment = %path.display(),
                    "active segment does not end where its clean shutdown left it; scanning it"
                );
                segment = Segment {
                    index: Vec::new(),
                    time_index: Vec::new(),
                    bytes_since_index: 0,
                    max_timestamp: -1,
                    end_offset: base,
                    size_bytes: 0,
                    ..segment
                };
            }
        }
        let (batches, valid_end) = scan(&file, base, 0, file_size, active).await?;
        for b in &batches {
            segment.track(b.position, &b.header, index_interval_bytes)?;
        }
        segment.size_bytes = valid_end;
        if active {
            if valid_end != file_size {
                tracing::warn!(
                    segment = %path.display(),
                    file_size,
                    valid_end,
                    "truncating torn or corrupt tail of the active segment"
                );
                file.truncate(valid_end).await.io()?;
                file.fdatasync().await.io()?;
            }
            segment.load_tail(&file).await?;
        } else {
            segment.write_indexes().await?;
        }
        Ok((segment, Some(batches)))
    }

    /// Reads the last partial alignment block, which the next aligned write starts with.
    async fn load_tail(&mut self, file: &DmaFile) -> Result<()> {
        let aligned = file.align_down(self.size_bytes);
        let tail_len = usize::try_from(self.size_bytes - aligned)?;
        if tail_len > 0 {
            self.tail = file.read_at(aligned, tail_len).await.io()?.to_vec();
        }
        Ok(())
    }

    /// Loads `.index` and `.timeindex` for a closed segment and checks them against the file. The
    /// batches after the last index entry are scanned to learn the segment's end and max timestamp.
    async fn load_indexes(&mut self, file: &DmaFile, file_size: u64) -> Result<Option<()>> {
        let (Ok(index), Ok(time_index)) = (
            files::read_whole(&index_path(&self.dir, self.base_offset)).await,
            files::read_whole(&time_index_path(&self.dir, self.base_offset)).await,
        ) else {
            return Ok(None);
        };
        if index.len() % 8 != 0 || time_index.len() % 12 != 0 {
            return Ok(None);
        }
        let entries: Vec<IndexEntry> = index
            .chunks_exact(8)
            .map(|c| IndexEntry {
                relative_offset: u32::from_be_bytes([c[0], c[1], c[2], c[3]]),
                position: u32::from_be_bytes([c[4], c[5], c[6], c[7]]),
            })
            .collect();
        let monotonic = entries
            .windows(2)
            .all(|w| w[0].relative_offset < w[1].relative_offset && w[0].position < w[1].position);
        if !monotonic || entries.iter().any(|e| u64::from(e.position) >= file_size) {
            return Ok(None);
        }
        let start = entries.last().map_or(0, |e| u64::from(e.position));
        let (tail_batches, valid_end) =
            scan(file, self.base_offset, start, file_size, false).await?;
        if tail_batches.is_empty() && file_size > 0 {
            return Ok(None);
        }
        self.index = entries;
        self.time_index = time_index
            .chunks_exact(12)
            .map(|c| TimeIndexEntry {
                prior_max_timestamp: i64::from_be_bytes(c[0..8].try_into().unwrap_or_default()),
                relative_offset: u32::from_be_bytes(c[8..12].try_into().unwrap_or_default()),
            })
            .collect();
        self.max_timestamp = self.time_index.last().map_or(-1, |e| e.prior_max_timestamp);
        for b in &tail_batches {
            self.max_timestamp = self.max_timestamp.max(b.header.max_timestamp);
            self.end_offset = b.header.last_offset().next();
        }
        self.size_bytes = valid_end;
        self.bytes_since_index = valid_end - start;
        Ok(Some(()))
    }

    /// Records a batch just placed at `position` in the in-memory indexes and counters.
    /// Fails (changing nothing) if the batch is not addressable from this segment: its offsets
    /// must lie within 2^32 of the base and its position below 4 GiB ([`Segment::fits`]).
    pub fn track(
        &mut self,
        position: u64,
        header: &BatchHeader,
        index_interval_bytes: u64,
    ) -> Result<()> {
        if !self.fits(position, header) {
            anyhow::bail!(
                "batch at offset {} (position {position}) is not addressable from segment {}",
                header.base_offset.0,
                self.base_offset.0
            );
        }
        let relative = u32::try_from(header.base_offset.0 - self.base_offset.0)?;
        let position32 = u32::try_from(position)?;
        if self.index.is_empty() || self.bytes_since_index >= index_interval_bytes {
            self.index.push(IndexEntry {
                relative_offset: relative,
                position: position32,
            });
            self.time_index.push(TimeIndexEntry {
                prior_max_timestamp: self.max_timestamp,
                relative_offset: relative,
            });
            self.bytes_since_index = 0;
        }
        self.bytes_since_index += header.size_bytes as u64;
        self.max_timestamp = self.max_timestamp.max(header.max_timestamp);
        self.end_offset = header.last_offset().next();
        Ok(())
    }

    /// Whether a batch at `position` can be indexed by this segment: index entries hold the offset
    /// relative to the base and the file position as u32 (Kafka's format), so a segment rolls
    /// before either would overflow.
    pub fn fits(&self, position: u64, header: &BatchHeader) -> bool {
        fits_segment(self.base_offset, position, header)
    }

    /// Builds the aligned write of `data` (whole batches) at the logical end of the segment.
    /// `file` is this segment's file, from [`FileSlot::get`].
    pub fn prepare_write<'a>(
        &self,
        file: &Rc<DmaFile>,
        parts: impl Iterator<Item = &'a [u8]> + Clone,
    ) -> PreparedWrite {
        let position = file.align_down(self.size_bytes);
        let len = self.tail.len() + parts.clone().map(<[u8]>::len).sum::<usize>();
        let aligned_len = usize::try_from(file.align_up(len as u64)).unwrap_or(usize::MAX);
        let mut buffer = file.alloc_dma_buffer(aligned_len);
        let slice = buffer.as_bytes_mut();
        slice[..self.tail.len()].copy_from_slice(&self.tail);
        // Each batch is copied once, straight into the DMA buffer.
        let mut at = self.tail.len();
        for part in parts {
            slice[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        slice[len..].fill(0);
        PreparedWrite {
            file: file.clone(),
            position,
            buffer,
        }
    }

    /// Advances the logical size after a prepared write of `parts` completed.
    pub fn commit_write<'a>(&mut self, parts: impl Iterator<Item = &'a [u8]> + Clone) {
        let data_len: usize = parts.clone().map(<[u8]>::len).sum();
        let new_size = self.size_bytes + data_len as u64;
        let aligned = new_size - new_size % self.alignment.max(1);
        // Below the alignment (a few KiB), so it fits any usize.
        let tail_len = usize::try_from(new_size - aligned).unwrap_or(0);
        let mut tail = Vec::with_capacity(tail_len);
        // The new bytes did not reach the next block: the old tail continues.
        let mut skip = if tail_len > data_len {
            tail.extend_from_slice(&self.tail);
            0
        } else {
            data_len - tail_len
        };
        for part in parts {
            if skip >= part.len() {
                skip -= part.len();
                continue;
            }
            tail.extend_from_slice(&part[skip..]);
            skip = 0;
        }
        self.tail = tail;
        self.size_bytes = new_size;
    }

    /// The file position to start reading at for `offset`: the last index entry at or below it.
    pub fn position_for(&self, offset: Offset) -> u64 {
        lookup(&self.index, offset.0 - self.base_offset.0)
    }

    /// The position from which batches may have a max timestamp at or above `timestamp`.
    pub fn position_for_timestamp(&self, timestamp: i64) -> u64 {
        let i = self
            .time_index
            .partition_point(|e| e.prior_max_timestamp < timestamp);
        if i == 0 {
            return 0;
        }
        let relative = self.time_index[i - 1].relative_offset;
        self.position_for(Offset(self.base_offset.0 + i64::from(relative)))
    }

    /// A copy of what [`Segment::write_indexes`] needs, to write without borrowing the segment.
    pub fn index_snapshot(&self) -> IndexSnapshot {
        IndexSnapshot {
            dir: self.dir.clone(),
            base_offset: self.base_offset,
            index: self.index.clone(),
            time_index: self.time_index.clone(),
        }
    }

    pub fn paths(&self) -> [PathBuf; 3] {
        [
            log_path(&self.dir, self.base_offset),
            index_path(&self.dir, self.base_offset),
            time_index_path(&self.dir, self.base_offset),
        ]
    }
    /// Writes the in-memory indexes as `.index` and `.timeindex` (done when the segment closes).
    pub async fn write_indexes(&self) -> Result<()> {
        self.index_snapshot().write_indexes().await
    }
}

/// A closed segment's indexes, ready to be written.
pub struct IndexSnapshot {
    dir: PathBuf,
    base_offset: Offset,
    index: Vec<IndexEntry>,
    time_index: Vec<TimeIndexEntry>,
}

impl IndexSnapshot {
    pub async fn write_indexes(&self) -> Result<()> {
        let mut index = Vec::with_capacity(self.index.len() * 8);
        for e in &self.index {
            index.extend_from_slice(&e.relative_offset.to_be_bytes());
            index.extend_from_slice(&e.position.to_be_bytes());
        }
        let mut time_index = Vec::with_capacity(self.time_index.len() * 12);
        for e in &self.time_index {
            time_index.extend_from_slice(&e.prior_max_timestamp.to_be_bytes());
            time_index.extend_from_slice(&e.relative_offset.to_be_bytes());
        }
        files::write_whole(&index_path(&self.dir, self.base_offset), &index).await?;
        files::write_whole(&time_index_path(&self.dir, self.base_offset), &time_index).await?;
        Ok(())
    }
}

/// The file position of the last index entry at or below `relative_offset` (0 when none is).
pub fn lookup(index: &[IndexEntry], relative_offset: i64) -> u64 {
    let i = index.partition_point(|e| i64::from(e.relative_offset) <= relative_offset);
    if i == 0 {
        0
    } else {
        u64::from(index[i - 1].position)
    }
}

fn fits_segment(base: Offset, position: u64, header: &BatchHeader) -> bool {
    let span = header.last_offset().0.checked_sub(base.0);
    span.is_some_and(|s| u32::try_from(s).is_ok())
        && header.base_offset >= base
        && u32::try_from(position).is_ok()
}

/// Walks the batches of `file` from `start` up to `end`, returning each batch found and the position
/// where valid data ends. With `check_crc` every batch's CRC is verified (recovery of the active
/// segment); a batch that fails, is torn, or lies below `base` ends the scan.
pub async fn scan(
    file: &DmaFile,
    base: Offset,
    start: u64,
    end: u64,
    check_crc: bool,
) -> Result<(Vec<ScannedBatch>, u64)> {
    let mut batches = Vec::new();
    let mut pos = start;
    let mut expected_next: Option<Offset> = None;
    while pos < end {
        let want = usize::try_from((end - pos).min(SCAN_CHUNK_BYTES as u64))?;
        let chunk = file.read_at(pos, want).await.io()?;
        let mut at = 0usize;
        let mut progressed = false;
        loop {
            let rest = &chunk[at..];
            let header = match BatchHeader::parse(rest) {
                Ok(h) => h,
                Err(BatchError::Incomplete) => break,
                Err(_) => return Ok((batches, pos + at as u64)),
            };
            if header.base_offset < base
                || expected_next.is_some_and(|n| header.base_offset < n)
                || !fits_segment(base, pos + at as u64, &header)
            {
                return Ok((batches, pos + at as u64));
            }
            if rest.len() < header.size_bytes {
                if pos + at as u64 + header.size_bytes as u64 > end {
                    return Ok((batches, pos + at as u64));
                }
                if at == 0 {
                    // A batch larger than the scan chunk: read exactly that batch.
                    let whole = file.read_at(pos, header.size_bytes).await.io()?;
                    if check_crc && batch::validate(&whole).is_err() {
                        return Ok((batches, pos));
                    }
                    batches.push(ScannedBatch {
                        position: pos,
                        header,
                    });
                    expected_next = Some(header.last_offset().next());
                    at = header.size_bytes;
                    progressed = true;
                }
                break;
            }
            if check_crc && batch::validate(rest).is_err() {
                return Ok((batches, pos + at as u64));
            }
            batches.push(ScannedBatch {
                position: pos + at as u64,
                header,
            });
            expected_next = Some(header.last_offset().next());
            at += header.size_bytes;
            progressed = true;
        }
        if !progressed {
            return Ok((batches, pos));
        }
        pos += at as u64;
    }
    Ok((batches, pos.min(end)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_finds_the_last_entry_at_or_below() {
        let index: Vec<IndexEntry> = (0..10)
            .map(|i| IndexEntry {
                relative_offset: i * 10,
                position: i * 4096,
            })
            .collect();
        assert_eq!(lookup(&index, 0), 0);
        assert_eq!(lookup(&index, 9), 0);
        assert_eq!(lookup(&index, 10), 4096);
        assert_eq!(lookup(&index, 95), 9 * 4096);
        assert_eq!(lookup(&[], 5), 0);
    }
}
