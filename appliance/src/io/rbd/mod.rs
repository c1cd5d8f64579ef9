//! A small, safe binding over librados' and librbd's C API (Debian's `librados-dev` and
//! `librbd-dev`; the C API is stable across Ceph releases, tested here against 16.2).
//!
//! # Shape
//! - [`Cluster::connect`]: one `rados_t` per conf file, keyring and client name; `Send + Sync`
//!   (librados handles are thread-safe), shut down when the last [`Pool`] and [`Image`] using it
//!   are gone.
//! - [`Cluster::pool`]: one `rados_ioctx_t`; creates, removes and opens images.
//! - [`Image`]: one open `rbd_image_t`, cheap to clone. Reads, writes, write-zeroes and flushes
//!   are asynchronous (`rbd_aio_*`); snapshots and the diff iterator are blocking calls (callers
//!   on the runtime run them in `spawn_blocking`).
//!
//! # Async completions
//! Each asynchronous operation boxes an [`InFlight`] (the buffer it reads into or writes from, a
//! clone of the image handle, and a oneshot sender) and hands the raw pointer to
//! `rbd_aio_create_completion`. librbd calls [`complete`] once, on one of its own threads; the
//! callback takes the box back, releases the completion and sends the result, the buffer and
//! the image handle through the oneshot. Nothing blocks a runtime thread. A caller that drops
//! its future only drops the receiver: librbd still owns the buffer's memory until the callback
//! runs, and the callback then frees it. The image handle travels with the operation so that
//! `rbd_close` can never run while an operation is in flight; if the receiver is gone, the
//! handle is dropped on a short-lived thread, because `rbd_close` from librbd's own callback
//! thread would wait for itself.
//!
//! # Errors
//! Control-plane calls fail with [`RbdError`] (operation, `pool/image`, errno text). Data calls
//! fail with the disk engine's [`DiskError`] (operation, `rbd:pool/image`, offset, length, errno
//! text), so the apply path handles a failed replica write the same way for both backends.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::ptr;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::oneshot;

use super::disk::{DiskError, DiskOp, IoBuf};

#[allow(non_camel_case_types)]
type rados_t = *mut c_void;
#[allow(non_camel_case_types)]
type rados_ioctx_t = *mut c_void;
#[allow(non_camel_case_types)]
type rbd_image_t = *mut c_void;
#[allow(non_camel_case_types)]
type rbd_image_options_t = *mut c_void;
#[allow(non_camel_case_types)]
type rbd_completion_t = *mut c_void;
#[allow(non_camel_case_types)]
type rbd_callback_t = extern "C" fn(rbd_completion_t, *mut c_void);
#[allow(non_camel_case_types)]
type progress_fn_t = extern "C" fn(u64, u64, *mut c_void) -> c_int;
#[allow(non_camel_case_types)]
type diff_callback_t = extern "C" fn(u64, usize, c_int, *mut c_void) -> c_int;

#[repr(C)]
#[allow(non_camel_case_types)]
struct rbd_snap_info_t {
    id: u64,
    size: u64,
    name: *const c_char,
}

/// librbd.h's `rbd_config_option_t`: one librbd option as an open image sees it.
#[repr(C)]
struct ConfigOption {
    name: *mut c_char,
    value: *mut c_char,
    /// `rbd_config_source_t` (client config, pool or image metadata).
    source: c_int,
}

#[link(name = "rados")]
extern "C" {
    fn rados_create2(
        cluster: *mut rados_t,
        cluster_name: *const c_char,
        name: *const c_char,
        flags: u64,
    ) -> c_int;
    fn rados_conf_read_file(cluster: rados_t, path: *const c_char) -> c_int;
    fn rados_conf_set(cluster: rados_t, option: *const c_char, value: *const c_char) -> c_int;
    fn rados_connect(cluster: rados_t) -> c_int;
    fn rados_shutdown(cluster: rados_t);
    fn rados_ioctx_create(
        cluster: rados_t,
        pool: *const c_char,
        ioctx: *mut rados_ioctx_t,
    ) -> c_int;
    fn rados_ioctx_destroy(ioctx: rados_ioctx_t);
    fn rados_getaddrs(cluster: rados_t, addrs: *mut *mut c_char) -> c_int;
    fn rados_conf_get(
        cluster: rados_t,
        option: *const c_char,
        buf: *mut c_char,
        len: usize,
    ) -> c_int;
}

