//! Filesystem storage rooted at one folder. A file is written to a temporary name beside its
//! final one (past the page cache, see `direct_file`), synced, renamed into place, and the
//! folder synced: readers never see a torn file, and a committed file survives a power loss.

use std::path::{Path, PathBuf};

use anyhow::Context;
use async_trait::async_trait;
use futures::StreamExt;
use tokio::fs;
use tokio_util::io::ReaderStream;

use super::{AttemptTag, ByteStream, Error, Fence, PartWriter, Storage, direct_file::DirectFile};

/// Files being written end in this; they never show in a manifest.
const TEMP_SUFFIX: &str = ".tmp";

pub struct FilesystemStorage {
    root: PathBuf,
}

impl FilesystemStorage {
    pub fn new(root: impl Into<PathBuf>) -> FilesystemStorage {
        FilesystemStorage { root: root.into() }
    }

    fn path(&self, container: &str, name: &str) -> anyhow::Result<PathBuf> {
        // Names are built by the server, but never let one climb out of the root.
        let safe =
            |s: &str| !s.is_empty() && s.split('/').all(|p| !p.is_empty() && p != "." && p != "..");
        anyhow::ensure!(
            safe(container) && !container.contains('/') && safe(name),
            "invalid storage path {container}/{name}"
        );
        Ok(self.root.join(container).join(name))
    }
}

#[async_trait]
impl Storage for FilesystemStorage {
    fn kind(&self) -> &'static str {
        "filesystem"
    }

    async fn create(
        &self,
        container: &str,
        name: &str,
        owner: AttemptTag,
    ) -> Result<Box<dyn PartWriter>, Error> {
        let path = self.path(container, name)?;
        let dir = path.parent().expect("a file path has a parent");
        fs::create_dir_all(dir)
            .await
            .with_context(|| format!("creating {}", dir.display()))?;
        let file_name = path.file_name().expect("has a name").to_string_lossy();
        // Named by its attempt (a rescue finds it) and unique (two writers never share one).
        let temp = dir.join(format!(
            ".{file_name}.{owner}.{}{TEMP_SUFFIX}",
            uuid::Uuid::new_v4().simple()
        ));
        let file = DirectFile::create(temp.clone())
            .await
            .with_context(|| format!("creating {}", temp.display()))?;
        Ok(Box::new(FilesystemWriter {
            file: Some(file),
            temp,
            path,
        }))
    }

    async fn read(&self, container: &str, name: &str) -> anyhow::Result<Option<ByteStream>> {
        let path = self.path(container, name)?;
        match fs::File::open(&path).await {
            // A folder of that name is no file.
            Ok(file) if !file.metadata().await?.is_file() => Ok(None),
            Ok(file) => Ok(Some(ReaderStream::with_capacity(file, 64 * 1024).boxed())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("opening {}", path.display())),
        }
    }

    async fn delete_folder(&self, container: &str, folder: &str) -> anyhow::Result<()> {
        remove_dir(&self.path(container, folder)?).await
    }

    async fn delete_container(&self, container: &str) -> anyhow::Result<()> {
        anyhow::ensure!(
            !container.contains('/') && !container.starts_with('.'),
            "invalid container"
        );
        remove_dir(&self.root.join(container)).await
    }

    async fn discard_unfinished(
        &self,
        container: &str,
        folder: &str,
        owner: AttemptTag,
    ) -> Result<(), Error> {
        let dir = self.path(container, folder)?;
        let mut entries = match fs::read_dir(&dir).await {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(anyhow::Error::new(e)
                    .context(format!("listing {}", dir.display()))
                    .into());
            }
        };
        let mark = format!(".{owner}.");
        while let Some(entry) = entries.next_entry().await? {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.ends_with(TEMP_SUFFIX) && name.contains(&mark) {
                match fs::remove_file(entry.path()).await {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(anyhow::Error::new(e)
                            .context(format!("removing {name}"))
                            .into());
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    async fn check(&self) -> anyhow::Result<()> {
        fs::create_dir_all(&self.root)
            .await
            .with_context(|| format!("cannot create the storage folder {}", self.root.display()))?;
        let probe = self
            .root
            .join(format!(".probe-{}", uuid::Uuid::new_v4().simple()));
        fs::write(&probe, b"ok").await.with_context(|| {
            format!("cannot write to the storage folder {}", self.root.display())
        })?;
        fs::remove_file(&probe).await.ok();
        Ok(())
    }

    async fn probe(&self) -> anyhow::Result<()> {
        usable_folder(&self.root).await
    }
}

/// The storage folder exists and may be written to (its mode allows it).
async fn usable_folder(root: &Path) -> anyhow::Result<()> {
    let meta = fs::metadata(root)
        .await
        .with_context(|| format!("the storage folder {} is missing", root.display()))?;
    anyhow::ensure!(
        meta.is_dir(),
        "the storage folder {} is not a folder",
        root.display()
    );
    anyhow::ensure!(
        !meta.permissions().readonly(),
        "the storage folder {} is read-only",
        root.display()
    );
    Ok(())
}

async fn remove_dir(path: &Path) -> anyhow::Result<()> {
    match fs::remove_dir_all(path).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("deleting {}", path.display()))
        }
        _ => Ok(()),
    }
}

struct FilesystemWriter {
    file: Option<DirectFile>,
    temp: PathBuf,
    path: PathBuf,
}

#[async_trait]
impl PartWriter for FilesystemWriter {
    async fn write(&mut self, bytes: &[u8]) -> Result<(), Error> {
        let file = self.file.as_mut().expect("written before commit");
        file.write(bytes)
            .await
            .with_context(|| format!("writing {}", self.temp.display()))?;
        Ok(())
    }

    async fn commit(mut self: Box<Self>, fence: Fence<'_>) -> Result<bool, Error> {
        let file = self.file.take().expect("committed once");
        file.finish()
            .await
            .with_context(|| format!("writing and syncing {}", self.temp.display()))?;
        if !fence.await {
            return Ok(false); // Drop removes the temporary file.
        }
        fs::rename(&self.temp, &self.path)
            .await
            .with_context(|| format!("renaming into {}", self.path.display()))?;
        // The rename lives in the folder's entry list: sync it too.
        let dir = self.path.parent().expect("a file path has a parent");
        let sync = async { fs::File::open(dir).await?.sync_all().await };
        sync.await
            .with_context(|| format!("syncing {}", dir.display()))?;
        Ok(true)
    }
}

impl Drop for FilesystemWriter {
    fn drop(&mut self) {
        // Not committed (error, lost lease): leave nothing half-written behind.
        if self.temp.exists() {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}
