//! Per-target builds that several processes may start at once — every replica's init container, a build Job, an
//! operator at a shell — on one shared artifact volume: one builds, the others wait for it and find the build done.
//!
//! - **One builder per target**: `engines/.<target>.lock`, an exclusive advisory lock (`flock(2)` through
//!   [`std::fs::File::lock`]) held from before the manifest is read until after it is rewritten. A process that
//!   finds it held says who holds it and waits (`--wait-secs`). The lock is released by the kernel when its holder
//!   exits, however it exits, so a crashed build never blocks the next one. (On NFS, `flock` is emulated with POSIX
//!   byte-range locks by Linux ≥ 2.6.12: it works across clients when the server supports NLM / NFSv4 locks.)
//! - **Versioned output**: a build goes to `engines/<target>/<key>/`, where the key hashes what decides the engine:
//!   the graph's and weights' sha256 from the manifest, the precision, the target, its options and the builder's
//!   versions (r1-export, ONNX Runtime). The same key already recorded in the manifest with its files present is a
//!   no-op; a new model version or a new builder gets a new folder, and a running server keeps reading the folder
//!   its manifest named when it loaded. Finished engines are never deleted by a build.
//! - **Never partial**: the manifest names a folder only once the folder is complete (written to a temporary
//!   sibling and renamed, then `manifest.json` replaced by write-then-rename), and servers open only what the
//!   manifest names.
//! - **No lost update**: builds of different targets run at once, so recording one is read-modify-write of
//!   `manifest.json` under a second, short lock (`engines/.manifest.lock`, [`MANIFEST_LOCK`]).
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use r1_engine::manifest::names::{DATA_FILE, ENGINES_DIR, MODEL_FILE};
use r1_engine::manifest::Manifest;
use sha2::{Digest, Sha256};

use crate::error::{ExportError, Result};

/// Default of `--wait-secs`: how long a build waits for another process's build of the same target. A TensorRT
/// build of a 70B graph takes tens of minutes.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(3600);

/// The name of the lock held while `manifest.json` is read, changed and replaced.
pub const MANIFEST_LOCK: &str = "manifest";

/// How often a waiting build retries the lock.
const POLL: Duration = Duration::from_millis(200);

/// The exclusive lock on one target's builds in one artifact; released when dropped (or when the process exits).
#[derive(Debug)]
pub struct BuildLock {
    _file: File,
}

/// `engines/.<target>.lock` of the artifact in `dir`.
pub fn lock_path(dir: &Path, target: &str) -> PathBuf {
    dir.join(ENGINES_DIR).join(format!(".{target}.lock"))
}

impl BuildLock {
    /// Takes the lock of `target` in `dir`, waiting up to `wait` while another process holds it; `on_wait` is told
    /// once who holds it (the pid and host it wrote). An error names the lock file, the holder and the time waited.
    pub fn acquire(dir: &Path, target: &str, wait: Duration, on_wait: &mut dyn FnMut(&str)) -> Result<BuildLock> {
        let path = lock_path(dir, target);
        let parent = dir.join(ENGINES_DIR);
        std::fs::create_dir_all(&parent).map_err(ExportError::io(&parent))?;
        let mut file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(ExportError::io(&path))?;
        let start = Instant::now();
        let mut told = false;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) => {
                    let holder = holder(&mut file);
                    if start.elapsed() >= wait {
                        return Err(ExportError::Output {
                            path,
                            message: format!(
                                "another r1-export build ({holder}) still holds this lock of `{target}` after {}s \
                                 (--wait-secs {}); it is released when that process exits",
                                start.elapsed().as_secs(),
                                wait.as_secs()
                            ),
                        });
                    }
                    if !told {
                        on_wait(&holder);
                        told = true;
                    }
                    std::thread::sleep(POLL);
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(ExportError::io(&path)(e)),
            }
        }
        // Who holds it, for the processes that will wait (best effort: the lock itself is the flock).
        let me = format!("pid {} on {}", std::process::id(), hostname());
        let _ = file.set_len(0).and_then(|_| file.rewind()).and_then(|_| file.write_all(me.as_bytes()));
        Ok(BuildLock { _file: file })
    }
}

