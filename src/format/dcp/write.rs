//! Writing a Distributed Checkpoint: each tensor one chunk (`torch.save`
//! stream) in `__0_0.distcp`, and the `.metadata` pickle of the dataclasses
//! `torch.distributed.checkpoint` reads, written as it writes them.
use std::io::Write;
use std::path::Path;

use crate::dtype;
use crate::error::{Error, Result};
use crate::format::torch_pickle::{self, Pickler};

const METADATA_MODULE: &str = "torch.distributed.checkpoint.metadata";
/// The one data file a written checkpoint has.
const DATA_FILE: &str = "__0_0.distcp";

/// `cls.__new__(cls)` then `BUILD` with the dict `fill` writes: how
/// dataclasses pickle.
fn dataclass(p: &mut Pickler, module: &str, class: &str, fill: impl FnOnce(&mut Pickler)) {
    p.global(module, class);
    p.op(b')');
    p.op(0x81); // NEWOBJ
    p.op(b'}');
    p.op(b'(');
    fill(p);
    p.op(b'u');
    p.op(b'b'); // BUILD
}

/// `torch.Size((…))`.
fn torch_size(p: &mut Pickler, dims: &[i64]) {
    p.global("torch", "Size");
    p.ints(dims);
    p.op(0x85); // TUPLE1
    p.op(b'R');
}

/// One tensor written: its name, dtype, shape, and where its stream is.
struct Written {
    fqn: String,
    kind: crate::dtype::Dtype,
    shape: Vec<i64>,
    offset: u64,
    length: u64,
}

/// The `.metadata` pickle of the written tensors, as `torch.distributed.checkpoint` writes it.
fn metadata(written: &[Written], planner: &dyn Fn(&str) -> Vec<String>) -> Vec<u8> {
    let mut p = Pickler { out: vec![0x80, 2] };
    dataclass(&mut p, METADATA_MODULE, "Metadata", |p| {
        p.str("state_dict_metadata");
        p.op(b'}');
        p.op(b'(');
        for w in written {
            p.str(&w.fqn);
            dataclass(p, METADATA_MODULE, "TensorStorageMetadata", |p| {
                p.str("properties");
                p.global(METADATA_MODULE, "TensorProperties");
                p.op(b')');
                p.op(0x81);
                // (dtype, layout, requires_grad, memory_format, pin_memory)
                p.op(b'(');
                p.global("torch", dtype::name(w.kind));
                p.global("torch.serialization", "_get_layout");
                p.str("torch.strided");
                p.op(0x85);
                p.op(b'R');
                p.op(0x89);
                p.global(METADATA_MODULE, "_MEM_FORMAT_ENCODING");
                p.int(0);
                p.op(0x85);
                p.op(b'R');
                p.op(0x89);
                p.op(b't');
                p.op(b'b');
                p.str("size");
                torch_size(p, &w.shape);
                p.str("chunks");
                p.op(b']');
                p.op(b'(');
                dataclass(p, METADATA_MODULE, "ChunkStorageMetadata", |p| {
                    p.str("offsets");
                    torch_size(p, &vec![0; w.shape.len()]);
                    p.str("sizes");
                    torch_size(p, &w.shape);
                });
                p.op(b'e');
            });
        }
        p.op(b'u');
        p.str("planner_data");
        p.op(b'}');
        p.op(b'(');
        for w in written {
            p.str(&w.fqn);
            p.op(b'(');
            for part in planner(&w.fqn) {
                p.str(&part);
            }
            p.op(b't');
        }
        p.op(b'u');
        p.str("storage_data");
        p.op(b'}');
        p.op(b'(');
        for w in written {
            dataclass(p, METADATA_MODULE, "MetadataIndex", |p| {
                p.str("fqn");
                p.str(&w.fqn);
                p.str("offset");
                torch_size(p, &vec![0; w.shape.len()]);
                p.str("index");
                p.int(0);
            });
            dataclass(p, "torch.distributed.checkpoint.filesystem", "_StorageInfo", |p| {
                p.str("relative_path");
                p.str(DATA_FILE);
                p.str("offset");
                p.int(w.offset as i64);
                p.str("length");
                p.int(w.length as i64);
            });
        }
        p.op(b'u');
        p.str("storage_meta");
        p.op(b'N');
        p.str("version");
        p.str("1.0.0");
    });
    p.op(b'.');
    p.out
}

/// Writes a Distributed Checkpoint into the folder `out` (new, or an old
/// checkpoint folder it replaces whole): the `outgoing` tensors, each made by `produce` in turn and
/// written as one chunk (`torch.save` stream) into `__0_0.distcp`, and the
/// `.metadata` that `torch.distributed.checkpoint.load` reads (and reshards on
/// load). Names get `prefix.` in front (`model`, for a checkpoint read under
/// that key), and the planner data records the split. The folder appears
/// whole or not at all.
pub(crate) fn write_stream(
    out: &Path,
    outgoing: &[crate::format::Outgoing],
    prefix: Option<&str>,
    produce: crate::format::Produce,
) -> Result<()> {
    crate::folders::write_folder_atomically(out, |temp| {
        let data_path = temp.join(DATA_FILE);
        let io = |source| Error::Io { path: data_path.clone(), source };
        let file = std::fs::File::create(&data_path).map_err(io)?;
        let mut data = std::io::BufWriter::with_capacity(8 << 20, file);
        let mut written = Vec::with_capacity(outgoing.len());
        let mut offset = 0u64;
        for (i, o) in outgoing.iter().enumerate() {
            let fqn = match prefix {
                Some(p) => format!("{p}.{}", o.name),
                None => o.name.clone(),
            };
            let tensor = produce(i)?;
            let stream = torch_pickle::tensor_stream(&o.name, &tensor)?;
            data.write_all(&stream).map_err(io)?;
            written.push(Written {
                fqn,
                kind: o.kind,
                shape: o.shape.clone(),
                offset,
                length: stream.len() as u64,
            });
            offset += stream.len() as u64;
        }
        data.flush().map_err(io)?;
        let planner = |fqn: &str| -> Vec<String> {
            match prefix {
                Some(p) => vec![p.to_string(), fqn[p.len() + 1..].to_string()],
                None => vec![fqn.to_string()],
            }
        };
        let meta = temp.join(".metadata");
        std::fs::write(&meta, metadata(&written, &planner))
            .map_err(|source| Error::Io { path: meta.clone(), source })
    })
}
