//! Thin, checked wrappers over the syscalls the disk engines need (pread/pwrite loops,
//! fallocate, fdatasync, block-device ioctls), so the engines hold no raw `libc` calls.

use std::io;
use std::os::fd::RawFd;

use super::buf::IoBuf;

/// The largest length handed to one read/write syscall or SQE (its length field is 32-bit);
/// longer buffers are completed by the short-transfer loop.
pub(crate) const CHUNK_BYTES_MAX: usize = 1 << 30;

/// The file descriptors of one open disk and the rule that routes a request to one of them.
///
/// With O_DIRECT on, requests whose offset, length and memory are aligned to `direct_align`
/// go to `direct`, everything else to `buffered` (same inode, opened without O_DIRECT).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Fds {
    pub direct: Option<RawFd>,
    pub buffered: RawFd,
    pub direct_align: u64,
}

impl Fds {
    pub fn for_io(&self, offset: u64, len: usize, ptr: *const u8) -> RawFd {
        match self.direct {
            Some(fd)
                if offset % self.direct_align == 0
                    && len as u64 % self.direct_align == 0
                    && ptr as usize as u64 % self.direct_align == 0 =>
            {
                fd
            }
            _ => self.buffered,
        }
    }
}

fn cvt(ret: isize) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// Reads exactly `buf.len()` bytes at `offset`, looping over short reads; EOF is an error.
pub(crate) fn pread_exact(fds: &Fds, offset: u64, buf: &mut IoBuf) -> io::Result<()> {
    let total = buf.len();
    let mut done = 0usize;
    let mut rounds = 0u32;
    while done < total {
        rounds += 1;
        if rounds > 1_000_000 {
            return Err(io::Error::other("read made no progress"));
        }
        let chunk = (total - done).min(CHUNK_BYTES_MAX);
        // SAFETY: `done < total <= capacity`, so the pointer stays inside the allocation.
        let ptr = unsafe { buf.as_mut_ptr().add(done) };
        let at = offset + done as u64;
        let fd = fds.for_io(at, chunk, ptr);
        // SAFETY: `ptr` is valid for writes of `chunk` bytes (inside `buf`, which we borrow
        // mutably for the duration of the call).
        let ret = unsafe { libc::pread64(fd, ptr.cast(), chunk, at as libc::off64_t) };
        match cvt(ret) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("end of file after {done} of {total} bytes"),
                ))
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes all of `buf` at `offset`, looping over short writes.
pub(crate) fn pwrite_all(fds: &Fds, offset: u64, buf: &IoBuf) -> io::Result<()> {
    let total = buf.len();
    let mut done = 0usize;
    let mut rounds = 0u32;
    while done < total {
        rounds += 1;
        if rounds > 1_000_000 {
            return Err(io::Error::other("write made no progress"));
        }
        let chunk = (total - done).min(CHUNK_BYTES_MAX);
        // SAFETY: `done < total <= capacity`, so the pointer stays inside the allocation.
        let ptr = unsafe { buf.as_ptr().add(done) };
        let at = offset + done as u64;
        let fd = fds.for_io(at, chunk, ptr);
        // SAFETY: `ptr` is valid for reads of `chunk` initialised bytes.
        let ret = unsafe { libc::pwrite64(fd, ptr.cast(), chunk, at as libc::off64_t) };
        match cvt(ret) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("wrote 0 bytes after {done} of {total}"),
                ))
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

pub(crate) fn fallocate(fd: RawFd, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    loop {
        // SAFETY: plain syscall on an fd we own; no memory is passed.
        let ret =
            unsafe { libc::fallocate64(fd, mode, offset as libc::off64_t, len as libc::off64_t) };
        if ret == 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// `lseek(fd, offset, SEEK_DATA)`: the first data byte at or after `offset`, `None` when only
/// a hole follows (ENXIO).
pub(crate) fn seek_data(fd: RawFd, offset: u64) -> io::Result<Option<u64>> {
    // SAFETY: plain syscall on an fd we own; no memory is passed.
    let ret = unsafe { libc::lseek64(fd, offset as libc::off64_t, libc::SEEK_DATA) };
    if ret >= 0 {
        return Ok(Some(ret as u64));
    }
    let error = io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::ENXIO) {
        return Ok(None);
    }
    Err(error)
}

pub(crate) fn fdatasync(fd: RawFd) -> io::Result<()> {
    loop {
        // SAFETY: plain syscall on an fd we own.
        let ret = unsafe { libc::fdatasync(fd) };
        if ret == 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// Logical block size of a block device (BLKSSZGET).
pub(crate) fn block_device_logical_block_size(fd: RawFd) -> io::Result<u64> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one `int` through the pointer, which points at `size`.
    let ret = unsafe { libc::ioctl(fd, libc::BLKSSZGET, &mut size as *mut libc::c_int) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size.max(1) as u64)
}

/// Is this error the kernel saying "this fallocate mode is not supported here"?
pub(crate) fn is_unsupported(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::ENOTTY)
    )
}
