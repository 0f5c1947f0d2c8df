fn main() {
    let a: Vec<String> = std::env::args().collect();
    let t = std::time::Instant::now();
    let fmt = transplant::sniff(std::path::Path::new(&a[1])).unwrap();
    eprintln!("sniff {:.3} {fmt:?}", t.elapsed().as_secs_f64());
    let t = std::time::Instant::now();
    let r = transplant::fuzzing::read_script_archive(std::path::Path::new(&a[1])).unwrap();
    eprintln!("read {:.3} {}", t.elapsed().as_secs_f64(), r.len());
    let t = std::time::Instant::now();
    drop(r);
    eprintln!("drop {:.3}", t.elapsed().as_secs_f64());
    let t = std::time::Instant::now();
    let s = transplant::open(&a[1]).unwrap();
    eprintln!("open {:.3}", t.elapsed().as_secs_f64());
    let t = std::time::Instant::now();
    let sum = transplant::Summary::of(s.as_ref());
    eprintln!("summary {:.3}", t.elapsed().as_secs_f64());
    let t = std::time::Instant::now();
    let text = sum.to_string();
    eprintln!("text {:.3} {}", t.elapsed().as_secs_f64(), text.len());
}
