//! Finding the ONNX Runtime shared library that the `ort` crate loads at run time (`load-dynamic`).
//!
//! Search order, first hit wins:
//! 1. `ORT_DYLIB_PATH` (a file; when set but missing, that is the error — no silent fallback);
//! 2. the project-local copy `scripts/setup.sh` installs: `$R1_HOME/lib/libonnxruntime.so.1.31.1`.
//!    `R1_HOME` is the r1 home folder itself (the scripts' `.r1/`, holding `lib/`, `tokenizer/`, `venv/`);
//!    when it is not set, the first `.r1` folder holding `lib/` found walking up from the current
//!    directory, then from the executable's directory;
//! 3. the `onnxruntime` Python package: `<site>/onnxruntime/capi/libonnxruntime.so.*`, site
//!    directories found from the usual prefixes (virtualenv, user, pyenv, system) without running
//!    Python, then from `python3 -c 'import site; ...'`. `R1_ORT_PYTHON_FALLBACK=off` skips this step,
//!    so that a machine's leftover Python packages cannot hide a broken project-local set-up
//!    (`scripts/test.sh` runs with it off).
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
/// The r1 home folder (what `scripts/setup.sh` fills: `lib/`, `tokenizer/`, `venv/`); default `<repo>/.r1`.
pub const R1_HOME_VAR: &str = "R1_HOME";
/// Name of the r1 home folder looked for when `R1_HOME` is not set.
pub const R1_HOME_DIR: &str = ".r1";
/// `off` (or `0`, `false`, `no`) turns the search of Python site directories off.
pub const PYTHON_FALLBACK_VAR: &str = "R1_ORT_PYTHON_FALLBACK";
/// The command that installs the project-local copy.
pub const FIX_COMMAND: &str = "scripts/setup.sh";
/// How the library is found, for the `--help` of every binary that loads it.
pub const LIBRARY_HELP: &str = "\
ONNX Runtime library (ort backend): ORT_DYLIB_PATH when set; else $R1_HOME/lib/libonnxruntime.so.1.31.1,
where R1_HOME is the r1 home folder that scripts/setup.sh fills (lib/, tokenizer/), by default the
nearest .r1/ above the current directory or the executable; else an onnxruntime Python package
(R1_ORT_PYTHON_FALLBACK=off skips that). --backend tract needs no native library.";

/// Where the library was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LibrarySource {
    /// `ORT_DYLIB_PATH`.
    EnvVar,
    /// `$R1_HOME/lib` (by default `<repo>/.r1/lib`).
    ProjectLocal,
    /// An `onnxruntime` Python package.
    PythonPackage,
}

impl fmt::Display for LibrarySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LibrarySource::EnvVar => "ORT_DYLIB_PATH",
            LibrarySource::ProjectLocal => "the project-local copy ($R1_HOME/lib)",
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
#[derive(Debug, Clone)]
pub struct SearchContext {
    /// Value of `ORT_DYLIB_PATH`.
    pub ort_dylib_path: Option<OsString>,
    /// Value of `R1_HOME`: the r1 home folder itself (holding `lib/`).
    pub r1_home: Option<PathBuf>,
    /// Current directory.
    pub cwd: Option<PathBuf>,
    /// Directory of the running executable.
    pub exe_dir: Option<PathBuf>,
    /// Python site directories to look in (already resolved).
    pub site_dirs: Vec<PathBuf>,
    /// Whether to ask `python3` for more site directories when the others have no library.
    pub ask_python: bool,
    /// Whether Python site directories are searched at all (`R1_ORT_PYTHON_FALLBACK`, on by default).
    pub python_fallback: bool,
}

impl Default for SearchContext {
    fn default() -> Self {
        SearchContext {
            ort_dylib_path: None,
            r1_home: None,
            cwd: None,
            exe_dir: None,
            site_dirs: Vec::new(),
            ask_python: false,
            python_fallback: true,
        }
    }
}

