//! `transplant merge`: its arguments and its run.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use transplant::{merge, plan_merge, Mapping, Matcher, MergeInput, MergeOptions, Method};

use crate::cli::{DtypeArg, MatchArg};

/// Merge several models into one (model soups, task arithmetic, TIES, DARE,
/// SLERP), one output tensor at a time.
///
/// The reference input — the base where there is one, else the first MODEL —
/// gives the output its names (after its rules), order, dtypes and integer
/// tensors; every other input is mapped onto it by its rules and the matcher,
/// and must map completely. Floating tensors (parameters and buffers) are
/// merged in float32 and written in the reference's dtype (then --dtype);
/// integer and bool tensors (num_batches_tracked, masks) are the reference's,
/// and those that differ between inputs are reported. OUT: .safetensors,
/// .pth/.bin/.pt (torch.save) or .npz, written whole or not at all.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The models to merge (for slerp with no --base: two, t = 0 the first).
    #[arg(required = true, value_name = "MODEL")]
    pub models: Vec<PathBuf>,
    /// Where to write the result.
    #[arg(short, long, value_name = "OUT")]
    pub out: PathBuf,
    /// How the models are merged.
    #[arg(long, value_enum)]
    pub method: MethodArg,
    /// One weight per MODEL (the base takes none); default 1 each.
    #[arg(long, num_args = 1.., value_name = "W", allow_negative_numbers = true)]
    pub weights: Vec<f64>,
    /// The base model: task vectors are MODEL - BASE (task-arithmetic, ties,
    /// dare-*); for slerp, the t = 0 end.
    #[arg(long, value_name = "BASE")]
    pub base: Option<PathBuf>,
    /// ties, dare-*: the fraction of each task vector kept, in (0, 1].
    #[arg(long, value_name = "D", allow_negative_numbers = true)]
    pub density: Option<f64>,
    /// task-arithmetic, ties, dare-*: the scale of the merged task vector (default 1).
    #[arg(long = "lambda", value_name = "L", allow_negative_numbers = true)]
    pub lambda: Option<f64>,
    /// slerp: where between the two models, in [0, 1] (default 0.5).
    #[arg(long, value_name = "T", allow_negative_numbers = true)]
    pub t: Option<f64>,
    /// dare-*: the seed of the drop masks.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub seed: u64,
    /// Convert the result's floating tensors to this dtype, last.
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
    /// A rules file for every input (the reference's rules make the output's names).
    #[arg(long, value_name = "FILE")]
    pub rules: Option<PathBuf>,
    /// A rule for every input, `PATTERN=>REPLACEMENT [| OP]...`.
    #[arg(long = "map", value_name = "PATTERN=>REPLACEMENT")]
    pub maps: Vec<String>,
    /// Leave names matching PATTERN out, in every input.
    #[arg(long = "skip", value_name = "PATTERN")]
    pub skips: Vec<String>,
    /// A rules file for one input only, tried before the shared rules: N is the
    /// MODEL's place (1 for the first) or `base`. Repeatable.
    #[arg(long = "rules-for", value_name = "N=FILE")]
    pub rules_for: Vec<String>,
    /// The matcher for what the rules leave (inputs other than the reference).
    #[arg(long = "match", value_enum, default_value_t = MatchArg::Exact)]
    pub matcher: MatchArg,
    /// The state dict inside torch.save checkpoint dicts (`state_dict`, `a.b`).
    #[arg(long)]
    pub key: Option<String>,
    /// Make unused rules and warnings errors.
    #[arg(long)]
    pub strict: bool,
    /// Print one JSON document on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum MethodArg {
    /// The weighted mean (model soups, checkpoint averaging).
    Linear,
    /// BASE + lambda * sum of w * (MODEL - BASE) (Ilharco et al.).
    TaskArithmetic,
    /// TIES-Merging: trim, elect sign, disjoint mean (Yadav et al.).
    Ties,
    /// DARE drop and rescale, then task arithmetic (Yu et al.).
    DareLinear,
    /// DARE drop and rescale, then TIES' sign election and mean.
    DareTies,
    /// Spherical interpolation between two models, per tensor.
    Slerp,
}

fn method(arg: MethodArg) -> Method {
    match arg {
        MethodArg::Linear => Method::Linear,
        MethodArg::TaskArithmetic => Method::TaskArithmetic,
        MethodArg::Ties => Method::Ties,
        MethodArg::DareLinear => Method::DareLinear,
        MethodArg::DareTies => Method::DareTies,
        MethodArg::Slerp => Method::Slerp,
    }
}

