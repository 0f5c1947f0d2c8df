//! Every dtype PyTorch 2.13 saves: read with its true dtype (what PyTorch reads from
//! the same bytes, name by name, dtype, shape and sha256), written with it, or
//! refused by name. Files are made by `scripts/every_dtype.py` with the venv's python.
use crate::common;

use std::path::{Path, PathBuf};

use common::{inspected, read_back, read_back_all, sorted, transplant, Record};

/// `scripts/every_dtype.py OUT KIND [DTYPES]`: the file it wrote.
fn every_dtype(dir: &Path, file: &str, kind: &str, dtypes: &str) -> PathBuf {
    let path = dir.join(file);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let output = std::process::Command::new(root.join(".venv/bin/python"))
        .arg(root.join("scripts/every_dtype.py"))
        .args([path.as_os_str(), kind.as_ref(), dtypes.as_ref()])
        .output()
        .expect("the venv's python runs");
    assert!(output.status.success(), "every_dtype.py: {}", String::from_utf8_lossy(&output.stderr));
    path
}

fn dtypes_of(records: &[Record]) -> Vec<&str> {
    records.iter().map(|r| r.dtype.as_str()).collect()
}

/// The dtypes numpy has (what `.npz` can hold).
const NUMPY: &str =
    "bool,uint8,int8,int16,int32,int64,uint16,uint32,uint64,float16,float32,float64,complex64,complex128";

/// The dtypes `torch.save` writes with a typed storage class (`FloatStorage`).
const TYPED: &str = "bool,uint8,int8,int16,int32,int64,float16,bfloat16,float32,float64,complex64,complex128";

#[test]
fn torch_save_of_every_dtype_reads_as_pytorch_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = every_dtype(dir.path(), "zip.pth", "zip", "");
    let (pytorch, _) = read_back(&path);
    assert_eq!(pytorch.len(), 28, "every dtype and a view");
    for dtype in
        ["uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e8m0fnu", "float4_e2m1fn_x2", "bits16"]
    {
        assert!(dtypes_of(&pytorch).contains(&dtype), "{dtype}");
    }
    assert_eq!(inspected(&path), pytorch, "name by name, dtype, shape and sha256");
}

#[test]
fn legacy_torch_save_reads_typed_storages_and_refuses_untyped_ones_as_torch_load_does() {
    let dir = tempfile::tempdir().unwrap();
    let typed = every_dtype(dir.path(), "typed.pth", "legacy", TYPED);
    assert_eq!(inspected(&typed), read_back(&typed).0);
    // torch.load fails on a legacy file with an UntypedStorage (a uint16 tensor).
    let untyped = every_dtype(dir.path(), "untyped.pth", "legacy", "float32,uint16");
    let run = transplant(["inspect".as_ref(), untyped.as_os_str()]);
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert!(run.stderr.contains("UntypedStorage") && run.stderr.contains("untyped.pth"), "{}", run.stderr);
}

#[test]
fn torchscript_buffers_of_every_dtype_read_as_pytorch_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = every_dtype(dir.path(), "buffers.pt", "script", "");
    let (pytorch, _) = read_back(&path);
    assert!(dtypes_of(&pytorch).contains(&"float8_e4m3fn") && dtypes_of(&pytorch).contains(&"uint64"));
    assert_eq!(inspected(&path), pytorch);
}

#[test]
fn safetensors_of_every_code_the_safetensors_package_writes_reads_as_pytorch_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = every_dtype(dir.path(), "all.safetensors", "safetensors", "");
    let (pytorch, _) = read_back(&path);
    for dtype in ["uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz"] {
        assert!(dtypes_of(&pytorch).contains(&dtype), "{dtype}");
    }
    assert_eq!(sorted(inspected(&path)), sorted(pytorch));
}

