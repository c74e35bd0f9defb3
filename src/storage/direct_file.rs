//! An append-only file written past the page cache (`O_DIRECT`) where the filesystem allows it.
//! An export writes gigabytes that are read back once, if ever: through the page cache each byte
//! costs the kernel a copy and a page to manage, and pushes the database's pages out of memory.
//!
//! Writes go out in whole aligned blocks from two buffers, one filling while the other is on its
//! way to the disk. The tail is padded to a block and the file cut back to its length. Where the
//! filesystem refuses `O_DIRECT` the same writes go through the page cache.

use std::{
    fs::{File, OpenOptions},
    io,
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::PathBuf,
    sync::Arc,
};

use tokio::task::{JoinHandle, spawn_blocking};

use super::spare::Buffer;

/// Offsets, lengths and buffer addresses of direct writes are multiples of this.
const BLOCK: usize = 4096;
/// Bytes per write (a multiple of `BLOCK`).
const BUFFER: usize = 1 << 20;

pub struct DirectFile {
    file: Arc<File>,
    direct: bool,
    filling: AlignedBuffer,
    /// The write on its way to the disk; it hands its buffer back for reuse.
    in_flight: Option<JoinHandle<io::Result<AlignedBuffer>>>,
    /// Where the next write starts.
    offset: u64,
}

impl DirectFile {
    /// Creates (or truncates) the file.
    pub async fn create(path: PathBuf) -> io::Result<DirectFile> {
        let (file, direct) = spawn_blocking(move || {
            let open = |flags| {
                OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .custom_flags(flags)
                    .open(&path)
            };
            match open(libc::O_DIRECT) {
                Ok(file) => Ok((file, true)),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok((open(0)?, false)),
                Err(e) => Err(e),
            }
        })
        .await??;
        Ok(DirectFile {
            file: Arc::new(file),
            direct,
            filling: AlignedBuffer::new(),
            in_flight: None,
            offset: 0,
        })
    }

    pub async fn write(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let taken = self.filling.fill(bytes);
            bytes = &bytes[taken..];
            if self.filling.is_full() {
                self.send().await?;
            }
        }
        Ok(())
    }

    /// Writes what is left and syncs the file's data and metadata.
    pub async fn finish(mut self) -> io::Result<()> {
        let length = self.offset + self.filling.len as u64;
        if self.direct {
            self.filling.pad_to_block();
        }
        if self.filling.len > 0 {
            self.send().await?;
        }
        self.landed().await?;
        let (file, direct) = (self.file, self.direct);
        spawn_blocking(move || {
            if direct {
                file.set_len(length)?;
            }
            file.sync_all()
        })
        .await?
    }

    /// Sends the filled buffer on its way once the previous write has landed, and takes that
    /// write's buffer to fill next.
    async fn send(&mut self) -> io::Result<()> {
        let next = self.landed().await?.unwrap_or_else(AlignedBuffer::new);
        let full = std::mem::replace(&mut self.filling, next);
        let (file, offset) = (self.file.clone(), self.offset);
        self.offset += full.len as u64;
        self.in_flight = Some(spawn_blocking(move || {
            file.write_all_at(full.bytes(), offset)?;
            Ok(full)
        }));
        Ok(())
    }

    /// Waits for the write in flight; its emptied buffer.
    async fn landed(&mut self) -> io::Result<Option<AlignedBuffer>> {
        let Some(write) = self.in_flight.take() else {
            return Ok(None);
        };
        let mut buffer = write.await??;
        buffer.len = 0;
        Ok(Some(buffer))
    }
}

/// `BUFFER` bytes that start at a `BLOCK` boundary of a spare buffer (whose memory does not
/// move when the buffer does).
struct AlignedBuffer {
    memory: Buffer,
    start: usize,
    len: usize,
}

impl AlignedBuffer {
    fn new() -> AlignedBuffer {
        let mut memory = Buffer::take();
        memory.resize(BUFFER + BLOCK, 0);
        let start = memory.as_ptr().align_offset(BLOCK);
        AlignedBuffer {
            memory,
            start,
            len: 0,
        }
    }

    /// Copies in as much of `bytes` as fits; how much that was.
    fn fill(&mut self, bytes: &[u8]) -> usize {
        let taken = bytes.len().min(BUFFER - self.len);
        let at = self.start + self.len;
        self.memory[at..at + taken].copy_from_slice(&bytes[..taken]);
        self.len += taken;
        taken
    }

    fn is_full(&self) -> bool {
        self.len == BUFFER
    }

    /// Zeros up to the next block boundary (cut off again by the file's length).
    fn pad_to_block(&mut self) {
        let padded = self.len.next_multiple_of(BLOCK);
        let at = self.start + self.len;
        self.memory[at..self.start + padded].fill(0);
        self.len = padded;
    }

    fn bytes(&self) -> &[u8] {
        &self.memory[self.start..self.start + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lengths around the block and buffer boundaries, written in uneven pieces, read back
    /// exactly (no padding left behind).
    #[tokio::test]
    async fn writes_read_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        for length in [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, BUFFER, 3 * BUFFER + 17] {
            let path = dir.path().join(format!("f-{length}"));
            let expected: Vec<u8> = (0..length)
                .map(|i| u8::try_from(i % 251).expect("below 251"))
                .collect();
            let mut file = DirectFile::create(path.clone()).await.unwrap();
            for piece in expected.chunks(BLOCK / 3 + 1000) {
                file.write(piece).await.unwrap();
            }
            file.finish().await.unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), expected, "length {length}");
        }
    }
}
