//! Files that ask for absurd resources are refused quickly and in bounded
//! memory: a checkpoint declaring a 1 TB tensor, a pickle nested a million
//! levels deep, zip bombs. The bound checked: each run takes under 10 s and the
//! `transplant` process peaks under 1.5 GB resident (of which about 0.5 GB is
//! libtorch itself).
use crate::common;

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use common::transplant;

const MAX_SECONDS: u64 = 10;
const MAX_RSS_BYTES: u64 = 1536 << 20;

/// `transplant inspect PATH` is refused quickly, naming the file, with a peak
/// resident set (of that one process, measured from its own parent: the test
/// binary runs other tests' children beside it) within the bound.
fn refused_within_bounds(path: &Path, what: &str) -> String {
    let start = Instant::now();
    let (run, peak) =
        common::transplant_measured(&["inspect", path.to_str().expect("a UTF-8 temporary path")]);
    let took = start.elapsed();
    assert_eq!(run.code, 1, "{what}: {}", run.stderr);
    assert!(
        run.stderr.contains(&path.file_name().unwrap().to_string_lossy().to_string()),
        "{what}: {}",
        run.stderr
    );
    assert!(took < Duration::from_secs(MAX_SECONDS), "{what}: took {took:?}");
    assert!(peak < MAX_RSS_BYTES, "{what}: peaked at {} MB", peak >> 20);
    eprintln!("{what}: refused in {took:?}, peak RSS {} MB", peak >> 20);
    run.stderr
}

/// An archive entry: name, compression, and what writes its content.
type ZipEntry<'a> = (&'a str, zip::CompressionMethod, &'a dyn Fn(&mut dyn Write));

fn zip_with(entries: &[ZipEntry]) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, method, fill) in entries {
        let options = zip::write::FileOptions::default().compression_method(*method).large_file(true);
        zip.start_file(*name, options).unwrap();
        fill(&mut zip);
    }
    zip.finish().unwrap().into_inner()
}

#[test]
fn absurd_requests_are_refused_quickly_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();

    // A safetensors header declaring a 1 TB tensor in a 200-byte file.
    let header = r#"{"w":{"dtype":"F32","shape":[274877906944],"data_offsets":[0,1099511627776]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&[0u8; 64]);
    let terabyte = dir.path().join("terabyte.safetensors");
    std::fs::write(&terabyte, &bytes).unwrap();
    refused_within_bounds(&terabyte, "a 1 TB safetensors tensor");

    // A torch.save storage declaring 2^40 floats.
    let mut pickle = b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpu".to_vec();
    pickle.extend_from_slice(&[0x8a, 6, 0, 0, 0, 0, 0, 1]);
    pickle.extend_from_slice(
        b"tQK\x00(\x8a\x06\x00\x00\x00\x00\x00\x01t(K\x01t\x89ccollections\nOrderedDict\n)RtRs.",
    );
    let storage: &dyn Fn(&mut dyn Write) = &|w| w.write_all(&[0u8; 16]).unwrap();
    let program: &dyn Fn(&mut dyn Write) = &|w| w.write_all(&pickle).unwrap();
    let archive = zip_with(&[
        ("archive/data.pkl", zip::CompressionMethod::Stored, program),
        ("archive/data/0", zip::CompressionMethod::Stored, storage),
    ]);
    let huge = dir.path().join("huge_storage.pth");
    std::fs::write(&huge, archive).unwrap();
    refused_within_bounds(&huge, "a 2^40-element torch.save storage");

    // A pickle nested a million levels deep (through the memo, with a shallow stack).
    let mut chain = vec![0x80, 2, b']', b'q', 0];
    for i in 0..1_000_000u32 {
        let (prev, next) = ((i % 2) as u8, ((i + 1) % 2) as u8);
        chain.extend_from_slice(&[b'h', prev, b']', b'q', next, b'a', b'0']);
    }
    chain.extend_from_slice(&[b'h', 0, b'.']);
    let program: &dyn Fn(&mut dyn Write) = &|w| w.write_all(&chain).unwrap();
    let deep = dir.path().join("deep.pth");
    std::fs::write(&deep, zip_with(&[("archive/data.pkl", zip::CompressionMethod::Stored, program)]))
        .unwrap();
    refused_within_bounds(&deep, "a million-deep pickle");

    // A zip bomb: 512 MB of zeros deflated to about half a megabyte, as an npz array.
    let mut npy = b"\x93NUMPY\x01\x00".to_vec();
    let dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (134217728,), }";
    let padded = format!("{dict}{}\n", " ".repeat(64 - (10 + dict.len() + 1) % 64));
    npy.extend_from_slice(&(padded.len() as u16).to_le_bytes());
    npy.extend_from_slice(padded.as_bytes());
    let zeros = vec![0u8; 1 << 20];
    let array: &dyn Fn(&mut dyn Write) = &|w| {
        w.write_all(&npy).unwrap();
        for _ in 0..512 {
            w.write_all(&zeros).unwrap();
        }
    };
    let bomb = dir.path().join("bomb.npz");
    std::fs::write(&bomb, zip_with(&[("w.npy", zip::CompressionMethod::Deflated, array)])).unwrap();
    assert!(std::fs::metadata(&bomb).unwrap().len() < 2 << 20);
    let message = refused_within_bounds(&bomb, "a 512 MB zip bomb");
    assert!(message.contains("zip bomb"), "{message}");
}