#[test]
fn convert_round_trips_keep_every_dtype_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let all = every_dtype(d, "all.pth", "zip", "");
    let st = every_dtype(d, "st_src.safetensors", "safetensors", "");
    let st = {
        // The safetensors dtypes as a torch.save file.
        let pth = d.join("st_src.pth");
        let run = transplant(["convert".as_ref(), st.as_os_str(), "--out".as_ref(), pth.as_os_str()]);
        assert_eq!(run.code, 0, "{}", run.stderr);
        pth
    };
    let np = every_dtype(d, "np.pth", "zip", NUMPY);
    let run = |src: &Path, out: &Path| {
        let r = transplant(["convert".as_ref(), src.as_os_str(), "--out".as_ref(), out.as_os_str()]);
        assert_eq!(r.code, 0, "convert {} {}: {}", src.display(), out.display(), r.stderr);
    };
    // pth -> pth, pth -> safetensors -> pth, pth -> npz -> pth, pth -> DCP -> pth.
    let chains: Vec<(PathBuf, Vec<PathBuf>)> = vec![
        (all.clone(), vec![d.join("all_out.pth")]),
        (st.clone(), vec![d.join("st.safetensors"), d.join("st_back.pth")]),
        (np.clone(), vec![d.join("np.npz"), d.join("np_back.pth")]),
        (all.clone(), vec![d.join("all_dcp/"), d.join("dcp_back.pth")]),
        (all.clone(), vec![d.join("all.ot"), d.join("ot_back.pth")]),
    ];
    let mut files = Vec::new();
    for (src, steps) in &chains {
        let mut from = src.clone();
        for out in steps {
            run(&from, out);
            from = out.clone();
            if out.extension().is_some() {
                files.push(out.clone());
            }
        }
        files.push(src.clone());
    }
    let read = read_back_all(&files);
    for (src, steps) in &chains {
        let want = sorted(read[src].0.clone());
        for out in steps.iter().filter(|o| o.extension().is_some()) {
            assert_eq!(sorted(read[out].0.clone()), want, "{} from {}", out.display(), src.display());
        }
    }
}

#[test]
fn a_distributed_checkpoint_of_every_dtype_loads_in_pytorch_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let module = every_dtype(dir.path(), "buffers.pt", "script", "");
    let folder = dir.path().join("dcp/");
    let run = transplant(["convert".as_ref(), module.as_os_str(), "--out".as_ref(), folder.as_os_str()]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let output = std::process::Command::new(root.join(".venv/bin/python"))
        .arg(root.join("scripts/dcp_check.py"))
        .args(["load".as_ref(), folder.as_os_str(), module.as_os_str()])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "torch.distributed.checkpoint.load: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn a_copy_into_a_torchscript_archive_keeps_every_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let src = every_dtype(dir.path(), "src.pth", "zip", "");
    let dst = every_dtype(dir.path(), "dst.pt", "script", "");
    // Other bytes in DST: the copy must replace them with SRC's.
    let out = dir.path().join("out.pt");
    let run =
        transplant(["copy".as_ref(), src.as_os_str(), dst.as_os_str(), "--out".as_ref(), out.as_os_str()]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let read = read_back_all(&[src.clone(), out.clone()]);
    assert_eq!(sorted(read[&out].0.clone()), sorted(read[&src].0.clone()));
}

#[test]
fn formats_that_cannot_hold_a_dtype_refuse_it_by_name_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let all = every_dtype(dir.path(), "all.pth", "zip", "");
    let cases = [("out.npz", "t_bfloat16", "bfloat16"), ("out.safetensors", "t_complex32", "complex32")];
    for (out, tensor, dtype) in cases {
        let out = dir.path().join(out);
        let run = transplant(["convert".as_ref(), all.as_os_str(), "--out".as_ref(), out.as_os_str()]);
        assert_eq!(run.code, 1, "{}", run.stderr);
        assert!(run.stderr.contains(tensor) && run.stderr.contains(dtype), "{}", run.stderr);
        assert!(!out.exists(), "no partial {}", out.display());
    }
    let e8m0 = every_dtype(dir.path(), "e8m0.pth", "zip", "float8_e8m0fnu");
    let out = dir.path().join("e8m0.safetensors");
    let run = transplant(["convert".as_ref(), e8m0.as_os_str(), "--out".as_ref(), out.as_os_str()]);
    assert!(run.code == 1 && run.stderr.contains("float8_e8m0fnu"), "{}", run.stderr);
}

