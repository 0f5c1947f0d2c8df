//! The FFI boundary: bindings to the C++ shim in `csrc/` and the one checked-call
//! helper. Everything here is crate-private; [`crate::ScriptModule`] is the safe face.
//! Long because it is the one door to C++: every binding to the shim sits here.
use std::ffi::{c_char, c_int, c_void, CStr};
use std::marker::PhantomData;
use std::path::PathBuf;

use tch::Tensor;

/// Whether libtorch's CUDA backend (`libtorch_cuda`) was loaded when this
/// process started, or why not: `"loaded"`, or `"not loaded: …"` (no CUDA
/// driver, `TRANSPLANT_CUDA=0`, a CPU-only libtorch).
///
/// This crate does not link `libtorch_cuda`: it loads it before `main`, and
/// only where a CUDA driver (`libcuda.so.1`) is installed, so that a process
/// on a machine without a GPU does not map its ~1 GB of code.
/// `tch::Cuda::is_available()` answers as usual either way.
pub fn cuda_backend() -> &'static str {
    // SAFETY: the shim returns a pointer to a static NUL-terminated string.
    unsafe { CStr::from_ptr(tp_cuda_backend()) }.to_str().unwrap_or("unknown")
}

/// The libtorch a process runs on: what [`libtorch`] finds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Libtorch {
    /// The version the loaded library reports (`TORCH_VERSION` among its
    /// build options, `2.13.0`), not the one this crate was compiled against;
    /// `None` where it reports none.
    pub version: Option<String>,
    /// The `libtorch_cpu` file the loader mapped (symbolic links resolved);
    /// `None` where the loader cannot say.
    pub library: Option<PathBuf>,
}

/// Which libtorch this process runs on: its version and the file it was
/// loaded from (a PyTorch wheel's `torch/lib/libtorch_cpu.so`, say), asked of
/// the loaded library and the dynamic loader.
pub fn libtorch() -> Libtorch {
    // SAFETY: the shim returns a pointer to a NUL-terminated string it keeps
    // for the life of the process.
    let described = unsafe { CStr::from_ptr(tp_libtorch()) }.to_string_lossy();
    let (version, path) = described.split_once('\n').unwrap_or((&described, ""));
    Libtorch {
        version: (!version.is_empty()).then(|| version.to_string()),
        library: (!path.is_empty())
            .then(|| std::fs::canonicalize(path).unwrap_or_else(|_| PathBuf::from(path))),
    }
}

/// Opaque `torch::jit::Module` handle owned by the shim.
#[repr(C)]
pub(crate) struct TpModule {
    _private: [u8; 0],
}

/// Role codes used by `tp_module_entries`.
pub(crate) const TP_PARAMETER: c_int = 0;

pub(crate) type EntryFn =
    extern "C" fn(ctx: *mut c_void, name: *const c_char, role: c_int, tensor: *mut torch_sys::C_tensor);
pub(crate) type TensorFn = extern "C" fn(ctx: *mut c_void, tensor: *mut torch_sys::C_tensor);
type ReleaseFn = extern "C" fn(ctx: *mut c_void);
type RangeFn = extern "C" fn(ctx: *mut c_void, begin: i64, end: i64);

