//! Finding the ONNX Runtime shared library that the `ort` crate loads at run time (`load-dynamic`).
//!
//! Search order, first hit wins:
//! 1. `ORT_DYLIB_PATH` (a file; when set but missing, that is the error — no silent fallback);
//! 2. the project-local copy `scripts/setup.sh` installs: `<root>/.r1/lib/libonnxruntime.so.1.31.1`,
//!    `<root>` from `R1_HOME`, else the first ancestor of the current directory, then of the
//!    executable's directory, that holds `.r1/lib`;
//! 3. the `onnxruntime` Python package: `<site>/onnxruntime/capi/libonnxruntime.so.*`, site
//!    directories found from the usual prefixes (virtualenv, user, pyenv, system) without running
//!    Python, then from `python3 -c 'import site; ...'`.
//!
//! When nothing is found, one error lists every place tried and the command that fixes it.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::error::{EngineError, Result};

/// The ONNX Runtime version the engine is built against (`ort` 2.0.0-rc.15, API 31).
pub const ORT_VERSION: &str = "1.31.1";
/// File name of the project-local copy.
pub const ORT_LIB_FILE: &str = "libonnxruntime.so.1.31.1";
/// The command that installs the project-local copy.
pub const FIX_COMMAND: &str = "scripts/setup.sh";

/// Where the library was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LibrarySource {
    /// `ORT_DYLIB_PATH`.
    EnvVar,
    /// `<root>/.r1/lib`.
    ProjectLocal,
    /// An `onnxruntime` Python package.
    PythonPackage,
}

impl fmt::Display for LibrarySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LibrarySource::EnvVar => "ORT_DYLIB_PATH",
            LibrarySource::ProjectLocal => "the project-local copy (.r1/lib)",
            LibrarySource::PythonPackage => "the onnxruntime Python package",
        })
    }
}

/// A found library.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrtLibrary {
    /// Absolute path of the shared library.
    pub path: PathBuf,
    /// Which rule found it.
    pub source: LibrarySource,
}

/// Inputs of the search, separated from the process environment so tests can drive it.
#[derive(Debug, Clone, Default)]
pub struct SearchContext {
    /// Value of `ORT_DYLIB_PATH`.
    pub ort_dylib_path: Option<OsString>,
    /// Value of `R1_HOME`.
    pub r1_home: Option<PathBuf>,
    /// Current directory.
    pub cwd: Option<PathBuf>,
    /// Directory of the running executable.
    pub exe_dir: Option<PathBuf>,
    /// Python site directories to look in (already resolved).
    pub site_dirs: Vec<PathBuf>,
    /// Whether to ask `python3` for more site directories when the others have no library.
    pub ask_python: bool,
}

impl SearchContext {
    /// The context of this process: its environment, directories and the usual site prefixes.
    pub fn from_process() -> Self {
        SearchContext {
            ort_dylib_path: std::env::var_os("ORT_DYLIB_PATH").filter(|v| !v.is_empty()),
            r1_home: std::env::var_os("R1_HOME").filter(|v| !v.is_empty()).map(PathBuf::from),
            cwd: std::env::current_dir().ok(),
            exe_dir: std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf)),
            site_dirs: static_site_dirs(),
            ask_python: true,
        }
    }
}

/// Finds the library for this process (see the module docs for the order).
pub fn discover() -> Result<OrtLibrary> {
    discover_with(&SearchContext::from_process())
}

/// Finds the library using `ctx` instead of the process environment.
pub fn discover_with(ctx: &SearchContext) -> Result<OrtLibrary> {
    let mut tried: Vec<String> = Vec::new();
    if let Some(v) = &ctx.ort_dylib_path {
        let p = PathBuf::from(v);
        if p.is_file() {
            return Ok(OrtLibrary { path: absolute(&p), source: LibrarySource::EnvVar });
        }
        return Err(EngineError::Unavailable {
            what: "ONNX Runtime library".into(),
            message: format!(
                "ORT_DYLIB_PATH is set to {} but no such file exists; point it at libonnxruntime.so.{ORT_VERSION}, unset it, or run `{FIX_COMMAND}`",
                p.display()
            ),
        });
    }
    tried.push("ORT_DYLIB_PATH (not set)".into());

    for root in project_roots(ctx) {
        let candidate = root.join(".r1").join("lib").join(ORT_LIB_FILE);
        if candidate.is_file() {
            return Ok(OrtLibrary { path: candidate, source: LibrarySource::ProjectLocal });
        }
        tried.push(candidate.display().to_string());
    }
    if ctx.r1_home.is_none() && ctx.cwd.is_none() && ctx.exe_dir.is_none() {
        tried.push("<repo>/.r1/lib (R1_HOME not set, no current or executable directory)".into());
    }

    if let Some(found) = search_sites(&ctx.site_dirs, &mut tried) {
        return Ok(found);
    }
    if ctx.ask_python {
        let extra: Vec<PathBuf> = python_site_dirs().into_iter().filter(|d| !ctx.site_dirs.contains(d)).collect();
        if extra.is_empty() {
            tried.push("python3 site directories (python3 not runnable or none found)".into());
        }
        if let Some(found) = search_sites(&extra, &mut tried) {
            return Ok(found);
        }
    }
    Err(EngineError::Unavailable {
        what: "ONNX Runtime library".into(),
        message: format!(
            "libonnxruntime.so ({ORT_VERSION}) was not found; tried, in order: {}. Fix: run `{FIX_COMMAND}` \
             (installs it to .r1/lib), or set ORT_DYLIB_PATH to the library, or `pip install onnxruntime=={ORT_VERSION}`; \
             or use `--backend tract`, which needs no native library",
            tried.join("; ")
        ),
    })
}

