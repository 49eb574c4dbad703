//! `strom tune`: is this machine ready to run strom well? Each check says what it found and, when
//! something should change, what to change. Only checks that would stop strom from running
//! (io_uring unavailable, no O_DIRECT on the data directory) make the command fail.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Memory one shard registers with io_uring (see `shard::startup`), plus ring overhead.
const MEMLOCK_BYTES_PER_SHARD: u64 = 3 << 20;
/// Open files: 3 per segment (log, index, time index), many segments per partition.
const OPEN_FILES_RECOMMENDED: u64 = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Warn,
    Fail,
}

pub struct Check {
    pub name: &'static str,
    pub verdict: Verdict,
    pub found: String,
    pub advice: Option<String>,
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

fn rlimit(resource: libc::__rlimit_resource_t) -> (u64, u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct passed by pointer.
    unsafe {
        libc::getrlimit(resource, &mut limit);
    }
    (limit.rlim_cur, limit.rlim_max)
}

fn human(bytes: u64) -> String {
    if bytes == libc::RLIM_INFINITY {
        "unlimited".into()
    } else {
        format!("{} KiB", bytes / 1024)
    }
}

pub fn check_io_uring() -> Check {
    let disabled = read("/proc/sys/kernel/io_uring_disabled").unwrap_or_else(|| "0".into());
    match io_uring::IoUring::new(8) {
        Ok(ring) => {
            let mut probe = io_uring::Probe::new();
            let ops = match ring.submitter().register_probe(&mut probe) {
                Ok(()) => {
                    let needed = [
                        io_uring::opcode::Read::CODE,
                        io_uring::opcode::Write::CODE,
                        io_uring::opcode::Fsync::CODE,
                        io_uring::opcode::Accept::CODE,
                    ];
                    if needed.iter().all(|op| probe.is_supported(*op)) {
                        "read, write, fsync and accept supported".to_string()
                    } else {
                        "some operations glommio uses are missing".to_string()
                    }
                }
                Err(_) => "opcode probe not supported (kernel < 5.6)".to_string(),
            };
            Check {
                name: "io_uring",
                verdict: Verdict::Ok,
                found: format!("available (io_uring_disabled={disabled}); {ops}"),
                advice: None,
            }
        }
        Err(e) => Check {
            name: "io_uring",
            verdict: Verdict::Fail,
            found: format!("unavailable: {e} (io_uring_disabled={disabled})"),
            advice: Some("strom needs io_uring: use Linux 5.8 or later, set kernel.io_uring_disabled=0, and allow io_uring in the container's seccomp profile".into()),
        },
    }
}

pub fn check_memlock(shards: usize) -> Check {
    let (soft, hard) = rlimit(libc::RLIMIT_MEMLOCK);
    let need = MEMLOCK_BYTES_PER_SHARD * shards as u64;
    // strom raises the soft limit to the hard one at start.
    let usable = hard.max(soft);
    let (verdict, advice) = if usable >= need {
        (Verdict::Ok, None)
    } else {
        (
            Verdict::Warn,
            Some(format!(
                "raise the memlock limit to at least {} (ulimit -l, or LimitMEMLOCK= in the systemd unit); below it, I/O buffers fall back to ordinary memory",
                human(need)
            )),
        )
    };
    Check {
        name: "memlock",
        verdict,
        found: format!(
            "soft {} / hard {}; {shards} shards need about {}",
            human(soft),
            human(hard),
            human(need)
        ),
        advice,
    }
}

pub fn check_o_direct(data_dir: &Path) -> Check {
    if let Err(e) = std::fs::create_dir_all(data_dir) {
        return Check {
            name: "O_DIRECT",
            verdict: Verdict::Fail,
            found: format!("cannot create {}: {e}", data_dir.display()),
            advice: Some("choose a writable --data-dir".into()),
        };
    }
    let path = data_dir.join(".strom-tune-probe");
    let result = (|| -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)?;
        // O_DIRECT needs an aligned buffer: a 4 KiB block from an aligned allocation.
        let layout = std::alloc::Layout::from_size_align(4096, 4096).expect("valid layout");
        // SAFETY: the layout is non-zero; the block is written, used and freed here.
        let block = unsafe { std::alloc::alloc_zeroed(layout) };
        if block.is_null() {
            return Err(std::io::Error::other("allocation failed"));
        }
        // SAFETY: `block` points to 4096 initialized bytes we own until dealloc below.
        let written = f.write_all(unsafe { std::slice::from_raw_parts(block, 4096) });
        // SAFETY: allocated above with the same layout.
        unsafe { std::alloc::dealloc(block, layout) };
        written?;
        f.sync_data()
    })();
    let _ = std::fs::remove_file(&path);
    match result {
        Ok(()) => Check {
            name: "O_DIRECT",
            verdict: Verdict::Ok,
            found: format!("aligned direct writes work on {}", data_dir.display()),
            advice: None,
        },
        Err(e) => Check {
            name: "O_DIRECT",
            verdict: Verdict::Fail,
            found: format!("direct writes fail on {}: {e}", data_dir.display()),
            advice: Some("put the data directory on a file system with O_DIRECT (XFS or ext4; not tmpfs or overlayfs)".into()),
        },
    }
}

