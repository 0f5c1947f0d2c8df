//! The right-hand side of a rename, and the patterns of a `cat`: `A + B =>
//! T1, T2 | op(..) | split(..)` read into patterns, an [`Action`] and ops,
//! with every combination the language does not allow refused by name.
use super::constants::{evaluate, Scope};
use super::Action;
use crate::dtype::Dtype;
use crate::transform::Op;

/// A chain's steps as written: ops, a split (last, or before an unstack), a
/// cat (first, or after a stack), a stack (first) or an unstack (last).
enum Step {
    Op(Op),
    Split { dim: i64, sizes: Option<Vec<i64>> },
    Cat { dim: i64 },
    Stack { dim: i64 },
    Unstack { dim: i64 },
    Dequantize { block: i64, dtype: Dtype },
    Quantize { block: i64, dtype: Dtype },
}

/// The block size FP8 checkpoints use (DeepSeek-V3's 128×128 blocks).
const DEFAULT_BLOCK: i64 = 128;

/// `dequantize([BLOCK, ]DTYPE)` / `quantize([BLOCK, ]DTYPE)`: the block size
/// (an integer expression, 128 if left out) and a dtype of those `allowed`.
fn parse_fp8(
    name: &str,
    args: &str,
    scope: &Scope,
    allowed: &[Dtype],
) -> std::result::Result<(i64, Dtype), String> {
    let args: Vec<&str> = args.split(',').map(str::trim).collect();
    let (block, dtype) = match args[..] {
        [dtype] => (DEFAULT_BLOCK, dtype),
        [block, dtype] => (evaluate(block, scope).map_err(|e| format!("{name}: {e}"))?, dtype),
        _ => {
            return Err(format!(
                "{name} takes a block size and a dtype: `{name}(128, {})`",
                allowed[0].name()
            ))
        }
    };
    if block <= 0 {
        return Err(format!("{name}: block size {block} is not positive"));
    }
    let short = match dtype {
        "bf16" => Some(Dtype::BFloat16),
        "f32" => Some(Dtype::Float32),
        "e4m3" => Some(Dtype::Float8E4M3Fn),
        "e5m2" => Some(Dtype::Float8E5M2),
        _ => None,
    };
    match short.or_else(|| crate::dtype::parse(dtype)) {
        Some(d) if allowed.contains(&d) => Ok((block, d)),
        _ => Err(format!(
            "{name}: dtype {dtype:?} is not one of {}",
            allowed.iter().map(|d| d.name()).collect::<Vec<_>>().join(", ")
        )),
    }
}

/// Parses `name(1, -2, 3)`; each argument an integer expression over the
/// constants in `scope` (`dim / heads`).
fn parse_step(text: &str, scope: &Scope) -> std::result::Result<Step, String> {
    let text = text.trim();
    let (name, args) = text
        .strip_suffix(')')
        .and_then(|t| t.split_once('('))
        .ok_or_else(|| format!("cannot read {text:?}: expected an op such as `reshape(-1)` or `split(0)`"))?;
    let name = name.trim();
    if name == "dequantize" {
        let (block, dtype) = parse_fp8(name, args, scope, &[Dtype::BFloat16, Dtype::Float32])?;
        return Ok(Step::Dequantize { block, dtype });
    }
    if name == "quantize" {
        let (block, dtype) = parse_fp8(name, args, scope, &[Dtype::Float8E4M3Fn, Dtype::Float8E5M2])?;
        return Ok(Step::Quantize { block, dtype });
    }
    let args: Vec<i64> = if args.trim().is_empty() {
        Vec::new()
    } else {
        args.split(',')
            .map(|a| evaluate(a, scope).map_err(|e| format!("{name}: {e}")))
            .collect::<std::result::Result<_, _>>()?
    };
    let count = |n: usize| {
        if args.len() == n {
            Ok(())
        } else {
            Err(format!("{name} takes {n} argument(s), {text:?} has {}", args.len()))
        }
    };
    let some = || {
        if args.is_empty() {
            Err(format!("{name} needs at least one argument"))
        } else {
            Ok(())
        }
    };
    Ok(match name {
        "reshape" => {
            some()?;
            if args.iter().filter(|&&d| d == -1).count() > 1 {
                return Err(format!("{text}: only one dimension can be -1"));
            }
            if let Some(bad) = args.iter().find(|&&d| d < -1) {
                return Err(format!("{text}: {bad} is not a size"));
            }
            Step::Op(Op::Reshape { shape: args })
        }
        "transpose" => {
            count(2)?;
            Step::Op(Op::Transpose { dims: [args[0], args[1]] })
        }
        "permute" => {
            some()?;
            Step::Op(Op::Permute { dims: args })
        }
        "narrow" => {
            count(3)?;
            if args[2] < 0 {
                return Err(format!("{text}: a length cannot be negative"));
            }
            Step::Op(Op::Narrow { dim: args[0], start: args[1], length: args[2] })
        }
        "split" => {
            some()?;
            let sizes = (args.len() > 1).then(|| args[1..].to_vec());
            if let Some(bad) = sizes.iter().flatten().find(|&&s| s <= 0) {
                return Err(format!("{text}: part size {bad} is not positive"));
            }
            Step::Split { dim: args[0], sizes }
        }
        "cat" => {
            count(1)?;
            Step::Cat { dim: args[0] }
        }
        "stack" => {
            count(1)?;
            Step::Stack { dim: args[0] }
        }
        "unstack" => {
            count(1)?;
            Step::Unstack { dim: args[0] }
        }
        other => {
            return Err(format!(
                "unknown op `{other}`: the ops are reshape, transpose, permute, narrow, split, cat, stack, unstack, dequantize and quantize"
            ))
        }
    })
}

