//! Photo files, content-addressed by SHA-256 under `<state>/photos/ab/abcdef…`.
//!
//! A photo reaches its final name only after its bytes are fsync'd in a temporary file,
//! renamed, and the folder fsync'd; only then does the row naming it commit (promise 1).
//! The daemon reads photos from descriptors the app passes over the socket, never from
//! paths a client names.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum PhotoError {
    #[error("the descriptor is not a regular file")]
    NotRegularFile,
    #[error("the photo is {size} bytes; the limit is {limit}")]
    TooLarge { size: u64, limit: u64 },
    #[error("cannot read the photo from its descriptor: {0}")]
    Read(std::io::Error),
    #[error("the photo is empty (0 bytes): there is nothing to attach")]
    Empty,
    #[error("photo storage {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Why a photo's file failed [`PhotoDir::verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Gone, or holding other bytes: it will not get better.
    Damaged(String),
    /// Could not be read just now (an I/O error, too many open files): it may.
    Unreadable(String),
}

/// A photo safely on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPhoto {
    pub sha256: String,
    pub size: u64,
}

pub struct PhotoDir {
    root: PathBuf,
    tmp: PathBuf,
}

impl PhotoDir {
    /// Creates the folders and clears temporary files a power cut left behind.
    pub fn open(root: &Path) -> Result<PhotoDir, PhotoError> {
        let tmp = root.join("tmp");
        std::fs::create_dir_all(&tmp).map_err(|source| PhotoError::Io {
            path: tmp.clone(),
            source,
        })?;
        // photos/ and tmp/ themselves made durable in their parents.
        for dir in [root, root.parent().unwrap_or(root)] {
            fsync_dir(dir).map_err(|source| PhotoError::Io {
                path: dir.to_owned(),
                source,
            })?;
        }
        if let Ok(entries) = std::fs::read_dir(&tmp) {
            for entry in entries.flatten() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(PhotoDir {
            root: root.to_owned(),
            tmp,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn path_of(&self, sha256: &str) -> PathBuf {
        self.root.join(&sha256[..2.min(sha256.len())]).join(sha256)
    }

    /// Copies the photo behind `fd` into the store, durably. Blocking: call it from a
    /// blocking thread.
    pub fn ingest(&self, fd: OwnedFd, limit: u64) -> Result<StoredPhoto, PhotoError> {
        let source = File::from(fd);
        let meta = source.metadata().map_err(PhotoError::Read)?;
        if !meta.file_type().is_file() {
            return Err(PhotoError::NotRegularFile);
        }
        if meta.len() > limit {
            return Err(PhotoError::TooLarge {
                size: meta.len(),
                limit,
            });
        }
        let tmp_path = self.tmp.join(uuid::Uuid::now_v7().to_string());
        let io = |source| PhotoError::Io {
            path: tmp_path.clone(),
            source,
        };
        let mut tmp = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp_path)
            .map_err(io)?;
        let result = (|| {
            let mut hasher = Sha256::new();
            let mut offset = 0u64;
            let mut buf = vec![0u8; 64 * 1024];
            // Positional reads: the app's file offset is shared with us and may be
            // anywhere, and a growing file must not push us past the limit.
            loop {
                let n = source.read_at(&mut buf, offset).map_err(PhotoError::Read)?;
                if n == 0 {
                    break;
                }
                offset += n as u64;
                if offset > limit {
                    return Err(PhotoError::TooLarge {
                        size: offset,
                        limit,
                    });
                }
                hasher.update(&buf[..n]);
                tmp.write_all(&buf[..n]).map_err(io)?;
            }
            // Nothing to upload would ever be asked for, or confirmed.
            if offset == 0 {
                return Err(PhotoError::Empty);
            }
            tmp.sync_all().map_err(io)?;
            Ok(StoredPhoto {
                sha256: hex::encode(hasher.finalize()),
                size: offset,
            })
        })();
        let photo = match result {
            Ok(p) => p,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp_path);
                return Err(e);
            }
        };
        drop(tmp);
        let final_path = self.path_of(&photo.sha256);
        let dir = final_path.parent().unwrap_or(&self.root).to_owned();
        let dir_io = |source| PhotoError::Io {
            path: dir.clone(),
            source,
        };
        let placed = (|| {
            // The folder's own entry is synced every time, not only when this call made
            // it: one made by a call whose sync failed (or was cut short) would
            // otherwise never be, and a power cut could take every photo renamed into
            // it since.
            std::fs::create_dir_all(&dir).map_err(dir_io)?;
            fsync_dir(&self.root).map_err(dir_io)?;
            // Same content already stored: keep the existing file, unless it no longer
            // holds that content (a damaged one is how an inspector ends up attaching
            // the same photo again).
            if final_path.exists() && self.verify(&photo.sha256).is_ok() {
                let _ = std::fs::remove_file(&tmp_path);
            } else {
                std::fs::rename(&tmp_path, &final_path).map_err(dir_io)?;
            }
            fsync_dir(&dir).map_err(dir_io)
        })();
        if placed.is_err() {
            // A full copy left in tmp/ until the next start would eat the reserve that
            // lets what is stored go on syncing; after the rename there is none to remove.
            let _ = std::fs::remove_file(&tmp_path);
        }
        placed.map(|()| photo)
    }

    /// Checks that a photo's file still holds the bytes its name is the SHA-256 of.
    /// Blocking: it reads the whole file.
    pub fn verify(&self, sha256: &str) -> Result<(), Check> {
        let path = self.path_of(sha256);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Check::Damaged(format!("{} is gone", path.display())))
            }
            Err(e) => {
                return Err(Check::Unreadable(format!(
                    "cannot open {}: {e}",
                    path.display()
                )))
            }
        };
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut offset = 0u64;
        loop {
            let n = file
                .read_at(&mut buf, offset)
                .map_err(|e| Check::Unreadable(format!("cannot read {}: {e}", path.display())))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            offset += n as u64;
        }
        let found = hex::encode(hasher.finalize());
        if found == sha256 {
            Ok(())
        } else {
            Err(Check::Damaged(format!(
                "{} no longer matches its SHA-256 ({offset} bytes hash to {found})",
                path.display()
            )))
        }
    }

    /// Every photo hash with a file in the store.
    pub fn list(&self) -> Result<Vec<String>, PhotoError> {
        let mut out = Vec::new();
        let io = |source| PhotoError::Io {
            path: self.root.clone(),
            source,
        };
        for entry in std::fs::read_dir(&self.root).map_err(io)? {
            let entry = entry.map_err(io)?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.len() != 2 || !entry.path().is_dir() {
                continue;
            }
            for file in std::fs::read_dir(entry.path()).map_err(io)?.flatten() {
                let f = file.file_name().to_string_lossy().into_owned();
                if f.len() == 64 && f.bytes().all(|b| b.is_ascii_hexdigit()) {
                    out.push(f);
                }
            }
        }
        Ok(out)
    }

    /// Removes a photo's file; the caller has checked that no row names it.
    /// Removes a photo's file; returns false when it is still there.
    pub fn remove(&self, sha256: &str) -> bool {
        let path = self.path_of(sha256);
        match std::fs::remove_file(&path) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove photo file");
                false
            }
        }
    }
}

