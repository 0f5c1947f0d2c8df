//! tch's own format (`.ot`): what `VarStore::save` and `Tensor::save_multi` write,
//! through libtorch's `torch::serialize::OutputArchive`.
//!
//! The container is a TorchScript archive holding one `__torch__.Module` whose
//! attributes are the tensors, with `.` in names replaced by `|` (attribute names
//! cannot hold dots). We read it as an archive (no libtorch load), write it
//! through tch, and give names back their dots.
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::Path;

use tch::Tensor;

use crate::error::{Error, Result};

/// Whether a TorchScript-style archive is a tch archive rather than a module:
/// a tch archive's code defines no method at all (one `class Module` listing its
/// tensors); a module has at least `forward`. The `.ot` extension decides too.
pub(crate) fn is_tch_archive<R: Read + Seek>(
    path: &Path,
    archive: &mut zip::ZipArchive<R>,
    folder: &str,
) -> bool {
    if super::Format::for_extension(path) == Some(super::Format::TchArchive) {
        return true;
    }
    let code: Vec<String> = archive
        .file_names()
        .filter(|n| n.starts_with(folder) && n[folder.len()..].starts_with("code/") && n.ends_with(".py"))
        .map(str::to_string)
        .collect();
    for name in code {
        let Ok(file) = archive.by_name(&name) else { return false };
        let mut text = String::new();
        // Code files are small; a huge one is not tch's.
        if file.take(MAX_CODE_BYTES).read_to_string(&mut text).is_err() || text.contains("def ") {
            return false;
        }
    }
    true
}

const MAX_CODE_BYTES: u64 = 1 << 20;
const FORMAT: &str = "tch archive (.ot)";

/// Reads every tensor of a `.ot` file, in the file's order: as the
/// TorchScript archive it is ([`super::script_archive`]), none of its code
/// run, every record's extent checked (libtorch's loader trusts them), each
/// tensor a view of a private map of the file.
pub fn read(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let tensors = super::script_archive::read(path).map_err(|e| match e {
        Error::Format { path, message, .. } => Error::Format { path, format: FORMAT, message },
        other => other,
    })?;
    if let Some((name, _, t)) = tensors.iter().find(|(_, _, t)| super::overlapping(&t.size(), &t.stride())) {
        return Err(Error::Format {
            path: path.into(),
            format: FORMAT,
            message: format!(
                "tensor {name}: a view of sizes {:?}, strides {:?} reaches elements twice: refused",
                t.size(),
                t.stride()
            ),
        });
    }
    Ok(tensors.into_iter().map(|(name, _, tensor)| (name.replace('|', "."), tensor)).collect())
}

/// Writes `tensors` as a `.ot` file that `VarStore::load` reads.
pub fn write(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    for (name, _) in tensors {
        if name.contains('|') {
            return Err(Error::Unrepresentable {
                path: path.into(),
                tensor: name.clone(),
                format: "tch archive (.ot)",
                reason: "names may not contain `|` (tch stores `.` as `|`)".into(),
            });
        }
    }
    // libtorch serializes a tensor's whole storage with its offset; a view into
    // a larger buffer (a tensor of a mapped safetensors file, viewed as its
    // dtype) is written wrongly, so each tensor goes out in a storage of its own.
    let owned = tensors
        .iter()
        .map(|(name, t)| {
            let copy = t.f_contiguous().and_then(|c| {
                if c.numel() == 0 {
                    // An empty storage has no data pointer, which tch's stream
                    // callback cannot take (a null slice): an empty view of a
                    // one-element storage reads back as the same empty tensor.
                    let strides: Vec<i64> = c.stride();
                    Tensor::f_zeros([1], (c.kind(), tch::Device::Cpu))
                        .and_then(|one| one.f_as_strided(c.size().as_slice(), strides.as_slice(), Some(0)))
                } else if c.data_ptr() == t.data_ptr() {
                    c.f_detach_copy()
                } else {
                    Ok(c)
                }
            });
            copy.map(|c| (name.clone(), c)).map_err(|source| Error::Tensor {
                store: path.display().to_string(),
                tensor: name.clone(),
                source,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    // libtorch's own file writer aborts the process when a write fails (a full
    // disk): its destructor throws. It writes into a stream here instead, which
    // never fails towards libtorch; the first error is kept and returned.
    let sink = std::rc::Rc::new(std::cell::RefCell::new(Sink {
        file: std::io::BufWriter::with_capacity(1 << 20, File::create(path).map_err(io(path))?),
        error: None,
    }));
    Tensor::save_multi_to_stream(&owned, SinkHandle(sink.clone())).map_err(|e| Error::Format {
        path: path.into(),
        format: "tch archive (.ot)",
        message: e.to_string(),
    })?;
    let mut sink = sink.borrow_mut();
    if let Some(error) = sink.error.take() {
        return Err(io(path)(error));
    }
    sink.file.flush().map_err(io(path))
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.into(), source }
}

/// The file libtorch's archive writer streams into, and the first error a
/// write met: after it, writes are dropped (and reported as done, so that
/// libtorch finishes without throwing).
struct Sink {
    file: std::io::BufWriter<File>,
    error: Option<std::io::Error>,
}

/// What libtorch holds of the [`Sink`] while it writes.
struct SinkHandle(std::rc::Rc<std::cell::RefCell<Sink>>);

impl Write for SinkHandle {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let mut sink = self.0.borrow_mut();
        if sink.error.is_none() {
            if let Err(error) = sink.file.write_all(data) {
                sink.error = Some(error);
            }
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