#[test]
fn casts_of_stored_only_dtypes_are_refused_whatever_the_policy() {
    let dir = tempfile::tempdir().unwrap();
    let src = every_dtype(dir.path(), "src.pth", "zip", "uint16,float8_e4m3fn");
    let dst = dir.path().join("dst.pth");
    common::python(
        "import sys, torch; torch.save({'t_uint16': torch.zeros(2, 3), 't_float8_e4m3fn': torch.zeros(2, 3)}, sys.argv[1])",
        &[&dst],
    );
    let out = dir.path().join("out.pth");
    let run = transplant([
        "copy".as_ref(),
        src.as_os_str(),
        dst.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
        "--allow-lossy".as_ref(),
    ]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    for name in ["t_uint16", "uint16", "t_float8_e4m3fn", "refused cast"] {
        assert!(run.stderr.contains(name) || run.stdout.contains(name), "{name}: {}", run.stderr);
    }
    assert!(!out.exists());
    // --dtype converts float16/bfloat16/float32/float64 only: the rest keep their dtype.
    let bf16 = dir.path().join("bf16.pth");
    let run = transplant([
        "copy".as_ref(),
        src.as_os_str(),
        src.as_os_str(),
        "--out".as_ref(),
        bf16.as_os_str(),
        "--dtype".as_ref(),
        "bf16".as_ref(),
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let read = read_back_all(&[src.clone(), bf16.clone()]);
    assert_eq!(sorted(read[&bf16].0.clone()), sorted(read[&src].0.clone()));
}

#[test]
fn a_live_module_with_a_dtype_tch_cannot_name_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = every_dtype(dir.path(), "u16.pt", "script", "float32,uint16");
    let error = transplant::ModuleStore::open(&path).unwrap_err().to_string();
    assert!(error.contains("t_uint16") && error.contains("uint16"), "{error}");
    // Read as an archive (no code run), it is described all the same.
    let records = inspected(&path);
    assert!(records.iter().any(|r| r.dtype == "uint16"));
}

#[test]
fn diff_compares_every_dtype_bit_for_bit_and_by_value_where_it_has_values() {
    let dir = tempfile::tempdir().unwrap();
    let a = every_dtype(dir.path(), "a.pth", "zip", "");
    let run = transplant(["diff".as_ref(), a.as_os_str(), a.as_os_str(), "--json".as_ref()]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let pairs = run.json()["pairs"].as_array().unwrap().clone();
    assert_eq!(pairs.len(), 28);
    assert!(pairs.iter().all(|p| p["identical"] == true), "{pairs:?}");
    // One element changed in B's float8, uint16 and bits8 tensors.
    let b = dir.path().join("b.pth");
    common::python(
        r#"
import sys, torch
d = torch.load(sys.argv[1])
for k in ["t_float8_e4m3fn", "t_uint16", "t_bits8"]:
    raw = d[k].view(torch.uint8).clone()
    raw.view(-1)[0] ^= 0x01
    d[k] = raw.view(d[k].dtype)
d["t_uint16_view"] = d["t_uint16"].t()
torch.save(d, sys.argv[2])
"#,
        &[&a, &b],
    );
    let run = transplant(["diff".as_ref(), a.as_os_str(), b.as_os_str(), "--json".as_ref()]);
    assert_eq!(run.code, 3, "{}{}", run.stdout, run.stderr);
    let json = run.json();
    let differing: Vec<&str> = json["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["identical"] == false)
        .map(|p| p["a"].as_str().unwrap())
        .collect();
    assert_eq!(differing, ["t_uint16", "t_float8_e4m3fn", "t_bits8", "t_uint16_view"]);
}

#[test]
fn a_v3_tensor_whose_dtype_pytorch_cannot_rebuild_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let good = every_dtype(dir.path(), "good.pth", "zip", "uint16");
    // The dtype argument of _rebuild_tensor_v3 replaced: torch.load fails on a name
    // torch has not; quantized tensors are not read (see the README).
    for (i, dtype) in ["qint8", "u16", "float128"].iter().enumerate() {
        let bad = dir.path().join(format!("bad{i}.pth"));
        common::python(
            r#"
import sys, zipfile, torch
src, out, dtype = sys.argv[1], sys.argv[2], sys.argv[3]
with zipfile.ZipFile(src) as z, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as w:
    for info in z.infolist():
        data = z.read(info)
        if info.filename.endswith("data.pkl"):
            assert b"ctorch\nuint16\n" in data
            data = data.replace(b"ctorch\nuint16\n", b"ctorch\n" + dtype.encode() + b"\n")
        w.writestr(info, data)
try:
    torch.load(out)
except Exception:
    pass
else:
    # torch.load makes a quantized tensor of qint8: transplant reads no quantized ones.
    assert dtype == "qint8", "torch.load read it"
"#,
            &[&good, &bad, Path::new(dtype)],
        );
        let run = transplant(["inspect".as_ref(), bad.as_os_str()]);
        assert_eq!(run.code, 1, "{dtype}: {}", run.stdout);
        assert!(run.stderr.contains(dtype) && run.stderr.contains(&format!("bad{i}.pth")), "{}", run.stderr);
    }
}
