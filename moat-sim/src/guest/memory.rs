//! Guest memory for the simulated guest: one memfd, mapped shared, offered to the backend
//! as one or more regions (so chains can cross a region boundary).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{fence, AtomicU8, Ordering};

use vhost::VhostUserMemoryRegionInfo;

use super::GuestError;

/// Guest-physical address of the first byte of guest memory.
pub const GPA_BASE: u64 = 0x10_0000;

/// Shared guest memory, addressed by guest-physical address.
pub struct GuestMemory {
    file: File,
    ptr: *mut u8,
    len: usize,
    regions: usize,
}

/// Map `len` bytes of `file` (at least that long), shared, readable and writable.
fn map_shared(file: &File, len: usize) -> Result<*mut libc::c_void, GuestError> {
    // SAFETY: mapping a file descriptor we hold open, shared, no longer than the file.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(GuestError::Memory(std::io::Error::last_os_error()));
    }
    Ok(ptr)
}

// SAFETY: the mapping lives as long as the struct; all access goes through bounds-checked
// volatile copies, and the other side (the backend) only sees it through its own mapping.
unsafe impl Send for GuestMemory {}

impl GuestMemory {
    pub fn new(len: usize, regions: usize) -> Result<GuestMemory, GuestError> {
        let regions = regions.max(1);
        let page = 4096;
        let len = len.div_ceil(regions * page) * regions * page;
        // SAFETY: memfd_create with a valid NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"moat-guest".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(GuestError::Memory(std::io::Error::last_os_error()));
        }
        // SAFETY: fd was just created and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64).map_err(GuestError::Memory)?;
        let ptr = map_shared(&file, len)?;
        Ok(GuestMemory {
            file,
            ptr: ptr.cast(),
            len,
            regions,
        })
    }

    /// The regions as the memory table describes them (same memfd, consecutive offsets).
    pub fn regions(&self) -> Vec<VhostUserMemoryRegionInfo> {
        let chunk = self.len / self.regions;
        (0..self.regions)
            .map(|i| VhostUserMemoryRegionInfo {
                guest_phys_addr: GPA_BASE + (i * chunk) as u64,
                memory_size: chunk as u64,
                userspace_addr: self.ptr as u64 + (i * chunk) as u64,
                mmap_offset: (i * chunk) as u64,
                mmap_handle: self.file.as_raw_fd(),
            })
            .collect()
    }

    /// (gpa, len) of each region.
    pub fn layout(&self) -> Vec<(u64, usize)> {
        self.regions()
            .iter()
            .map(|r| (r.guest_phys_addr, r.memory_size as usize))
            .collect()
    }

    /// The frontend's virtual address of a guest-physical address (vring addresses are
    /// given to the backend this way, as QEMU does).
    pub fn va(&self, gpa: u64) -> u64 {
        self.ptr as u64 + (gpa - GPA_BASE)
    }

    fn offset(&self, gpa: u64, len: usize) -> usize {
        let off = gpa
            .checked_sub(GPA_BASE)
            .and_then(|o| usize::try_from(o).ok())
            .filter(|o| o.checked_add(len).is_some_and(|end| end <= self.len));
        match off {
            Some(off) => off,
            None => panic!("simulated guest bug: access {gpa:#x}+{len} outside its own memory"),
        }
    }

    pub fn write(&self, gpa: u64, data: &[u8]) {
        let off = self.offset(gpa, data.len());
        // SAFETY: bounds checked above; the mapping is valid for self.len bytes.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(off), data.len()) };
    }

    pub fn read(&self, gpa: u64, out: &mut [u8]) {
        let off = self.offset(gpa, out.len());
        // SAFETY: bounds checked above.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(off), out.as_mut_ptr(), out.len()) };
    }

    pub fn write_u16(&self, gpa: u64, v: u16) {
        fence(Ordering::SeqCst);
        let off = self.offset(gpa, 2);
        // SAFETY: bounds checked; ring fields are 2-byte aligned by layout.
        unsafe { std::ptr::write_volatile(self.ptr.add(off).cast::<u16>(), v.to_le()) };
        fence(Ordering::SeqCst);
    }

    pub fn read_u16(&self, gpa: u64) -> u16 {
        fence(Ordering::SeqCst);
        let off = self.offset(gpa, 2);
        // SAFETY: bounds checked; aligned by layout.
        let v = unsafe { std::ptr::read_volatile(self.ptr.add(off).cast::<u16>()) };
        fence(Ordering::SeqCst);
        u16::from_le(v)
    }

    /// A second, independent shared mapping of this memory that another thread may write
    /// into while the backend reads (as another vCPU would). See [`GuestMemWriter`].
    pub fn writer(&self) -> Result<GuestMemWriter, GuestError> {
        GuestMemWriter::map(&self.file, self.len)
    }

    pub fn read_u32(&self, gpa: u64) -> u32 {
        let mut b = [0u8; 4];
        fence(Ordering::SeqCst);
        self.read(gpa, &mut b);
        u32::from_le_bytes(b)
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what new() mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A thread-safe writer over guest memory: its own shared mapping of the guest memfd (so it
/// stays valid however long it lives, even after the guest is dropped), written one byte at
/// a time with atomic stores. For tests that rewrite a buffer the device may be reading.
pub struct GuestMemWriter {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is owned by the writer and only ever written through atomic byte
// stores, which are sound from any number of threads at once.
unsafe impl Send for GuestMemWriter {}
// SAFETY: as above; `&self` methods only do atomic stores into the owned mapping.
unsafe impl Sync for GuestMemWriter {}

impl GuestMemWriter {
    fn map(file: &File, len: usize) -> Result<GuestMemWriter, GuestError> {
        let ptr = map_shared(file, len)?;
        Ok(GuestMemWriter {
            ptr: ptr.cast(),
            len,
        })
    }

    /// Store `data` at `gpa`, byte by byte in address order (relaxed atomic stores: a
    /// concurrent reader may see any mix of old and new bytes, never a torn byte).
    ///
    /// # Panics
    /// If `[gpa, gpa + data.len())` is not inside guest memory.
    pub fn write(&self, gpa: u64, data: &[u8]) {
        let off = gpa
            .checked_sub(GPA_BASE)
            .and_then(|o| usize::try_from(o).ok())
            .filter(|o| o.checked_add(data.len()).is_some_and(|end| end <= self.len));
        let Some(off) = off else {
            panic!("write {gpa:#x}+{} outside guest memory", data.len());
        };
        for (i, &b) in data.iter().enumerate() {
            // SAFETY: in bounds (checked above) of a live mapping; AtomicU8 has the
            // alignment and size of u8.
            let cell = unsafe { &*self.ptr.add(off + i).cast::<AtomicU8>() };
            cell.store(b, Ordering::Relaxed);
        }
    }
}

impl Drop for GuestMemWriter {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what map() mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}
