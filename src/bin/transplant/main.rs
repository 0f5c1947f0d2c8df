//! The `transplant` command line: parse, call the library, print, map errors to
//! exit statuses (0 complete, 1 error, 2 usage, 3 incomplete or different).
mod cli;
mod merge;
mod progress;
mod transfer;

use std::fmt::Display;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use clap::{CommandFactory, FromArgMatches};
use serde::Serialize;
use transplant::{
    compare_outputs, convert, copy_to_file, copy_with, diff, plan_conversion, Constants, ConvertOptions,
    CopyOptions, Format, Mapping, Matcher, ModuleStore, NameOrder, Plan, Policy, Report, ScriptModule,
    Summary, Tolerance,
};

use cli::{Cli, Command, DtypeArg, MappingArgs, MatchArg};

/// The exit statuses, the CLI contract's: scripts test for these numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Exit {
    /// Done and complete.
    Complete = 0,
    /// An error: nothing was written.
    Error = 1,
    /// The command line itself is wrong.
    Usage = 2,
    /// Finished, but incomplete (a partial copy) or different (diff, verify).
    Incomplete = 3,
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> Self {
        ExitCode::from(exit as u8)
    }
}

/// How a command ended when it did not fail.
enum Outcome {
    /// Done and complete (exit 0).
    Complete,
    /// Finished, but incomplete or different (exit 3).
    Incomplete,
}

fn main() -> ExitCode {
    // `--json` promises one JSON document on stdout, usage errors included.
    let json = std::env::args().skip(1).any(|a| a == "--json");
    let cli = match parse() {
        Ok(cli) => cli,
        Err(usage) if usage.use_stderr() => {
            if json {
                let _ = emit(
                    true,
                    &serde_json::json!({ "error": { "kind": "usage", "message": usage.to_string() } }),
                );
            }
            let _ = usage.print();
            return Exit::Usage.into();
        }
        Err(help) => {
            let _ = help.print();
            return Exit::Complete.into();
        }
    };
    let mut cli = cli;
    if let Command::Copy { out, .. } | Command::Convert { out, .. } = &mut cli.command {
        // An existing Distributed Checkpoint folder named without its slash is
        // replaced whole, as `DIR/` names it (as a file OUT is replaced).
        if out.join(".metadata").is_file() && !out.as_os_str().to_string_lossy().ends_with('/') {
            out.as_mut_os_string().push("/");
        }
    }
    // Missing folders of OUT are created, and removed again if the command fails.
    let out = match &cli.command {
        Command::Copy { out, .. } | Command::Convert { out, .. } => Some(out.clone()),
        Command::Merge(args) => Some(args.out.clone()),
        Command::MergeLora(args) => Some(args.out.clone()),
        _ => None,
    };
    let mut created = Vec::new();
    let result = match out.as_deref().map(|out| transfer::create_folders_of(out, &mut created)) {
        Some(Err(error)) => Err(error.into()),
        _ => run(cli.command),
    };
    if result.is_err() {
        for folder in created.iter().rev() {
            let _ = std::fs::remove_dir(folder);
        }
    }
    match result {
        Ok(Outcome::Complete) => Exit::Complete.into(),
        Ok(Outcome::Incomplete) => Exit::Incomplete.into(),
        Err(error) => {
            if json && !EMITTED.load(Ordering::Relaxed) {
                let _ = emit(true, &serde_json::json!({ "error": error_json(&error) }));
            }
            eprintln!("error: {}", shown(&message(&error)));
            Exit::Error.into()
        }
    }
}

/// Parses the command line; `--version` names the libtorch this process runs on.
fn parse() -> Result<Cli, clap::Error> {
    let version: &'static str = Box::leak(version().into_boxed_str());
    Cli::from_arg_matches(&Cli::command().version(version).try_get_matches()?)
}

/// What `--version` says after the name: this build, and the libtorch it runs
/// on (the version that library reports, its folder, its CUDA backend).
fn version() -> String {
    let libtorch = transplant::libtorch();
    let folder = libtorch.library.as_deref().and_then(Path::parent);
    format!(
        "{} (libtorch {} at {}; CUDA backend {})",
        env!("CARGO_PKG_VERSION"),
        libtorch.version.as_deref().unwrap_or("of unknown version"),
        folder.map_or_else(|| "an unknown place".to_string(), |f| f.display().to_string()),
        transplant::cuda_backend()
    )
}

/// Whether a JSON document was printed on stdout already (the report of a
/// refused copy carries its error): a second one is never printed.
static EMITTED: AtomicBool = AtomicBool::new(false);