fn holder(file: &mut File) -> String {
    let mut s = String::new();
    let _ = file.rewind().and_then(|_| file.read_to_string(&mut s));
    if s.trim().is_empty() {
        "holder unknown".into()
    } else {
        s.trim().to_string()
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "this host".into())
}

/// The version key of `target`'s build of the artifact `manifest` describes: 16 hex digits of a sha256 over the
/// graph's and weights' hashes, the precision, the target and its options, and the builder's versions.
pub fn build_key(manifest: &Manifest, target: &str, options: &str, ort_version: &str) -> String {
    let sha = |name: &str| manifest.files.get(name).map_or("-", |f| f.sha256.as_str()).to_string();
    let precision = manifest.precision.to_string();
    let mut parts = vec![
        (MODEL_FILE, sha(MODEL_FILE)),
        (DATA_FILE, sha(DATA_FILE)),
        ("precision", precision),
        ("target", target.to_string()),
        ("options", options.to_string()),
        ("r1-export", env!("CARGO_PKG_VERSION").to_string()),
        ("onnxruntime", ort_version.to_string()),
    ];
    if target == "cpu" {
        parts.push(("cpu-serving-graph", CPU_SERVING_REVISION.to_string()));
    }
    let parts: Vec<(&str, &str)> = parts.iter().map(|(k, v)| (*k, v.as_str())).collect();
    key_of(&parts)
}

/// Revision of the CPU serving rewrites (`r1-export --target cpu`): a change makes `r1-export build --target cpu`
/// rebuild graphs written before it. 2: float32 attention is r1's own kernel (`r1.GroupQueryAttention`). 3: the
/// routed experts of `int8-wo` / `int4-wo` / `int8` DeepseekV3 graphs are quantized (`com.microsoft.QMoE`). 4: a
/// portable graph whose expert stacks are quantized already (streamed `int8-wo` / `int4-wo`) gets its `QMoE` from
/// their codes, and `--cpu-float-experts` dequantizes them.
pub const CPU_SERVING_REVISION: &str = "4";

fn key_of(parts: &[(&str, &str)]) -> String {
    let mut h = Sha256::new();
    for (k, v) in parts {
        h.update(format!("{k}={v}\n"));
    }
    hex::encode(&h.finalize()[..8])
}

/// `engines/<target>/<key>`, relative to the artifact (always `/`-separated).
pub fn version_dir(target: &str, key: &str) -> String {
    format!("{}/{key}", r1_engine::manifest::names::engine_dir(target))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_process_waits_and_gives_up_naming_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let held = BuildLock::acquire(dir.path(), "cpu", Duration::ZERO, &mut |_| {}).unwrap();
        // flock(2) locks are per open file description: a second open in this process contends like a second
        // process would.
        let mut seen = String::new();
        let e = BuildLock::acquire(dir.path(), "cpu", Duration::from_millis(300), &mut |h| seen = h.to_string())
            .unwrap_err()
            .to_string();
        let me = format!("pid {}", std::process::id());
        assert!(seen.contains(&me), "{seen}");
        assert!(
            e.contains(".cpu.lock") && e.contains(&me) && e.contains("`cpu`") && e.contains("--wait-secs 0"),
            "{e}"
        );
        // Another target is not blocked, and the lock is free again once dropped.
        drop(BuildLock::acquire(dir.path(), "h100", Duration::ZERO, &mut |_| {}).unwrap());
        drop(held);
        BuildLock::acquire(dir.path(), "cpu", Duration::ZERO, &mut |_| {}).unwrap();
    }

    #[test]
    fn the_key_changes_with_what_decides_the_engine() {
        let parts = |graph: &'static str, target: &'static str, ort: &'static str| {
            [(MODEL_FILE, graph), (DATA_FILE, "d"), ("precision", "fp16"), ("target", target), ("onnxruntime", ort)]
        };
        let base = key_of(&parts("g1", "cpu", "1.31.1"));
        assert_eq!(base.len(), 16);
        assert_eq!(base, key_of(&parts("g1", "cpu", "1.31.1")), "deterministic");
        assert_ne!(base, key_of(&parts("g2", "cpu", "1.31.1")), "a new graph is a new version");
        assert_ne!(base, key_of(&parts("g1", "h100", "1.31.1")));
        assert_ne!(base, key_of(&parts("g1", "cpu", "1.32.0")));
    }
}
