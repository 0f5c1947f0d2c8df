//! TorchScript files read as archives, running none of their code: on every
//! TorchScript fixture (scripted, traced, timm's, nested, tied), the names,
//! roles, shapes, dtypes, order and values equal what libtorch's loader gives.
use crate::common;

use std::path::{Path, PathBuf};

use common::{bit_equal, fixtures};
use transplant::{ModuleStore, Source};

fn script_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        // Files that run code when loaded: tests/hostile_archives.rs.
        if path.is_dir() && path.file_name().is_some_and(|n| n == "hostile") {
            continue;
        }
        if path.is_dir() {
            script_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "pt")
            && transplant::sniff(&path).ok() == Some(transplant::Format::TorchScript)
        {
            out.push(path);
        }
    }
}

#[test]
fn every_torchscript_fixture_reads_as_libtorch_loads_it() {
    let mut files = Vec::new();
    script_files(&fixtures(), &mut files);
    assert!(files.len() >= 20, "{} TorchScript fixtures", files.len());
    for file in files {
        let shim = ModuleStore::open(&file).unwrap();
        let archive = transplant::fuzzing::read_script_archive(&file)
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let want: Vec<(String, transplant::Role, Vec<i64>, transplant::Dtype)> =
            shim.entries().iter().map(|e| (e.name.to_string(), e.role, e.shape.clone(), e.dtype)).collect();
        let got: Vec<(String, transplant::Role, Vec<i64>, transplant::Dtype)> = archive
            .iter()
            .map(|(n, r, t)| (n.clone(), *r, t.size(), transplant::Dtype::of(t).unwrap()))
            .collect();
        assert_eq!(got, want, "{}", file.display());
        for (i, (name, _, t)) in archive.iter().enumerate() {
            assert!(bit_equal(t, shim.tensor(i).unwrap()), "{}: {name}", file.display());
        }
    }
}

/// A copy into a TorchScript file read as an archive rewrites the archive:
/// the result loads in libtorch and computes what the libtorch path's result
/// computes; every member but the storage records is byte-identical.
#[test]
fn a_copy_into_an_archive_rewrites_it_and_the_result_loads_and_computes_alike() {
    use transplant::{copy, Mapping, Plan, Policy, ScriptArchive, Target};
    let dir = tempfile::tempdir().unwrap();
    let source = transplant::open(common::fixture("bn_net_a.pt")).unwrap();
    let mut archive = ScriptArchive::open(common::fixture("bn_net_b.pt")).unwrap();
    let plan = Plan::build(source.as_ref(), &archive, &Mapping::default()).unwrap();
    copy(&plan, source.as_ref(), &mut archive, &Policy::default()).unwrap();
    let out = dir.path().join("rewritten.pt");
    archive.save(&out).unwrap();
    // The original file is untouched.
    let original = ModuleStore::open(common::fixture("bn_net_b.pt")).unwrap();
    let mut rewritten = ModuleStore::open(&out).unwrap();
    rewritten.module_mut().set_training(false).unwrap();
    let input = common::expected_tensor("bn_net.expected.safetensors", "input");
    let got = rewritten.module().forward(&[input]).unwrap().remove(0);
    assert!(got.equal(&common::expected_tensor("bn_net.expected.safetensors", "output_a")));
    assert!(!bit_equal(original.tensor(1).unwrap(), rewritten.tensor(1).unwrap()));
    // Members other than data records are byte-identical, in the same order.
    let (before, after) = (common::zip_members(&common::fixture("bn_net_b.pt")), common::zip_members(&out));
    assert_eq!(
        before.iter().map(|m| &m.0).collect::<Vec<_>>(),
        after.iter().map(|m| &m.0).collect::<Vec<_>>()
    );
    for ((name, a), (_, b)) in before.iter().zip(&after) {
        if !name.contains("/data/") {
            assert_eq!(a, b, "{name}");
        }
    }
}

/// The store of `path`'s tensors as libtorch loads them: names and tensors.
fn loaded(path: &Path) -> Vec<(String, tch::Tensor)> {
    let store = ModuleStore::open(path).unwrap();
    (0..store.entries().len())
        .map(|i| (store.entries()[i].name.to_string(), store.tensor(i).unwrap().shallow_clone()))
        .collect()
}

