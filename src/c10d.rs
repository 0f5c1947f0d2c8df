//! torch.distributed's c10d from Rust, as libtorch ships it: a `TCPStore`
//! (keys under a prefix) and a Gloo process group whose operations run on
//! tensors. The transport of [`crate::sync`]; nothing here knows about models.
use std::ffi::{c_char, c_int, c_void, CString};
use std::ptr;
use std::time::Duration;

use tch::Tensor;

use crate::error::{Error, Result};
use crate::ffi::check;

#[repr(C)]
pub(crate) struct TpStore {
    _private: [u8; 0],
}
#[repr(C)]
pub(crate) struct TpGroup {
    _private: [u8; 0],
}
#[repr(C)]
pub(crate) struct TpWork {
    _private: [u8; 0],
}

type BytesFn = extern "C" fn(ctx: *mut c_void, data: *const u8, len: usize);

extern "C" {
    fn tp_c10d_log_level(level: c_int);
    fn tp_store_connect(
        host: *const c_char,
        port: u16,
        is_server: c_int,
        timeout_ms: i64,
        prefix: *const c_char,
        out: *mut *mut TpStore,
    ) -> *mut c_char;
    fn tp_store_prefixed(store: *const TpStore, prefix: *const c_char, out: *mut *mut TpStore)
        -> *mut c_char;
    fn tp_store_free(store: *mut TpStore);
    fn tp_store_port(store: *const TpStore, out: *mut c_int) -> *mut c_char;
    fn tp_store_set(store: *mut TpStore, key: *const c_char, data: *const u8, len: usize) -> *mut c_char;
    fn tp_store_wait(
        store: *mut TpStore,
        key: *const c_char,
        timeout_ms: i64,
        found: *mut c_int,
    ) -> *mut c_char;
    fn tp_store_check(store: *mut TpStore, key: *const c_char, found: *mut c_int) -> *mut c_char;
    fn tp_store_get(store: *mut TpStore, key: *const c_char, ctx: *mut c_void, f: BytesFn) -> *mut c_char;
    fn tp_store_delete(store: *mut TpStore, key: *const c_char) -> *mut c_char;
    fn tp_store_add(store: *mut TpStore, key: *const c_char, delta: i64, out: *mut i64) -> *mut c_char;
    fn tp_group_gloo(
        store: *mut TpStore,
        rank: c_int,
        size: c_int,
        timeout_ms: i64,
        hostname: *const c_char,
        out: *mut *mut TpGroup,
    ) -> *mut c_char;
    fn tp_group_free(group: *mut TpGroup);
    fn tp_group_broadcast(
        group: *mut TpGroup,
        tensor: *mut torch_sys::C_tensor,
        root: c_int,
        out: *mut *mut TpWork,
    ) -> *mut c_char;
    fn tp_work_wait(work: *mut TpWork) -> *mut c_char;
    fn tp_work_free(work: *mut TpWork);
}

/// Whether c10d's own diagnostics (C++ log lines: every timed-out wait, every
/// lost connection, with stack traces) reach stderr: from here on, for the
/// whole process (c10's log level is a global). Errors still reach the caller.
pub(crate) fn show_diagnostics(show: bool) {
    // SAFETY: sets an int global; no preconditions.
    unsafe { tp_c10d_log_level(if show { 0 } else { 3 }) }
}