impl SearchContext {
    /// The context of this process: its environment, directories and the usual site prefixes.
    pub fn from_process() -> Self {
        let mut ctx = SearchContext::from_vars(|k| std::env::var_os(k));
        ctx.cwd = std::env::current_dir().ok();
        ctx.exe_dir = std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf));
        if ctx.python_fallback {
            ctx.site_dirs = static_site_dirs();
            ctx.ask_python = true;
        }
        ctx
    }

    /// The part of the context read from environment variables (`var` looks one up; empty counts as unset).
    pub fn from_vars(var: impl Fn(&str) -> Option<OsString>) -> Self {
        let get = |k: &str| var(k).filter(|v| !v.is_empty());
        let fallback = get(PYTHON_FALLBACK_VAR)
            .map(|v| !matches!(v.to_string_lossy().trim().to_ascii_lowercase().as_str(), "off" | "0" | "false" | "no"))
            .unwrap_or(true);
        SearchContext {
            ort_dylib_path: get("ORT_DYLIB_PATH"),
            r1_home: get(R1_HOME_VAR).map(PathBuf::from),
            python_fallback: fallback,
            ..SearchContext::default()
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

    for home in r1_homes(ctx) {
        let candidate = home.join("lib").join(ORT_LIB_FILE);
        if candidate.is_file() {
            return Ok(OrtLibrary { path: candidate, source: LibrarySource::ProjectLocal });
        }
        let how = if ctx.r1_home.is_some() { "$R1_HOME/lib" } else { "R1_HOME not set" };
        tried.push(format!("{} ({how})", candidate.display()));
    }
    if ctx.r1_home.is_none() && ctx.cwd.is_none() && ctx.exe_dir.is_none() {
        tried.push("<repo>/.r1/lib (R1_HOME not set, no current or executable directory)".into());
    }

    if !ctx.python_fallback {
        tried.push(format!("Python site directories (skipped: {PYTHON_FALLBACK_VAR} is off)"));
    } else if let Some(found) = search_sites(&ctx.site_dirs, &mut tried) {
        return Ok(found);
    }
    if ctx.python_fallback && ctx.ask_python {
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
             (installs it to $R1_HOME/lib, by default <repo>/.r1/lib), or set ORT_DYLIB_PATH to the library, or `pip install onnxruntime=={ORT_VERSION}`; \
             or use `--backend tract`, which needs no native library",
            tried.join("; ")
        ),
    })
}

