//! Small whole-file helpers on glommio DMA files: durable atomic replacement (write to a temporary
//! name, fdatasync, rename, sync the directory) and checked reads of strom's own metadata files.
//!
//! Metadata files carry a header so a torn or foreign file is detected, never misread:
//! `b"STRM"`, format version (u32 BE), payload length (u64 BE), CRC-32C of the payload (u32 BE).

use std::path::Path;

use anyhow::{bail, Context, Result};
use glommio::io::{DmaFile, OpenOptions};

const MAGIC: &[u8; 4] = b"STRM";
const HEADER_BYTES: usize = 20;

/// Writes `bytes` as the whole content of an O_DIRECT file: padded to the alignment, then truncated
/// to the real length, then made durable.
pub async fn write_whole(path: &Path, bytes: &[u8]) -> Result<()> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .dma_open(path)
        .await
        .io()
        .with_context(|| format!("creating {}", path.display()))?;
    if !bytes.is_empty() {
        let aligned = usize::try_from(file.align_up(bytes.len() as u64))?;
        let mut buf = file.alloc_dma_buffer(aligned);
        let slice = buf.as_bytes_mut();
        slice[..bytes.len()].copy_from_slice(bytes);
        slice[bytes.len()..].fill(0);
        file.write_at(buf, 0).await.io()?;
    }
    file.truncate(bytes.len() as u64).await.io()?;
    file.fdatasync().await.io()?;
    file.close().await.io()?;
    Ok(())
}

/// Reads a whole file through O_DIRECT.
pub async fn read_whole(path: &Path) -> Result<Vec<u8>> {
    let file = DmaFile::open(path)
        .await
        .io()
        .with_context(|| format!("opening {}", path.display()))?;
    let size = usize::try_from(file.file_size().await.io()?)?;
    let data = if size == 0 {
        Vec::new()
    } else {
        file.read_at(0, size).await.io()?.to_vec()
    };
    file.close().await.io()?;
    Ok(data)
}

/// Atomically replaces `path` with a checksummed metadata file holding `payload`.
pub async fn write_meta(path: &Path, version: u32, payload: &[u8]) -> Result<()> {
    let mut bytes = Vec::with_capacity(HEADER_BYTES + payload.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&version.to_be_bytes());
    bytes.extend_from_slice(&(payload.len() as u64).to_be_bytes());
    bytes.extend_from_slice(&crc32c::crc32c(payload).to_be_bytes());
    bytes.extend_from_slice(payload);
    let tmp = path.with_extension("tmp");
    write_whole(&tmp, &bytes).await?;
    glommio::io::rename(&tmp, path)
        .await
        .io()
        .with_context(|| format!("renaming {} into place", tmp.display()))?;
    sync_dir(path.parent().unwrap_or(Path::new("."))).await
}

/// Reads a metadata file written by [`write_meta`], checking magic, version, length and CRC.
pub async fn read_meta(path: &Path, version: u32) -> Result<rkyv::util::AlignedVec<16>> {
    let bytes = read_whole(path).await?;
    check_meta(&bytes, version).with_context(|| format!("reading {}", path.display()))
}

/// The payload of a metadata file's bytes, after checking magic, version, length and CRC.
pub fn check_meta(bytes: &[u8], version: u32) -> Result<rkyv::util::AlignedVec<16>> {
    let field = |range: std::ops::Range<usize>| -> Result<&[u8]> {
        bytes
            .get(range)
            .ok_or_else(|| anyhow::anyhow!("shorter than a strom metadata header"))
    };
    if field(0..4)? != MAGIC {
        bail!("not a strom metadata file");
    }
    let found = u32::from_be_bytes(field(4..8)?.try_into()?);
    if found != version {
        bail!("format version {found}, expected {version}");
    }
    let len = usize::try_from(u64::from_be_bytes(field(8..16)?.try_into()?))?;
    let crc = u32::from_be_bytes(field(16..20)?.try_into()?);
    let payload = field(HEADER_BYTES..bytes.len())?;
    if payload.len() != len || crc32c::crc32c(payload) != crc {
        bail!("torn or corrupt (length or CRC mismatch)");
    }
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(len);
    aligned.extend_from_slice(payload);
    Ok(aligned)
}

/// fsyncs a directory so that file creations, renames and removals in it are durable.
pub async fn sync_dir(dir: &Path) -> Result<()> {
    let d = glommio::io::Directory::open(dir)
        .await
        .io()
        .with_context(|| format!("opening directory {}", dir.display()))?;
    d.sync().await.io()?;
    d.close().await.io()?;
    Ok(())
}

thread_local! {
    /// Blocking calls of this shard still running, with an event told when one ends.
    static IN_FLIGHT: (std::cell::Cell<usize>, event_listener::Event) =
        const { (std::cell::Cell::new(0), event_listener::Event::new()) };
}

/// Runs a blocking filesystem call (directory creation, listing, removal, stat) on glommio's
/// blocking thread pool, so that the shard's executor never waits on it.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    IN_FLIGHT.with(|(n, _)| n.set(n.get() + 1));
    let out = glommio::executor().spawn_blocking(f).await;
    IN_FLIGHT.with(|(n, ended)| {
        n.set(n.get() - 1);
        ended.notify(usize::MAX);
    });
    out
}