/// fsync on a directory makes a rename or a new entry in it durable.
pub fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_that_cannot_be_put_in_place_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let photos = PhotoDir::open(&dir.path().join("photos")).unwrap();
        let src = dir.path().join("p.jpg");
        std::fs::write(&src, b"hello photo").unwrap();
        let first = photos
            .ingest(File::open(&src).unwrap().into(), 1 << 20)
            .unwrap();
        // Its folder replaced by a file: the next copy cannot be renamed into it.
        let shard = photos.path_of(&first.sha256).parent().unwrap().to_owned();
        std::fs::remove_dir_all(&shard).unwrap();
        std::fs::write(&shard, b"not a folder").unwrap();
        assert!(photos
            .ingest(File::open(&src).unwrap().into(), 1 << 20)
            .is_err());
        assert_eq!(std::fs::read_dir(&photos.tmp).unwrap().count(), 0);
    }

    #[test]
    fn ingest_hashes_stores_and_deduplicates() {
        let dir = tempfile::tempdir().unwrap();
        let photos = PhotoDir::open(&dir.path().join("photos")).unwrap();
        let src = dir.path().join("p.jpg");
        std::fs::write(&src, b"hello photo").unwrap();
        let a = photos
            .ingest(File::open(&src).unwrap().into(), 1 << 20)
            .unwrap();
        let b = photos
            .ingest(File::open(&src).unwrap().into(), 1 << 20)
            .unwrap();
        assert_eq!(a, b);
        assert_eq!(a.size, 11);
        assert_eq!(
            std::fs::read(photos.path_of(&a.sha256)).unwrap(),
            b"hello photo"
        );
        assert_eq!(photos.list().unwrap(), vec![a.sha256.clone()]);
    }

    #[test]
    fn a_damaged_file_fails_its_check_and_the_same_photo_again_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let photos = PhotoDir::open(&dir.path().join("photos")).unwrap();
        let src = dir.path().join("src");
        std::fs::write(&src, b"hello photo").unwrap();
        let a = photos
            .ingest(File::open(&src).unwrap().into(), 100)
            .unwrap();
        assert_eq!(photos.verify(&a.sha256), Ok(()));
        std::fs::write(photos.path_of(&a.sha256), b"hellO photo").unwrap();
        let Err(Check::Damaged(problem)) = photos.verify(&a.sha256) else {
            panic!("damaged")
        };
        assert!(problem.contains("no longer matches"), "{problem}");
        photos
            .ingest(File::open(&src).unwrap().into(), 100)
            .unwrap();
        assert_eq!(photos.verify(&a.sha256), Ok(()));
        std::fs::remove_file(photos.path_of(&a.sha256)).unwrap();
        let Err(Check::Damaged(problem)) = photos.verify(&a.sha256) else {
            panic!("gone")
        };
        assert!(problem.contains("is gone"), "{problem}");
        // Nothing to attach in an empty file.
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        assert!(matches!(
            photos.ingest(File::open(&empty).unwrap().into(), 100),
            Err(PhotoError::Empty)
        ));
    }

    #[test]
    fn ingest_refuses_directories_and_oversize() {
        let dir = tempfile::tempdir().unwrap();
        let photos = PhotoDir::open(&dir.path().join("photos")).unwrap();
        let d = File::open(dir.path()).unwrap();
        assert!(matches!(
            photos.ingest(d.into(), 10),
            Err(PhotoError::NotRegularFile)
        ));
        let src = dir.path().join("big");
        std::fs::write(&src, vec![1u8; 100]).unwrap();
        assert!(matches!(
            photos.ingest(File::open(&src).unwrap().into(), 10),
            Err(PhotoError::TooLarge { .. })
        ));
        assert!(std::fs::read_dir(dir.path().join("photos/tmp"))
            .unwrap()
            .next()
            .is_none());
    }
}