/// A copy streamed into a rewrite of the archive (`copy_to_file`, what the CLI
/// does for a `.pt` target) gives the file the libtorch path gives: plain
/// pairs, casts, a split, a concatenation and transposes.
#[test]
fn a_streamed_copy_into_an_archive_equals_the_libtorch_path() {
    use transplant::{
        copy_to_file, copy_with, CopyOptions, Mapping, Matcher, Plan, Policy, Rules, ScriptArchive,
    };
    let dir = tempfile::tempdir().unwrap();
    // A float64 source: every pair is a cast into the float32 target.
    let doubled = dir.path().join("doubled.safetensors");
    {
        let a = ModuleStore::open(common::fixture("bn_net_a.pt")).unwrap();
        let named = (0..a.entries().len())
            .map(|i| {
                let t = a.tensor(i).unwrap();
                let t = if t.is_floating_point() { t.to_kind(tch::Kind::Double) } else { t.shallow_clone() };
                (a.entries()[i].name.to_string(), t)
            })
            .collect();
        transplant::Checkpoint::from_tensors(
            "doubled",
            transplant::Format::Safetensors,
            named,
            Default::default(),
        )
        .unwrap()
        .save_as(&doubled, transplant::Format::Safetensors)
        .unwrap();
    }
    let t = |name: &str| common::fixture(&format!("transforms/{name}.pt"));
    let cases: Vec<(PathBuf, PathBuf, &str)> = vec![
        (common::fixture("bn_net_a.pt"), common::fixture("bn_net_b.pt"), ""),
        (doubled, common::fixture("bn_net_b.pt"), ""),
        (t("fused_attn"), t("split_attn"), "qkv\\.(weight|bias) => q_proj.$1, k_proj.$1, v_proj.$1 | split(0)\nproj\\.(.*) => o_proj.$1\n"),
        (t("split_attn"), t("fused_attn"), "q_proj\\.(weight|bias) + k_proj\\.(weight|bias) + v_proj\\.(weight|bias) => qkv.$1 | cat(0)\no_proj\\.(.*) => proj.$1\n"),
        (t("conv1d_mlp"), t("linear_mlp"), "c_(fc|proj)\\.weight => $1.weight | transpose(0, 1)\nc_(fc|proj)\\.bias => $1.bias\n"),
    ];
    let policy = Policy { strict: true, allow_lossy_casts: true };
    let mut written = Vec::new();
    for (k, (src, dst, rules)) in cases.iter().enumerate() {
        let mapping = Mapping {
            rules: Rules::parse(rules, "rules").unwrap(),
            matcher: if rules.is_empty() { Matcher::default() } else { Matcher::Exact },
            source_order: None,
        };
        let source = transplant::open(src).unwrap();
        let (streamed, through_libtorch) =
            (dir.path().join(format!("s{k}.pt")), dir.path().join(format!("l{k}.pt")));
        let mut archive = ScriptArchive::open(dst).unwrap();
        let plan = Plan::build(source.as_ref(), &archive, &mapping).unwrap();
        let copied =
            copy_to_file(&plan, source.as_ref(), &mut archive, &streamed, &policy, CopyOptions::default())
                .unwrap_or_else(|e| panic!("case {k}: {e}"));
        assert!(copied.verified && copied.tensors == plan.pairs.len());
        let mut live = ModuleStore::open(dst).unwrap();
        let plan = Plan::build(source.as_ref(), &live, &mapping).unwrap();
        copy_with(&plan, source.as_ref(), &mut live, &policy, CopyOptions::default()).unwrap();
        transplant::Target::save(&live, &through_libtorch).unwrap();
        let (a, b) = (loaded(&streamed), loaded(&through_libtorch));
        assert_eq!(a.len(), b.len());
        for ((name, x), (_, y)) in a.iter().zip(&b) {
            assert!(bit_equal(x, y), "case {k}: {name} differs between the streamed and the libtorch copy");
        }
        // Every member but the records written is the target's, byte for byte,
        // in the same order.
        let (before, after) = (common::zip_members(dst), common::zip_members(&streamed));
        assert_eq!(
            before.iter().map(|m| &m.0).collect::<Vec<_>>(),
            after.iter().map(|m| &m.0).collect::<Vec<_>>(),
            "case {k}"
        );
        for ((name, old), (_, new)) in before.iter().zip(&after) {
            if !name.contains("/data/") {
                assert!(old == new, "case {k}: {name} changed");
            }
        }
        // Records start on 64-byte boundaries, as PyTorch writes them.
        let mut zip = zip::ZipArchive::new(std::fs::File::open(&streamed).unwrap()).unwrap();
        for i in 0..zip.len() {
            let member = zip.by_index_raw(i).unwrap();
            if member.name().contains("/data/") {
                assert_eq!(member.data_start() % 64, 0, "case {k}: {}", member.name());
            }
        }
        written.push((streamed, through_libtorch));
        // The target as read is untouched by the streamed copy.
        let again = ScriptArchive::open(dst).unwrap();
        for i in 0..archive.entries().len() {
            assert!(bit_equal(archive.tensor(i).unwrap(), again.tensor(i).unwrap()));
        }
    }
    // PyTorch's own torch.jit.load reads the streamed files as it reads the
    // libtorch path's.
    let all: Vec<PathBuf> = written.iter().flat_map(|(a, b)| [a.clone(), b.clone()]).collect();
    let read = common::read_back_all(&all);
    for (streamed, through_libtorch) in &written {
        assert_eq!(read[streamed].0, read[through_libtorch].0, "{}", streamed.display());
    }
}