/// `--rules-for` parsed: (input, file), the input `None` for the base.
fn rules_for(args: &MergeArgs) -> Result<Vec<(Option<usize>, PathBuf)>> {
    args.rules_for
        .iter()
        .map(|spec| {
            let (which, file) = spec
                .split_once('=')
                .with_context(|| format!("--rules-for {spec:?}: expected N=FILE or base=FILE"))?;
            let input = match which.trim() {
                "base" => {
                    anyhow::ensure!(args.base.is_some(), "--rules-for {spec:?}: there is no --base");
                    None
                }
                n => {
                    let n: usize =
                        n.parse().ok().filter(|&n| n >= 1 && n <= args.models.len()).with_context(|| {
                            format!("--rules-for {spec:?}: N is a MODEL's place, 1 to {}", args.models.len())
                        })?;
                    Some(n - 1)
                }
            };
            Ok((input, PathBuf::from(file)))
        })
        .collect()
}

/// Runs `transplant merge`; returns what to print.
pub fn run(args: &MergeArgs) -> Result<transplant::Merged> {
    let own = rules_for(args)?;
    let mut inputs: Vec<&Path> = args.models.iter().map(PathBuf::as_path).collect();
    inputs.extend(args.base.as_deref());
    inputs.extend(args.rules.as_deref());
    inputs.extend(own.iter().map(|(_, f)| f.as_path()));
    crate::transfer::check_output(&args.out, &inputs)?;
    let matcher = match args.matcher {
        MatchArg::Exact => Matcher::Exact,
        MatchArg::Auto => Matcher::Auto,
        MatchArg::Order => Matcher::Order,
    };
    let mapping_of = |input: Option<usize>| -> Result<Mapping> {
        let mut mapping = Mapping { matcher, ..Mapping::default() };
        for (_, file) in own.iter().filter(|(i, _)| *i == input) {
            mapping.rules.extend(&transplant::Rules::from_file(file)?)?;
        }
        let shared = Mapping::from_parts(args.rules.as_deref(), &args.maps, &args.skips, matcher)?;
        mapping.rules.extend(&shared.rules)?;
        Ok(mapping)
    };
    let open = |path: &Path| crate::transfer::open_source(path, args.key.as_deref());
    let base = args.base.as_deref().map(open).transpose()?;
    let models = args.models.iter().map(|p| open(p)).collect::<transplant::Result<Vec<_>>>()?;
    let base_input = match &base {
        Some(b) => Some(MergeInput { source: b.as_ref(), mapping: mapping_of(None)? }),
        None => None,
    };
    let model_inputs = models
        .iter()
        .enumerate()
        .map(|(i, m)| Ok(MergeInput { source: m.as_ref(), mapping: mapping_of(Some(i))? }))
        .collect::<Result<Vec<_>>>()?;
    let options = MergeOptions {
        method: method(args.method),
        weights: (!args.weights.is_empty()).then(|| args.weights.clone()),
        density: args.density,
        lambda: args.lambda,
        t: args.t,
        seed: args.seed,
        dtype: args.dtype.map(crate::kind_of),
        strict: args.strict,
    };
    let plan = plan_merge(base_input.as_ref(), &model_inputs, &args.out, &options)?;
    let sources: Vec<&dyn transplant::Source> =
        models.iter().map(|m| m.as_ref() as &dyn transplant::Source).collect();
    Ok(merge(&plan, base.as_deref().map(|b| b as &dyn transplant::Source), &sources, &args.out)?)
}

/// Merge a PEFT LoRA adapter into its base model: W + scale * B·A for every
/// adapted weight (Linear, GPT-2's Conv1D, convolutions, embeddings), the
/// adapter's modules_to_save in place of the base's. DoRA is refused.
///
/// ADAPTER is a folder with adapter_config.json and adapter_model.safetensors
/// (or adapter_model.bin), as PEFT's save_pretrained writes it. OUT holds
/// every tensor of BASE: .safetensors, .pth/.bin/.pt or .npz, written whole or
/// not at all.
#[derive(Debug, Args)]
pub struct MergeLoraArgs {
    /// The base model.
    #[arg(value_name = "BASE")]
    pub base: PathBuf,
    /// The adapter folder.
    #[arg(value_name = "ADAPTER")]
    pub adapter: PathBuf,
    /// Where to write the result.
    #[arg(short, long, value_name = "OUT")]
    pub out: PathBuf,
    /// Convert the result's floating tensors to this dtype.
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
    /// The state dict inside a torch.save checkpoint dict of BASE.
    #[arg(long)]
    pub key: Option<String>,
    /// Print one JSON document on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Runs `transplant merge-lora`; returns what to print.
pub fn run_lora(args: &MergeLoraArgs) -> Result<transplant::LoraMerged> {
    let adapter_files: Vec<PathBuf> =
        ["adapter_model.safetensors", "adapter_model.bin", "adapter_config.json"]
            .iter()
            .map(|f| args.adapter.join(f))
            .collect();
    let mut inputs: Vec<&Path> = vec![&args.base];
    inputs.extend(adapter_files.iter().map(PathBuf::as_path));
    crate::transfer::check_output(&args.out, &inputs)?;
    let base = crate::transfer::open_source(&args.base, args.key.as_deref())?;
    let adapter = transplant::Adapter::open(&args.adapter)?;
    Ok(transplant::merge_lora(base.as_ref(), &adapter, &args.out, args.dtype.map(crate::kind_of))?)
}
