//! Write buffers of about a megabyte, kept for the next file when one is done with them. An
//! export writes its parts one after another, and freed memory goes back to the system at once
//! (see `main.rs`): a fresh buffer would cost the kernel a page fault and a zeroed page per
//! 4 KiB, three megabytes per part, about 700 MB for the 1.2 M resources of the benchmark.

use std::{
    ops::{Deref, DerefMut},
    sync::{Mutex, PoisonError},
};

/// Bytes every buffer holds at least: a megabyte of lines and room for the line that crosses it.
pub const CAPACITY: usize = (1 << 20) + (64 << 10);
/// Buffers kept at most (about 17 MB): three per writing worker.
const KEPT: usize = 16;

static SPARE: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// A buffer of at least `CAPACITY` bytes that goes back to the spares when dropped. Its length
/// and contents are whatever its last user left.
pub struct Buffer(Vec<u8>);

impl Buffer {
    pub fn take() -> Buffer {
        let spare = SPARE.lock().unwrap_or_else(PoisonError::into_inner).pop();
        Buffer(spare.unwrap_or_else(|| Vec::with_capacity(CAPACITY)))
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // A buffer a huge line grew is let go: the spares stay about a megabyte each.
        if self.0.capacity() > 2 * CAPACITY {
            return;
        }
        let mut spare = SPARE.lock().unwrap_or_else(PoisonError::into_inner);
        if spare.len() < KEPT {
            spare.push(std::mem::take(&mut self.0));
        }
    }
}

impl Deref for Buffer {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.0
    }
}

impl DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_buffer_is_taken_again_and_a_grown_one_is_not_kept() {
        let mut first = Buffer::take();
        first.clear();
        first.extend_from_slice(b"left");
        let at = first.as_ptr();
        drop(first);
        // Other tests take buffers too: look for this one among the spares.
        let taken: Vec<Buffer> = (0..KEPT + 1).map(|_| Buffer::take()).collect();
        assert!(taken.iter().all(|b| b.capacity() >= CAPACITY));
        assert!(taken.iter().any(|b| b.as_ptr() == at && &b[..] == b"left"));
        drop(taken);
        let mut grown = Buffer::take();
        grown.resize(3 * CAPACITY, 0);
        drop(grown);
        let spare = SPARE.lock().unwrap();
        assert!(spare.len() <= KEPT);
        assert!(spare.iter().all(|b| b.capacity() <= 2 * CAPACITY));
    }
}