#[link(name = "rbd")]
extern "C" {
    fn rbd_image_options_create(opts: *mut rbd_image_options_t);
    fn rbd_image_options_destroy(opts: rbd_image_options_t);
    fn rbd_image_options_set_uint64(opts: rbd_image_options_t, optname: c_int, value: u64)
        -> c_int;
    fn rbd_create4(
        io: rados_ioctx_t,
        name: *const c_char,
        size: u64,
        opts: rbd_image_options_t,
    ) -> c_int;
    fn rbd_remove(io: rados_ioctx_t, name: *const c_char) -> c_int;
    fn rbd_clone3(
        p_ioctx: rados_ioctx_t,
        p_name: *const c_char,
        p_snapname: *const c_char,
        c_ioctx: rados_ioctx_t,
        c_name: *const c_char,
        c_opts: rbd_image_options_t,
    ) -> c_int;
    fn rbd_open(
        io: rados_ioctx_t,
        name: *const c_char,
        image: *mut rbd_image_t,
        snap_name: *const c_char,
    ) -> c_int;
    fn rbd_open_read_only(
        io: rados_ioctx_t,
        name: *const c_char,
        image: *mut rbd_image_t,
        snap_name: *const c_char,
    ) -> c_int;
    fn rbd_close(image: rbd_image_t) -> c_int;
    fn rbd_read(image: rbd_image_t, offset: u64, len: usize, buf: *mut c_char) -> isize;
    fn rbd_get_size(image: rbd_image_t, size: *mut u64) -> c_int;
    fn rbd_get_features(image: rbd_image_t, features: *mut u64) -> c_int;
    fn rbd_config_image_list(
        image: rbd_image_t,
        options: *mut ConfigOption,
        max_options: *mut c_int,
    ) -> c_int;
    fn rbd_config_image_list_cleanup(options: *mut ConfigOption, max_options: c_int);
    fn rbd_resize(image: rbd_image_t, size: u64) -> c_int;

    fn rbd_snap_create2(
        image: rbd_image_t,
        name: *const c_char,
        flags: u32,
        progress: progress_fn_t,
        progress_arg: *mut c_void,
    ) -> c_int;
    fn rbd_snap_remove(image: rbd_image_t, name: *const c_char) -> c_int;
    fn rbd_snap_protect(image: rbd_image_t, name: *const c_char) -> c_int;
    fn rbd_snap_unprotect(image: rbd_image_t, name: *const c_char) -> c_int;
    fn rbd_snap_is_protected(
        image: rbd_image_t,
        name: *const c_char,
        is_protected: *mut c_int,
    ) -> c_int;
    fn rbd_snap_list(image: rbd_image_t, snaps: *mut rbd_snap_info_t, max: *mut c_int) -> c_int;
    fn rbd_snap_list_end(snaps: *mut rbd_snap_info_t);
    fn rbd_diff_iterate2(
        image: rbd_image_t,
        from_snap: *const c_char,
        offset: u64,
        len: u64,
        include_parent: u8,
        whole_object: u8,
        callback: diff_callback_t,
        arg: *mut c_void,
    ) -> c_int;

    fn rbd_aio_create_completion(
        arg: *mut c_void,
        callback: rbd_callback_t,
        completion: *mut rbd_completion_t,
    ) -> c_int;
    fn rbd_aio_get_return_value(completion: rbd_completion_t) -> isize;
    fn rbd_aio_release(completion: rbd_completion_t);
    fn rbd_aio_write(
        image: rbd_image_t,
        offset: u64,
        len: usize,
        buf: *const c_char,
        completion: rbd_completion_t,
    ) -> c_int;
    fn rbd_aio_writev(
        image: rbd_image_t,
        iov: *const libc::iovec,
        iovcnt: c_int,
        offset: u64,
        completion: rbd_completion_t,
    ) -> c_int;
    fn rbd_aio_read(
        image: rbd_image_t,
        offset: u64,
        len: usize,
        buf: *mut c_char,
        completion: rbd_completion_t,
    ) -> c_int;
    fn rbd_aio_write_zeroes(
        image: rbd_image_t,
        offset: u64,
        len: usize,
        completion: rbd_completion_t,
        zero_flags: c_int,
        op_flags: c_int,
    ) -> c_int;
    fn rbd_aio_flush(image: rbd_image_t, completion: rbd_completion_t) -> c_int;

    fn rbd_lock_get_owners(
        image: rbd_image_t,
        lock_mode: *mut c_int,
        lock_owners: *mut *mut c_char,
        max_lock_owners: *mut usize,
    ) -> c_int;
    fn rbd_lock_get_owners_cleanup(lock_owners: *mut *mut c_char, lock_owner_count: usize);
    fn rbd_lock_break(image: rbd_image_t, lock_mode: c_int, lock_owner: *const c_char) -> c_int;
}

/// `RBD_LOCK_MODE_EXCLUSIVE` (librbd.h's `rbd_lock_mode_t`, an int-sized enum).
const LOCK_MODE_EXCLUSIVE: c_int = 0;

/// `RBD_SNAP_CREATE_SKIP_QUIESCE` (librbd.h).
const SNAP_CREATE_SKIP_QUIESCE: u32 = 1 << 0;

/// `RBD_IMAGE_OPTION_FEATURES` / `RBD_IMAGE_OPTION_ORDER` (librbd.h).
const IMAGE_OPTION_FEATURES: c_int = 1;
const IMAGE_OPTION_ORDER: c_int = 2;

/// Image feature bits (rbd/features.h).
pub const FEATURE_LAYERING: u64 = 1 << 0;
pub const FEATURE_EXCLUSIVE_LOCK: u64 = 1 << 2;
pub const FEATURE_OBJECT_MAP: u64 = 1 << 3;
pub const FEATURE_FAST_DIFF: u64 = 1 << 4;
/// What every replica image is created with: clones for test failover (layering), one writer
/// at a time (exclusive-lock), and exact, fast changed-block queries (object-map, fast-diff).
pub const REPLICA_FEATURES: u64 =
    FEATURE_LAYERING | FEATURE_EXCLUSIVE_LOCK | FEATURE_OBJECT_MAP | FEATURE_FAST_DIFF;
/// 4 MiB objects (RBD's default order).
pub const OBJECT_ORDER: u64 = 22;

/// A failed control-plane call: what, on which `pool/image` (or conf file), and the errno text.
#[derive(Debug, thiserror::Error)]
#[error("rbd {operation} {target}: {source}")]
pub struct RbdError {
    pub operation: &'static str,
    pub target: String,
    #[source]
    pub source: io::Error,
}

impl RbdError {
    /// The errno (positive), e.g. `libc::ENOENT` for a missing image or pool.
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

fn check(ret: c_int, operation: &'static str, target: &str) -> Result<(), RbdError> {
    if ret < 0 {
        Err(RbdError {
            operation,
            target: target.to_string(),
            source: io::Error::from_raw_os_error(-ret),
        })
    } else {
        Ok(())
    }
}

fn c_string(value: &str, operation: &'static str, target: &str) -> Result<CString, RbdError> {
    CString::new(value).map_err(|_| RbdError {
        operation,
        target: target.to_string(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "name contains a NUL byte"),
    })
}

struct ClusterHandle {
    raw: rados_t,
}

// SAFETY: a connected `rados_t` is thread-safe (librados serialises internally); the handle is
// only shut down in Drop, when no Pool or Image refers to it any more.
unsafe impl Send for ClusterHandle {}
// SAFETY: as above; every call through `&ClusterHandle` is a thread-safe librados call.
unsafe impl Sync for ClusterHandle {}

impl ClusterHandle {
    /// `rados_conf_set` before connecting; `operation` names it in errors (`set <key>`).
    fn set(
        &self,
        key: &str,
        value: &str,
        operation: &'static str,
        label: &str,
    ) -> Result<(), RbdError> {
        let key = c_string(key, operation, label)?;
        let value = c_string(value, operation, label)?;
        // SAFETY: unconnected handle; both strings NUL-terminated, copied by librados.
        let ret = unsafe { rados_conf_set(self.raw, key.as_ptr(), value.as_ptr()) };
        check(ret, operation, label)
    }
}

impl Drop for ClusterHandle {
    fn drop(&mut self) {
        // SAFETY: `raw` came from rados_create2 and is shut down exactly once, here; every
        // ioctx created from it holds an Arc to this handle and has been destroyed already.
        unsafe { rados_shutdown(self.raw) };
    }
}

/// How to reach a cluster: its conf file, the client's keyring (None: what the conf says) and
/// the client name (`client.ferry`, or `ferry` which means the same).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterOptions {
    pub conf: PathBuf,
    pub keyring: Option<PathBuf>,
    pub client: String,
}

/// A connected cluster handle.
#[derive(Clone)]
pub struct Cluster {
    handle: Arc<ClusterHandle>,
    label: String,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("label", &self.label)
            .finish()
    }
}

