//! numpy `.npz` archives (`np.savez`, `np.savez_compressed`): a zip of `.npy` arrays.
//!
//! Our own `.npy` header parser: it accepts what numpy writes (`descr`,
//! `fortran_order`, `shape`), checks every size, and never trusts a length.
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::Path;

use tch::Tensor;

use crate::dtype::Dtype;

use crate::dtype;
use crate::error::{Error, Result};

const FORMAT: &str = "npz";
const NPY_MAGIC: &[u8] = b"\x93NUMPY";
/// numpy itself refuses headers longer than this.
const MAX_HEADER_LEN: usize = 1 << 16;

fn format_error(path: &Path, message: impl Into<String>) -> Error {
    Error::Format { path: path.into(), format: FORMAT, message: message.into() }
}

/// The numpy type string of an element type, if numpy has it.
fn descr_of(kind: Dtype) -> Option<&'static str> {
    Some(match kind {
        Dtype::Bool => "|b1",
        Dtype::UInt8 => "|u1",
        Dtype::Int8 => "|i1",
        Dtype::Int16 => "<i2",
        Dtype::Int32 => "<i4",
        Dtype::Int64 => "<i8",
        Dtype::UInt16 => "<u2",
        Dtype::UInt32 => "<u4",
        Dtype::UInt64 => "<u8",
        Dtype::Float16 => "<f2",
        Dtype::Float32 => "<f4",
        Dtype::Float64 => "<f8",
        Dtype::Complex64 => "<c8",
        Dtype::Complex128 => "<c16",
        _ => return None,
    })
}

fn kind_of(descr: &str) -> std::result::Result<Dtype, String> {
    let (order, code) = descr.split_at(descr.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(0));
    if order == ">" && !matches!(code, "b1" | "u1" | "i1") {
        return Err(format!("big-endian arrays ({descr}) are not supported: save them little-endian"));
    }
    let kind = match code {
        "b1" | "?" => Dtype::Bool,
        "u1" | "B" => Dtype::UInt8,
        "i1" | "b" => Dtype::Int8,
        "i2" | "h" => Dtype::Int16,
        "i4" | "i" => Dtype::Int32,
        "i8" | "q" | "l" => Dtype::Int64,
        "u2" | "H" => Dtype::UInt16,
        "u4" | "I" => Dtype::UInt32,
        "u8" | "Q" | "L" => Dtype::UInt64,
        "f2" | "e" => Dtype::Float16,
        "f4" | "f" => Dtype::Float32,
        "f8" | "d" => Dtype::Float64,
        "c8" | "F" => Dtype::Complex64,
        "c16" | "D" => Dtype::Complex128,
        _ => return Err(format!("numpy dtype {descr} has no libtorch equivalent")),
    };
    Ok(kind)
}

/// What an `.npy` header says.
#[derive(Debug, PartialEq)]
pub(crate) struct Header {
    kind: Dtype,
    fortran_order: bool,
    shape: Vec<i64>,
}

/// The value of `'key': VALUE` in numpy's header dict literal, up to its end.
fn field<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let at = header.find(&format!("'{key}'")).or_else(|| header.find(&format!("\"{key}\"")))?;
    let rest = header[at + key.len() + 2..].trim_start().strip_prefix(':')?.trim_start();
    let end =
        if rest.starts_with('(') { rest.find(')')? + 1 } else { rest.find([',', '}']).unwrap_or(rest.len()) };
    Some(rest[..end].trim())
}

pub(crate) fn parse_header(header: &str) -> std::result::Result<Header, String> {
    // A key written twice is read as the first here and as the last by numpy:
    // one file, two meanings. Refused.
    for key in ["descr", "fortran_order", "shape"] {
        let times =
            header.matches(&format!("'{key}'")).count() + header.matches(&format!("\"{key}\"")).count();
        if times > 1 {
            return Err(format!("'{key}' appears {times} times in the header"));
        }
    }
    let descr = field(header, "descr").ok_or("no 'descr' in header")?;
    let kind = kind_of(descr.trim_matches(['\'', '"']))?;
    let fortran_order = match field(header, "fortran_order") {
        Some("True") => true,
        Some("False") | None => false,
        Some(other) => return Err(format!("fortran_order is {other}, expected True or False")),
    };
    let shape_text = field(header, "shape").ok_or("no 'shape' in header")?;
    let inner =
        shape_text.strip_prefix('(').and_then(|s| s.strip_suffix(')')).ok_or("shape is not a tuple")?;
    let shape = inner
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| d.trim_end_matches('L').parse::<i64>().map_err(|_| format!("bad dimension {d:?} in shape")))
        .collect::<std::result::Result<Vec<i64>, String>>()?;
    if shape.iter().any(|&d| d < 0) {
        return Err("negative dimension in shape".into());
    }
    Ok(Header { kind, fortran_order, shape })
}

