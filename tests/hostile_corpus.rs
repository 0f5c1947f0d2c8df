//! Bad input through the command line: every supported format truncated and
//! bit-flipped, empty files, folders, a symlink loop, wrong extensions, bad rules
//! and shapes. Every case ends in a clean exit (1 for errors, 2 for usage) with
//! a message naming the file, no panic or crash, no OUT file left, and SRC and
//! DST unchanged. The corpus is generated here, from the fixtures, with a fixed seed.
use crate::common;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use common::{file_hash, fixture, transplant};
use transplant::{Checkpoint, Format, ModuleStore, Source, Target};

/// What a case must end in.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    /// Exit 1, the message naming `names`.
    Error,
    /// Exit 2.
    Usage,
    /// A corrupted byte may leave a valid file: 0, 1 or 3, but never a crash.
    Clean,
    /// A valid file under a misleading name: found by content, copied.
    Success,
}

struct Case {
    what: String,
    args: Vec<OsString>,
    expect: Expect,
    names: String,
    out: Option<PathBuf>,
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// bn_net_a's state in every state-dict format, and the module itself.
fn valid_sources(dir: &Path) -> Vec<PathBuf> {
    let module = ModuleStore::open(fixture("bn_net_a.pt")).unwrap();
    let named: Vec<(String, tch::Tensor)> = (0..module.entries().len())
        .map(|i| (module.entries()[i].name.to_string(), module.tensor(i).unwrap().shallow_clone()))
        .collect();
    let state = Checkpoint::from_tensors("bn_net_a", Format::Safetensors, named, BTreeMap::new()).unwrap();
    let mut files = vec![dir.join("module.pt")];
    std::fs::copy(fixture("bn_net_a.pt"), &files[0]).unwrap();
    for name in ["state.safetensors", "state.pth", "state.ot", "state.npz"] {
        let path = dir.join(name);
        state.save(&path).unwrap();
        files.push(path);
    }
    // Round three: the legacy format, and a checkpoint with an inert placeholder.
    for name in ["training.pth", "legacy.pth", "inert_payload.pth"] {
        let copy = dir.join(name);
        std::fs::copy(fixture(&format!("torch_save/{name}")), &copy).unwrap();
        files.push(copy);
    }
    files
}

/// The byte ranges (start, end) where a format keeps its header and metadata.
fn metadata_regions(bytes: &[u8], name: &str) -> Vec<(usize, usize)> {
    let len = bytes.len();
    if name.ends_with(".safetensors") {
        let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        vec![(0, (8 + header).min(len))]
    } else {
        // Zip archives: local headers and the first entry at the front, the
        // central directory at the back.
        vec![(0, len.min(4096)), (len.saturating_sub(4096), len)]
    }
}

fn os(parts: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<OsString> {
    parts.iter().map(|p| p.as_ref().to_os_string()).collect()
}

fn build_corpus(dir: &Path, dst: &Path) -> Vec<Case> {
    let corpus = dir.join("corpus");
    let outs = dir.join("out");
    std::fs::create_dir_all(&corpus).unwrap();
    std::fs::create_dir_all(&outs).unwrap();
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    let mut cases = Vec::new();
    let copy_case = |cases: &mut Vec<Case>, what: String, src: PathBuf, expect: Expect| {
        let out = outs.join(format!("out{}.pt", cases.len()));
        let names = src.file_name().unwrap().to_string_lossy().into_owned();
        let args = os(&[&"copy", &src, &dst, &"-o", &out, &"--allow-partial"]);
        cases.push(Case { what, args, expect, names, out: Some(out) });
    };
    for valid in valid_sources(dir) {
        let bytes = std::fs::read(&valid).unwrap();
        let name = valid.file_name().unwrap().to_string_lossy().into_owned();
        for k in 1..=10 {
            let cut = bytes.len() * k / 11;
            let path = corpus.join(format!("cut{cut}-{name}"));
            std::fs::write(&path, &bytes[..cut]).unwrap();
            copy_case(&mut cases, format!("{name} truncated at {cut}"), path, Expect::Error);
        }
        let regions = metadata_regions(&bytes, &name);
        for k in 0..20 {
            let (start, end) = regions[k % regions.len()];
            let at = start + rng.below(end - start);
            let mask = (rng.below(255) + 1) as u8;
            let mut flipped = bytes.clone();
            flipped[at] ^= mask;
            let path = corpus.join(format!("flip{k}-{name}"));
            std::fs::write(&path, &flipped).unwrap();
            copy_case(&mut cases, format!("{name} byte {at} ^ {mask:#04x}"), path, Expect::Clean);
        }
        let empty = corpus.join(format!("empty-{name}"));
        std::fs::write(&empty, b"").unwrap();
        copy_case(&mut cases, format!("empty {name}"), empty, Expect::Error);
        // The same content under another extension: found by content.
        let renamed = corpus.join(format!("{name}.bin"));
        std::fs::write(&renamed, &bytes).unwrap();
        copy_case(&mut cases, format!("{name} named .bin"), renamed, Expect::Success);
    }
    let text = corpus.join("notes.safetensors");
    std::fs::write(&text, "not a model at all\n").unwrap();
    copy_case(&mut cases, "text named .safetensors".into(), text, Expect::Error);
    let folder = corpus.join("folder.pt");
    std::fs::create_dir_all(&folder).unwrap();
    copy_case(&mut cases, "a directory".into(), folder, Expect::Error);
    let (loop_a, loop_b) = (corpus.join("loop_a.pt"), corpus.join("loop_b.pt"));
    std::os::unix::fs::symlink(&loop_b, &loop_a).unwrap();
    std::os::unix::fs::symlink(&loop_a, &loop_b).unwrap();
    copy_case(&mut cases, "a symlink loop".into(), loop_a, Expect::Error);
    copy_case(&mut cases, "a missing file".into(), corpus.join("missing.pt"), Expect::Error);

    // The sharded index, truncated.
    let sharded = dir.join("sharded");
    std::fs::create_dir_all(&sharded).unwrap();
    for entry in std::fs::read_dir(fixture("sharded")).unwrap().flatten() {
        std::fs::copy(entry.path(), sharded.join(entry.file_name())).unwrap();
    }
    let index = std::fs::read(sharded.join("model.safetensors.index.json")).unwrap();
    for k in 1..=10 {
        let cut = index.len() * k / 11;
        let path = sharded.join(format!("cut{cut}.safetensors.index.json"));
        std::fs::write(&path, &index[..cut]).unwrap();
        copy_case(&mut cases, format!("index truncated at {cut}"), path, Expect::Error);
    }

    // Rules files.
    let good_src = fixture("bn_net_a.pt");
    for (what, text) in [
        ("a bad regex", "features\\.(.* => x.$1\n"),
        ("an unknown keyword", "rename features => x\n"),
        ("an empty pattern", " => x\n"),
        ("a missing group", "features\\.(.*) => x.$3\n"),
    ] {
        let rules = corpus.join(format!("rules{}.txt", cases.len()));
        std::fs::write(&rules, text).unwrap();
        let out = outs.join(format!("out{}.pt", cases.len()));
        let args = os(&[&"copy", &good_src, &dst, &"-o", &out, &"--rules", &rules]);
        let names = format!("{}:1", rules.file_name().unwrap().to_string_lossy());
        cases.push(Case {
            what: format!("rules with {what}"),
            args,
            expect: Expect::Error,
            names,
            out: Some(out),
        });
    }
    // Shapes and flags.
    for shape in ["1,x,8", "", "0,3,8,8", "-1", "3,,4"] {
        let args = os(&[&"verify", &good_src, &good_src, &"--input", &shape]);
        cases.push(Case {
            what: format!("--input {shape:?}"),
            args,
            expect: Expect::Usage,
            names: String::new(),
            out: None,
        });
    }
    // Round two: special files, overlapping views, members and keys twice.
    let fifo = corpus.join("model.fifo");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo only creates the node.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o644) }, 0);
    let zero = PathBuf::from("/dev/zero");
    for (what, args, names) in [
        ("a FIFO as SRC", vec![fifo.clone()], "model.fifo"),
        (
            "a FIFO as rules",
            vec![good_src.clone(), dst.to_path_buf(), "--rules".into(), fifo.clone()],
            "model.fifo",
        ),
        (
            "/dev/zero as rules",
            vec![good_src.clone(), dst.to_path_buf(), "--rules".into(), zero.clone()],
            "/dev/zero",
        ),
        (
            "/dev/zero as a plan",
            vec![good_src.clone(), dst.to_path_buf(), "--plan".into(), zero.clone()],
            "/dev/zero",
        ),
    ] {
        let out = outs.join(format!("out{}.pt", cases.len()));
        let mut all: Vec<OsString> = vec!["copy".into()];
        if args.len() == 1 {
            all.extend([args[0].clone().into_os_string(), dst.as_os_str().to_owned()]);
        } else {
            all.extend(args.into_iter().map(PathBuf::into_os_string));
        }
        all.extend(["-o".into(), out.clone().into_os_string()]);
        cases.push(Case {
            what: what.into(),
            args: all,
            expect: Expect::Error,
            names: names.into(),
            out: Some(out),
        });
    }
    let pickle_view = |size: u8, stride: u8| -> Vec<u8> {
        // {'w': _rebuild_tensor_v2(storage('0', 4 floats), 0, (size,), (stride,), False, OrderedDict())}
        let mut p = vec![0x80, 2, b'}', b'X', 1, 0, 0, 0, b'w'];
        p.extend_from_slice(
            b"ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\n",
        );
        p.extend_from_slice(b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQK\x00(K");
        p.extend_from_slice(&[size, b't', b'(', b'K', stride, b't']);
        p.extend_from_slice(b"\x89ccollections\nOrderedDict\n)RtRs.");
        p
    };
    let zip_of = |members: &[(&str, Vec<u8>)]| -> Vec<u8> {
        use std::io::Write;
        let options = zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Stored);
        let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        for (name, data) in members {
            zip.start_file(*name, options).unwrap();
            zip.write_all(data).unwrap();
        }
        zip.finish().unwrap().into_inner()
    };
    let npy = |header: &str| -> Vec<u8> {
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        let padded = format!("{header:<118}\n");
        bytes.extend_from_slice(&(padded.len() as u16).to_le_bytes());
        bytes.extend_from_slice(padded.as_bytes());
        bytes.extend_from_slice(&[0u8; 12]);
        bytes
    };
    for (what, name, bytes) in [
        (
            "an overlapping view",
            "view.pth",
            zip_of(&[("archive/data.pkl", pickle_view(200, 0)), ("archive/data/0", vec![0; 16])]),
        ),
        (
            "data.pkl twice",
            "twice.pth",
            zip_of(&[
                ("archive/data.pkl", pickle_view(4, 1)),
                ("archive/data/0", vec![0; 16]),
                ("archive/data.pkl", pickle_view(2, 1)),
            ]),
        ),
        (
            "an .npy header with descr twice",
            "descr.npz",
            zip_of(&[(
                "w.npy",
                npy("{'descr': '<f4', 'descr': '<f8', 'fortran_order': False, 'shape': (3,), }"),
            )]),
        ),
    ] {
        let path = corpus.join(name);
        std::fs::write(&path, bytes).unwrap();
        copy_case(&mut cases, what.into(), path, Expect::Error);
    }
    // Missing output folders are made; one that is a regular file cannot be.
    std::fs::write(outs.join("not_a_folder"), b"a file").unwrap();
    let out = outs.join("not_a_folder/deeper/out.pt");
    let args = os(&[&"copy", &good_src, &dst, &"-o", &out]);
    cases.push(Case {
        what: "OUT under a regular file".into(),
        args,
        expect: Expect::Error,
        names: "not_a_folder".into(),
        out: Some(out),
    });
    cases
}