/// Directories that may hold `.r1/lib`, in search order, without duplicates.
fn project_roots(ctx: &SearchContext) -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = Vec::new();
    let mut push = |p: PathBuf| {
        if !roots.contains(&p) {
            roots.push(p);
        }
    };
    if let Some(home) = &ctx.r1_home {
        push(home.clone());
        return roots;
    }
    for start in [&ctx.cwd, &ctx.exe_dir].into_iter().flatten() {
        match start.ancestors().find(|a| a.join(".r1").join("lib").is_dir()) {
            Some(found) => push(found.to_path_buf()),
            None => push(start.clone()),
        }
    }
    roots
}

fn search_sites(sites: &[PathBuf], tried: &mut Vec<String>) -> Option<OrtLibrary> {
    for site in sites {
        let capi = site.join("onnxruntime").join("capi");
        if let Some(lib) = best_versioned_lib(&capi) {
            return Some(OrtLibrary { path: lib, source: LibrarySource::PythonPackage });
        }
        tried.push(format!("{}/libonnxruntime.so.*", capi.display()));
    }
    None
}

/// The `libonnxruntime.so.X.Y.Z` in `dir` with the highest version, if any.
fn best_versioned_lib(dir: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(dir).ok()?;
    let mut best: Option<(Vec<u64>, PathBuf)> = None;
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(ver) = name.strip_prefix("libonnxruntime.so.") else { continue };
        let parts: Option<Vec<u64>> = ver.split('.').map(|p| p.parse().ok()).collect();
        let Some(parts) = parts else { continue };
        if best.as_ref().is_none_or(|(b, _)| parts > *b) {
            best = Some((parts, e.path()));
        }
    }
    best.map(|(_, p)| p)
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Site directories guessed from well-known prefixes, without running Python.
fn static_site_dirs() -> Vec<PathBuf> {
    let mut prefixes: Vec<PathBuf> = Vec::new();
    if let Some(venv) = std::env::var_os("VIRTUAL_ENV") {
        prefixes.push(PathBuf::from(venv).join("lib"));
    }
    if let Some(conda) = std::env::var_os("CONDA_PREFIX") {
        prefixes.push(PathBuf::from(conda).join("lib"));
    }
    if let Some(home) = std::env::var_os("HOME").map(PathBuf::from) {
        prefixes.push(home.join(".local").join("lib"));
        let pyenv_root = std::env::var_os("PYENV_ROOT").map(PathBuf::from).unwrap_or_else(|| home.join(".pyenv"));
        if let Ok(versions) = std::fs::read_dir(pyenv_root.join("versions")) {
            let mut v: Vec<PathBuf> = versions.flatten().map(|e| e.path().join("lib")).collect();
            v.sort();
            prefixes.extend(v);
        }
    }
    prefixes.push(PathBuf::from("/usr/local/lib"));
    prefixes.push(PathBuf::from("/usr/lib"));
    let mut sites = Vec::new();
    for prefix in prefixes {
        let Ok(entries) = std::fs::read_dir(&prefix) else { continue };
        let mut pys: Vec<PathBuf> = entries
            .flatten()
            .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with("python3")))
            .map(|e| e.path())
            .collect();
        pys.sort();
        pys.reverse();
        for py in pys {
            for sub in ["site-packages", "dist-packages"] {
                let d = py.join(sub);
                if d.is_dir() && !sites.contains(&d) {
                    sites.push(d);
                }
            }
        }
    }
    sites
}