fn c_string(what: &str, text: &str) -> Result<CString> {
    CString::new(text).map_err(|_| Error::Sync { message: format!("{what} {text:?} holds a NUL byte") })
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

fn failed(what: String) -> impl FnOnce(String) -> Error {
    move |message| Error::Sync { message: format!("{what}: {message}") }
}

/// A c10d `TCPStore` seen through a key prefix (joined here, as text: c10d's
/// own `PrefixStore` puts a `/` after every prefix, `a//b//key`).
pub(crate) struct Store {
    raw: *mut TpStore,
    /// Put before every key.
    prefix: String,
    /// `host:port`, for messages.
    place: String,
}

// SAFETY: the handle owns reference-counted c10d stores; c10d's TCPStore client
// serialises its own socket use under a mutex, so it may be used from any
// thread; `&mut self` methods are still used one at a time.
unsafe impl Send for Store {}

impl Drop for Store {
    fn drop(&mut self) {
        // SAFETY: `raw` came from tp_store_connect/tp_store_prefixed, freed once.
        unsafe { tp_store_free(self.raw) }
    }
}

extern "C" fn take_bytes(ctx: *mut c_void, data: *const u8, len: usize) {
    // SAFETY: `ctx` is the `&mut Vec<u8>` `get` passed, alive for the call;
    // `data` holds `len` bytes during the call.
    let out = unsafe { &mut *(ctx as *mut Vec<u8>) };
    if len > 0 {
        out.extend_from_slice(unsafe { std::slice::from_raw_parts(data, len) });
    }
}

impl Store {
    /// Connects to the store at `host:port`, serving it from this process when
    /// `serve`; waits up to `timeout` for the server.
    pub(crate) fn connect(
        host: &str,
        port: u16,
        serve: bool,
        timeout: Duration,
        prefix: &str,
    ) -> Result<Self> {
        let place = format!("{host}:{port}");
        let (c_host, c_prefix) = (c_string("host", host)?, c_string("prefix", "")?);
        let mut raw = ptr::null_mut();
        // SAFETY: both strings are NUL-terminated and outlive the call; `raw` is an out pointer.
        let result = unsafe {
            check(tp_store_connect(
                c_host.as_ptr(),
                port,
                c_int::from(serve),
                millis(timeout),
                c_prefix.as_ptr(),
                &mut raw,
            ))
        };
        let what = if serve { "serving the TCPStore at" } else { "connecting to the TCPStore at" };
        result.map_err(failed(format!("{what} {host}:{port}")))?;
        Ok(Self { raw, prefix: prefix.to_string(), place })
    }

    /// The same store with `prefix` added to every key.
    pub(crate) fn prefixed(&self, prefix: &str) -> Result<Self> {
        let raw = self.c10d_prefixed("")?;
        Ok(Self { raw, prefix: format!("{}{prefix}", self.prefix), place: self.place.clone() })
    }

    /// A handle on the same store, its keys under c10d's `PrefixStore` of
    /// `prefix` (nothing added when empty).
    fn c10d_prefixed(&self, prefix: &str) -> Result<*mut TpStore> {
        let c_prefix = c_string("prefix", prefix)?;
        let mut raw = ptr::null_mut();
        // SAFETY: `self.raw` is live; `raw` is an out pointer.
        let result = unsafe { check(tp_store_prefixed(self.raw, c_prefix.as_ptr(), &mut raw)) };
        result.map_err(failed(format!("store {}", self.place)))?;
        Ok(raw)
    }

    /// `key` under this store's prefix, as a C string.
    fn key(&self, key: &str) -> Result<CString> {
        c_string("key", &format!("{}{key}", self.prefix))
    }

    /// Where `key` is, for messages.
    fn at(&self, key: &str) -> String {
        format!("{}{key} in the store at {}", self.prefix, self.place)
    }

    /// The port the store's server listens on.
    pub(crate) fn port(&self) -> Result<u16> {
        let mut port = 0;
        // SAFETY: `self.raw` is live; `port` is an out pointer.
        unsafe { check(tp_store_port(self.raw, &mut port)) }
            .map_err(failed(format!("store {}", self.place)))?;
        u16::try_from(port).map_err(|_| Error::Sync { message: format!("store {}: port {port}", self.place) })
    }

    pub(crate) fn set(&mut self, key: &str, value: &[u8]) -> Result<()> {
        let c_key = self.key(key)?;
        // SAFETY: `self.raw` is live; `value` holds `len` bytes during the call.
        let result = unsafe { check(tp_store_set(self.raw, c_key.as_ptr(), value.as_ptr(), value.len())) };
        result.map_err(failed(format!("setting {}", self.at(key))))
    }

    /// Waits up to `timeout` for `key`; whether it appeared.
    pub(crate) fn wait(&mut self, key: &str, timeout: Duration) -> Result<bool> {
        let c_key = self.key(key)?;
        let mut found = 0;
        // SAFETY: `self.raw` is live; `found` is an out pointer.
        let result =
            unsafe { check(tp_store_wait(self.raw, c_key.as_ptr(), millis(timeout).max(1), &mut found)) };
        result.map_err(failed(format!("waiting for {}", self.at(key))))?;
        Ok(found != 0)
    }

    /// Whether `key` exists now.
    pub(crate) fn check(&mut self, key: &str) -> Result<bool> {
        let c_key = self.key(key)?;
        let mut found = 0;
        // SAFETY: `self.raw` is live; `found` is an out pointer.
        let result = unsafe { check(tp_store_check(self.raw, c_key.as_ptr(), &mut found)) };
        result.map_err(failed(format!("looking for {}", self.at(key))))?;
        Ok(found != 0)
    }

    /// The value of `key`, waiting up to `timeout` for it.
    pub(crate) fn get(&mut self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        if !self.wait(key, timeout)? {
            return Err(Error::Sync {
                message: format!("{} did not appear within {timeout:?}", self.at(key)),
            });
        }
        let c_key = self.key(key)?;
        let mut value: Vec<u8> = Vec::new();
        let ctx = &mut value as *mut Vec<u8> as *mut c_void;
        // SAFETY: `self.raw` is live; `take_bytes` only appends to `value`.
        let result = unsafe { check(tp_store_get(self.raw, c_key.as_ptr(), ctx, take_bytes)) };
        result.map_err(failed(format!("reading {}", self.at(key))))?;
        Ok(value)
    }

    /// Deletes `key`, if it exists.
    pub(crate) fn delete(&mut self, key: &str) -> Result<()> {
        let c_key = self.key(key)?;
        // SAFETY: `self.raw` is live; the key outlives the call.
        let result = unsafe { check(tp_store_delete(self.raw, c_key.as_ptr())) };
        result.map_err(failed(format!("deleting {}", self.at(key))))
    }

    /// Adds `delta` to the counter at `key`; the new value.
    pub(crate) fn add(&mut self, key: &str, delta: i64) -> Result<i64> {
        let c_key = self.key(key)?;
        let mut out = 0;
        // SAFETY: `self.raw` is live; `out` is an out pointer.
        let result = unsafe { check(tp_store_add(self.raw, c_key.as_ptr(), delta, &mut out)) };
        result.map_err(failed(format!("adding to {}", self.at(key))))?;
        Ok(out)
    }
}

/// A Gloo process group.
pub(crate) struct Group {
    raw: *mut TpGroup,
}

// SAFETY: the handle owns a reference-counted ProcessGroupGloo, which runs its
// operations on its own threads and may be called from any thread; operations
// are started one at a time through `&mut self`.
unsafe impl Send for Group {}

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: `raw` came from tp_group_gloo, freed once.
        unsafe { tp_group_free(self.raw) }
    }
}

