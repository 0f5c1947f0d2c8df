//! [`ScriptModule`]: a TorchScript module loaded through the shim, with its
//! parameters **and buffers** (which `tch::CModule` does not expose).
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::Path;
use std::ptr;

use tch::{Device, Tensor};

use crate::entry::{device_name, Role};
use crate::error::{Error, Result};
use crate::ffi;

/// One parameter or buffer of a module, with a tensor that shares its storage.
#[derive(Debug)]
pub struct NamedTensor {
    /// Dotted name, as PyTorch's `state_dict()` gives it (`features.0.bn.running_mean`).
    pub name: String,
    /// Parameter or buffer.
    pub role: Role,
    /// A handle on the module's own storage: an in-place write changes the module.
    pub tensor: Tensor,
}

/// A TorchScript module (`torch.jit.save` / `torch.jit.script` / `torch.jit.trace`).
pub struct ScriptModule {
    raw: *mut ffi::TpModule,
    /// Where the module came from, for error messages.
    origin: String,
}

// SAFETY: the handle owns a `torch::jit::Module` (a reference-counted pointer to a
// heap object); nothing in it is tied to the thread that created it.
unsafe impl Send for ScriptModule {}
// SAFETY: every `&self` method only reads the module (listing entries, saving,
// forward, which libtorch's inference services run from many threads at once);
// the one mutation of the module object, `set_training`, takes `&mut self`.
// Tensor writes through `named_tensors()` handles go through libtorch like any shared tensor.
unsafe impl Sync for ScriptModule {}

impl std::fmt::Debug for ScriptModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScriptModule").field("origin", &self.origin).finish()
    }
}

impl Drop for ScriptModule {
    fn drop(&mut self) {
        // SAFETY: `raw` came from tp_module_load/tp_module_deepcopy and is freed once.
        unsafe { ffi::tp_module_free(self.raw) }
    }
}

fn c_path(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| Error::NulInPath { path: path.into() })
}

extern "C" fn push_entry(
    ctx: *mut c_void,
    name: *const c_char,
    role: c_int,
    tensor: *mut torch_sys::C_tensor,
) {
    // SAFETY: `ctx` is the `&mut Vec<NamedTensor>` that `entries` passed, alive for
    // the call; `name` is a NUL-terminated string valid during this callback;
    // `tensor` is a fresh `new at::Tensor` whose ownership passes to us.
    let entries = unsafe { &mut *(ctx as *mut Vec<NamedTensor>) };
    let name = unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned();
    let tensor = unsafe { Tensor::from_ptr(tensor) };
    let role = if role == ffi::TP_PARAMETER { Role::Parameter } else { Role::Buffer };
    entries.push(NamedTensor { name, role, tensor });
}

extern "C" fn push_tensor(ctx: *mut c_void, tensor: *mut torch_sys::C_tensor) {
    // SAFETY: as in `push_entry`.
    let outputs = unsafe { &mut *(ctx as *mut Vec<Tensor>) };
    outputs.push(unsafe { Tensor::from_ptr(tensor) });
}

