//! Capture: NBD exports of protected disks; every write journaled in order before the reply.
