//! The command line, as clap declarations: doc comments are the help text.
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Move the complete state of PyTorch models — parameters and buffers such as
/// BatchNorm running statistics — between models, checkpoints and devices.
///
/// Models: TorchScript modules (torch.jit.save), torch.save checkpoints
/// (.pt/.pth/.bin), .safetensors (and sharded *.safetensors.index.json), tch
/// .ot and .npz files; the kind is found from the content.
///
/// Exit status: 0 done and complete; 1 error (nothing written); 2 usage error;
/// 3 finished, but the transfer is incomplete or the models differ.
#[derive(Debug, Parser)]
#[command(name = "transplant", version, arg_required_else_help = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List a model's tensors: role, dtype, shape, device, bytes, and totals.
    Inspect {
        /// The model file.
        model: PathBuf,
        /// The state dict inside a torch.save checkpoint dict (`state_dict`, `a.b`).
        #[arg(long)]
        key: Option<String>,
        /// Print one JSON document on stdout.
        #[arg(long)]
        json: bool,
        /// Also give each tensor's SHA-256: of its bytes in C-contiguous row-major
        /// order, little-endian (`sha256` in JSON).
        #[arg(long)]
        digest: bool,
    },
    /// Show what a copy from SRC into DST would do, writing nothing.
    Plan {
        /// The model to copy from.
        src: PathBuf,
        /// The model to copy into.
        dst: PathBuf,
        #[command(flatten)]
        mapping: MappingArgs,
        /// Also write the plan to this JSON file (replay it with `copy --plan`).
        #[arg(long, value_name = "PLAN.json")]
        save_plan: Option<PathBuf>,
        /// Print one JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Copy SRC's tensors into DST's and write the result to OUT.
    ///
    /// OUT keeps DST's kind (a TorchScript module stays a module, with DST's code
    /// and SRC's weights) unless its extension names a state-dict format
    /// (.safetensors, .safetensors.index.json for shards, .pth/.bin, .ot, .npz).
    /// OUT is written whole or not at all; SRC and DST are never modified.
    Copy {
        /// The model to copy from.
        src: PathBuf,
        /// The model to copy into (read, never written).
        dst: PathBuf,
        /// Where to write the result.
        #[arg(short, long, value_name = "OUT")]
        out: PathBuf,
        #[command(flatten)]
        mapping: MappingArgs,
        /// Replay a plan saved by `plan --save-plan` instead of mapping again.
        #[arg(long, value_name = "PLAN.json")]
        plan: Option<PathBuf>,
        /// Where the target's tensors live during the copy (cpu, cuda, cuda:N).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Convert the result's floating tensors to this dtype.
        #[arg(long, value_enum)]
        dtype: Option<DtypeArg>,
        /// Write the result even if some tensors have no counterpart (exit 3).
        #[arg(long)]
        allow_partial: bool,
        /// With a .safetensors.index.json OUT: the most bytes of tensors per shard
        /// (`5GB`, `500MB`, `2GiB`, bytes); default 5GB.
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        max_shard_size: Option<u64>,
        /// Allow casts that lose information (float to integer, values out of the
        /// target dtype's range); each is still reported.
        #[arg(long)]
        allow_lossy: bool,
        /// Print one JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Convert SRC into another format, its names and tensors as the rules make
    /// them, with no target model.
    ///
    /// OUT's extension names the format: .safetensors, .safetensors.index.json
    /// (sharded safetensors: shards STEM-0000K-of-0000N.safetensors next to the
    /// index), .pth/.bin/.pt (torch.save, loadable with weights_only=True), .npz,
    /// .ot. Written one tensor at a time; whole or not at all (a sharded result
    /// as a whole set). SRC is never modified.
    Convert {
        /// The checkpoint or model to convert.
        src: PathBuf,
        /// Where to write the result.
        #[arg(short, long, value_name = "OUT")]
        out: PathBuf,
        /// A rules file: renames, skips, transforms (see the README's rule language).
        #[arg(long, value_name = "FILE")]
        rules: Option<PathBuf>,
        /// Give a constant of the rules file (`let NAME = VALUE`) another value.
        #[arg(long = "set", value_name = "NAME=VALUE")]
        sets: Vec<String>,
        /// A rule, `PATTERN=>REPLACEMENT [| OP]...` (any form a rules file takes).
        #[arg(long = "map", value_name = "PATTERN=>REPLACEMENT")]
        maps: Vec<String>,
        /// Leave source names matching PATTERN out (tried before every other rule).
        #[arg(long = "skip", value_name = "PATTERN")]
        skips: Vec<String>,
        /// The state dict inside a torch.save checkpoint dict (`state_dict`, `a.b`).
        #[arg(long)]
        key: Option<String>,
        /// Convert the floating tensors to this dtype (integer buffers stay integers).
        #[arg(long, value_enum)]
        dtype: Option<DtypeArg>,
        /// With a .safetensors.index.json OUT: the most bytes of tensors per shard
        /// (`5GB`, `500MB`, `2GiB`, bytes); default 5GB.
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        max_shard_size: Option<u64>,
        /// Make an unused rule (and every warning) an error.
        #[arg(long)]
        strict: bool,
        /// Allow casts that lose information (values out of the new dtype's range).
        #[arg(long)]
        allow_lossy: bool,
        /// Print one JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Compare two models tensor by tensor (A's names mapped onto B's by the
    /// rules and the matcher, as `plan A B` would).
    Diff {
        /// The first model.
        a: PathBuf,
        /// The second model.
        b: PathBuf,
        #[command(flatten)]
        mapping: MappingArgs,
        /// Relative tolerance.
        #[arg(long, default_value_t = 0.0)]
        rtol: f64,
        /// Absolute tolerance.
        #[arg(long, default_value_t = 0.0)]
        atol: f64,
        /// Print one JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Merge several models into one (model soups, task arithmetic, TIES, DARE, SLERP).
    Merge(crate::merge::MergeArgs),
    /// Merge a PEFT LoRA adapter into its base model (W + scale * B·A).
    MergeLora(crate::merge::MergeLoraArgs),
    /// Run two TorchScript modules in eval mode on the same seeded random
    /// inputs and compare their outputs.
    Verify {
        /// The first module.
        a: PathBuf,
        /// The second module.
        b: PathBuf,
        /// An input shape, as `1,3,224,224`; repeat for several inputs.
        #[arg(long = "input", value_name = "SHAPE", required = true, value_parser = parse_shape)]
        inputs: Vec<Vec<i64>>,
        /// Largest |a - b| allowed in any output.
        #[arg(long, default_value_t = 1e-5)]
        atol: f64,
        /// Seed of the random inputs.
        #[arg(long, default_value_t = 0)]
        seed: i64,
        /// Most elements all inputs may hold together (checked before allocating).
        #[arg(long, default_value_t = transplant::MAX_INPUT_ELEMENTS, value_name = "N")]
        max_input_elements: u64,
        /// Print one JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Print a completion script for SHELL on stdout, made from these very
    /// definitions (the README says where each shell looks for it).
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: ShellArg,
    },
    /// Print the manual page (roff) on stdout, made from these very
    /// definitions: `transplant man | man -l -`; with SUBCOMMAND, its own page
    /// (transplant-copy(1), which the main page lists).
    Man {
        /// The subcommand whose page to print.
        #[arg(value_parser = ["inspect", "plan", "copy", "convert", "diff", "verify", "completions", "man"])]
        subcommand: Option<String>,
    },
}

/// The shells `completions` writes for.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ShellArg {
    /// Bash.
    Bash,
    /// Zsh.
    Zsh,
    /// Fish.
    Fish,
    /// PowerShell.
    Powershell,
}

impl ShellArg {
    /// clap_complete's generator of this shell.
    pub fn generator(self) -> clap_complete::Shell {
        match self {
            ShellArg::Bash => clap_complete::Shell::Bash,
            ShellArg::Zsh => clap_complete::Shell::Zsh,
            ShellArg::Fish => clap_complete::Shell::Fish,
            ShellArg::Powershell => clap_complete::Shell::PowerShell,
        }
    }
}

/// How source names become target names.
#[derive(Debug, Args)]
pub struct MappingArgs {
    /// A rules file: `PATTERN => REPLACEMENT`, `skip PATTERN` and `keep PATTERN`, one per line.
    #[arg(long, value_name = "FILE")]
    pub rules: Option<PathBuf>,
    /// Give a constant of the rules file (`let NAME = VALUE`) another value,
    /// as `heads=8`: one rules file serves every size of a model family.
    #[arg(long = "set", value_name = "NAME=VALUE")]
    pub sets: Vec<String>,
    /// A rename rule, `PATTERN=>REPLACEMENT` (regex on the whole name; $1, ${name}).
    #[arg(long = "map", value_name = "PATTERN=>REPLACEMENT")]
    pub maps: Vec<String>,
    /// Leave source names matching PATTERN out (tried before every other rule).
    #[arg(long = "skip", value_name = "PATTERN")]
    pub skips: Vec<String>,
    /// Keep the target tensors matching PATTERN as they are, on purpose (a new
    /// head, masks computed at construction): listed as kept, never left over.
    /// A kept target that a rule or the matcher would fill is an error.
    #[arg(long = "keep", value_name = "PATTERN")]
    pub keeps: Vec<String>,
    /// The matcher for what the rules leave.
    #[arg(long = "match", value_enum, default_value_t = MatchArg::Auto)]
    pub matcher: MatchArg,
    /// With `--match order`: take the source's registration order from MODEL, a
    /// model or file with the same names that keeps one (the source architecture
    /// scripted with random weights, say), for a source that keeps none
    /// (safetensors, .npz).
    #[arg(long, value_name = "MODEL")]
    pub order_from: Option<PathBuf>,
    /// The state dict inside a torch.save checkpoint dict of the source (`state_dict`, `a.b`).
    #[arg(long)]
    pub key: Option<String>,
    /// Make every leftover, unused rule and warning an error.
    #[arg(long)]
    pub strict: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum MatchArg {
    /// Names equal after the rules.
    Exact,
    /// Exact, then `module.`/`_orig_mod.` prefixes, then unique suffixes.
    Auto,
    /// Modules aligned in registration order by their tensors' leaves, roles,
    /// dtypes and shapes; tensors paired inside them by leaf name.
    Order,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DtypeArg {
    /// bfloat16.
    Bf16,
    /// float16.
    F16,
    /// float32.
    F32,
    /// float64.
    F64,
}

fn parse_shape(text: &str) -> Result<Vec<i64>, String> {
    let dims: Result<Vec<i64>, _> = text.split(',').map(|d| d.trim().parse::<i64>()).collect();
    match dims {
        Ok(dims) if !dims.is_empty() && dims.iter().all(|&d| d > 0) => Ok(dims),
        _ => Err(format!(
            "{text:?} is not a shape: expected positive integers separated by commas, like 1,3,224,224"
        )),
    }
}

/// Parses `5GB`, `500MB`, `2GiB`, `100kB`, or a number of bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = (&t[..split], t[split..].trim());
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size: expected a number and a unit, like 5GB"))?;
    let scale: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0f64.powi(4),
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)")),
    };
    let bytes = value * scale;
    if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!("{text:?} is not a positive size"));
    }
    Ok(bytes as u64)
}
