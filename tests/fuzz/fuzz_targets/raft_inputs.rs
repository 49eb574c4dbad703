//! The cluster's inputs from disk and from other brokers: a replica's Raft log (`raft.wal`; the
//! target frames the input with valid checksums so that the replay behind them is reached, then
//! starts a Raft replica on it), a broker-to-broker frame, and a committed metadata command.
//! Arbitrary bytes must be an error, never a panic.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

/// The run's directory, removed when libFuzzer exits (it exits without unwinding, so no
/// destructor would; after a crash the directory stays, with the log that crashed).
static DIR: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn remove_dir() {
    if let Some(dir) = DIR.get() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = strom::replication::transport::decode_frame(data);
    let _ = strom::cluster::metadata::MetadataCommand::decode(data);

    // The input split at 0xFF bytes: each piece one WAL frame, its first byte the frame kind.
    let mut wal = Vec::new();
    for piece in data.split(|b| *b == 0xFF) {
        if let Some((kind, payload)) = piece.split_first() {
            strom::replication::wal::frame(&mut wal, *kind, payload);
        }
    }
    let dir = DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("strom-fuzz-wal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // SAFETY: registers a function that takes nothing and returns nothing.
        unsafe { libc::atexit(remove_dir) };
        dir
    });
    std::fs::write(dir.join(strom::replication::wal::WAL_FILE), &wal).unwrap();
    if let Ok(store) = strom::replication::wal::WalStore::open(&dir, &[1, 2, 3]) {
        let _ = strom::replication::Replica::new_raw(1, store);
    }
});