/// The whole chain of an error, each cause once: the library's messages already
/// end with their source's (`x.pt: No such file or directory`), which a plain
/// `{:#}` would repeat.
fn message(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let part = without_backtrace(&cause.to_string());
        if !text.ends_with(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
    }
    text
}

/// A message with libtorch's C++ backtrace taken off: libtorch ends its
/// messages with `Exception raised from …` and `frame #N: …` lines, which say
/// nothing to a user; what comes before them (its first line) is kept.
fn without_backtrace(text: &str) -> String {
    let cut = ["\nException raised from ", "\nframe #"].iter().filter_map(|m| text.find(m)).min();
    match cut {
        Some(at) => text[..at].trim_end().to_string(),
        None => text.to_string(),
    }
}

/// An error as JSON: its kind, its whole message, and the file it concerns.
fn error_json(error: &anyhow::Error) -> serde_json::Value {
    let library = error.chain().find_map(|e| e.downcast_ref::<transplant::Error>());
    serde_json::json!({
        "kind": library.map_or("error", transplant::Error::kind),
        "message": message(error),
        "file": library.and_then(transplant::Error::path),
    })
}

/// An error message as a terminal may show it: control characters other than
/// the message's own line breaks escaped (names in it come from files).
fn shown(message: &str) -> String {
    message.split('\n').map(|line| transplant::escaped(line).into_owned()).collect::<Vec<_>>().join("\n")
}

/// Prints `value`: as one JSON document on stdout with `json`, else as text.
/// A closed stdout (`transplant inspect … | head`) is not an error.
fn emit<T: Serialize + Display>(json: bool, value: &T) -> Result<()> {
    let text = if json { serde_json::to_string_pretty(value)? } else { value.to_string() };
    EMITTED.fetch_or(json, Ordering::Relaxed);
    match writeln!(std::io::stdout().lock(), "{text}") {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// A value printed as text the way its `Display` does, and as JSON with extra fields.
#[derive(Serialize)]
struct WithExtra<'a, T: Serialize, E: Serialize> {
    #[serde(flatten)]
    value: &'a T,
    #[serde(flatten)]
    extra: E,
}

impl<T: Serialize + Display, E: Serialize> Display for WithExtra<'_, T, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.value.fmt(f)
    }
}

/// The `--set NAME=VALUE` flags.
fn constants(sets: &[String]) -> Result<Constants> {
    let mut constants = Constants::new();
    for set in sets {
        constants.set_text(set)?;
    }
    Ok(constants)
}

fn mapping(args: &MappingArgs) -> Result<(Mapping, Policy)> {
    let matcher = match args.matcher {
        MatchArg::Exact => Matcher::Exact,
        MatchArg::Auto => Matcher::Auto,
        MatchArg::Order => Matcher::Order,
    };
    let mut mapping = Mapping::from_parts_with(
        args.rules.as_deref(),
        &args.maps,
        &args.skips,
        &constants(&args.sets)?,
        matcher,
    )?;
    for pattern in &args.keeps {
        mapping.rules.add_keep(pattern)?;
    }
    if let Some(model) = &args.order_from {
        anyhow::ensure!(
            matcher == Matcher::Order,
            "--order-from lends a registration order to the order matcher: add --match order"
        );
        let store = transplant::open(model).with_context(|| format!("--order-from {}", model.display()))?;
        mapping.source_order = Some(NameOrder::of(store.as_ref())?);
    }
    Ok((mapping, Policy { strict: args.strict, allow_lossy_casts: false }))
}