impl Cluster {
    /// Reads the conf, sets the keyring, connects (blocking: monitor handshake and auth).
    pub fn connect(options: &ClusterOptions) -> Result<Cluster, RbdError> {
        let label = options.conf.display().to_string();
        let client = if options.client.contains('.') {
            options.client.clone()
        } else {
            format!("client.{}", options.client)
        };
        let name = c_string(&client, "connect", &label)?;
        let cluster_name = c_string("ceph", "connect", &label)?;
        let conf = c_string(&label, "read conf", &label)?;
        let mut raw: rados_t = ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer; both strings are NUL-terminated and outlive the
        // call (librados copies them).
        let ret = unsafe { rados_create2(&mut raw, cluster_name.as_ptr(), name.as_ptr(), 0) };
        check(ret, "create cluster handle", &label)?;
        let handle = ClusterHandle { raw };
        // SAFETY: `handle.raw` is a fresh, unconnected handle; `conf` is NUL-terminated.
        let ret = unsafe { rados_conf_read_file(handle.raw, conf.as_ptr()) };
        check(ret, "read conf", &label)?;
        if let Some(keyring) = &options.keyring {
            let keyring = keyring.display().to_string();
            handle.set("keyring", &keyring, "set keyring", &label)?;
        }
        // An OSD request waits for its placement group however long it is down, rather than
        // failing with ETIMEDOUT after a conf's `rados_osd_op_timeout`: a replica write then
        // stalls (and the acknowledgements behind it) instead of failing mid-batch, and a
        // request that timed out on the client can still never land late, after the retry
        // that replaced it. 0 is librados' default; this overrides a conf that sets one.
        handle.set(
            "rados_osd_op_timeout",
            "0",
            "set rados_osd_op_timeout",
            &label,
        )?;
        // Replica writes are sent from Ferry's own buffers, which nothing changes while a
        // write is in flight (`Image::write_parts_at` keeps them until its completion, which
        // librbd holds back until it released them): librbd's default copies every write
        // first, a memcpy per replicated byte on the target (benches/RESULTS.md, Ceph RBD).
        handle.set(
            "rbd_disable_zero_copy_writes",
            "false",
            "set rbd_disable_zero_copy_writes",
            &label,
        )?;
        // No librbd cache: the apply path flushes every group commit and acknowledges only
        // after the flush, so the default write-around cache gains nothing (it completes a
        // write before the OSD has it, then the flush waits for it anyway) and costs a layer
        // that tracks and throttles every write (at `rbd_cache_max_dirty`, 24 MiB in flight).
        handle.set("rbd_cache", "false", "set rbd_cache", &label)?;
        // SAFETY: configured, unconnected handle; connect may block, which callers allow for.
        let ret = unsafe { rados_connect(handle.raw) };
        check(ret, "connect", &format!("{label} as {client}"))?;
        Ok(Cluster {
            handle: Arc::new(handle),
            label,
        })
    }

    /// An I/O context on `pool` (fails with ENOENT if the pool does not exist).
    pub fn pool(&self, pool: &str) -> Result<Pool, RbdError> {
        let name = c_string(pool, "open pool", pool)?;
        let mut ioctx: rados_ioctx_t = ptr::null_mut();
        // SAFETY: connected cluster handle; `ioctx` is a valid out-pointer; `name` NUL-terminated.
        let ret = unsafe { rados_ioctx_create(self.handle.raw, name.as_ptr(), &mut ioctx) };
        check(ret, "open pool", pool)?;
        Ok(Pool {
            inner: Arc::new(PoolHandle {
                raw: ioctx,
                name: pool.to_string(),
                _cluster: self.handle.clone(),
            }),
        })
    }
}

impl ClusterHandle {
    /// The value of a configuration option as this client sees it (conf file and overrides).
    fn conf_get(&self, option: &str) -> Result<String, RbdError> {
        let key = c_string(option, "get conf option", option)?;
        let mut capacity = 256usize;
        loop {
            let mut buf = vec![0u8; capacity];
            // SAFETY: connected handle; `key` is NUL-terminated; `buf` has `capacity` writable
            // bytes, which librados fills with a NUL-terminated value or refuses with
            // ENAMETOOLONG.
            let ret = unsafe {
                rados_conf_get(self.raw, key.as_ptr(), buf.as_mut_ptr().cast(), capacity)
            };
            if ret == -libc::ENAMETOOLONG && capacity < 1 << 20 {
                capacity *= 4;
                continue;
            }
            check(ret, "get conf option", option)?;
            let end = buf.iter().position(|&byte| byte == 0).unwrap_or(buf.len());
            return Ok(String::from_utf8_lossy(&buf[..end]).into_owned());
        }
    }

    /// This client's messenger addresses, each as `ip:port/nonce` (`rados_getaddrs` prints an
    /// address vector, `[v2:ip:port/nonce,v1:...]` or a single address).
    fn addresses(&self) -> Result<Vec<String>, RbdError> {
        let mut raw: *mut c_char = ptr::null_mut();
        // SAFETY: connected handle; valid out-pointer, set to a strdup'ed string on success.
        let ret = unsafe { rados_getaddrs(self.raw, &mut raw) };
        check(ret, "get client addresses", "cluster")?;
        if raw.is_null() {
            return Ok(Vec::new());
        }
        // SAFETY: librados returned a NUL-terminated, malloc'ed string; copied, then freed once.
        let text = unsafe { CStr::from_ptr(raw) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: `raw` came from strdup in librados and nothing refers to it any more.
        unsafe { libc::free(raw.cast()) };
        Ok(text
            .trim_matches(|c| c == '[' || c == ']')
            .split(',')
            .map(|address| strip_address_type(address.trim()).to_string())
            .filter(|address| !address.is_empty())
            .collect())
    }
}

/// `v2:1.2.3.4:0/42` → `1.2.3.4:0/42` (lock owners are printed without the type).
fn strip_address_type(address: &str) -> &str {
    for prefix in ["v1:", "v2:", "any:"] {
        if let Some(rest) = address.strip_prefix(prefix) {
            return rest;
        }
    }
    address
}

/// Whether two printed client addresses name the same client instance: same IP and nonce (a
/// client's port is 0 in one rendering and the bound port in another, so it is not compared).
fn same_client(a: &str, b: &str) -> bool {
    let key = |address: &str| {
        let address = strip_address_type(address);
        let (host_port, nonce) = address.rsplit_once('/').unwrap_or((address, ""));
        let host = host_port
            .rsplit_once(':')
            .map_or(host_port, |(host, _)| host);
        (host.to_string(), nonce.to_string())
    };
    key(a) == key(b)
}

struct PoolHandle {
    raw: rados_ioctx_t,
    name: String,
    // Keeps the cluster connected while this ioctx exists (dropped after `raw` is destroyed).
    _cluster: Arc<ClusterHandle>,
}

// SAFETY: a rados ioctx may be used from several threads at once for the calls made here
// (image create/remove/open); it is destroyed only in Drop.
unsafe impl Send for PoolHandle {}
// SAFETY: as above.
unsafe impl Sync for PoolHandle {}

impl Drop for PoolHandle {
    fn drop(&mut self) {
        // SAFETY: `raw` came from rados_ioctx_create and is destroyed exactly once; every image
        // opened on it holds an Arc to this handle and is closed already.
        unsafe { rados_ioctx_destroy(self.raw) };
    }
}

/// An I/O context on one pool.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolHandle>,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("name", &self.inner.name)
            .finish()
    }
}

