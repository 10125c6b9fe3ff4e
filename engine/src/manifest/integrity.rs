//! Verifying an artifact's files against the sha256 and sizes `manifest.json` lists.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::names::{MANIFEST_FILE, MODEL_FILE};
use super::{FileEntry, Manifest};

/// Why an artifact failed [`Manifest::verify_files`]. Every message names the file and, where it applies, the
/// expected and the actual value.
#[derive(Debug, thiserror::Error)]
pub enum IntegrityError {
    /// A file listed in `manifest.json` is not in the artifact directory.
    #[error("artifact file `{file}` is listed in manifest.json but missing from {dir}")]
    Missing {
        /// Relative path as listed.
        file: String,
        /// The artifact directory.
        dir: PathBuf,
    },
    /// A file the loader needs is not listed in `manifest.json`, so it could not be verified.
    #[error("manifest.json does not list `{file}` in `files`, so its integrity cannot be checked")]
    Unlisted {
        /// Relative path.
        file: String,
    },
    /// A listed path is absolute or leaves the artifact directory.
    #[error("manifest.json lists `{file}`, which is not a relative path inside the artifact directory")]
    UnsafePath {
        /// The path as listed.
        file: String,
    },
    /// The file's size differs from the manifest's (checked before hashing).
    #[error("artifact file `{file}` has {actual} bytes, manifest.json says {expected} bytes (truncated or replaced)")]
    Size {
        /// Relative path.
        file: String,
        /// Size in the manifest.
        expected: u64,
        /// Size on disk.
        actual: u64,
    },
    /// The file's sha256 differs from the manifest's.
    #[error("artifact file `{file}` has sha256 {actual}, manifest.json says {expected} (modified or corrupted)")]
    Hash {
        /// Relative path.
        file: String,
        /// sha256 in the manifest (lowercase hex).
        expected: String,
        /// sha256 of the file on disk.
        actual: String,
    },
    /// A file could not be opened or read.
    #[error("cannot read artifact file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// What [`Manifest::verify_files`] checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntegrityReport {
    /// Files whose size and sha256 matched.
    pub files: usize,
    /// Bytes hashed.
    pub bytes: u64,
    /// Files in the directory (besides `manifest.json`) that the manifest does not list; they were not verified.
    pub unlisted: Vec<String>,
}

impl Manifest {
    /// Verifies every file listed in `files` against its size and sha256 (sizes of all files first, so a truncated
    /// multi-GB file is refused before anything is hashed; then hashes, streamed in 8 MiB chunks). `model.onnx`
    /// must be listed. Files present but not listed are returned in the report, not refused.
    pub fn verify_files(&self, dir: &Path) -> std::result::Result<IntegrityReport, IntegrityError> {
        verify_entries(&self.files, dir, &[MODEL_FILE])
    }
}

/// [`Manifest::verify_files`] over a `files` map; every name in `required` must be listed.
pub fn verify_entries(
    files: &BTreeMap<String, FileEntry>,
    dir: &Path,
    required: &[&str],
) -> std::result::Result<IntegrityReport, IntegrityError> {
    use std::path::Component;
    for r in required {
        if !files.contains_key(*r) {
            return Err(IntegrityError::Unlisted { file: (*r).to_string() });
        }
    }
    let mut paths = Vec::with_capacity(files.len());
    for (rel, entry) in files {
        let p = Path::new(rel);
        if rel.is_empty() || !p.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(IntegrityError::UnsafePath { file: rel.clone() });
        }
        let path = dir.join(p);
        let meta = match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => m,
            Ok(_) => return Err(IntegrityError::Missing { file: rel.clone(), dir: dir.to_path_buf() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(IntegrityError::Missing { file: rel.clone(), dir: dir.to_path_buf() })
            }
            Err(source) => return Err(IntegrityError::Io { path, source }),
        };
        if meta.len() != entry.bytes {
            return Err(IntegrityError::Size { file: rel.clone(), expected: entry.bytes, actual: meta.len() });
        }
        paths.push((rel, entry, path));
    }
    let mut bytes = 0u64;
    for (rel, entry, path) in &paths {
        let (actual, n) = sha256_file(path)?;
        if n != entry.bytes {
            return Err(IntegrityError::Size { file: (*rel).clone(), expected: entry.bytes, actual: n });
        }
        if !actual.eq_ignore_ascii_case(&entry.sha256) {
            return Err(IntegrityError::Hash { file: (*rel).clone(), expected: entry.sha256.clone(), actual });
        }
        bytes += n;
    }
    let mut unlisted = Vec::new();
    list_unlisted(dir, dir, files, &mut unlisted);
    unlisted.sort();
    Ok(IntegrityReport { files: paths.len(), bytes, unlisted })
}