fn run(command: Command) -> Result<Outcome> {
    match command {
        Command::Inspect { model, key, json, digest } => {
            let store = transplant::open_with_key(transfer::model_file(&model)?, key.as_deref())?;
            let summary =
                if digest { Summary::with_digests(store.as_ref())? } else { Summary::of(store.as_ref()) };
            emit(json, &summary)?;
            Ok(Outcome::Complete)
        }
        Command::Plan { src, dst, mapping: args, save_plan, json } => {
            if let Some(path) = &save_plan {
                transfer::check_output(path, &inputs(&[&src, &dst], &args, None))?;
            }
            let (mapping, policy) = mapping(&args)?;
            let source = transfer::open_source(&src, args.key.as_deref())?;
            let target = transfer::open_target(&dst, tch::Device::Cpu, None)?;
            let plan = Plan::build(source.as_ref(), target.as_ref(), &mapping)?;
            if let Some(path) = &save_plan {
                plan.save(path, source.as_ref(), target.as_ref())
                    .with_context(|| format!("saving the plan to {}", path.display()))?;
            }
            let report = Report::new(&plan, &policy, None);
            let checked = plan.check(&policy).map_err(anyhow::Error::new);
            let error = checked.as_ref().err().map(error_json);
            let extra = serde_json::json!({ "plan_file": save_plan, "error": error });
            emit(json, &WithExtra { value: &report, extra })?;
            checked?;
            Ok(if plan.is_complete() { Outcome::Complete } else { Outcome::Incomplete })
        }
        Command::Copy {
            src,
            dst,
            out,
            mapping: args,
            plan,
            device,
            dtype,
            allow_partial,
            max_shard_size,
            allow_lossy,
            json,
        } => {
            transfer::check_output(&out, &inputs(&[&src, &dst], &args, plan.as_deref()))?;
            let (mapping, mut policy) = mapping(&args)?;
            policy.allow_lossy_casts = allow_lossy;
            let device = transfer::device(&device)?;
            let dtype = dtype.map(kind_of);
            let source = transfer::open_source(&src, args.key.as_deref())?;
            let mut target = transfer::open_target(&dst, device, dtype)?;
            let plan = match &plan {
                Some(file) => Plan::replay(file, source.as_ref(), target.as_ref())?,
                None => Plan::build(source.as_ref(), target.as_ref(), &mapping)?,
            };
            let refused =
                |plan: &Plan, why: anyhow::Error| refuse(&Report::new(plan, &policy, None), json, why);
            if let Err(e) = plan.check(&policy) {
                return refused(&plan, e.into());
            }
            if !plan.is_complete() && !allow_partial {
                let open = plan.open_leftovers();
                let steps = transfer::next_steps(&plan, mapping.matcher);
                return refused(
                    &plan,
                    anyhow::anyhow!(
                        "the transfer is incomplete ({open} tensors have no counterpart); nothing was written: \
                         {steps}"
                    ),
                );
            }
            let bar = progress::Bar::default();
            let options = CopyOptions { progress: Some(&bar), ..CopyOptions::default() };
            let (copied, written) = if transfer::streams_into_archive(target.as_ref(), &out, max_shard_size) {
                let copied = copy_to_file(&plan, source.as_ref(), target.as_mut(), &out, &policy, options)?;
                (copied, transfer::Written { path: out.clone(), kind: target.kind().to_string() })
            } else {
                let copied = copy_with(&plan, source.as_ref(), target.as_mut(), &policy, options)?;
                (copied, transfer::write_output(target.as_ref(), &out, max_shard_size)?)
            };
            let report = Report::new(&plan, &policy, Some(copied));
            emit(json, &WithExtra { value: &report, extra: serde_json::json!({ "output": written }) })?;
            if !json {
                let _ = writeln!(
                    std::io::stdout().lock(),
                    "  wrote {} ({})",
                    written.path.display(),
                    written.kind
                );
            }
            Ok(if plan.is_complete() { Outcome::Complete } else { Outcome::Incomplete })
        }
        Command::Convert {
            src,
            out,
            rules,
            sets,
            maps,
            skips,
            key,
            dtype,
            max_shard_size,
            strict,
            allow_lossy,
            json,
        } => {
            let mut inputs: Vec<&Path> = vec![&src];
            inputs.extend(rules.as_deref());
            transfer::check_output(&out, &inputs)?;
            let mapping = Mapping::from_parts_with(
                rules.as_deref(),
                &maps,
                &skips,
                &constants(&sets)?,
                Matcher::Exact,
            )?;
            let policy = Policy { strict, allow_lossy_casts: allow_lossy };
            let source = transfer::open_source(&src, key.as_deref())?;
            let (plan, outline) = plan_conversion(source.as_ref(), &mapping, &out, dtype.map(kind_of))?;
            let report = Report::new(&plan, &policy, None);
            if let Err(e) = plan.check(&policy) {
                return refuse(&report, json, e.into());
            }
            let bar = progress::Bar::default();
            let options = ConvertOptions {
                max_shard_bytes: max_shard_size,
                progress: Some(&bar),
                ..ConvertOptions::default()
            };
            let converted = convert(&plan, source.as_ref(), &outline, &out, &policy, options)?;
            let summary = transfer::ConvertSummary::new(&plan, source.as_ref(), &converted);
            emit(
                json,
                &WithExtra {
                    value: &report,
                    extra: serde_json::json!({ "summary": summary, "converted": converted }),
                },
            )?;
            if !json {
                let _ = write!(std::io::stdout().lock(), "{summary}");
            }
            Ok(Outcome::Complete)
        }
        Command::Diff { a, b, mapping: args, rtol, atol, json } => {
            let (mapping, _) = mapping(&args)?;
            let first = transfer::open_source(&a, args.key.as_deref())?;
            let second = transplant::open(transfer::model_file(&b)?)?;
            let plan = Plan::build(first.as_ref(), second.as_ref(), &mapping)?;
            let diff = diff(&plan, first.as_ref(), second.as_ref(), Tolerance { rtol, atol })?;
            emit(json, &diff)?;
            Ok(if diff.is_same() { Outcome::Complete } else { Outcome::Incomplete })
        }
        Command::Merge(args) => {
            let merged = merge::run(&args)?;
            emit(args.json, &merged)?;
            Ok(Outcome::Complete)
        }
        Command::MergeLora(args) => {
            let merged = merge::run_lora(&args)?;
            emit(args.json, &merged)?;
            Ok(Outcome::Complete)
        }
        Command::Verify { a, b, inputs, atol, seed, max_input_elements, json } => {
            let (mut first, mut second) = (module(&a)?, module(&b)?);
            let comparison =
                match compare_outputs(&mut first, &mut second, &inputs, seed, atol, max_input_elements) {
                    Err(error @ transplant::Error::InputTooLarge { .. }) => {
                        return Err(anyhow::Error::new(error).context(
                            "verify's inputs are bounded (--max-input-elements N raises the bound)",
                        ))
                    }
                    other => other?,
                };
            emit(json, &comparison)?;
            Ok(if comparison.is_same() { Outcome::Complete } else { Outcome::Incomplete })
        }
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell.generator(), &mut command, "transplant", &mut script);
            std::io::stdout().lock().write_all(&script).context("writing the completion script")?;
            Ok(Outcome::Complete)
        }
        Command::Man { subcommand } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            // Built, subcommands are named as their pages are: transplant-copy.
            command.build();
            let command = match subcommand {
                Some(name) => command
                    .find_subcommand(&name)
                    .cloned()
                    .with_context(|| format!("no subcommand {name}"))?,
                None => command,
            };
            let mut page = Vec::new();
            clap_mangen::Man::new(command).render(&mut page).context("making the manual page")?;
            std::io::stdout().lock().write_all(&page).context("writing the manual page")?;
            Ok(Outcome::Complete)
        }
    }
}

