//! Writing the artifact directory atomically: everything goes to a temporary directory next to
//! `OUT_DIR` (same filesystem), which is renamed into place only after the manifest is written. A
//! failed export removes the temporary directory and never leaves a half-written artifact.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use r1_engine::manifest::{FileEntry, Manifest};
use sha2::{Digest, Sha256};

use crate::error::{ExportError, Result};

/// Checkpoint files copied into the artifact when present.
pub const COPIED_FILES: &[&str] = &["tokenizer.json", "tokenizer_config.json", "generation_config.json"];

/// A temporary artifact directory that becomes `OUT_DIR` on [`TempArtifact::commit`], or is removed
/// when dropped uncommitted.
pub struct TempArtifact {
    tmp: PathBuf,
    out: PathBuf,
    committed: bool,
}

impl TempArtifact {
    /// Creates `<parent>/.<name>.tmp-<pid>`. `out` must not exist or be an empty directory.
    pub fn create(out: &Path) -> Result<TempArtifact> {
        if out.exists() {
            let empty = std::fs::read_dir(out).map(|mut d| d.next().is_none()).unwrap_or(false);
            if !out.is_dir() || !empty {
                return Err(ExportError::Output {
                    path: out.to_path_buf(),
                    message: "already exists and is not an empty directory; remove it or choose another -o".into(),
                });
            }
        }
        let name = out.file_name().ok_or_else(|| ExportError::Output {
            path: out.to_path_buf(),
            message: "output path has no directory name".into(),
        })?;
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(ExportError::io(&parent))?;
        let tmp = parent.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(ExportError::io(&tmp))?;
        }
        std::fs::create_dir(&tmp).map_err(ExportError::io(&tmp))?;
        Ok(TempArtifact { tmp, out: out.to_path_buf(), committed: false })
    }

    /// The temporary directory to write into.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Writes `manifest` into the temporary directory ([`Manifest::write_atomic`], which checks it first) and
    /// renames the directory to `OUT_DIR`.
    pub fn commit(mut self, manifest: &Manifest) -> Result<PathBuf> {
        manifest.write_atomic(&self.tmp)?;
        if self.out.is_dir() {
            // An empty directory: rename(2) replaces it.
            std::fs::remove_dir(&self.out).map_err(ExportError::io(&self.out))?;
        }
        std::fs::rename(&self.tmp, &self.out).map_err(ExportError::io(&self.out))?;
        self.committed = true;
        Ok(self.out.clone())
    }
}

impl Drop for TempArtifact {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// sha256 and size of a file, read in 8 MiB chunks.
pub fn hash_file(path: &Path) -> Result<FileEntry> {
    let mut f = File::open(path).map_err(ExportError::io(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 8 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(ExportError::io(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(FileEntry { sha256: hex::encode(h.finalize()), bytes })
}

/// Copies the tokenizer and generation files that exist in `checkpoint` into `dir`; returns their
/// hashes by file name.
pub fn copy_checkpoint_files(checkpoint: &Path, dir: &Path) -> Result<BTreeMap<String, FileEntry>> {
    let mut out = BTreeMap::new();
    for name in COPIED_FILES {
        let src = checkpoint.join(name);
        if src.is_file() {
            let dst = dir.join(name);
            std::fs::copy(&src, &dst).map_err(ExportError::io(&src))?;
            out.insert(name.to_string(), hash_file(&dst)?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_artifact_leaves_nothing() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("art");
        {
            let t = TempArtifact::create(&out).unwrap();
            std::fs::write(t.path().join("x"), b"half").unwrap();
        }
        assert!(!out.exists());
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
    }

    #[test]
    fn non_empty_output_is_refused() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("f"), b"x").unwrap();
        let e = TempArtifact::create(root.path()).err().unwrap();
        assert!(e.to_string().contains("not an empty directory"), "{e}");
    }
}