extern "C" {
    fn tp_cuda_backend() -> *const c_char;
    fn tp_libtorch() -> *const c_char;
    fn tp_error_free(error: *mut c_char);
    pub(crate) fn tp_module_load(
        path: *const c_char,
        device: *const c_char,
        out: *mut *mut TpModule,
    ) -> *mut c_char;
    pub(crate) fn tp_module_free(module: *mut TpModule);
    pub(crate) fn tp_module_deepcopy(module: *const TpModule, out: *mut *mut TpModule) -> *mut c_char;
    pub(crate) fn tp_module_entries(module: *const TpModule, ctx: *mut c_void, f: EntryFn) -> *mut c_char;
    pub(crate) fn tp_module_save(module: *const TpModule, path: *const c_char) -> *mut c_char;
    pub(crate) fn tp_module_set_training(module: *mut TpModule, training: c_int) -> *mut c_char;
    pub(crate) fn tp_module_is_training(module: *const TpModule, out: *mut c_int) -> *mut c_char;
    pub(crate) fn tp_module_to(module: *mut TpModule, device: *const c_char, dtype: c_int) -> *mut c_char;
    pub(crate) fn tp_module_forward(
        module: *const TpModule,
        inputs: *const *mut torch_sys::C_tensor,
        n_inputs: usize,
        ctx: *mut c_void,
        f: TensorFn,
    ) -> *mut c_char;
    fn tp_tensor_from_borrowed_bytes(
        data: *mut c_void,
        nbytes: i64,
        ctx: *mut c_void,
        release: ReleaseFn,
        out: *mut *mut torch_sys::C_tensor,
    ) -> *mut c_char;
    fn tp_tensor_impl(tensor: *const torch_sys::C_tensor) -> *const c_void;
    fn tp_strided_view(
        base: *const torch_sys::C_tensor,
        dtype: c_int,
        ndim: i64,
        sizes: *const i64,
        strides: *const i64,
        offset: i64,
        out: *mut *mut torch_sys::C_tensor,
    ) -> *mut c_char;
    fn tp_storage_bytes(tensor: *const torch_sys::C_tensor, data: *mut *const c_void, nbytes: *mut usize);
    fn tp_parallel_for(n: i64, grain: i64, ctx: *mut c_void, body: RangeFn) -> *mut c_char;
    fn tp_describe_pairs(
        dst: *const *mut torch_sys::C_tensor,
        src: *const *mut torch_sys::C_tensor,
        n: usize,
        for_writing: c_int,
        moves: *mut TpMove,
        failed: *mut i64,
    ) -> *mut c_char;
    fn tp_copy_described(
        dst: *const *mut torch_sys::C_tensor,
        src: *const *mut torch_sys::C_tensor,
        moves: *const TpMove,
        n: usize,
        failed: *mut i64,
    ) -> *mut c_char;
    fn tp_verify_described(
        dst: *const *mut torch_sys::C_tensor,
        src: *const *mut torch_sys::C_tensor,
        moves: *const TpMove,
        n: usize,
        mismatch: *mut i64,
    ) -> *mut c_char;
}

/// `tp_move.kind` (csrc/shim.h): converted or on a GPU, through `copy_`.
const TP_MOVE_OTHER: i32 = 0;

/// `tp_move` (csrc/shim.h): one pair as the shim described it.
#[repr(C)]
#[derive(Clone, Copy)]
struct TpMove {
    to: *mut c_void,
    from: *const c_void,
    target: *mut c_void,
    nbytes: i64,
    kind: i32,
}

impl Default for TpMove {
    fn default() -> Self {
        TpMove {
            to: std::ptr::null_mut(),
            from: std::ptr::null(),
            target: std::ptr::null_mut(),
            nbytes: 0,
            kind: 0,
        }
    }
}

/// Pairs of tensors (`dst[i]` receives `src[i]`) checked and described by the
/// shim once, then copied and verified without reading their metadata again.
/// Borrows the targets (mutably, when they are to be written) and the sources
/// for `'a`, so they cannot be resized or reallocated meanwhile.
pub(crate) struct Pairs<'a> {
    /// Targets: from `&mut Tensor` when `writable`; else only ever read.
    dst: Vec<*mut torch_sys::C_tensor>,
    /// Sources: only ever read. (The shim's signature takes `tp_tensor *`.)
    src: Vec<*mut torch_sys::C_tensor>,
    moves: Vec<TpMove>,
    writable: bool,
    _tensors: PhantomData<(&'a mut Tensor, &'a Tensor)>,
}

/// A failed call: the failing pair's index, if known, and libtorch's message.
pub(crate) type PairError = (Option<usize>, String);

/// The shim reads through these pointers only.
fn read_only(tensors: &[&Tensor]) -> Vec<*mut torch_sys::C_tensor> {
    tensors.iter().map(|t| t.as_ptr().cast_mut()).collect()
}