/// What a `PATTERN[ + PATTERN]... => TARGET[, TARGET]... [| OP]...` line says.
pub(super) fn parse_rename(
    left: &str,
    right: &str,
    scope: &Scope,
) -> std::result::Result<(Vec<String>, Action, Vec<Op>), String> {
    // Patterns hold no spaces, so ` + ` separates the members of a cat.
    let words: Vec<&str> = left.split_whitespace().collect();
    let mut patterns = Vec::new();
    for (k, word) in words.iter().enumerate() {
        match (k % 2, *word) {
            (0, "+") => return Err("`+` needs a pattern on each side".into()),
            (0, pattern) => patterns.push(pattern.to_string()),
            (_, "+") => {}
            (_, _) => {
                let first = words[0];
                return Err(format!(
                    "pattern {left:?} contains a space, which no tensor name has \
                     (`{first}` is not a keyword: rules are `PATTERN => REPLACEMENT` or `skip PATTERN`; \
                     members of a cat are joined by ` + `)"
                ));
            }
        }
    }
    if words.len() % 2 == 0 && !words.is_empty() {
        return Err("`+` needs a pattern on each side".into());
    }
    let mut parts = right.split('|');
    let targets: Vec<String> =
        parts.next().unwrap_or_default().split(',').map(|t| t.trim().to_string()).collect();
    let steps = parts.map(|p| parse_step(p, scope)).collect::<std::result::Result<Vec<_>, _>>()?;
    if let Some(k) = steps.iter().position(|s| matches!(s, Step::Dequantize { .. } | Step::Quantize { .. })) {
        return parse_fp8_rule(patterns, targets, steps, k);
    }
    let mut ops = Vec::new();
    let (mut split, mut cat, mut stack, mut unstack) = (None, None, None, None);
    let last = steps.len().saturating_sub(1);
    for (k, step) in steps.into_iter().enumerate() {
        match step {
            Step::Stack { dim } => {
                if k != 0 {
                    return Err(
                        "stack starts a chain: it must be the first op (`| stack(D) | cat(C)` fuses)".into(),
                    );
                }
                stack = Some(dim);
            }
            Step::Unstack { dim } => {
                if k != last {
                    return Err(
                        "unstack ends a chain: no op can follow it (`| split(C) | unstack(D)` parts first)"
                            .into(),
                    );
                }
                unstack = Some(dim);
            }
            Step::Op(op) => {
                if (cat.is_some() || stack.is_some()) && matches!(op, Op::Narrow { .. }) {
                    return Err("narrow after cat: the concatenation is written into the target as views, \
                                and a narrowed target region cannot be one; narrow the target's sources instead"
                        .into());
                }
                if split.is_some() {
                    return Err("split ends a chain: no op can follow it".into());
                }
                ops.push(op);
            }
            Step::Split { dim, sizes } => {
                if split.is_some() {
                    return Err("a rule splits once".into());
                }
                split = Some((dim, sizes));
            }
            Step::Dequantize { .. } | Step::Quantize { .. } => {
                return Err("dequantize and quantize are the rule's one op".into());
            }
            Step::Cat { dim } => {
                if k != 0 && !(k == 1 && stack.is_some()) {
                    return Err("cat starts a chain: it must be the first op (or follow a stack)".into());
                }
                cat = Some(dim);
            }
        }
    }
    if let Some(dim) = stack {
        if split.is_some() || unstack.is_some() {
            return Err("a rule either stacks (many to one) or splits and unstacks (one to many)".into());
        }
        if targets.len() != 1 || targets[0].is_empty() {
            return Err("stack makes one target".into());
        }
        if patterns.len() > 1 && cat.is_none() {
            return Err("several patterns' stacks are joined: `A + B => T | stack(D) | cat(C)`".into());
        }
        if patterns.len() == 1 && cat.is_some() {
            return Err(
                "stack then cat joins several patterns' stacks: `A + B => T | stack(D) | cat(C)`".into()
            );
        }
        let target = targets.into_iter().next().unwrap_or_default();
        return Ok((patterns, Action::Stack { target, dim, cat, index: 0 }, ops));
    }
    if let Some(dim) = unstack {
        if cat.is_some() || patterns.len() > 1 {
            return Err("unstack makes many targets of one source: one pattern, no cat".into());
        }
        if targets.iter().any(String::is_empty) {
            return Err("an empty target in the list".into());
        }
        if targets.len() > 1 && split.is_none() {
            return Err("several targets of an unstack need `| split(C) | unstack(D)`".into());
        }
        if let Some((_, Some(sizes))) = &split {
            if sizes.len() != targets.len() {
                return Err(format!("split gives {} sizes for {} targets", sizes.len(), targets.len()));
            }
        }
        return Ok((patterns, Action::Unstack { targets, dim, split }, ops));
    }
    if targets.iter().any(String::is_empty) {
        return Err(if targets.len() == 1 {
            "empty replacement".into()
        } else {
            "an empty target in the list".into()
        });
    }
    let action = match (split, cat) {
        (Some(_), Some(_)) => {
            return Err("a rule either splits (one to many) or concatenates (many to one)".into())
        }
        (Some((dim, sizes)), None) => {
            if targets.len() < 2 {
                return Err("split makes several targets: list them, `=> A, B | split(D)`".into());
            }
            if let Some(sizes) = &sizes {
                if sizes.len() != targets.len() {
                    return Err(format!("split gives {} sizes for {} targets", sizes.len(), targets.len()));
                }
            }
            Action::Split { targets, dim, sizes }
        }
        (None, Some(dim)) => {
            if patterns.len() < 2 {
                return Err("cat joins several sources: `A + B => T | cat(D)`".into());
            }
            if targets.len() != 1 {
                return Err("cat makes one target".into());
            }
            Action::Cat { target: targets.into_iter().next().unwrap_or_default(), dim }
        }
        (None, None) => {
            if targets.len() > 1 {
                return Err("several targets need `| split(D)`".into());
            }
            if patterns.len() > 1 {
                return Err("several patterns need `| cat(D)`".into());
            }
            Action::Rename(targets.into_iter().next().unwrap_or_default())
        }
    };
    Ok((patterns, action, ops))
}