impl Pool {
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    fn target(&self, image: &str) -> String {
        format!("{}/{}", self.inner.name, image)
    }

    /// Creates image `name` of `size` bytes with `features` (e.g. [`REPLICA_FEATURES`]) and
    /// 4 MiB objects. Fails with EEXIST if it exists.
    pub fn create_image(&self, name: &str, size: u64, features: u64) -> Result<(), RbdError> {
        let target = self.target(name);
        let c_name = c_string(name, "create image", &target)?;
        let mut opts: rbd_image_options_t = ptr::null_mut();
        // SAFETY: valid out-pointer; the options object is destroyed below on every path.
        unsafe { rbd_image_options_create(&mut opts) };
        // SAFETY: `opts` is a live options object; FEATURES and ORDER are uint64 options.
        let mut ret =
            unsafe { rbd_image_options_set_uint64(opts, IMAGE_OPTION_FEATURES, features) };
        if ret == 0 {
            // SAFETY: as above.
            ret = unsafe { rbd_image_options_set_uint64(opts, IMAGE_OPTION_ORDER, OBJECT_ORDER) };
        }
        if ret == 0 {
            // SAFETY: live ioctx and options; `c_name` NUL-terminated and outlives the call.
            ret = unsafe { rbd_create4(self.inner.raw, c_name.as_ptr(), size, opts) };
        }
        // SAFETY: `opts` came from rbd_image_options_create and is destroyed once.
        unsafe { rbd_image_options_destroy(opts) };
        check(ret, "create image", &target)
    }

    /// Removes image `name` (it must have no snapshots and no watchers).
    pub fn remove_image(&self, name: &str) -> Result<(), RbdError> {
        let target = self.target(name);
        let c_name = c_string(name, "remove image", &target)?;
        // SAFETY: live ioctx; `c_name` NUL-terminated.
        let ret = unsafe { rbd_remove(self.inner.raw, c_name.as_ptr()) };
        check(ret, "remove image", &target)
    }

    /// Creates image `clone`, a copy-on-write child of snapshot `snapshot` of image `parent`
    /// (`rbd_clone3`, layering; the snapshot must be protected for clone format 1, which a
    /// cluster with old clients uses), with `features` and the parent's object size. Fails with
    /// EEXIST if `clone` exists. Blocking.
    pub fn clone_image(
        &self,
        parent: &str,
        snapshot: &str,
        clone: &str,
        features: u64,
    ) -> Result<(), RbdError> {
        let target = format!(
            "{}@{snapshot} -> {}",
            self.target(parent),
            self.target(clone)
        );
        let c_parent = c_string(parent, "clone image", &target)?;
        let c_snapshot = c_string(snapshot, "clone image", &target)?;
        let c_clone = c_string(clone, "clone image", &target)?;
        let mut opts: rbd_image_options_t = ptr::null_mut();
        // SAFETY: valid out-pointer; the options object is destroyed below on every path.
        unsafe { rbd_image_options_create(&mut opts) };
        // SAFETY: `opts` is a live options object; FEATURES is a uint64 option.
        let mut ret =
            unsafe { rbd_image_options_set_uint64(opts, IMAGE_OPTION_FEATURES, features) };
        if ret == 0 {
            // SAFETY: live ioctx (parent and child in this pool) and options; the three names
            // are NUL-terminated and outlive the call.
            ret = unsafe {
                rbd_clone3(
                    self.inner.raw,
                    c_parent.as_ptr(),
                    c_snapshot.as_ptr(),
                    self.inner.raw,
                    c_clone.as_ptr(),
                    opts,
                )
            };
        }
        // SAFETY: `opts` came from rbd_image_options_create and is destroyed once.
        unsafe { rbd_image_options_destroy(opts) };
        check(ret, "clone image", &target)
    }

    /// The monitors as the client's conf names them (`mon_host`), e.g.
    /// `v2:127.0.0.1:3300/0` or `10.0.0.1,10.0.0.2:6789`.
    pub fn mon_host(&self) -> Result<String, RbdError> {
        self.inner._cluster.conf_get("mon_host")
    }

    /// Opens image `name` for reading and writing (the head, not a snapshot).
    pub fn open_image(&self, name: &str) -> Result<Image, RbdError> {
        self.open(name, None)
    }

    /// Opens snapshot `snapshot` of image `name`, read-only (a recovery point's view). Takes no
    /// exclusive lock, so it reads beside the target's writer.
    pub fn open_snapshot(&self, name: &str, snapshot: &str) -> Result<Image, RbdError> {
        self.open(name, Some(snapshot))
    }

    fn open(&self, name: &str, snapshot: Option<&str>) -> Result<Image, RbdError> {
        let target = match snapshot {
            Some(snapshot) => format!("{}@{snapshot}", self.target(name)),
            None => self.target(name),
        };
        let c_name = c_string(name, "open image", &target)?;
        let c_snapshot = snapshot
            .map(|snapshot| c_string(snapshot, "open image", &target))
            .transpose()?;
        let mut raw: rbd_image_t = ptr::null_mut();
        let ret = match &c_snapshot {
            // SAFETY: live ioctx; valid out-pointer; NULL snapshot name means the image head.
            None => unsafe { rbd_open(self.inner.raw, c_name.as_ptr(), &mut raw, ptr::null()) },
            // SAFETY: live ioctx; valid out-pointer; both names NUL-terminated and alive.
            Some(snapshot) => unsafe {
                rbd_open_read_only(self.inner.raw, c_name.as_ptr(), &mut raw, snapshot.as_ptr())
            },
        };
        check(ret, "open image", &target)?;
        let handle = ImageHandle {
            raw,
            label: target.clone(),
            _pool: self.inner.clone(),
        };
        let mut size = 0u64;
        // SAFETY: `raw` is an open image; `size` a valid out-pointer.
        let ret = unsafe { rbd_get_size(handle.raw, &mut size) };
        check(ret, "get size", &target)?;
        // The cluster handle turns librbd's cache off, but pool or image metadata
        // (`rbd config pool set`, `conf_rbd_cache`) may turn it back on for this image: ask
        // the image what it runs with. If it cannot say, flushes are kept.
        let cache = match image_option(handle.raw, "rbd_cache") {
            Ok(Some(value)) => value != "false",
            Ok(None) => true,
            Err(errno) => {
                tracing::warn!(image = %target, errno, "cannot read the image's librbd options; every flush goes to librbd");
                true
            }
        };
        Ok(Image {
            inner: Arc::new(handle),
            size,
            cache,
        })
    }
}