impl<'a> Pairs<'a> {
    /// Pairs to be copied: checks that every pair agrees in shape (else the
    /// lowest index that does not, and nothing is written) and describes each,
    /// the targets' data asked for as writable.
    pub(crate) fn to_write(dst: Vec<&'a mut Tensor>, src: &[&'a Tensor]) -> Result<Self, PairError> {
        let dst = dst.into_iter().map(|t| t.as_mut_ptr()).collect();
        Self::describe(dst, read_only(src), true)
    }

    /// Pairs to be compared only (nothing is written).
    pub(crate) fn to_read(dst: &[&'a Tensor], src: &[&'a Tensor]) -> Result<Self, PairError> {
        Self::describe(read_only(dst), read_only(src), false)
    }

    fn describe(
        dst: Vec<*mut torch_sys::C_tensor>,
        src: Vec<*mut torch_sys::C_tensor>,
        writable: bool,
    ) -> Result<Self, PairError> {
        assert_eq!(dst.len(), src.len(), "pairs come in twos");
        let n = dst.len();
        let mut pairs =
            Pairs { dst, src, moves: vec![TpMove::default(); n], writable, _tensors: PhantomData };
        let mut failed: i64 = -1;
        // SAFETY: both arrays hold `n` live `at::Tensor*` borrowed for `'a`; the
        // shim only reads them and writes `moves` (n entries) and `failed`.
        let result = unsafe {
            check(tp_describe_pairs(
                pairs.dst.as_ptr(),
                pairs.src.as_ptr(),
                n,
                c_int::from(writable),
                pairs.moves.as_mut_ptr(),
                &mut failed,
            ))
        };
        result.map_err(|message| (usize::try_from(failed).ok(), message))?;
        Ok(pairs)
    }

    /// The first two pairs (by index) whose targets share memory (tied weights,
    /// overlapping views) but would receive different bytes there: copying
    /// both would leave one of them wrong whatever the order. Shared memory
    /// that receives the same bytes from both (tied sources, equal values) is
    /// fine. Only contiguous targets are seen. Where a pair converts its
    /// values (a cast, a GPU), two pairs that write the same whole range are
    /// asked of `equal` (`equal(a, b)`: whether pairs `a` and `b` write the
    /// same bytes), since their sources cannot be compared as they lie.
    pub(crate) fn first_conflict(&self, equal: &dyn Fn(usize, usize) -> bool) -> Option<(usize, usize)> {
        let mut ranges: Vec<(usize, usize, usize)> = (self.moves.iter().enumerate())
            .filter(|(_, m)| !m.to.is_null() && m.nbytes > 0)
            .map(|(i, m)| (m.to as usize, m.to as usize + m.nbytes as usize, i))
            .collect();
        ranges.sort_unstable();
        // The ranges started so far that reach beyond the current start: one at
        // most, unless targets overlap.
        let mut open: Vec<(usize, usize, usize)> = Vec::new();
        let mut conflict: Option<(usize, usize)> = None;
        for &(start, end, i) in &ranges {
            open.retain(|&(_, reach, _)| reach > start);
            for &(other_start, other_end, j) in &open {
                let shared = start..end.min(other_end);
                if !self.same_bytes(j, other_start, i, start, shared, equal) {
                    let found = (i.min(j), i.max(j));
                    conflict = Some(conflict.map_or(found, |c| c.min(found)));
                }
            }
            open.push((start, end, i));
        }
        conflict
    }

    /// Whether pairs `a` (target at `a_start`) and `b` (at `b_start`) write the
    /// same bytes into the addresses `shared`.
    fn same_bytes(
        &self,
        a: usize,
        a_start: usize,
        b: usize,
        b_start: usize,
        shared: std::ops::Range<usize>,
        equal: &dyn Fn(usize, usize) -> bool,
    ) -> bool {
        let (x, y) = (&self.moves[a], &self.moves[b]);
        let cpu_bytes = |m: &TpMove| m.kind != TP_MOVE_OTHER && !m.from.is_null();
        if a_start == b_start
            && x.nbytes == y.nbytes
            && !x.from.is_null()
            && x.from == y.from
            && x.kind == y.kind
        {
            return true; // one source written twice into one place
        }
        if !cpu_bytes(x) || !cpu_bytes(y) {
            // Converted or on a GPU: the values are compared once converted,
            // where both fill the same range; otherwise not assumed equal.
            return a_start == b_start && x.nbytes == y.nbytes && equal(a, b);
        }
        let len = shared.end - shared.start;
        // SAFETY: both pairs are plain CPU pairs: `from` points at `nbytes`
        // readable bytes of a source tensor alive for `'a`, and `shared` lies
        // within both targets' ranges, so both offsets plus `len` stay within
        // their sources' bytes.
        unsafe {
            let from = |m: &TpMove, start: usize| {
                std::slice::from_raw_parts((m.from as *const u8).add(shared.start - start), len)
            };
            from(x, a_start) == from(y, b_start)
        }
    }

    /// Bytes the target of pair `i` holds.
    pub(crate) fn bytes(&self, i: usize) -> u64 {
        self.moves[i].nbytes.max(0) as u64
    }

    /// Copies the pairs in `range`, in place, in one call into the shim
    /// (`tp_copy_described`); errors give indices into all the pairs.
    pub(crate) fn copy(&mut self, range: std::ops::Range<usize>) -> Result<(), PairError> {
        if !self.writable {
            return Err((None, "these pairs were described for reading only".into()));
        }
        let mut failed: i64 = -1;
        // SAFETY: the ranges are in bounds (slicing panics otherwise); the
        // tensors are live for `'a` and described by `moves`, whose pointers
        // stay valid while they are not reallocated (the borrows forbid it). The
        // shim writes only into the targets' data, which came from `&mut
        // Tensor`s (`writable`), and `failed`.
        let result = unsafe {
            let (dst, src, moves) =
                (&self.dst[range.clone()], &self.src[range.clone()], &self.moves[range.clone()]);
            check(tp_copy_described(dst.as_ptr(), src.as_ptr(), moves.as_ptr(), dst.len(), &mut failed))
        };
        result.map_err(|message| (usize::try_from(failed).ok().map(|i| range.start + i), message))
    }

    /// The index of the first pair whose target is not bit for bit its source
    /// converted to the target's dtype and device, if any.
    pub(crate) fn first_mismatch(&self) -> Result<Option<usize>, String> {
        let mut mismatch: i64 = -1;
        // SAFETY: as in `copy`; the shim only reads the tensors and writes `mismatch`.
        unsafe {
            check(tp_verify_described(
                self.dst.as_ptr(),
                self.src.as_ptr(),
                self.moves.as_ptr(),
                self.dst.len(),
                &mut mismatch,
            ))?
        };
        Ok(usize::try_from(mismatch).ok())
    }
}

