//! The fd budget: segment files are opened when used and closed when they have not been used for
//! longest, so a shard keeps at most `open_files_max` of them open however many partitions it
//! owns (one open file per partition would stop at the process's fd limit: 4,096 partitions
//! under `ulimit -n 4096`, and the sockets would find no fd left).
//!
//! A [`FileSlot`] names one file and holds it while it is open. [`FileSlot::get`] opens it on
//! demand and marks it recently used; when more than the budget are open, the least recently used
//! slot lets go of its file. A caller that got the file keeps its own `Rc` until its I/O is done,
//! so a file is never closed under a read or write in flight (the budget may then be exceeded
//! briefly, by the number of operations in flight).
//!
//! The table is per shard (thread-local): no lock, and each shard gets its share of the budget.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::{Rc, Weak};

use anyhow::{Context, Result};
use glommio::io::{DmaFile, OpenOptions};

use super::files::GlommioResultExt;

/// Open segment files per shard when nothing else is configured.
pub const OPEN_FILES_MAX_DEFAULT: usize = 1024;

struct OpenTable {
    open_max: usize,
    /// Open slots by the tick of their last use: the first entry is the least recently used.
    open: BTreeMap<u64, Weak<FileSlot>>,
    next_tick: u64,
}

thread_local! {
    static TABLE: RefCell<OpenTable> = const {
        RefCell::new(OpenTable {
            open_max: OPEN_FILES_MAX_DEFAULT,
            open: BTreeMap::new(),
            next_tick: 1,
        })
    };
}

/// Sets this shard's budget of open segment files (at shard start).
pub fn set_open_files_max(open_max: usize) {
    TABLE.with(|t| t.borrow_mut().open_max = open_max.max(1));
}

/// How many segment files this shard holds open now.
pub fn open_count() -> usize {
    TABLE.with(|t| t.borrow().open.len())
}

/// One segment file, open or not.
pub struct FileSlot {
    path: PathBuf,
    writable: bool,
    file: RefCell<Option<Rc<DmaFile>>>,
    /// The tick under which the slot is in the table while open; 0 when closed.
    tick: Cell<u64>,
}

impl FileSlot {
    /// A slot for a file that exists (or, if `writable`, will be written through it).
    pub fn new(path: PathBuf, writable: bool) -> Rc<FileSlot> {
        Rc::new(FileSlot {
            path,
            writable,
            file: RefCell::new(None),
            tick: Cell::new(0),
        })
    }

    /// A slot around a file just opened by the caller (creation, recovery).
    pub fn with_file(path: PathBuf, writable: bool, file: Rc<DmaFile>) -> Rc<FileSlot> {
        let slot = FileSlot::new(path, writable);
        slot.install(file);
        slot
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file, opening it if the budget closed it.
    pub async fn get(self: &Rc<Self>) -> Result<Rc<DmaFile>> {
        let open = self.file.borrow().clone();
        if let Some(file) = open {
            self.touch();
            return Ok(file);
        }
        let file = OpenOptions::new()
            .read(true)
            .write(self.writable)
            .dma_open(&self.path)
            .await
            .io()
            .with_context(|| format!("opening segment {}", self.path.display()))?;
        // Another task may have opened it meanwhile: keep theirs, close ours.
        let opened_meanwhile = self.file.borrow().clone();
        if let Some(existing) = opened_meanwhile {
            let _ = file.close().await;
            self.touch();
            return Ok(existing);
        }
        let file = Rc::new(file);
        self.install(file.clone());
        Ok(file)
    }

    /// Lets go of the file now (the segment is being deleted or replaced).
    pub fn close(&self) {
        let tick = self.tick.replace(0);
        if tick != 0 {
            TABLE.with(|t| t.borrow_mut().open.remove(&tick));
        }
        self.file.borrow_mut().take();
    }

    fn install(self: &Rc<Self>, file: Rc<DmaFile>) {
        *self.file.borrow_mut() = Some(file);
        self.touch();
        // Evicted slots are dropped after the table's borrow ends.
        let evicted: Vec<Rc<FileSlot>> = TABLE.with(|t| {
            let mut t = t.borrow_mut();
            let mut out = Vec::new();
            while t.open.len() > t.open_max {
                let Some((_, weak)) = t.open.pop_first() else {
                    break;
                };
                if let Some(slot) = weak.upgrade() {
                    slot.tick.set(0);
                    out.push(slot);
                }
            }
            out
        });
        for slot in evicted {
            slot.file.borrow_mut().take();
        }
    }

    fn touch(self: &Rc<Self>) {
        TABLE.with(|t| {
            let mut t = t.borrow_mut();
            let old = self.tick.get();
            if old != 0 {
                t.open.remove(&old);
            }
            let tick = t.next_tick;
            t.next_tick += 1;
            t.open.insert(tick, Rc::downgrade(self));
            self.tick.set(tick);
        });
    }
}

impl Drop for FileSlot {
    fn drop(&mut self) {
        let tick = self.tick.get();
        if tick != 0 {
            // `try_with`: a slot dropped while the thread's table is being torn down needs nothing.
            let _ = TABLE.try_with(|t| {
                if let Ok(mut t) = t.try_borrow_mut() {
                    t.open.remove(&tick);
                }
            });
        }
    }
}