struct ImageHandle {
    raw: rbd_image_t,
    /// `pool/image`, for errors.
    label: String,
    // Keeps the ioctx alive while the image is open (dropped after `raw` is closed).
    _pool: Arc<PoolHandle>,
}

// SAFETY: librbd image handles are safe to use from several threads at once (ImageCtx has its
// own locks; rbd-nbd and qemu issue aio from many threads on one handle). Closed only in Drop.
unsafe impl Send for ImageHandle {}
// SAFETY: as above.
unsafe impl Sync for ImageHandle {}

impl Drop for ImageHandle {
    fn drop(&mut self) {
        // SAFETY: `raw` came from rbd_open and is closed exactly once. Every in-flight aio holds
        // an Arc to this handle, so none is outstanding here; this never runs on a librbd
        // callback thread (see `complete`).
        let ret = unsafe { rbd_close(self.raw) };
        if ret < 0 {
            tracing::warn!(image = %self.label, errno = -ret, "rbd close failed");
        }
    }
}

/// The value of librbd option `name` as the open `image` runs with it (its client config with
/// the pool's and the image's overrides applied); `Err(errno)` if librbd cannot list them.
fn image_option(image: rbd_image_t, name: &str) -> Result<Option<String>, i32> {
    // As `Image::snapshots`: a list too small gets -ERANGE and the count it needs.
    let mut capacity: c_int = 256;
    let (mut options, room) = loop {
        let mut options: Vec<ConfigOption> = (0..capacity)
            .map(|_| ConfigOption {
                name: ptr::null_mut(),
                value: ptr::null_mut(),
                source: 0,
            })
            .collect();
        let mut room = capacity;
        // SAFETY: `image` is open; `options` has `room` writable entries; librbd fills at most
        // that many and sets `room` to how many it filled, or to how many it needs (-ERANGE).
        let ret = unsafe { rbd_config_image_list(image, options.as_mut_ptr(), &mut room) };
        if ret == -libc::ERANGE {
            capacity = room.max(capacity * 2);
            continue;
        }
        if ret < 0 {
            return Err(-ret);
        }
        break (options, room);
    };
    let filled = usize::try_from(room).unwrap_or(0).min(options.len());
    let value = options[..filled].iter().find_map(|option| {
        if option.name.is_null() || option.value.is_null() {
            return None;
        }
        // SAFETY: librbd filled these entries with NUL-terminated strings it allocated, alive
        // until the cleanup below.
        let (key, value) = unsafe { (CStr::from_ptr(option.name), CStr::from_ptr(option.value)) };
        (key.to_bytes() == name.as_bytes()).then(|| value.to_string_lossy().into_owned())
    });
    // SAFETY: the `filled` entries librbd filled, released once; nothing refers to them after.
    unsafe { rbd_config_image_list_cleanup(options.as_mut_ptr(), room) };
    Ok(value)
}

/// One open RBD image. Clones share the handle; the image closes when the last clone and the
/// last in-flight operation are gone.
#[derive(Clone)]
pub struct Image {
    inner: Arc<ImageHandle>,
    size: u64,
    /// Whether librbd's cache is on for this image (see [`Image::flush`]).
    cache: bool,
}

impl fmt::Debug for Image {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Image")
            .field("image", &self.inner.label)
            .field("size", &self.size)
            .finish()
    }
}

/// One snapshot as [`Image::snapshots`] lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: u64,
    pub name: String,
    pub size: u64,
}

/// One extent as the diff iterator reports it: `exists == false` means the range reads as
/// zeroes now (discarded or never written) but did not before.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiffExtent {
    pub offset: u64,
    pub len: u64,
    pub exists: bool,
}

/// The state one aio operation hands to librbd and gets back in [`complete`].
struct InFlight {
    buf: Option<IoBuf>,
    /// The caller's buffers a vectored write hands librbd (kept until it completes).
    parts: Vec<Bytes>,
    image: Arc<ImageHandle>,
    reply: oneshot::Sender<(isize, Option<IoBuf>, Arc<ImageHandle>)>,
}

extern "C" fn complete(completion: rbd_completion_t, arg: *mut c_void) {
    // SAFETY: `arg` is the pointer `submit` leaked from a Box<InFlight> for exactly this
    // completion; librbd calls this callback once per completion, so the box is reclaimed once.
    let state = unsafe { Box::from_raw(arg.cast::<InFlight>()) };
    // SAFETY: `completion` is the completion this callback belongs to; librbd has finished
    // with the buffer, so reading the result and releasing the completion is allowed here.
    let ret = unsafe { rbd_aio_get_return_value(completion) };
    // SAFETY: released exactly once, after its result was read; nothing uses it afterwards.
    unsafe { rbd_aio_release(completion) };
    let InFlight {
        buf,
        parts,
        image,
        reply,
    } = *state;
    drop(parts);
    if let Err((_, buf, image)) = reply.send((ret, buf, image)) {
        // The caller stopped waiting. Dropping the image handle here could be its last
        // reference, and rbd_close on a librbd callback thread waits for this very thread.
        std::thread::spawn(move || drop((buf, image)));
    }
}

impl Image {
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether librbd's cache is on for this image (client config, pool and image overrides
    /// applied): then [`Image::flush`] sends a flush; otherwise writes are durable once done.
    pub fn cache_enabled(&self) -> bool {
        self.cache
    }

    /// `pool/image`.
    pub fn name(&self) -> &str {
        &self.inner.label
    }

    fn disk_error(&self, op: DiskOp, offset: u64, len: u64, source: io::Error) -> DiskError {
        DiskError {
            op,
            path: PathBuf::from(format!("rbd:{}", self.inner.label)),
            offset,
            len,
            source,
        }
    }