/// Runs `body` over ranges covering `0..len`, each at least `grain` long, on
/// libtorch's intra-op threads (see `tp_parallel_for`). `body` must not
/// unwind: the caller catches panics inside it.
pub(crate) fn parallel_for(len: usize, grain: usize, body: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
    extern "C" fn trampoline(ctx: *mut c_void, begin: i64, end: i64) {
        // SAFETY: `ctx` is the `&&dyn Fn` passed below, alive for the whole call.
        let body = unsafe { &*(ctx as *const &(dyn Fn(std::ops::Range<usize>) + Sync)) };
        body(begin as usize..end as usize);
    }
    let ctx = &body as *const &(dyn Fn(std::ops::Range<usize>) + Sync) as *mut c_void;
    let (len, grain) =
        (i64::try_from(len).unwrap_or(i64::MAX), i64::try_from(grain.max(1)).unwrap_or(i64::MAX));
    // SAFETY: `ctx` points at `body`, which outlives the call; the trampoline is
    // called from libtorch's threads, which `body: Sync` allows.
    let result = unsafe { check(tp_parallel_for(len, grain, ctx, trampoline)) };
    // at::parallel_for itself only fails if the body throws, and ours cannot.
    result.expect("at::parallel_for over a body that cannot throw");
}

/// Identifies the tensor behind a handle: two handles (shallow clones) of one
/// tensor give the same value, distinct tensors different ones — unlike
/// `data_ptr`, which is shared by views and null for every empty tensor.
pub(crate) fn tensor_identity(tensor: &Tensor) -> usize {
    // SAFETY: `tensor.as_ptr()` is a live `at::Tensor*` for the duration of the call.
    unsafe { tp_tensor_impl(tensor.as_ptr()) as usize }
}