#[test]
fn a_safetensors_header_listing_millions_of_empty_tensors_is_refused_by_the_entry_bound() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("many.safetensors");
    // 1.77 million zero-size tensors in a ~97 MB header (under safetensors' own
    // 100 MB header bound): once 2.4 GB and 16 s to inspect.
    let mut header = String::with_capacity(100 << 20);
    header.push('{');
    for i in 0..1_770_000 {
        if i > 0 {
            header.push(',');
        }
        header.push_str(&format!("\"t{i}\":{{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]}}"));
    }
    header.push('}');
    let mut file = std::fs::File::create(&path).unwrap();
    file.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
    file.write_all(header.as_bytes()).unwrap();
    drop(file);
    let message = refused_within_bounds(&path, "1.77 million empty tensors");
    assert!(message.contains("more than the 1048576"), "{message}");
}

/// 100,000 rules (2.4 MB) over 20,000 tensors: each name is tried only
/// against the rules whose literal text it starts with, each regex compiled
/// when needed: the plan pairs all 20,000 in bounded memory (it took more
/// than two minutes and 2.6 GB when every rule was compiled and tried).
#[test]
fn a_hundred_thousand_rules_over_twenty_thousand_tensors_stay_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst, rules) =
        (dir.path().join("src.pth"), dir.path().join("dst.pth"), dir.path().join("many.rules"));
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let status = std::process::Command::new(root.join(".venv/bin/python"))
        .args([
            "-c",
            "import sys, torch\n\
             torch.save({f'layer.{i}.weight': torch.ones(1) for i in range(20000)}, sys.argv[1])\n\
             torch.save({f'renamed.{i}.weight': torch.ones(1) for i in range(20000)}, sys.argv[2])",
        ])
        .args([&src, &dst])
        .status()
        .unwrap();
    assert!(status.success());
    let text: String =
        (0..100_000).map(|i| format!("layer\\.{i}\\.(weight|bias) => renamed.{i}.$1\n")).collect();
    std::fs::write(&rules, text).unwrap();
    let started = Instant::now();
    let (run, rss) = common::transplant_measured(&[
        "plan",
        src.to_str().unwrap(),
        dst.to_str().unwrap(),
        "--rules",
        rules.to_str().unwrap(),
        "--json",
    ]);
    assert!(run.code == 0 || run.code == 3, "{}", run.stderr);
    assert!(rss < 1200 << 20, "{} MB", rss >> 20);
    assert!(started.elapsed() < Duration::from_secs(240), "a guard against trying every rule on every name");
    // And the pairs are the rules' (checked on the text report of a smaller run).
    let few: String = (0..100).map(|i| format!("layer\\.{i}\\.(weight|bias) => renamed.{i}.$1\n")).collect();
    std::fs::write(&rules, few).unwrap();
    let run = transplant([
        "plan",
        src.to_str().unwrap(),
        dst.to_str().unwrap(),
        "--rules",
        rules.to_str().unwrap(),
    ]);
    assert!(
        run.stdout.contains("renamed.7.weight  <- layer.7.weight  (rule `layer\\.7\\.(weight|bias)"),
        "{}",
        run.stdout
    );
}