/// A refused transfer: its report (on stdout as the one JSON document, with
/// the error in it, under `--json`; else on stderr), then the error.
fn refuse(report: &Report, json: bool, why: anyhow::Error) -> Result<Outcome> {
    if json {
        emit(true, &WithExtra { value: report, extra: serde_json::json!({ "error": error_json(&why) }) })?;
    } else {
        eprintln!("{report}");
    }
    Err(why)
}

/// The dtype a `--dtype` names.
pub(crate) fn kind_of(dtype: DtypeArg) -> tch::Kind {
    match dtype {
        DtypeArg::Bf16 => tch::Kind::BFloat16,
        DtypeArg::F16 => tch::Kind::Half,
        DtypeArg::F32 => tch::Kind::Float,
        DtypeArg::F64 => tch::Kind::Double,
    }
}

/// Every file a command reads: the models, and the rules, order and plan files.
/// None of them may be written.
fn inputs<'a>(models: &[&'a Path], args: &'a MappingArgs, plan: Option<&'a Path>) -> Vec<&'a Path> {
    let mut all = models.to_vec();
    all.extend(args.rules.as_deref());
    all.extend(args.order_from.as_deref());
    all.extend(plan);
    all
}

/// Loads a TorchScript module, or says why a file is not one.
fn module(path: &Path) -> Result<ScriptModule> {
    let kind = transplant::sniff(path)?;
    anyhow::ensure!(
        kind == Format::TorchScript,
        "{}: verify runs TorchScript modules, and this is a {kind}",
        path.display()
    );
    Ok(ModuleStore::open(path)?.into_module())
}

#[cfg(test)]
mod tests {
    use super::without_backtrace;

    #[test]
    fn libtorch_backtraces_are_taken_off() {
        let torch = "tensor w of a.pt: Torch(\"start (9) + length (9) exceeds dimension size (5).\n\
                     Exception raised from narrow_symint at aten/src/ATen/native/TensorShape.cpp:1400 (most recent call first):\n\
                     frame #0: c10::Error::Error(...) + 0x9c (0x7f in libc10.so)\nframe #1: ...\")";
        assert_eq!(
            without_backtrace(torch),
            "tensor w of a.pt: Torch(\"start (9) + length (9) exceeds dimension size (5)."
        );
        assert_eq!(without_backtrace("a.pt: two\nlines"), "a.pt: two\nlines");
    }
}