/// A tensor of `kind` sharing `base`'s storage: `sizes` and `strides`,
/// starting `offset` elements (of `kind`) from the storage's start; refused
/// where it would reach past the storage. One call, no dispatcher: readers of
/// files with tens of thousands of tensors make them this way.
pub(crate) fn strided_view(
    base: &Tensor,
    kind: impl Into<crate::dtype::Dtype>,
    sizes: &[i64],
    strides: &[i64],
    offset: i64,
) -> Result<Tensor, String> {
    if sizes.len() != strides.len() {
        return Err(format!("{} sizes but {} strides", sizes.len(), strides.len()));
    }
    let mut out = std::ptr::null_mut();
    // SAFETY: `base` is a live tensor; the arrays hold `sizes.len()` values and
    // outlive the call; the shim writes `out` only on success.
    let result = unsafe {
        check(tp_strided_view(
            base.as_ptr(),
            crate::dtype::scalar_type(kind),
            sizes.len() as i64,
            sizes.as_ptr(),
            strides.as_ptr(),
            offset,
            &mut out,
        ))
    };
    // SAFETY: on success `out` is a fresh `new at::Tensor` that we now own.
    result.map(|()| unsafe { Tensor::from_ptr(out) })
}

/// The 1-D contiguous `uint8` tensor `bytes` seen as elements of `dtype`
/// (any dtype libtorch has, also those tch has no `Kind` for); its offset
/// in its storage must be a multiple of the element size, its length too.
pub(crate) fn view_bytes_as(bytes: &Tensor, dtype: crate::dtype::Dtype) -> Result<Tensor, String> {
    let element = dtype.size() as i64;
    let (offset, len) = (bytes.storage_offset(), bytes.numel() as i64);
    if offset % element != 0 || len % element != 0 || bytes.stride() != [1] {
        return Err(format!("{len} bytes at offset {offset} are not whole {dtype} elements"));
    }
    strided_view(bytes, dtype, &[len / element], &[1], offset / element)
}

/// An uninitialised contiguous CPU tensor of `dtype` and `shape`, for any
/// dtype (also those tch has no `Kind` for).
pub(crate) fn empty(shape: &[i64], dtype: crate::dtype::Dtype) -> Result<Tensor, tch::TchError> {
    if let Some(kind) = dtype.kind() {
        return Tensor::f_empty(shape, (kind, tch::Device::Cpu));
    }
    let numel = shape.iter().try_fold(1i64, |n, &d| n.checked_mul(d.max(0)));
    let bytes = numel
        .and_then(|n| n.checked_mul(dtype.size() as i64))
        .ok_or_else(|| tch::TchError::Shape(format!("{shape:?} of {dtype} overflows")))?;
    let raw = Tensor::f_empty([bytes], (tch::Kind::Uint8, tch::Device::Cpu))?;
    view_bytes_as(&raw, dtype).map_err(tch::TchError::Kind)?.f_reshape(shape)
}

/// `tensor` as `dtype`: itself when it has that dtype already, else cast
/// (only between dtypes tch has a `Kind` for; any other is refused by name).
pub(crate) fn to_dtype(tensor: &Tensor, dtype: crate::dtype::Dtype) -> Result<Tensor, tch::TchError> {
    let own = crate::dtype::Dtype::of(tensor)?;
    if own == dtype {
        return Ok(tensor.shallow_clone());
    }
    own.require_kind(&format!("a cast from {own} to {dtype}"))?;
    tensor.f_to_kind(dtype.require_kind(&format!("a cast from {own} to {dtype}"))?)
}

/// The address range of `tensor`'s whole storage (empty without one).
pub(crate) fn storage_range(tensor: &Tensor) -> std::ops::Range<usize> {
    let (mut data, mut nbytes) = (std::ptr::null(), 0usize);
    // SAFETY: `tensor.as_ptr()` is a live `at::Tensor*`; the shim writes the two outputs.
    unsafe { tp_storage_bytes(tensor.as_ptr(), &mut data, &mut nbytes) };
    data as usize..data as usize + nbytes
}