/// The r1 home folders that may hold `lib/`, in search order, without duplicates: `R1_HOME` alone when it is set,
/// else the first `.r1` with a `lib/` above the current directory, then above the executable's directory (where
/// none is found, `<start>/.r1`, so the error names where it was expected).
fn r1_homes(ctx: &SearchContext) -> Vec<PathBuf> {
    if let Some(home) = &ctx.r1_home {
        return vec![home.clone()];
    }
    let mut homes: Vec<PathBuf> = Vec::new();
    for start in [&ctx.cwd, &ctx.exe_dir].into_iter().flatten() {
        let home = match start.ancestors().find(|a| a.join(R1_HOME_DIR).join("lib").is_dir()) {
            Some(found) => found.join(R1_HOME_DIR),
            None => start.join(R1_HOME_DIR),
        };
        if !homes.contains(&home) {
            homes.push(home);
        }
    }
    homes
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
        SearchContext::default()
    }

    #[test]
    fn env_var_wins_over_everything() {
        let t = tempfile::tempdir().unwrap();
        let env_lib = t.path().join("custom/libonnxruntime.so.1.31.1");
        touch(&env_lib);
        touch(&t.path().join("repo/.r1/lib").join(ORT_LIB_FILE));
        let c =
            SearchContext { ort_dylib_path: Some(env_lib.clone().into()), cwd: Some(t.path().join("repo")), ..ctx() };
        let found = discover_with(&c).unwrap();
        assert_eq!(found, OrtLibrary { path: env_lib, source: LibrarySource::EnvVar });
    }

    #[test]
    fn env_var_pointing_nowhere_is_an_error_not_a_fallback() {
        let t = tempfile::tempdir().unwrap();
        touch(&t.path().join("repo/.r1/lib").join(ORT_LIB_FILE));
        let missing = t.path().join("nope.so");
        let c =
            SearchContext { ort_dylib_path: Some(missing.clone().into()), cwd: Some(t.path().join("repo")), ..ctx() };
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
    fn r1_home_is_the_home_folder_itself_and_is_used_instead_of_walking() {
        let t = tempfile::tempdir().unwrap();
        // What scripts/setup.sh makes with R1_HOME=<dir>: <dir>/lib/libonnxruntime.so.1.31.1.
        let home_lib = t.path().join("custom-home/lib").join(ORT_LIB_FILE);
        touch(&home_lib);
        touch(&t.path().join("repo/.r1/lib").join(ORT_LIB_FILE));
        let c =
            SearchContext { r1_home: Some(t.path().join("custom-home")), cwd: Some(t.path().join("repo")), ..ctx() };
        assert_eq!(discover_with(&c).unwrap(), OrtLibrary { path: home_lib, source: LibrarySource::ProjectLocal });
    }

    #[test]
    fn r1_home_set_to_the_scripts_default_finds_its_lib() {
        // scripts/test.sh and demo.sh export R1_HOME=<repo>/.r1; the library is <repo>/.r1/lib/..., never .r1/.r1/lib.
        let t = tempfile::tempdir().unwrap();
        let lib = t.path().join("repo/.r1/lib").join(ORT_LIB_FILE);
        touch(&lib);
        let c =
            SearchContext { r1_home: Some(t.path().join("repo/.r1")), cwd: Some(t.path().join("elsewhere")), ..ctx() };
        assert_eq!(discover_with(&c).unwrap().path, lib);
    }

    #[test]
    fn r1_home_without_the_library_names_home_lib_and_does_not_walk() {
        let t = tempfile::tempdir().unwrap();
        touch(&t.path().join("repo/.r1/lib").join(ORT_LIB_FILE));
        let home = t.path().join("empty-home");
        let c = SearchContext { r1_home: Some(home.clone()), cwd: Some(t.path().join("repo")), ..ctx() };
        let msg = discover_with(&c).unwrap_err().to_string();
        assert!(msg.contains(&home.join("lib").join(ORT_LIB_FILE).display().to_string()), "{msg}");
        assert!(!msg.contains(".r1/.r1"), "{msg}");
    }

    #[test]
    fn environment_variables_are_read_as_documented() {
        let from = |pairs: &[(&str, &str)]| {
            let pairs: Vec<(String, String)> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            SearchContext::from_vars(move |k| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| OsString::from(v)))
        };
        let unset = from(&[]);
        assert_eq!((unset.r1_home, unset.ort_dylib_path, unset.python_fallback), (None, None, true));
        let set = from(&[("R1_HOME", "/opt/r1-home"), ("ORT_DYLIB_PATH", "/x/lib.so")]);
        assert_eq!(set.r1_home, Some(PathBuf::from("/opt/r1-home")));
        assert_eq!(set.ort_dylib_path, Some(OsString::from("/x/lib.so")));
        let empty = from(&[("R1_HOME", ""), ("ORT_DYLIB_PATH", "")]);
        assert_eq!((empty.r1_home, empty.ort_dylib_path), (None, None));
        for off in ["off", "0", "false", "NO"] {
            assert!(!from(&[(PYTHON_FALLBACK_VAR, off)]).python_fallback, "{off}");
        }
        assert!(from(&[(PYTHON_FALLBACK_VAR, "on")]).python_fallback);
    }

    #[test]
    fn python_fallback_off_skips_site_packages_and_says_so() {
        let t = tempfile::tempdir().unwrap();
        let site = t.path().join("site");
        touch(&site.join("onnxruntime/capi/libonnxruntime.so.1.31.1"));
        let on = SearchContext { cwd: Some(t.path().join("repo")), site_dirs: vec![site.clone()], ..ctx() };
        assert_eq!(discover_with(&on).unwrap().source, LibrarySource::PythonPackage);
        let off = SearchContext { python_fallback: false, ask_python: true, ..on };
        let msg = discover_with(&off).unwrap_err().to_string();
        assert!(msg.contains("R1_ORT_PYTHON_FALLBACK is off"), "{msg}");
        assert!(!msg.contains(&site.display().to_string()), "site directories must not be searched: {msg}");
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
        let c = SearchContext {
            cwd: Some(t.path().to_path_buf()),
            site_dirs: vec![t.path().join("empty"), site.clone()],
            ..ctx()
        };
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
            let at = msg[last..]
                .find(needle.as_str())
                .unwrap_or_else(|| panic!("`{needle}` missing or out of order in: {msg}"));
            last += at + needle.len();
        }
    }
}
