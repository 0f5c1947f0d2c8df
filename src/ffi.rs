//! The FFI boundary: bindings to the C++ shim in `csrc/` and the one checked-call
//! helper. Everything here is crate-private; [`crate::ScriptModule`] is the safe face.
use std::ffi::{c_char, c_int, c_void, CStr};

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

extern "C" {
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
    pub(crate) fn tp_module_forward(
        module: *const TpModule,
        inputs: *const *mut torch_sys::C_tensor,
        n_inputs: usize,
        ctx: *mut c_void,
        f: TensorFn,
    ) -> *mut c_char;
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