/// Online discard (`-o discard` on ext4 or XFS) trims freed blocks inside the file system's
/// commits: deleting segments (retention, a deleted topic) then holds up the journal's syncs
/// that `acks=all` produces wait for. Measured on this project's machine: journal writes and
/// fdatasyncs of up to 230 ms in runs started right after the previous run's data (about 1 GB)
/// was deleted, against at most 8.6 ms in four runs with the file system remounted without
/// discard.
pub fn check_discard(data_dir: &Path) -> Check {
    let Some((point, fstype, opts)) = crate::storage::trash::mount_of(data_dir) else {
        return Check {
            name: "online discard",
            verdict: Verdict::Ok,
            found: "mount not found".into(),
            advice: None,
        };
    };
    let online = crate::storage::trash::trims_online(&opts);
    Check {
        name: "online discard",
        verdict: if online { Verdict::Warn } else { Verdict::Ok },
        found: format!(
            "{fstype} on {point} {}",
            if online {
                "is mounted with discard"
            } else {
                "has no online discard"
            }
        ),
        advice: online.then(|| {
            "mount without discard and trim weekly instead (systemctl enable --now fstrim.timer): online discard trims deleted segments inside file-system commits, and acks=all produces wait for those (strom deletes large files in paced chunks meanwhile: strom.delete.pacing)".into()
        }),
    }
}

pub fn check_governor() -> Check {
    let mut governors = std::collections::BTreeSet::new();
    if let Ok(entries) = std::fs::read_dir("/sys/devices/system/cpu") {
        for e in entries.flatten() {
            let p = e.path().join("cpufreq/scaling_governor");
            if let Some(g) = read(&p.to_string_lossy()) {
                governors.insert(g);
            }
        }
    }
    if governors.is_empty() {
        return Check {
            name: "cpu governor",
            verdict: Verdict::Ok,
            found: "not exposed (virtual machine or fixed frequency)".into(),
            advice: None,
        };
    }
    let all_performance = governors.iter().all(|g| g == "performance");
    Check {
        name: "cpu governor",
        verdict: if all_performance { Verdict::Ok } else { Verdict::Warn },
        found: governors.into_iter().collect::<Vec<_>>().join(", "),
        advice: (!all_performance).then(|| {
            "set the performance governor (cpupower frequency-set -g performance) for flat latency".into()
        }),
    }
}

pub fn check_thp() -> Check {
    let Some(v) = read("/sys/kernel/mm/transparent_hugepage/enabled") else {
        return Check {
            name: "transparent huge pages",
            verdict: Verdict::Ok,
            found: "not exposed".into(),
            advice: None,
        };
    };
    let active = v
        .split_whitespace()
        .find(|w| w.starts_with('['))
        .map(|w| w.trim_matches(['[', ']']).to_string())
        .unwrap_or(v);
    let ok = active != "always";
    Check {
        name: "transparent huge pages",
        verdict: if ok { Verdict::Ok } else { Verdict::Warn },
        found: active,
        advice: (!ok).then(|| {
            "use madvise (echo madvise > /sys/kernel/mm/transparent_hugepage/enabled): 'always' adds compaction stalls to the tail".into()
        }),
    }
}

pub fn check_open_files() -> Check {
    let (soft, hard) = rlimit(libc::RLIMIT_NOFILE);
    let ok = soft >= OPEN_FILES_RECOMMENDED;
    Check {
        name: "open files",
        verdict: if ok { Verdict::Ok } else { Verdict::Warn },
        found: format!("soft {soft} / hard {hard}"),
        advice: (!ok).then(|| {
            format!("raise the open-file limit to {OPEN_FILES_RECOMMENDED} or more (ulimit -n, LimitNOFILE=): each segment keeps up to three files open")
        }),
    }
}

/// Runs every check; returns the report and whether the machine can run strom at all.
pub fn report(data_dir: &Path, shards: usize) -> (String, bool) {
    let checks = [
        check_io_uring(),
        check_memlock(shards),
        check_o_direct(data_dir),
        check_discard(data_dir),
        check_governor(),
        check_thp(),
        check_open_files(),
    ];
    let mut out = String::new();
    let mut runnable = true;
    for c in &checks {
        let tag = match c.verdict {
            Verdict::Ok => "ok  ",
            Verdict::Warn => "warn",
            Verdict::Fail => {
                runnable = false;
                "FAIL"
            }
        };
        out.push_str(&format!("[{tag}] {:<24} {}\n", c.name, c.found));
        if let Some(a) = &c.advice {
            out.push_str(&format!("       {:<24} -> {a}\n", ""));
        }
    }
    out.push_str(if runnable {
        "ready: strom can run here\n"
    } else {
        "not ready: fix the FAIL lines first\n"
    });
    (out, runnable)
}