/// A rule of FP8 block scales: `W + S => T | dequantize(B, DTYPE)` (the
/// weight's pattern, then its scales') or `W => T | quantize(B, DTYPE)` (the
/// scales written beside `T`, as `T_scale_inv`). The op is the rule's one op:
/// its values are computed, and no view could follow them into the target.
fn parse_fp8_rule(
    patterns: Vec<String>,
    targets: Vec<String>,
    steps: Vec<Step>,
    k: usize,
) -> std::result::Result<(Vec<String>, Action, Vec<Op>), String> {
    let name = if matches!(steps[k], Step::Dequantize { .. }) { "dequantize" } else { "quantize" };
    if steps.len() != 1 {
        return Err(format!("{name} computes new values: it is the rule's one op"));
    }
    if targets.len() != 1 || targets[0].is_empty() {
        return Err(format!("{name} makes one target (its scales are named after it)"));
    }
    let target = targets.into_iter().next().unwrap_or_default();
    let action = match steps.into_iter().next() {
        Some(Step::Dequantize { block, dtype }) => {
            if patterns.len() != 2 {
                return Err(
                    "dequantize reads a weight and its block scales: `(.*)\\.weight + (.*)\\.weight_scale_inv => $1.weight | dequantize(128, bf16)`"
                        .into(),
                );
            }
            Action::Dequantize { target, block, dtype }
        }
        Some(Step::Quantize { block, dtype }) => {
            if patterns.len() != 1 {
                return Err(
                    "quantize reads one tensor: `(.*)\\.weight => $1.weight | quantize(128, e4m3)`".into()
                );
            }
            Action::Quantize { target, block, dtype }
        }
        _ => return Err(format!("{name}: not an FP8 op")),
    };
    Ok((patterns, action, Vec::new()))
}

/// The capture group a `stack` ranges over: the one of each pattern that
/// `target` does not refer to (the same in every pattern).
pub(super) fn stack_index(
    patterns: &[String],
    regexes: &[(super::first::Pattern, regex_syntax::hir::Hir)],
    target: &str,
) -> std::result::Result<usize, String> {
    let refs = super::group_references(target);
    let mut index = None;
    for (pattern, (regex, _)) in patterns.iter().zip(regexes) {
        let names: Vec<Option<&str>> = regex.regex().map(|r| r.capture_names().collect()).unwrap_or_default();
        let unused: Vec<usize> = (1..regex.captures_len())
            .filter(|&k| {
                !refs
                    .iter()
                    .any(|r| r.parse::<usize>() == Ok(k) || names.get(k).copied().flatten() == Some(r))
            })
            .collect();
        let [k] = unused[..] else {
            return Err(format!(
                "stack ranges over the one capture of {pattern:?} that the target {target:?} does not use; \
                 it has {} such captures (write the index as a capture, `(\\d+)`, that the target leaves out)",
                unused.len()
            ));
        };
        if index.is_some_and(|i| i != k) {
            return Err("the patterns of a stack must range over the same capture group".into());
        }
        index = Some(k);
    }
    index.ok_or_else(|| "a stack needs a pattern".into())
}

/// The names an unstack makes of its targets' `parts` over `count` indices:
/// index-major (every target of index 0, then of index 1, …).
pub(crate) fn unstacked_names(parts: &[(String, String)], count: usize) -> Vec<String> {
    (0..count).flat_map(|e| parts.iter().map(move |(a, b)| format!("{a}{e}{b}"))).collect()
}