/// Lowercase hex sha256 and length of a file, read in 8 MiB chunks.
fn sha256_file(path: &Path) -> std::result::Result<(String, u64), IntegrityError> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let io = |source| IntegrityError::Io { path: path.to_path_buf(), source };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 8 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).map_err(io)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((hex::encode(h.finalize()), n))
}

/// Appends the relative paths (with `/`) of regular files under `at` that `files` does not list.
fn list_unlisted(root: &Path, at: &Path, files: &BTreeMap<String, FileEntry>, out: &mut Vec<String>) {
    let Ok(rd) = std::fs::read_dir(at) else { return };
    for e in rd.flatten() {
        let path = e.path();
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            list_unlisted(root, &path, files, out);
        } else if let Ok(rel) = path.strip_prefix(root) {
            let rel: Vec<String> = rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
            let rel = rel.join("/");
            if rel != MANIFEST_FILE && !files.contains_key(&rel) {
                out.push(rel);
            }
        }
    }
}

#[cfg(test)]
mod integrity_tests {
    use super::*;

    fn artifact() -> (tempfile::TempDir, BTreeMap<String, FileEntry>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut files = BTreeMap::new();
        for (name, body) in [("model.onnx", b"graph bytes".as_slice()), ("sub/model.onnx.data", &[7u8; 10_000][..])] {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(&path, body).expect("write");
            let (sha256, bytes) = sha256_file(&path).expect("hash");
            files.insert(name.to_string(), FileEntry { sha256, bytes });
        }
        (dir, files)
    }

    #[test]
    fn intact_artifact_passes_and_reports_unlisted_files() {
        let (dir, files) = artifact();
        std::fs::write(dir.path().join(MANIFEST_FILE), "{}").expect("write");
        std::fs::write(dir.path().join("notes.txt"), "x").expect("write");
        let r = verify_entries(&files, dir.path(), &["model.onnx"]).expect("intact");
        assert_eq!((r.files, r.bytes, r.unlisted), (2, 11 + 10_000, vec!["notes.txt".to_string()]));
        // Known value: sha256("graph bytes") computed independently of sha256_file's chunking.
        use sha2::Digest;
        assert_eq!(files["model.onnx"].sha256, hex::encode(sha2::Sha256::digest(b"graph bytes")));
    }

    #[test]
    fn one_flipped_byte_is_refused_naming_file_and_both_hashes() {
        let (dir, files) = artifact();
        let path = dir.path().join("sub/model.onnx.data");
        let mut body = std::fs::read(&path).expect("read");
        body[5_000] ^= 1;
        std::fs::write(&path, &body).expect("write");
        let err = verify_entries(&files, dir.path(), &[]).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, IntegrityError::Hash { .. }), "{msg}");
        assert!(msg.contains("sub/model.onnx.data") && msg.contains(&files["sub/model.onnx.data"].sha256), "{msg}");
        use sha2::Digest;
        assert!(msg.contains(&hex::encode(sha2::Sha256::digest(&body))), "{msg}");
    }

    #[test]
    fn missing_truncated_unlisted_and_escaping_paths_are_refused() {
        let (dir, files) = artifact();
        let msg = verify_entries(&files, dir.path(), &["tokenizer.json"]).unwrap_err().to_string();
        assert!(msg.contains("does not list `tokenizer.json`"), "{msg}");

        std::fs::write(dir.path().join("model.onnx"), b"graph byte").expect("truncate");
        let msg = verify_entries(&files, dir.path(), &[]).unwrap_err().to_string();
        assert!(msg.contains("`model.onnx` has 10 bytes, manifest.json says 11 bytes"), "{msg}");

        std::fs::remove_file(dir.path().join("model.onnx")).expect("rm");
        let err = verify_entries(&files, dir.path(), &[]).unwrap_err();
        assert!(matches!(err, IntegrityError::Missing { ref file, .. } if file == "model.onnx"), "{err}");

        for bad in ["../outside", "/etc/passwd", "a/../../b", ""] {
            let mut f = BTreeMap::new();
            f.insert(bad.to_string(), FileEntry { sha256: String::new(), bytes: 0 });
            let err = verify_entries(&f, dir.path(), &[]).unwrap_err();
            assert!(matches!(err, IntegrityError::UnsafePath { .. }), "{bad}: {err}");
        }
    }
}
