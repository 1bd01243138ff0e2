//! Attachment files downloaded from the back office (drawings, manuals), named by their
//! SHA-256 like photos. A download grows a partial file; its length is the progress, so
//! a download resumes where the file ends, after a cut or a restart. Nothing here is
//! user data: a partial file that a power cut damaged fails its SHA-256 at the end and
//! is fetched again.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::photos::fsync_dir;

#[derive(Clone)]
pub struct AttachmentDir {
    root: PathBuf,
    partial: PathBuf,
}

/// What appending a chunk did.
#[derive(Debug, PartialEq, Eq)]
pub enum Appended {
    /// The chunk extended the file; the new length.
    Grew(u64),
    /// The chunk does not start where the file ends (a repeat or a gap): ignored.
    NotNext { have: u64 },
}

impl AttachmentDir {
    pub fn open(root: &Path) -> std::io::Result<AttachmentDir> {
        let partial = root.join("partial");
        std::fs::create_dir_all(&partial)?;
        Ok(AttachmentDir {
            root: root.to_owned(),
            partial,
        })
    }

    /// Where a complete attachment lives.
    pub fn path_of(&self, sha256: &str) -> PathBuf {
        self.root.join(sha256)
    }

    fn partial_of(&self, sha256: &str) -> PathBuf {
        self.partial.join(sha256)
    }

    pub fn is_complete(&self, sha256: &str) -> bool {
        self.path_of(sha256).is_file()
    }

    /// Bytes downloaded so far.
    pub fn received(&self, sha256: &str) -> u64 {
        std::fs::metadata(self.partial_of(sha256))
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// Appends `data` if it starts at the end of what was received. Blocking.
    pub fn append(&self, sha256: &str, offset: u64, data: &[u8]) -> std::io::Result<Appended> {
        let path = self.partial_of(sha256);
        let mut file = OpenOptions::new().create(true).append(true).open(&path)?;
        let have = file.metadata()?.len();
        if offset != have {
            return Ok(Appended::NotNext { have });
        }
        file.write_all(data)?;
        Ok(Appended::Grew(have + data.len() as u64))
    }

    /// Checks the finished download against its name; a match is made durable under its
    /// final name, a mismatch is thrown away. Returns whether it matched. Blocking.
    pub fn finish(&self, sha256: &str) -> std::io::Result<bool> {
        let path = self.partial_of(sha256);
        let mut file = File::open(&path)?;
        if sha256_of(&mut file)? != sha256 {
            std::fs::remove_file(&path)?;
            return Ok(false);
        }
        file.sync_all()?;
        std::fs::rename(&path, self.path_of(sha256))?;
        fsync_dir(&self.root)?;
        Ok(true)
    }

    /// Whether a complete attachment's bytes still match its name. Blocking.
    pub fn verify(&self, sha256: &str) -> std::io::Result<bool> {
        Ok(sha256_of(&mut File::open(self.path_of(sha256))?)? == sha256)
    }

    /// The attachments on the device, complete or partial.
    pub fn list(&self) -> Vec<String> {
        let mut out = Vec::new();
        for dir in [&self.root, &self.partial] {
            if let Ok(entries) = std::fs::read_dir(dir) {
                out.extend(entries.flatten().filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    (name.len() == 64 && e.path().is_file()).then_some(name)
                }));
            }
        }
        out
    }

    /// Forgets an attachment no work order names any more, complete or partial.
    pub fn remove(&self, sha256: &str) {
        for path in [self.path_of(sha256), self.partial_of(sha256)] {
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove attachment file");
                }
            }
        }
    }
}

fn sha256_of(file: &mut File) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_download_grows_resumes_and_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let a = AttachmentDir::open(&dir.path().join("attachments")).unwrap();
        let data = b"a drawing of the pump station".to_vec();
        let sha = hex::encode(Sha256::digest(&data));
        assert_eq!(a.append(&sha, 0, &data[..10]).unwrap(), Appended::Grew(10));
        // A repeat and a gap are both refused, and the file stays as it was.
        assert_eq!(
            a.append(&sha, 0, &data[..10]).unwrap(),
            Appended::NotNext { have: 10 }
        );
        assert_eq!(
            a.append(&sha, 15, &data[15..]).unwrap(),
            Appended::NotNext { have: 10 }
        );
        assert_eq!(a.received(&sha), 10);
        assert_eq!(
            a.append(&sha, 10, &data[10..]).unwrap(),
            Appended::Grew(data.len() as u64)
        );
        assert!(a.finish(&sha).unwrap());
        assert!(a.is_complete(&sha));
        assert_eq!(std::fs::read(a.path_of(&sha)).unwrap(), data);

        let wrong = "0".repeat(64);
        a.append(&wrong, 0, b"not what the name says").unwrap();
        assert!(!a.finish(&wrong).unwrap());
        assert_eq!(a.received(&wrong), 0);
        assert!(!a.is_complete(&wrong));
    }
}
