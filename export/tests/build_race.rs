//! Engine builds started together on one artifact — what every replica's init container does on a shared volume
//! (deploy/helm) — build once, and a reader never sees a partial engine (export/src/build_lock.rs).
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use r1_engine::manifest::Manifest;
use r1_export::fixture::{preset, write_checkpoint};

fn r1_export(args: &[&std::ffi::OsStr]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_r1-export"));
    c.args(args);
    c
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// What a server would load right now: the manifest parses, and when it names a CPU build, every file of that
/// build is there at its recorded size. `Err` describes a violation; `Ok(true)` when a build was named.
fn reader_view(out: &Path) -> Result<bool, String> {
    let m = Manifest::load(out).map_err(|e| format!("manifest unreadable: {e}"))?;
    let Some(rec) = m.targets.cpu() else { return Ok(false) };
    for f in &rec.files {
        let want = m.files.get(f).map(|e| e.bytes).ok_or(format!("{f}: not in manifest.files"))?;
        let got = std::fs::metadata(out.join(f)).map(|m| m.len()).map_err(|e| format!("{f}: {e}"))?;
        if got != want {
            return Err(format!("{f}: {got} bytes on disk, the manifest says {want}"));
        }
    }
    Ok(m.targets.cpu_graph(out) == Some(rec.graph.as_str()))
}

/// A tiny exported artifact (no target built yet): (tempdir, artifact dir).
fn exported() -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    write_checkpoint(&preset("tiny-qwen2").unwrap(), &ck).unwrap();
    let out = tmp.path().join("out");
    let o = r1_export(&[ck.as_os_str(), "-o".as_ref(), out.as_os_str(), "--quiet".as_ref()]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    (tmp, out)
}

#[test]
fn two_builds_at_once_build_once_and_a_reader_never_sees_a_partial_engine() {
    let (_tmp, out) = exported();

    // A reader polls the artifact the whole time, as a server starting at any moment would.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, out) = (stop.clone(), out.clone());
        std::thread::spawn(move || {
            let (mut looks, mut built_seen) = (0usize, 0usize);
            while !stop.load(Ordering::Relaxed) {
                match reader_view(&out) {
                    Ok(built) => built_seen += usize::from(built),
                    Err(e) => return Err(e),
                }
                looks += 1;
            }
            Ok((looks, built_seen))
        })
    };

    let build = || {
        r1_export(&["build".as_ref(), out.as_os_str(), "--target".as_ref(), "cpu".as_ref()])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (build(), build());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    stop.store(true, Ordering::Relaxed);
    let (looks, built_seen) = reader.join().unwrap().unwrap_or_else(|e| panic!("a reader saw a partial build: {e}"));
    assert!(a.status.success() && b.status.success(), "a: {}\nb: {}", stderr(&a), stderr(&b));

    // Exactly one built; the other found that build recorded (after waiting for the lock, or after it finished).
    let wrote = [&a, &b].iter().filter(|o| stderr(o).contains("cpu: wrote")).count();
    let current = [&a, &b].iter().filter(|o| stderr(o).contains("cpu: already built for this artifact")).count();
    assert_eq!((wrote, current), (1, 1), "a: {}\nb: {}", stderr(&a), stderr(&b));
    assert!(looks > 0 && built_seen > 0, "the reader looked {looks} times and saw the build {built_seen} times");

    // One version folder, no temporary folder left, and it is what the manifest names.
    let m = Manifest::load(&out).unwrap();
    let graph = m.targets.cpu().unwrap().graph.clone();
    let versions: Vec<String> = std::fs::read_dir(out.join("engines/cpu"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(versions.len(), 1, "{versions:?}");
    assert_eq!(graph, format!("engines/cpu/{}/model.onnx", versions[0]));
    assert!(reader_view(&out).unwrap());
}

#[test]
fn a_build_waiting_past_wait_secs_fails_naming_the_lock_and_its_holder() {
    let (_tmp, out) = exported();
    // This process holds the lock, as a build in another pod would.
    let _held = r1_export::build_lock::BuildLock::acquire(&out, "cpu", std::time::Duration::ZERO, &mut |_| {}).unwrap();
    let o = r1_export(&[
        "build".as_ref(),
        out.as_os_str(),
        "--target".as_ref(),
        "cpu".as_ref(),
        "--wait-secs".as_ref(),
        "1".as_ref(),
    ])
    .output()
    .unwrap();
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("waiting for it"), "{e}");
    assert!(
        e.contains("engines/.cpu.lock")
            && e.contains(&format!("pid {}", std::process::id()))
            && e.contains("--wait-secs 1"),
        "{e}"
    );
    assert!(Manifest::load(&out).unwrap().targets.cpu().is_none(), "nothing recorded");
}