/// Reads one `.npy` stream: header, then exactly the data the header declares.
fn read_npy(reader: &mut impl Read, declared_size: u64) -> std::result::Result<Tensor, String> {
    let mut prefix = [0u8; 8];
    reader.read_exact(&mut prefix).map_err(|e| format!("no .npy header: {e}"))?;
    if &prefix[..6] != NPY_MAGIC {
        return Err("not a .npy array (bad magic)".into());
    }
    let header_len = match prefix[6] {
        1 => {
            let mut len = [0u8; 2];
            reader.read_exact(&mut len).map_err(|e| e.to_string())?;
            u16::from_le_bytes(len) as usize
        }
        2 | 3 => {
            let mut len = [0u8; 4];
            reader.read_exact(&mut len).map_err(|e| e.to_string())?;
            u32::from_le_bytes(len) as usize
        }
        v => return Err(format!(".npy version {v} is not supported")),
    };
    if header_len > MAX_HEADER_LEN {
        return Err(format!(".npy header of {header_len} bytes is too long"));
    }
    let mut header = vec![0u8; header_len];
    reader.read_exact(&mut header).map_err(|e| format!("truncated header: {e}"))?;
    let header = parse_header(&String::from_utf8_lossy(&header))?;

    let numel = header.shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
    let bytes =
        numel.and_then(|n| n.checked_mul(dtype::size(header.kind) as u64)).ok_or("shape overflows")?;
    if bytes > declared_size {
        return Err(format!(
            "header declares {bytes} bytes of data, the archive entry holds {declared_size}"
        ));
    }
    let mut data = vec![0u8; bytes as usize];
    reader.read_exact(&mut data).map_err(|e| format!("truncated data: {e}"))?;
    let flat = crate::ffi::view_bytes_as(&Tensor::from_slice(&data), header.kind)?;
    let tensor = if header.fortran_order {
        let reversed: Vec<i64> = header.shape.iter().rev().copied().collect();
        let order: Vec<i64> = (0..reversed.len() as i64).rev().collect();
        flat.f_reshape(&reversed).and_then(|t| t.f_permute(order.as_slice())).and_then(|t| t.f_contiguous())
    } else {
        flat.f_reshape(&header.shape)
    };
    tensor.map_err(|e| e.to_string())
}

/// Reads every array of an `.npz`, in archive order, named without `.npy`.
pub fn read(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let file = crate::files::open_regular(path)?;
    let mut archive =
        zip::ZipArchive::new(BufReader::new(file)).map_err(|e| format_error(path, e.to_string()))?;
    super::check_unique_members(path, FORMAT, &mut archive)?;
    super::check_entries(path, "npz", archive.len())?;
    let mut tensors = Vec::with_capacity(archive.len());
    for index in 0..archive.len() {
        let mut entry = archive.by_index(index).map_err(|e| format_error(path, e.to_string()))?;
        let entry_name = entry.name().to_string();
        let Some(name) = entry_name.strip_suffix(".npy") else {
            return Err(format_error(path, format!("entry {entry_name} is not a .npy array")));
        };
        let declared = entry.size();
        // Compressed entries are bounded before anything is inflated.
        let compressed = entry.compressed_size();
        if entry.compression() != zip::CompressionMethod::Stored {
            super::check_expansion(path, FORMAT, &format!("array {name}"), compressed, declared)?;
        }
        let tensor =
            read_npy(&mut entry, declared).map_err(|m| format_error(path, format!("array {name}: {m}")))?;
        tensors.push((name.to_string(), tensor));
    }
    Ok(tensors)
}

fn npy_header(descr: &str, shape: &[i64]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(i64::to_string).collect();
    let shape = match dims.len() {
        0 => "()".to_string(),
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // Magic (6) + version (2) + length (2) + dict + padding + '\n' is a multiple of 64.
    let unpadded = 10 + dict.len() + 1;
    dict.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    dict.push('\n');
    let mut out = Vec::with_capacity(10 + dict.len());
    out.extend_from_slice(NPY_MAGIC);
    if let Ok(len) = u16::try_from(dict.len()) {
        out.extend_from_slice(&[1, 0]);
        out.extend_from_slice(&len.to_le_bytes());
    } else {
        // A version 2 header has a 4-byte length: re-pad for its 12-byte prefix.
        let trimmed = dict.trim_end().to_string();
        let unpadded = 12 + trimmed.len() + 1;
        dict = format!("{trimmed}{}\n", " ".repeat((64 - unpadded % 64) % 64));
        out.extend_from_slice(&[2, 0]);
        out.extend_from_slice(&(dict.len() as u32).to_le_bytes());
    }
    out.extend_from_slice(dict.as_bytes());
    out
}

/// Why the tensor name `name` cannot be an `.npz` member's name (`NAME.npy`),
/// if it cannot: one that would leave the archive when extracted (`..`, an
/// absolute path), or that readers split or cut differently (`\\`, NUL, an
/// empty part).
fn unsafe_member_name(name: &str) -> Option<&'static str> {
    Some(if name.is_empty() {
        "the name is empty"
    } else if name.contains('\0') {
        "the name holds a NUL character"
    } else if name.contains('\\') {
        "the name holds a backslash"
    } else if name.starts_with('/') {
        "the name is an absolute path"
    } else if name.split('/').any(|part| part.is_empty() || part == "." || part == "..") {
        "the name has an empty, `.` or `..` path part"
    } else {
        return None;
    })
}