impl Group {
    /// Joins a Gloo group of `size` ranks as `rank`, meeting through `store`,
    /// with sockets bound to `hostname`; blocks until every rank joined.
    pub(crate) fn gloo(
        store: &Store,
        rank: usize,
        size: usize,
        timeout: Duration,
        hostname: &str,
    ) -> Result<Self> {
        let c_host = c_string("hostname", hostname)?;
        let (c_rank, c_size) = (rank as c_int, size as c_int);
        // The group's own keys under this store's prefix (c10d adds a `/`).
        let keys = Store {
            raw: store.c10d_prefixed(store.prefix.trim_end_matches('/'))?,
            prefix: String::new(),
            place: store.place.clone(),
        };
        let mut raw = ptr::null_mut();
        // SAFETY: `keys.raw` is live; the string outlives the call; `raw` is an out pointer.
        let result = unsafe {
            check(tp_group_gloo(keys.raw, c_rank, c_size, millis(timeout), c_host.as_ptr(), &mut raw))
        };
        result.map_err(failed(format!(
            "joining a Gloo group of {size} as rank {rank} through {}",
            store.at("")
        )))?;
        Ok(Self { raw })
    }

    /// Starts broadcasting `tensor` (a contiguous CPU tensor) from `root`:
    /// every other rank's tensor receives root's. The work holds the tensor.
    pub(crate) fn broadcast(&mut self, tensor: &Tensor, root: usize) -> Result<Work> {
        let mut raw = ptr::null_mut();
        // SAFETY: `self.raw` and `tensor` are live for the call; c10d keeps its
        // own reference to the tensor for the operation.
        let result = unsafe {
            check(tp_group_broadcast(self.raw, tensor.as_ptr() as *mut _, root as c_int, &mut raw))
        };
        result.map_err(failed(format!("starting a broadcast from rank {root}")))?;
        Ok(Work { raw })
    }
}

/// An operation started on a [`Group`].
pub(crate) struct Work {
    raw: *mut TpWork,
}

// SAFETY: a c10d Work is a reference-counted object completed by the group's
// threads; waiting from another thread is what c10d does itself.
unsafe impl Send for Work {}

impl Drop for Work {
    fn drop(&mut self) {
        // SAFETY: `raw` came from tp_group_broadcast, freed once.
        unsafe { tp_work_free(self.raw) }
    }
}

impl Work {
    /// Waits for the operation; its error if it failed (a peer gone, a timeout).
    pub(crate) fn wait(self) -> std::result::Result<(), String> {
        // SAFETY: `self.raw` is live until `self` drops after the call.
        unsafe { check(tp_work_wait(self.raw)) }
    }
}