extern "C" fn release_owner<T>(ctx: *mut c_void) {
    // SAFETY: `ctx` is the `Box<T>` leaked in `tensor_over_bytes`; libtorch calls
    // this once, when the storage is freed.
    drop(unsafe { Box::from_raw(ctx as *mut T) });
}

/// A 1-D `uint8` CPU tensor over `len` bytes at `data` that keeps `owner` (the
/// memory map or buffer holding those bytes) alive for as long as any tensor
/// shares the storage.
///
/// # Safety
/// `data .. data + len` must be valid for reads and writes for as long as `owner`
/// lives, and must not be accessed mutably by anything else meanwhile.
pub(crate) unsafe fn tensor_over_bytes<T: Send + 'static>(
    owner: T,
    data: *mut u8,
    len: usize,
) -> Result<Tensor, String> {
    let nbytes = i64::try_from(len).map_err(|_| format!("{len} bytes do not fit a tensor"))?;
    let ctx = Box::into_raw(Box::new(owner)) as *mut c_void;
    let mut out = std::ptr::null_mut();
    // SAFETY: `data`/`len` are valid per this function's contract; `ctx` is released by
    // `release_owner::<T>` exactly once, by libtorch, or below if the call fails.
    let result = unsafe {
        check(tp_tensor_from_borrowed_bytes(data as *mut c_void, nbytes, ctx, release_owner::<T>, &mut out))
    };
    match result {
        // SAFETY: on success `out` is a fresh `new at::Tensor` that we now own.
        Ok(()) => Ok(unsafe { Tensor::from_ptr(out) }),
        Err(message) => {
            release_owner::<T>(ctx);
            Err(message)
        }
    }
}

/// Turns a shim return value into `Ok(())` or the C++ exception's message.
///
/// # Safety
/// `error` must be null or a message returned by a `tp_*` function, not yet freed.
pub(crate) unsafe fn check(error: *mut c_char) -> Result<(), String> {
    if error.is_null() {
        return Ok(());
    }
    // SAFETY: the shim returns a NUL-terminated malloc'd string, freed once here.
    let message = unsafe { CStr::from_ptr(error) }.to_string_lossy().into_owned();
    unsafe { tp_error_free(error) };
    Err(message)
}

#[cfg(test)]
mod tests {
    use super::strided_view;
    use tch::{Device, Kind, Tensor};

    #[test]
    fn strided_views_have_the_dtype_and_bytes_asked_and_stay_inside_their_storage() {
        let bytes = Tensor::arange(64, (Kind::Uint8, Device::Cpu));
        let rarer = [Kind::ComplexFloat, Kind::Float8e5m2, Kind::Float8e4m3fn];
        for kind in crate::dtype::COMMON_KINDS.into_iter().chain(rarer) {
            let view = strided_view(&bytes, kind, &[2], &[1], 1).unwrap();
            assert_eq!(view.kind(), kind);
            let want = bytes.narrow(0, 0, 32).view_dtype(kind).narrow(0, 1, 2);
            assert!(view.view_dtype(Kind::Uint8).equal(&want.view_dtype(Kind::Uint8)), "{kind:?}");
        }
        let t = strided_view(&bytes, Kind::Float, &[3, 2], &[1, 3], 2).unwrap();
        assert_eq!(t.stride(), [1, 3]);
        assert!(t.equal(&bytes.view_dtype(Kind::Float).as_strided([3, 2], [1, 3], 2)));
        assert!(strided_view(&bytes, Kind::Float, &[16], &[1], 1).is_err(), "past the end");
        assert!(strided_view(&bytes, Kind::Float, &[4, 4], &[4, 1], 0).is_ok());
        assert!(strided_view(&bytes, Kind::Int64, &[2], &[-1], 4).is_err(), "a negative stride");
        assert!(strided_view(&bytes, Kind::Float, &[0], &[1], 100).is_ok(), "an empty view reaches nothing");
    }
}