/// Writes `tensors` as an uncompressed `.npz` that `numpy.load` reads (directly:
/// callers wanting atomicity go through [`crate::files::write_atomically`]).
pub fn write(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    write_stream(path, &super::outgoing(tensors), &mut |i| Ok(tensors[i].1.shallow_clone()))
}

/// Writes an uncompressed `.npz` of the `outgoing` tensors, in that order, each
/// made by `produce` when its member's turn comes.
pub(crate) fn write_stream(path: &Path, outgoing: &[super::Outgoing], produce: super::Produce) -> Result<()> {
    let io = |source| Error::Io { path: path.into(), source };
    let descrs = super::check_types(path, FORMAT, outgoing, descr_of)?;
    for o in outgoing {
        if let Some(reason) = unsafe_member_name(&o.name) {
            return Err(Error::Unrepresentable {
                path: path.into(),
                tensor: o.name.clone(),
                format: FORMAT,
                reason: format!("{reason}: as the archive member {}.npy it is unsafe", o.name),
            });
        }
    }
    let file = File::create(path).map_err(io)?;
    let mut archive = zip::ZipWriter::new(crate::files::PatchingWriter::new(file));
    let options = zip::write::FileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .large_file(outgoing.iter().any(|o| o.bytes() >= u32::MAX as usize));
    for (i, (o, descr)) in outgoing.iter().zip(descrs).enumerate() {
        let tensor = super::produce_checked(path, FORMAT, outgoing, i, produce)?;
        archive
            .start_file(format!("{}.npy", o.name), options)
            .map_err(|e| format_error(path, e.to_string()))?;
        archive.write_all(&npy_header(descr, &o.shape)).map_err(io)?;
        archive.write_all(super::bytes_of(&tensor)).map_err(io)?;
    }
    let mut inner = archive.finish().map_err(|e| format_error(path, e.to_string()))?;
    inner.flush().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_numpy_writes() {
        let twice = parse_header("{'descr': '<f4', 'descr': '<f8', 'fortran_order': False, 'shape': (3,), }");
        assert!(twice.unwrap_err().contains("'descr' appears 2 times"));
        let h = parse_header("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }").unwrap();
        assert_eq!(h, Header { kind: Dtype::Float32, fortran_order: false, shape: vec![3, 4] });
        let h = parse_header("{'descr': '|b1', 'fortran_order': True, 'shape': (5,), }").unwrap();
        assert_eq!(h, Header { kind: Dtype::Bool, fortran_order: true, shape: vec![5] });
        let h = parse_header("{'descr': '<i8', 'fortran_order': False, 'shape': (), }").unwrap();
        assert_eq!(h.shape, Vec::<i64>::new());
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        assert!(parse_header("{'descr': '>f4', 'fortran_order': False, 'shape': (3,), }").is_err());
        assert!(parse_header("{'descr': '<U8', 'fortran_order': False, 'shape': (3,), }").is_err());
        assert!(parse_header("{'descr': '<f4', 'shape': (-3,), }").is_err());
        assert!(parse_header("{'descr': '<f4', 'shape': (x,), }").is_err());
        assert!(parse_header("{'fortran_order': False, 'shape': (3,), }").is_err());
        assert!(parse_header("").is_err());
    }

    #[test]
    fn member_names_that_leave_the_archive_are_refused() {
        for bad in ["", "../x", "a/../../x", "/abs", "a\\b", "a\0b", "a//b", "./a", "a/"] {
            assert!(unsafe_member_name(bad).is_some(), "{bad:?}");
        }
        for good in ["a", "layer.0.weight", "a/b", "x..y", ".hidden"] {
            assert_eq!(unsafe_member_name(good), None, "{good:?}");
        }
    }

    #[test]
    fn header_is_padded_to_64_bytes() {
        for shape in [vec![], vec![7], vec![2, 3, 4]] {
            let header = npy_header("<f4", &shape);
            assert_eq!(header.len() % 64, 0);
            assert_eq!(header.last(), Some(&b'\n'));
        }
    }

    #[test]
    fn data_longer_than_the_entry_is_refused_before_allocating() {
        let mut bytes = npy_header("<f8", &[1 << 40]);
        bytes.extend_from_slice(&[0u8; 16]);
        let error = read_npy(&mut bytes.as_slice(), bytes.len() as u64).unwrap_err();
        assert!(error.contains("declares"), "{error}");
    }
}