/// Site directories reported by `python3` (empty when it cannot run).
fn python_site_dirs() -> Vec<PathBuf> {
    let out = std::process::Command::new("python3")
        .args(["-c", "import site,sys\nfor p in site.getsitepackages()+[site.getusersitepackages()]: print(p)"])
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(PathBuf::from)
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"not really a library").unwrap();
    }

    fn ctx() -> SearchContext {
        SearchContext { ask_python: false, ..SearchContext::default() }
    }

    #[test]
    fn env_var_wins_over_everything() {
        let t = tempfile::tempdir().unwrap();
        let env_lib = t.path().join("custom/libonnxruntime.so.1.31.1");
        touch(&env_lib);
        touch(&t.path().join("repo/.r1/lib").join(ORT_LIB_FILE));
        let c = SearchContext { ort_dylib_path: Some(env_lib.clone().into()), cwd: Some(t.path().join("repo")), ..ctx() };
        let found = discover_with(&c).unwrap();
        assert_eq!(found, OrtLibrary { path: env_lib, source: LibrarySource::EnvVar });
    }

    #[test]
    fn env_var_pointing_nowhere_is_an_error_not_a_fallback() {
        let t = tempfile::tempdir().unwrap();
        touch(&t.path().join("repo/.r1/lib").join(ORT_LIB_FILE));
        let missing = t.path().join("nope.so");
        let c = SearchContext { ort_dylib_path: Some(missing.clone().into()), cwd: Some(t.path().join("repo")), ..ctx() };
        let msg = discover_with(&c).unwrap_err().to_string();
        assert!(msg.contains(&missing.display().to_string()) && msg.contains(FIX_COMMAND), "{msg}");
    }

    #[test]
    fn project_copy_found_walking_up_from_cwd_before_site_packages() {
        let t = tempfile::tempdir().unwrap();
        let lib = t.path().join("repo/.r1/lib").join(ORT_LIB_FILE);
        touch(&lib);
        let deep = t.path().join("repo/engine/src/x");
        std::fs::create_dir_all(&deep).unwrap();
        let site = t.path().join("site");
        touch(&site.join("onnxruntime/capi/libonnxruntime.so.1.31.1"));
        let c = SearchContext { cwd: Some(deep), site_dirs: vec![site], ..ctx() };
        assert_eq!(discover_with(&c).unwrap(), OrtLibrary { path: lib, source: LibrarySource::ProjectLocal });
    }

    #[test]
    fn r1_home_is_used_instead_of_walking() {
        let t = tempfile::tempdir().unwrap();
        let home_lib = t.path().join("home/.r1/lib").join(ORT_LIB_FILE);
        touch(&home_lib);
        touch(&t.path().join("repo/.r1/lib").join(ORT_LIB_FILE));
        let c = SearchContext { r1_home: Some(t.path().join("home")), cwd: Some(t.path().join("repo")), ..ctx() };
        assert_eq!(discover_with(&c).unwrap().path, home_lib);
    }

    #[test]
    fn exe_dir_is_walked_after_cwd() {
        let t = tempfile::tempdir().unwrap();
        let lib = t.path().join("install/.r1/lib").join(ORT_LIB_FILE);
        touch(&lib);
        let bin = t.path().join("install/target/debug");
        std::fs::create_dir_all(&bin).unwrap();
        let c = SearchContext { cwd: Some(t.path().join("elsewhere")), exe_dir: Some(bin), ..ctx() };
        assert_eq!(discover_with(&c).unwrap().path, lib);
    }

    #[test]
    fn site_packages_picks_highest_version() {
        let t = tempfile::tempdir().unwrap();
        let site = t.path().join("site");
        touch(&site.join("onnxruntime/capi/libonnxruntime.so.1.9.0"));
        touch(&site.join("onnxruntime/capi/libonnxruntime.so.1.31.1"));
        touch(&site.join("onnxruntime/capi/libonnxruntime_providers_shared.so"));
        let c = SearchContext { cwd: Some(t.path().to_path_buf()), site_dirs: vec![t.path().join("empty"), site.clone()], ..ctx() };
        let found = discover_with(&c).unwrap();
        assert_eq!(found.source, LibrarySource::PythonPackage);
        assert_eq!(found.path, site.join("onnxruntime/capi/libonnxruntime.so.1.31.1"));
    }

    #[test]
    fn nothing_found_names_every_place_tried_and_the_fix() {
        let t = tempfile::tempdir().unwrap();
        let site = t.path().join("site-a");
        let c = SearchContext { cwd: Some(t.path().join("repo")), site_dirs: vec![site.clone()], ..ctx() };
        let err = discover_with(&c).unwrap_err();
        assert_eq!(err.kind(), "unavailable");
        let msg = err.to_string();
        let order = [
            "ORT_DYLIB_PATH (not set)".to_string(),
            t.path().join("repo/.r1/lib").join(ORT_LIB_FILE).display().to_string(),
            format!("{}/libonnxruntime.so.*", site.join("onnxruntime/capi").display()),
            format!("`{FIX_COMMAND}`"),
        ];
        let mut last = 0;
        for needle in &order {
            let at = msg[last..].find(needle.as_str()).unwrap_or_else(|| panic!("`{needle}` missing or out of order in: {msg}"));
            last += at + needle.len();
        }
    }
}