impl ScriptModule {
    /// Loads a module saved by `torch.jit.save`, with its tensors on the CPU.
    ///
    /// The module and each of its children come back in the mode they were
    /// saved in (`torch.jit.save` keeps every module's `training` flag): a
    /// model saved after `model.eval()` loads in eval mode, one saved in
    /// training mode (the default of a new `nn.Module`) in training mode, where
    /// BatchNorm normalizes by the batch and Dropout drops. Call
    /// [`set_training`](Self::set_training) to choose; [`is_training`](Self::is_training) says which.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        Self::load_on(path, Device::Cpu)
    }

    /// Loads a module saved by `torch.jit.save`, with its tensors on `device`
    /// (in the mode it was saved in, as [`load`](Self::load)).
    pub fn load_on(path: impl AsRef<Path>, device: Device) -> Result<Self> {
        let path = path.as_ref();
        // libtorch's own message for a folder or a missing file is cryptic.
        let metadata = std::fs::metadata(path).map_err(|source| Error::Io { path: path.into(), source })?;
        if metadata.is_dir() {
            return Err(Error::LoadModule {
                path: path.into(),
                message: "is a directory, expected a file".into(),
            });
        }
        let c_path = c_path(path)?;
        let c_device = CString::new(device_name(device)).unwrap_or_default();
        let mut raw = ptr::null_mut();
        // SAFETY: both strings are NUL-terminated and outlive the call; `raw` is an out pointer.
        let result = unsafe { ffi::check(ffi::tp_module_load(c_path.as_ptr(), c_device.as_ptr(), &mut raw)) };
        result.map_err(|message| Error::LoadModule { path: path.into(), message })?;
        Ok(Self { raw, origin: path.display().to_string() })
    }

    /// Where this module came from (its file), as used in error messages.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    fn module_error(&self, operation: &'static str) -> impl FnOnce(String) -> Error + '_ {
        move |message| Error::Module { module: self.origin.clone(), operation, message }
    }

    /// A deep copy: the same code with tensors of its own.
    pub fn deep_copy(&self) -> Result<Self> {
        let mut raw = ptr::null_mut();
        // SAFETY: `self.raw` is a live module; `raw` is an out pointer.
        let result = unsafe { ffi::check(ffi::tp_module_deepcopy(self.raw, &mut raw)) };
        result.map_err(self.module_error("deepcopy"))?;
        Ok(Self { raw, origin: self.origin.clone() })
    }

    /// Every parameter and buffer, recursively, with dotted names, in the order of
    /// PyTorch's `state_dict()`. The tensors share storage with the module.
    pub fn named_tensors(&self) -> Result<Vec<NamedTensor>> {
        let mut entries: Vec<NamedTensor> = Vec::new();
        let ctx = &mut entries as *mut Vec<NamedTensor> as *mut c_void;
        // SAFETY: `self.raw` is live; `push_entry` matches `EntryFn` and only pushes into `entries`.
        let result = unsafe { ffi::check(ffi::tp_module_entries(self.raw, ctx, push_entry)) };
        result.map_err(self.module_error("listing parameters and buffers"))?;
        Ok(entries)
    }

    /// Saves the module (code, current tensors and mode) like `torch.jit.save`.
    /// The file appears whole or not at all (written beside `path`, then
    /// renamed), as every [`Target::save`](crate::Target::save) does, whose
    /// signature this is.
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::files::write_atomically(path, |temp| self.save_in_place(temp))
    }

    /// `torch.jit.save` into `path` itself.
    fn save_in_place(&self, path: &Path) -> Result<()> {
        let c_path = c_path(path)?;
        // SAFETY: `self.raw` is live; the path is NUL-terminated and outlives the call.
        let result = unsafe { ffi::check(ffi::tp_module_save(self.raw, c_path.as_ptr())) };
        result.map_err(|message| Error::SaveModule {
            module: self.origin.clone(),
            path: path.into(),
            message,
        })
    }

    /// Switches the module and its children to training (`true`) or eval (`false`) mode.
    pub fn set_training(&mut self, training: bool) -> Result<()> {
        // SAFETY: `self.raw` is live and borrowed mutably.
        let result = unsafe { ffi::check(ffi::tp_module_set_training(self.raw, c_int::from(training))) };
        result.map_err(self.module_error("setting train/eval mode"))
    }

    /// Moves every parameter and buffer to `device` and, with `dtype`, converts
    /// the floating ones to it (like `module.to(device, dtype)` in PyTorch:
    /// integer buffers such as `num_batches_tracked` keep their type).
    pub fn to(&mut self, device: Device, dtype: Option<tch::Kind>) -> Result<()> {
        let code = match dtype {
            None => -1,
            Some(tch::Kind::Half) => 5,
            Some(tch::Kind::Float) => 6,
            Some(tch::Kind::Double) => 7,
            Some(tch::Kind::BFloat16) => 15,
            Some(other) => {
                return Err(Error::Module {
                    module: self.origin.clone(),
                    operation: "conversion",
                    message: format!(
                        "modules convert to floating dtypes only, not {}",
                        crate::dtype::name(other)
                    ),
                })
            }
        };
        let c_device = CString::new(device_name(device)).unwrap_or_default();
        // SAFETY: `self.raw` is live and borrowed mutably; the string outlives the call.
        let result = unsafe { ffi::check(ffi::tp_module_to(self.raw, c_device.as_ptr(), code)) };
        result.map_err(self.module_error("moving/converting"))
    }

    /// Whether the module is in training mode.
    pub fn is_training(&self) -> Result<bool> {
        let mut training: c_int = 0;
        // SAFETY: `self.raw` is live; `training` is an out pointer.
        let result = unsafe { ffi::check(ffi::tp_module_is_training(self.raw, &mut training)) };
        result.map_err(self.module_error("reading train/eval mode"))?;
        Ok(training != 0)
    }

    /// Runs `forward(*inputs)`. The output — a tensor, or tuples/lists of tensors —
    /// comes back flattened depth first. Gradients are not tracked.
    pub fn forward(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let _no_grad = tch::no_grad_guard();
        let pointers: Vec<*mut torch_sys::C_tensor> =
            inputs.iter().map(|tensor| tensor.as_ptr() as *mut torch_sys::C_tensor).collect();
        let mut outputs: Vec<Tensor> = Vec::new();
        let ctx = &mut outputs as *mut Vec<Tensor> as *mut c_void;
        // SAFETY: `self.raw` is live; the input pointers are borrowed from `inputs`
        // for the call and only read; `push_tensor` matches `TensorFn`.
        let result = unsafe {
            ffi::check(ffi::tp_module_forward(self.raw, pointers.as_ptr(), pointers.len(), ctx, push_tensor))
        };
        result.map_err(self.module_error("forward"))?;
        Ok(outputs)
    }
}
