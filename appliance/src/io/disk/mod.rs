//! Disk engines: io_uring and a pwrite fallback behind one interface.