fn check(case: &Case, dst: &Path, dst_hash: &str) -> Result<(), String> {
    let src = case.args.get(1).map(PathBuf::from);
    let src_hash = src.as_ref().filter(|p| p.is_file()).map(|p| file_hash(p));
    let run = transplant(&case.args);
    let fail = |why: String| {
        Err(format!("{}: {why}\n  exit {}\n  stderr: {}", case.what, run.code, run.stderr.trim()))
    };
    if run.stderr.contains("panicked") || run.code == 101 {
        return fail("panicked".into());
    }
    let ok_code = match case.expect {
        Expect::Error => run.code == 1,
        Expect::Usage => run.code == 2,
        Expect::Clean => [0, 1, 3].contains(&run.code),
        Expect::Success => run.code == 0 || run.code == 3,
    };
    if !ok_code {
        return fail(format!("expected {:?}", case.expect));
    }
    if run.code == 1 {
        if !run.stderr.contains(&case.names) {
            return fail(format!("the message does not name {}", case.names));
        }
        if run.stderr.trim().lines().filter(|l| l.starts_with("error:")).count() != 1 {
            return fail("not one error message".into());
        }
        if case.out.as_ref().is_some_and(|o| o.exists()) {
            return fail("OUT was written".into());
        }
    }
    if src_hash.is_some() && src.as_ref().map(|p| file_hash(p)) != src_hash {
        return fail("SRC changed".into());
    }
    if file_hash(dst) != dst_hash {
        return fail("DST changed".into());
    }
    Ok(())
}

#[test]
fn every_bad_input_ends_cleanly_with_nothing_lost() {
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("dst.pt");
    std::fs::copy(fixture("bn_net_b.pt"), &dst).unwrap();
    let dst_hash = file_hash(&dst);
    let cases = build_corpus(dir.path(), &dst);
    let failures: Vec<String> = std::thread::scope(|scope| {
        let halves: Vec<&[Case]> = cases.chunks(cases.len().div_ceil(2)).collect();
        let workers: Vec<_> = halves
            .into_iter()
            .map(|part| {
                scope
                    .spawn(|| part.iter().filter_map(|c| check(c, &dst, &dst_hash).err()).collect::<Vec<_>>())
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap()).collect()
    });
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("out"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("transplant-tmp"))
        .collect();
    println!("hostile corpus: {} cases tried, {} passed", cases.len(), cases.len() - failures.len());
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    assert!(failures.is_empty(), "{} cases failed:\n{}", failures.len(), failures.join("\n"));
}