    fn check_range(&self, op: DiskOp, offset: u64, len: u64) -> Result<(), DiskError> {
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(self.disk_error(
                op,
                offset,
                len,
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("beyond the image size {}", self.size),
                ),
            ));
        }
        Ok(())
    }

    /// Starts one aio call and waits for its completion without blocking the runtime.
    async fn submit(
        &self,
        op: DiskOp,
        offset: u64,
        len: u64,
        buf: Option<IoBuf>,
        start: impl FnOnce(rbd_image_t, *mut u8, rbd_completion_t) -> c_int,
    ) -> (Result<(), DiskError>, Option<IoBuf>) {
        self.submit_parts(op, offset, len, buf, Vec::new(), start)
            .await
    }

    /// [`submit`](Self::submit), also keeping `parts` alive until the operation completes.
    async fn submit_parts(
        &self,
        op: DiskOp,
        offset: u64,
        len: u64,
        buf: Option<IoBuf>,
        parts: Vec<Bytes>,
        start: impl FnOnce(rbd_image_t, *mut u8, rbd_completion_t) -> c_int,
    ) -> (Result<(), DiskError>, Option<IoBuf>) {
        let answer = match self.start(buf, parts, start) {
            Ok(answer) => answer,
            Err((errno, buf)) => {
                let error = self.disk_error(op, offset, len, io::Error::from_raw_os_error(errno));
                return (Err(error), buf);
            }
        };
        match answer.await {
            Ok((ret, buf, _image)) if ret < 0 => {
                let errno = i32::try_from(-ret).unwrap_or(libc::EIO);
                let error = self.disk_error(op, offset, len, io::Error::from_raw_os_error(errno));
                (Err(error), buf)
            }
            Ok((_, buf, _image)) => (Ok(()), buf),
            // `complete` always sends before dropping the sender.
            Err(_) => (
                Err(self.disk_error(op, offset, len, io::Error::other("completion lost"))),
                None,
            ),
        }
    }

    /// Hands `buf` and a completion to librbd through `start`; on refusal, the errno and the
    /// buffer come back.
    #[allow(clippy::type_complexity)]
    fn start(
        &self,
        buf: Option<IoBuf>,
        parts: Vec<Bytes>,
        start: impl FnOnce(rbd_image_t, *mut u8, rbd_completion_t) -> c_int,
    ) -> Result<oneshot::Receiver<(isize, Option<IoBuf>, Arc<ImageHandle>)>, (i32, Option<IoBuf>)>
    {
        let (reply, answer) = oneshot::channel();
        let mut state = Box::new(InFlight {
            buf,
            parts,
            image: self.inner.clone(),
            reply,
        });
        let data = state
            .buf
            .as_mut()
            .map_or(ptr::null_mut(), |buf| buf.as_mut_ptr());
        let arg = Box::into_raw(state).cast::<c_void>();
        let mut completion: rbd_completion_t = ptr::null_mut();
        // SAFETY: `arg` stays valid until `complete` reclaims it (or until we reclaim it below
        // when the operation never started); `complete` has the rbd_callback_t signature.
        let ret = unsafe { rbd_aio_create_completion(arg, complete, &mut completion) };
        let ret = if ret < 0 {
            ret
        } else {
            let started = start(self.inner.raw, data, completion);
            if started < 0 {
                // SAFETY: the operation was refused, so librbd will not call back; the
                // completion is released once and nothing else refers to it.
                unsafe { rbd_aio_release(completion) };
            }
            started
        };
        if ret < 0 {
            // SAFETY: librbd never took ownership (no completion, or the call was refused), so
            // we reclaim the box leaked above, exactly once.
            let state = unsafe { Box::from_raw(arg.cast::<InFlight>()) };
            return Err((-ret, state.buf));
        }
        Ok(answer)
    }

    /// Writes `buf[..len]` at `offset`; hands the buffer back.
    pub async fn write_at(&self, offset: u64, buf: IoBuf) -> (Result<(), DiskError>, IoBuf) {
        let len = buf.len();
        if let Err(error) = self.check_range(DiskOp::Write, offset, len as u64) {
            return (Err(error), buf);
        }
        let (result, buf) = self
            .submit(
                DiskOp::Write,
                offset,
                len as u64,
                Some(buf),
                |image, data, c| {
                    // SAFETY: `data` points at `len` initialised bytes of the IoBuf owned by the
                    // in-flight state, which lives until the completion fires; `image` is open.
                    unsafe { rbd_aio_write(image, offset, len, data.cast(), c) }
                },
            )
            .await;
        (result, buf.unwrap_or_else(|| IoBuf::zeroed(0)))
    }

    /// Writes `parts` one after another from `offset` with one `rbd_aio_writev`, straight from
    /// the caller's memory: librbd takes any buffer (no alignment), and with zero-copy writes
    /// on (see [`Cluster::connect`]) it sends from these buffers without copying them.
    pub async fn write_parts_at(&self, offset: u64, parts: Vec<Bytes>) -> Result<(), DiskError> {
        let len: usize = parts.iter().map(Bytes::len).sum();
        self.check_range(DiskOp::Write, offset, len as u64)?;
        if len == 0 {
            return Ok(());
        }
        // Addresses and lengths (the iovec array is built in the call: raw pointers are not
        // `Send`, and this future is).
        let spans: Vec<(usize, usize)> = parts
            .iter()
            .map(|part| (part.as_ptr() as usize, part.len()))
            .collect();
        let Ok(count) = c_int::try_from(spans.len()) else {
            return Err(self.disk_error(
                DiskOp::Write,
                offset,
                len as u64,
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "too many buffers for one write",
                ),
            ));
        };
        self.submit_parts(
            DiskOp::Write,
            offset,
            len as u64,
            None,
            parts,
            |image, _, c| {
                let iov: Vec<libc::iovec> = spans
                    .iter()
                    .map(|&(base, len)| libc::iovec {
                        iov_base: base as *mut c_void,
                        iov_len: len,
                    })
                    .collect();
                // SAFETY: `iov` describes `count` live, initialised buffers owned by `parts`, which
                // the in-flight state keeps (at the same addresses: moving a `Bytes` does not move
                // its data) until the completion fires; librbd reads the array itself during the
                // call; `image` is open.
                unsafe { rbd_aio_writev(image, iov.as_ptr(), count, offset, c) }
            },
        )
        .await
        .0
    }

    /// Reads `buf.len()` bytes at `offset` into `buf`; hands the buffer back.
    pub async fn read_at(&self, offset: u64, buf: IoBuf) -> (Result<(), DiskError>, IoBuf) {
        let len = buf.len();
        if let Err(error) = self.check_range(DiskOp::Read, offset, len as u64) {
            return (Err(error), buf);
        }
        let (result, buf) = self
            .submit(
                DiskOp::Read,
                offset,
                len as u64,
                Some(buf),
                |image, data, c| {
                    // SAFETY: `data` points at `len` writable bytes of the IoBuf owned by the
                    // in-flight state, which nothing else can see until the completion fires.
                    unsafe { rbd_aio_read(image, offset, len, data.cast(), c) }
                },
            )
            .await;
        (result, buf.unwrap_or_else(|| IoBuf::zeroed(0)))
    }

    /// Reads `buf.len()` bytes at `offset`, blocking the calling thread (`rbd_read`): for
    /// readers that are not on the runtime (a failover export's point view).
    pub fn read_blocking(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.check_range(DiskOp::Read, offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &mut buf[done..];
            // SAFETY: open image; `rest` is `rest.len()` writable bytes borrowed for the whole
            // synchronous call.
            let ret = unsafe {
                rbd_read(
                    self.inner.raw,
                    offset + done as u64,
                    rest.len(),
                    rest.as_mut_ptr().cast(),
                )
            };
            if ret <= 0 {
                let source = if ret == 0 {
                    io::Error::new(io::ErrorKind::UnexpectedEof, "read returned no bytes")
                } else {
                    io::Error::from_raw_os_error(i32::try_from(-ret).unwrap_or(libc::EIO))
                };
                return Err(self.disk_error(DiskOp::Read, offset, buf.len() as u64, source));
            }
            done += ret as usize;
        }
        Ok(())
    }

    /// Makes `[offset, offset+len)` read as zeroes (`rbd_aio_write_zeroes`: unlike a discard,
    /// a partial object is really zeroed).
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.check_range(DiskOp::WriteZeroes, offset, len)?;
        let mut done = 0u64;
        // size_t is 64-bit on every target Ferry builds for, but stay within it anyway.
        while done < len {
            let chunk = (len - done).min(1 << 30);
            let at = offset + done;
            self.submit(DiskOp::WriteZeroes, at, chunk, None, |image, _, c| {
                // SAFETY: `image` is open; no buffer is involved.
                unsafe { rbd_aio_write_zeroes(image, at, chunk as usize, c, 0, 0) }
            })
            .await
            .0?;
            done += chunk;
        }
        Ok(())
    }

    /// Completes when every write acknowledged before it is durable in the cluster.
    ///
    /// With librbd's cache off (how Ferry opens replicas, see [`Cluster::connect`]) a write
    /// completes only once the OSDs committed it (Ceph answers a write when it is on disk on
    /// every replica), so every acknowledged write is durable already and there is nothing to
    /// send. An `rbd_aio_flush` there would wait for every write in flight when it is called:
    /// the apply executor commits one batch while the next batch's writes run, so each commit
    /// waited for the next batch too (54 ms per flush on the one-node cluster, benches/RESULTS.md).
    pub async fn flush(&self) -> Result<(), DiskError> {
        if !self.cache {
            return Ok(());
        }
        self.submit(DiskOp::Flush, 0, 0, None, |image, _, c| {
            // SAFETY: `image` is open; no buffer is involved.
            unsafe { rbd_aio_flush(image, c) }
        })
        .await
        .0
    }

    /// The image's feature bits (see [`REPLICA_FEATURES`]).
    pub fn features(&self) -> Result<u64, RbdError> {
        let mut features = 0u64;
        // SAFETY: open image; valid out-pointer.
        let ret = unsafe { rbd_get_features(self.inner.raw, &mut features) };
        check(ret, "get features", &self.inner.label)?;
        Ok(features)
    }

    /// The addresses of the clients holding the image's exclusive lock (as `ip:port/nonce`);
    /// empty when nobody holds it. Blocking.
    pub fn lock_owners(&self) -> Result<Vec<String>, RbdError> {
        let mut capacity = 4usize;
        loop {
            let mut owners: Vec<*mut c_char> = vec![ptr::null_mut(); capacity];
            let mut count = capacity;
            let mut mode: c_int = 0;
            // SAFETY: open image; `owners` has room for `count` pointers, which librbd fills
            // with strdup'ed strings (or returns ERANGE with the needed count); valid
            // out-pointers.
            let ret = unsafe {
                rbd_lock_get_owners(self.inner.raw, &mut mode, owners.as_mut_ptr(), &mut count)
            };
            if ret == -libc::ENOENT {
                return Ok(Vec::new());
            }
            if ret == -libc::ERANGE {
                capacity = count.max(capacity * 2);
                continue;
            }
            check(ret, "get lock owners", &self.inner.label)?;
            let list = owners[..count]
                .iter()
                .map(|&owner| {
                    // SAFETY: each of the first `count` entries is a NUL-terminated string
                    // librbd allocated; it stays valid until the cleanup call below.
                    unsafe { CStr::from_ptr(owner) }
                        .to_string_lossy()
                        .into_owned()
                })
                .collect();
            // SAFETY: frees exactly the `count` strings librbd allocated above, once.
            unsafe { rbd_lock_get_owners_cleanup(owners.as_mut_ptr(), count) };
            return Ok(list);
        }
    }

    /// Breaks the exclusive lock held by any client other than this process's own connection,
    /// blocklisting it first (`rbd_lock_break`, with librbd's default
    /// `rbd_blocklist_on_break_lock`), and returns the owners it broke. Blocking.
    ///
    /// For a writer that owns the image: after its previous process died (`kill -9`, a host
    /// crash) the dead client's lock and watch linger until the OSDs time the watch out
    /// (`osd_client_watch_timeout`, 30 s), and every write of the new process waits that long
    /// for the lock. A live other writer is fenced: from then on the cluster refuses its
    /// writes. The client's key needs the blocklist capability (`profile rbd` has it).
    pub fn break_other_clients_lock(&self) -> Result<Vec<String>, RbdError> {
        let owners = self.lock_owners()?;
        if owners.is_empty() {
            return Ok(owners);
        }
        let own = self.inner._pool._cluster.addresses()?;
        let mut broken = Vec::new();
        for owner in owners {
            if own.iter().any(|address| same_client(address, &owner)) {
                continue;
            }
            let c_owner = c_string(&owner, "break lock", &self.inner.label)?;
            // SAFETY: open image; `c_owner` is NUL-terminated and outlives the call.
            let ret =
                unsafe { rbd_lock_break(self.inner.raw, LOCK_MODE_EXCLUSIVE, c_owner.as_ptr()) };
            // ENOENT/EBUSY: the lock went away or changed hands meanwhile (not ours to break).
            if ret == -libc::ENOENT || ret == -libc::EBUSY {
                continue;
            }
            check(
                ret,
                "break lock",
                &format!("{} held by {owner}", self.inner.label),
            )?;
            broken.push(owner);
        }
        Ok(broken)
    }

    /// Grows (or shrinks) the image. Blocking. Returns the resized image handle's new size.
    pub fn resize(&mut self, size: u64) -> Result<(), RbdError> {
        // SAFETY: open image; resize is a synchronous librbd call.
        let ret = unsafe { rbd_resize(self.inner.raw, size) };
        check(ret, "resize", &self.inner.label)?;
        self.size = size;
        Ok(())
    }

    fn snap_call(
        &self,
        operation: &'static str,
        name: &str,
        call: unsafe extern "C" fn(rbd_image_t, *const c_char) -> c_int,
    ) -> Result<(), RbdError> {
        let target = format!("{}@{}", self.inner.label, name);
        let c_name = c_string(name, operation, &target)?;
        // SAFETY: `call` is one of librbd's (image, snapshot name) calls; the image is open and
        // `c_name` is NUL-terminated and outlives the call.
        let ret = unsafe { call(self.inner.raw, c_name.as_ptr()) };
        check(ret, operation, &target)
    }

    /// Creates snapshot `name` of the image head (blocking; flushes first). Skips the quiesce
    /// notification (`RBD_SNAP_CREATE_SKIP_QUIESCE`): Ferry is the image's only writer.
    pub fn create_snapshot(&self, name: &str) -> Result<(), RbdError> {
        extern "C" fn no_progress(_offset: u64, _total: u64, _arg: *mut c_void) -> c_int {
            0
        }
        unsafe extern "C" fn create(image: rbd_image_t, name: *const c_char) -> c_int {
            // SAFETY: forwarded from `snap_call`'s contract (open image, NUL-terminated name);
            // the progress callback ignores its null argument.
            unsafe {
                rbd_snap_create2(
                    image,
                    name,
                    SNAP_CREATE_SKIP_QUIESCE,
                    no_progress,
                    ptr::null_mut(),
                )
            }
        }
        self.snap_call("create snapshot", name, create)
    }

    /// Removes snapshot `name` (it must be unprotected).
    pub fn remove_snapshot(&self, name: &str) -> Result<(), RbdError> {
        self.snap_call("remove snapshot", name, rbd_snap_remove)
    }

    /// Protects snapshot `name`, so clones can be made of it (test failover).
    pub fn protect_snapshot(&self, name: &str) -> Result<(), RbdError> {
        self.snap_call("protect snapshot", name, rbd_snap_protect)
    }

    /// Unprotects snapshot `name` (fails with EBUSY while clones of it exist).
    pub fn unprotect_snapshot(&self, name: &str) -> Result<(), RbdError> {
        self.snap_call("unprotect snapshot", name, rbd_snap_unprotect)
    }

    /// Whether snapshot `name` is protected.
    pub fn is_snapshot_protected(&self, name: &str) -> Result<bool, RbdError> {
        let target = format!("{}@{}", self.inner.label, name);
        let c_name = c_string(name, "query snapshot protection", &target)?;
        let mut protected: c_int = 0;
        // SAFETY: open image; `c_name` NUL-terminated and alive; valid out-pointer.
        let ret = unsafe { rbd_snap_is_protected(self.inner.raw, c_name.as_ptr(), &mut protected) };
        check(ret, "query snapshot protection", &target)?;
        Ok(protected != 0)
    }

    /// The image's snapshots, oldest first.
    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>, RbdError> {
        let mut capacity: c_int = 16;
        loop {
            let mut infos: Vec<rbd_snap_info_t> = (0..capacity)
                .map(|_| rbd_snap_info_t {
                    id: 0,
                    size: 0,
                    name: ptr::null(),
                })
                .collect();
            let mut max = capacity;
            // SAFETY: `infos` has room for `max` entries; librbd fills at most that many, or
            // returns ERANGE with the needed count in `max`.
            let ret = unsafe { rbd_snap_list(self.inner.raw, infos.as_mut_ptr(), &mut max) };
            if ret == -libc::ERANGE {
                capacity = max.max(capacity * 2);
                continue;
            }
            check(ret, "list snapshots", &self.inner.label)?;
            let count = ret as usize;
            let list = infos[..count]
                .iter()
                .map(|info| SnapshotInfo {
                    id: info.id,
                    size: info.size,
                    // SAFETY: librbd set `name` to a NUL-terminated string for each of the
                    // `count` entries; it stays valid until rbd_snap_list_end below.
                    name: unsafe { CStr::from_ptr(info.name) }
                        .to_string_lossy()
                        .into_owned(),
                })
                .collect();
            // SAFETY: `infos` was filled by rbd_snap_list, which allocated the names freed here
            // once; the Vec itself is ours and dropped afterwards.
            unsafe { rbd_snap_list_end(infos.as_mut_ptr()) };
            return Ok(list);
        }
    }

    /// Extents of `[offset, offset+len)` that changed since snapshot `from` (None: since the
    /// image was created), in offset order. With fast-diff this reads the object map only.
    /// `whole_object` reports whole 4 MiB objects (faster, coarser).
    pub fn diff(
        &self,
        from: Option<&str>,
        offset: u64,
        len: u64,
        whole_object: bool,
    ) -> Result<Vec<DiffExtent>, RbdError> {
        extern "C" fn collect(offset: u64, len: usize, exists: c_int, arg: *mut c_void) -> c_int {
            // SAFETY: `arg` is the `&mut Vec<DiffExtent>` passed to rbd_diff_iterate2 below,
            // which is alive and not otherwise borrowed while librbd calls back synchronously.
            let extents = unsafe { &mut *arg.cast::<Vec<DiffExtent>>() };
            extents.push(DiffExtent {
                offset,
                len: len as u64,
                exists: exists != 0,
            });
            0
        }
        let target = format!("{}@{}", self.inner.label, from.unwrap_or("(creation)"));
        let from = from
            .map(|name| c_string(name, "diff", &target))
            .transpose()?;
        let mut extents: Vec<DiffExtent> = Vec::new();
        // SAFETY: open image; `from` is NUL-terminated or NULL; the callback has the expected
        // signature and `arg` points at `extents`, which outlives this synchronous call.
        let ret = unsafe {
            rbd_diff_iterate2(
                self.inner.raw,
                from.as_ref().map_or(ptr::null(), |name| name.as_ptr()),
                offset,
                len,
                0,
                u8::from(whole_object),
                collect,
                (&mut extents as *mut Vec<DiffExtent>).cast(),
            )
        };
        check(ret, "diff", &target)?;
        Ok(extents)
    }
}

#[doc(hidden)]
pub mod test_cluster;

#[cfg(test)]
mod tests;