/// Waits (at most `limit`) until no blocking call of this shard is running: a shard that stops
/// first leaves a blocking thread with nobody to hand its result to, and glommio panics there.
/// Returns how many were still running.
pub async fn blocking_drained(limit: std::time::Duration) -> usize {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let listener = IN_FLIGHT.with(|(_, ended)| ended.listen());
        let running = IN_FLIGHT.with(|(n, _)| n.get());
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if running == 0 || left.is_zero() {
            return running;
        }
        let _ = glommio::timer::timeout(left, async {
            listener.await;
            Ok(())
        })
        .await;
    }
}

/// Removes a file off the shard thread; a file already gone is not an error.
pub async fn remove_file(path: &Path) -> Result<()> {
    let owned = path.to_path_buf();
    match blocking(move || std::fs::remove_file(owned)).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Suffix of a partition directory whose deletion is under way (Kafka's own convention:
/// `<topic>-<partition>.<unique id>-delete`).
pub const DELETE_SUFFIX: &str = "-delete";

/// Deletes a directory crash-consistently: first renamed out of the way under a unique
/// `…-delete` name and the rename made durable, then removed on glommio's blocking pool (never
/// `std::fs` on a shard thread). A crash after the rename leaves only a `-delete` directory, which
/// [`finish_deletions`] removes at the next start; nothing can reuse it.
pub async fn retire_dir(dir: &Path) -> Result<()> {
    let name = dir
        .file_name()
        .with_context(|| format!("{} has no directory name", dir.display()))?;
    let doomed = dir.with_file_name(format!(
        "{}.{}{DELETE_SUFFIX}",
        name.to_string_lossy(),
        uuid::Uuid::new_v4().simple()
    ));
    glommio::io::rename(dir, &doomed)
        .await
        .io()
        .with_context(|| format!("renaming {} for deletion", dir.display()))?;
    sync_dir(dir.parent().unwrap_or(Path::new("."))).await?;
    let large = super::trash::large_files(&doomed).await;
    if !large.is_empty() {
        // Large files go at the shard's deletion pace, off the caller's path.
        glommio::spawn_local(async move {
            if let Err(e) = super::trash::trickle_dir(doomed.clone(), large).await {
                tracing::warn!(dir = %doomed.display(), error = %format!("{e:#}"), "removing a deleted directory failed; retried at next start");
            }
        })
        .detach();
        return Ok(());
    }
    let target = doomed.clone();
    let removed = blocking(move || std::fs::remove_dir_all(&target)).await;
    if let Err(e) = removed {
        // The rename already made the deletion durable; the next start finishes it.
        tracing::warn!(dir = %doomed.display(), error = %e, "removing a deleted directory failed; retried at next start");
    }
    Ok(())
}

/// Removes every directory that a deletion renamed but did not finish removing (at start, before
/// any shard runs). Returns how many there were.
pub fn finish_deletions(data_dir: &Path) -> Result<usize> {
    let mut finished = 0;
    for entry in
        std::fs::read_dir(data_dir).with_context(|| format!("listing {}", data_dir.display()))?
    {
        let entry = entry?;
        let is_doomed = entry.file_name().to_string_lossy().ends_with(DELETE_SUFFIX);
        if is_doomed && entry.file_type()?.is_dir() {
            std::fs::remove_dir_all(entry.path())
                .with_context(|| format!("removing {}", entry.path().display()))?;
            tracing::info!(dir = %entry.path().display(), "finished an interrupted deletion");
            finished += 1;
        }
    }
    Ok(finished)
}

/// Opens a file of real data on the data directory's device before anything else, once per shard.
///
/// glommio decides per device whether reads may use the io_uring poll ring, by reading the first
/// O_DIRECT file opened there. If that file is empty the kernel answers the probe read without
/// touching the device, glommio concludes the device supports polling, and every later read fails
/// with EOPNOTSUPP on devices that do not (virtio, for one). A probe on a file with a block of data
/// gets the true answer.
pub async fn probe_device(data_dir: &Path) -> Result<()> {
    let path = data_dir.join(".device-probe");
    let target = path.clone();
    blocking(move || {
        if std::fs::metadata(&target).map(|m| m.len()).unwrap_or(0) < 4096 {
            std::fs::write(&target, vec![0u8; 4096])?;
        }
        Ok::<(), std::io::Error>(())
    })
    .await
    .with_context(|| format!("writing {}", path.display()))?;
    let file = DmaFile::open(&path)
        .await
        .io()
        .with_context(|| format!("opening {}", path.display()))?;
    file.close().await.io()?;
    Ok(())
}

/// glommio's error type is not `Sync`, so it cannot travel inside `anyhow::Error`; every glommio
/// result is turned into a `std::io::Error` (which glommio provides a conversion to) at the call.
pub trait GlommioResultExt<T> {
    fn io(self) -> std::io::Result<T>;
}

impl<T> GlommioResultExt<T> for glommio::Result<T, ()> {
    fn io(self) -> std::io::Result<T> {
        self.map_err(std::io::Error::from)
    }
}

/// Makes everything written to the file system holding `dir` durable (syncfs(2)): its metadata
/// (file sizes, extents) committed and the device cache flushed. One call instead of an
/// fdatasync (a file-system commit each) per file grown since the last one.
pub async fn syncfs(dir: &Path) -> Result<()> {
    let dir = dir.to_path_buf();
    blocking(move || {
        let handle =
            std::fs::File::open(&dir).with_context(|| format!("opening {}", dir.display()))?;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&handle);
        // SAFETY: `fd` is an open descriptor owned by `handle` for the length of the call.
        if unsafe { libc::syncfs(fd) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(anyhow::Error::new(e).context(format!("syncfs of {}", dir.display())));
        }
        Ok(())
    })
    .await
}