/// A record holding several tensors (views of one storage) of which the copy
/// fills only some keeps the others' bytes; filling all of them needs none of
/// the old record.
#[test]
fn a_record_filled_in_part_keeps_the_rest_of_its_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let dst = common::fixture("shared_storage.pt");
    let before = loaded(&dst);
    let names: Vec<&str> = before.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&"a") && names.contains(&"b"), "{names:?}");
    let value = |name: &str| before.iter().find(|(n, _)| n == name).unwrap().1.shallow_clone();
    assert_eq!(
        value("a").data_ptr() as usize + 6 * 4,
        value("b").data_ptr() as usize,
        "a and b are not one storage"
    );
    let only_a = dir.path().join("only_a.safetensors");
    let new_a = tch::Tensor::full([6], 7.0, (tch::Kind::Float, tch::Device::Cpu));
    transplant::Checkpoint::from_tensors(
        "a",
        transplant::Format::Safetensors,
        vec![("a".into(), new_a.shallow_clone())],
        Default::default(),
    )
    .unwrap()
    .save_as(&only_a, transplant::Format::Safetensors)
    .unwrap();
    let out = dir.path().join("out.pt");
    let run = common::transplant([
        "copy",
        only_a.to_str().unwrap(),
        dst.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--allow-partial",
    ]);
    assert_eq!(run.code, 3, "{}\n{}", run.stdout, run.stderr);
    let after = loaded(&out);
    for (name, t) in &after {
        let want = if name == "a" { new_a.shallow_clone() } else { value(name) };
        assert!(bit_equal(t, &want), "{name}");
    }
}

/// `copy --dtype` into a TorchScript file converts the target as an archive
/// too (nothing run): the result equals libtorch's `module.to(dtype)` path, and
/// a float tensor kept as a plain attribute (neither parameter nor buffer)
/// keeps its dtype, as `module.to` leaves it — also where its storage's type
/// was named first by a retyped buffer's.
#[test]
fn a_dtype_conversion_in_the_archive_equals_libtorchs_and_leaves_plain_attributes() {
    use transplant::{copy_with, CopyOptions, Mapping, ModuleStore, Plan, Policy, ScriptModule, Target};
    let dir = tempfile::tempdir().unwrap();
    let policy = Policy { strict: false, allow_lossy_casts: true };
    let mut written = Vec::new();
    for (k, (src, dst, flag, kind)) in [
        ("bn_net_a.pt", "bn_net_b.pt", "f16", tch::Kind::Half),
        ("plain_attribute.pt", "plain_attribute.pt", "bf16", tch::Kind::BFloat16),
    ]
    .into_iter()
    .enumerate()
    {
        let (src, dst) = (common::fixture(src), common::fixture(dst));
        let streamed = dir.path().join(format!("s{k}.pt"));
        let run = common::transplant([
            "copy",
            src.to_str().unwrap(),
            dst.to_str().unwrap(),
            "-o",
            streamed.to_str().unwrap(),
            "--dtype",
            flag,
            "--allow-lossy",
        ]);
        assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
        let through_libtorch = dir.path().join(format!("l{k}.pt"));
        let mut module = ScriptModule::load_on(&dst, tch::Device::Cpu).unwrap();
        module.to(tch::Device::Cpu, Some(kind)).unwrap();
        let mut live = ModuleStore::new(module).unwrap();
        let source = transplant::open(&src).unwrap();
        let plan = Plan::build(source.as_ref(), &live, &Mapping::default()).unwrap();
        copy_with(&plan, source.as_ref(), &mut live, &policy, CopyOptions::default()).unwrap();
        live.save(&through_libtorch).unwrap();
        let (a, b) = (loaded(&streamed), loaded(&through_libtorch));
        assert_eq!(a.len(), b.len());
        for ((name, x), (_, y)) in a.iter().zip(&b) {
            assert_eq!(x.kind(), y.kind(), "{name}");
            assert!(bit_equal(x, y), "case {k}: {name}");
        }
        written.push((streamed, through_libtorch));
    }
    let all: Vec<PathBuf> = written.iter().flat_map(|(a, b)| [a.clone(), b.clone()]).collect();
    let read = common::read_back_all(&all);
    for (streamed, through_libtorch) in &written {
        assert_eq!(read[streamed].0, read[through_libtorch].0, "{}", streamed.display());
    }
    // The plain attribute, which PyTorch's module.to leaves alone.
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let probe = "import sys, torch\nm = torch.jit.load(sys.argv[1])\n\
                 print(m.offset.dtype, m.offset.tolist(), m.scale.dtype, m.lin.weight.dtype)\n";
    let out = std::process::Command::new(root.join(".venv/bin/python"))
        .args(["-c", probe])
        .arg(&written[1].0)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.trim(),
        "torch.float32 [0.0, 1.0] torch.bfloat16 torch.bfloat16",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Archives laid out as libtorch never writes them are read as libtorch reads
/// them or refused: members outside the first member's folder, a storage
/// typed twice, an attribute the class does not declare, one it declares
/// missing, a module graph whose shared children name millions of tensors.
#[test]
fn archives_libtorch_would_not_read_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let script = r#"
import sys, zipfile, torch

class Pair(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.tensor([101.0, 102.0]))
        self.register_buffer("b", torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float16))
    def forward(self, x):
        return x * self.w.sum() + self.b.float().sum()

