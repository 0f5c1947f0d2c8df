//! The `transplant` command line. Parsing and printing only; the work is the library's.
use clap::Parser;

/// Move the complete state of PyTorch models — parameters and buffers — between
/// models, checkpoints and devices.
#[derive(Debug, Parser)]
#[command(name = "transplant", version, about, long_about = None)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
}
