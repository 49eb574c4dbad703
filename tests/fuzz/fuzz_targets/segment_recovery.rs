//! Segment recovery from arbitrary bytes on disk: a `.log` file (and, for a closed segment, its
//! `.index` and `.timeindex`) written from the input, then opened the way start-up opens them, as
//! the active segment (CRC scan and truncation, or after a clean shutdown its indexes trusted and
//! checked against the file) and as a closed one (index loading and checks).
//! Whatever is on disk, opening returns a segment or an error, never a panic.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use glommio::{LocalExecutor, LocalExecutorBuilder};
use libfuzzer_sys::fuzz_target;
use strom::model::Offset;
use strom::storage::segment::Segment;

/// The run's directory, removed when libFuzzer exits (it exits without unwinding, so no
/// destructor would; after a crash the directory stays, with the files that crashed).
static DIR: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn remove_dir() {
    if let Some(dir) = DIR.get() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

thread_local! {
    static EXECUTOR: (LocalExecutor, PathBuf) = {
        let dir = std::env::temp_dir().join(format!("strom-fuzz-segment-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temporary directory");
        if DIR.set(dir.clone()).is_ok() {
            // SAFETY: registers a function that takes nothing and returns nothing.
            unsafe { libc::atexit(remove_dir) };
        }
        let executor = LocalExecutorBuilder::default().make().expect("glommio executor");
        executor.run(async {
            strom::storage::files::probe_device(&dir).await.expect("device probe");
        });
        (executor, dir)
    };
}

fuzz_target!(|data: &[u8]| {
    let [flags, index_len, time_len, rest @ ..] = data else {
        return;
    };
    let (index, rest) = rest.split_at(usize::from(*index_len).min(rest.len()));
    let (time_index, log) = rest.split_at(usize::from(*time_len).min(rest.len()));
    let base = Offset(i64::from(*flags >> 2));
    EXECUTOR.with(|(executor, dir)| {
        let log_path = strom::storage::segment::log_path(dir, base);
        std::fs::write(&log_path, log).expect("write .log");
        std::fs::write(log_path.with_extension("index"), index).expect("write .index");
        std::fs::write(log_path.with_extension("timeindex"), time_index).expect("write .timeindex");
        let active = flags & 1 == 1;
        let clean = flags & 2 == 2;
        executor.run(async {
            let _ = Segment::open(dir, base, active, clean, 4096, 0).await;
        });
        for entry in std::fs::read_dir(dir).expect("list") {
            let path = entry.expect("entry").path();
            if !path.ends_with(".device-probe") {
                let _ = std::fs::remove_file(path);
            }
        }
    });
});