out = sys.argv[1]
torch.jit.save(torch.jit.script(Pair()), f"{out}/pair.pt")

# 24 levels of modules whose two children are one object (TorchScript itself
# takes exponential time to script that): 2^25 names in a file of a few KB,
# the pickle written op by op as libtorch writes a module's.
import struct
def s(text):
    b = text.encode()
    return b"X" + struct.pack("<I", len(b)) + b
def obj(module, name, items):
    body = b"c" + f"{module}\n{name}\n".encode() + b")\x81}("
    for k, v in items:
        body += s(k) + v
    return body + b"ub"
tensor = (b"ctorch._utils\n_rebuild_tensor_v2\n((" + s("storage") + b"ctorch\nFloatStorage\n" + s("0") + s("cpu")
          + b"K\x01tQK\x00K\x01\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtR")
program = b"\x80\x02" + obj("__torch__.torch.nn.modules.linear", "Linear",
                           [("training", b"\x89"), ("weight", tensor), ("bias", tensor)]) + b"q\x00"
for level in range(24):
    program += obj("__torch__", "Chain", [("training", b"\x89"), ("left", b"h" + bytes([level])),
                                          ("right", b"h" + bytes([level]))]) + b"q" + bytes([level + 1])
program += b"."
chain_code = "class Chain(Module):\n  __parameters__ = []\n  __buffers__ = []\n  training : bool\n  left : __torch__.Chain\n  right : __torch__.Chain\n"
linear_code = "class Linear(Module):\n  __parameters__ = [\"weight\", \"bias\", ]\n  __buffers__ = []\n  weight : Tensor\n  bias : Tensor\n  training : bool\n"
with zipfile.ZipFile(f"{out}/chain.pt", "w") as z:
    for n, d in [("data.pkl", program), ("code/__torch__.py", chain_code),
                 ("code/__torch__/torch/nn/modules/linear.py", linear_code), ("data/0", b"\0\0\0\0"),
                 ("constants.pkl", b"\x80\x02).") , ("version", b"3\n")]:
        z.writestr("chain/" + n, d)
members = [(i.filename, zipfile.ZipFile(f"{out}/pair.pt").read(i)) for i in zipfile.ZipFile(f"{out}/pair.pt").infolist()]

def write(name, ms):
    with zipfile.ZipFile(f"{out}/{name}", "w") as z:
        for n, d in ms:
            z.writestr(n, d)

def patched(old, new, after=None):
    res = []
    for n, d in members:
        if n.endswith("data.pkl"):
            at = d.index(after) if after else 0
            i = d.index(old, at)
            d = d[:i] + new + d[i + len(old):]
        res.append((n, d))
    return res

write("outside.pt", members + [("zz/data.pkl", b"")])
write("typed_twice.pt", patched(b"X\x01\x00\x00\x001", b"X\x01\x00\x00\x000", after=b"HalfStorage"))
write("undeclared.pt", patched(b"X\x01\x00\x00\x00w", b"X\x01\x00\x00\x00v"))
"#;
    // torch.jit.script reads the classes' source: the script runs from a file.
    let file = dir.path().join("make.py");
    std::fs::write(&file, script).unwrap();
    common::python(
        "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')",
        &[&file, dir.path()],
    );
    // libtorch loads the unmodified archive; transplant reads it.
    let run = common::transplant(["inspect".as_ref(), dir.path().join("pair.pt").as_os_str()]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    for (file, says) in [
        ("outside.pt", "outside the archive's folder"),
        ("typed_twice.pt", "is typed both float32 and float16"),
        ("undeclared.pt", "which its class declares"),
        ("chain.pt", "share submodules"),
    ] {
        let path = dir.path().join(file);
        let run = common::transplant(["inspect".as_ref(), path.as_os_str()]);
        assert_eq!(run.code, 1, "{file}: {}{}", run.stdout, run.stderr);
        assert!(run.stderr.contains(says) && run.stderr.contains(file), "{file}: {}", run.stderr);
    }
}
