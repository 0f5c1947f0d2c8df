//! Pairs that compute FP8 block scales: a `dequantize` group (a weight and its
//! scales) becomes one pair from the weight, the scales read beside it; a
//! `quantize` source becomes two pairs, the weight and its scales. Shapes,
//! dtypes and the block grid are checked here, before anything is read.
use super::build::{Builder, Renamed};
use super::Cast;
use crate::dotted::NameLookup;
use crate::dtype::{self, Dtype};
use crate::fp8::{fp8_max, scale_grid};
use crate::matching::How;
use crate::rules::{Action, Rules};
use crate::transform::{shape_text, Compute, Transform};

impl Builder<'_> {
    /// Pairs `i` with `j` through a transform that computes values: its cast
    /// is from the dtype the arithmetic gives, not the source's.
    fn pair_computed(&mut self, i: usize, j: usize, rule: usize, transform: Transform) {
        let from = transform.compute.as_ref().and_then(Compute::dtype);
        self.pair_with(i, j, Some(rule), How::Exact, Some(transform));
        let to = self.target.entries()[j].dtype;
        if let (Some(from), Some(pair)) = (from, self.pairs.last_mut()) {
            pair.cast = (from != to).then(|| Cast { from, to, lossy: dtype::static_loss(from, to) });
        }
    }

    /// A `dequantize` group: the FP8 weight (first pattern) and its float32
    /// scales (second) on the weight's block grid, into a target of the
    /// weight's shape.
    pub(super) fn pair_dequantize(&mut self, rules: &Rules, lookup: &NameLookup, r: &mut Renamed, g: usize) {
        let sources = self.source.entries();
        let (rule, members, to) = (r.groups[g].rule, r.groups[g].sources.clone(), r.groups[g].to.clone());
        let Action::Dequantize { block, dtype: result, .. } = &rules.rules()[rule].action else { return };
        let [weight, scale] = members[..] else { return };
        let (w, s) = (&sources[weight], &sources[scale]);
        let checked = (|| {
            if fp8_max(w.dtype).is_none() {
                return Err(format!(
                    "the weight {} is {}, dequantize reads float8_e4m3fn or float8_e5m2",
                    w.name,
                    w.dtype.name()
                ));
            }
            let grid = scale_grid(&w.shape, *block).map_err(|e| format!("{}: {e}", w.name))?;
            if s.dtype != Dtype::Float32 {
                return Err(format!(
                    "the scales {} are {}, dequantize reads float32 scales",
                    s.name,
                    s.dtype.name()
                ));
            }
            if s.shape != grid {
                return Err(format!(
                    "the scales {} are {}, the block grid of {} {} in blocks of {block} is {}",
                    s.name,
                    shape_text(&s.shape),
                    w.name,
                    shape_text(&w.shape),
                    shape_text(&grid)
                ));
            }
            let j = self.free_target(lookup, &to, r)?;
            let target = &self.target.entries()[j];
            if target.shape != w.shape {
                return Err(format!(
                    "the result is {}, {to} is {}",
                    shape_text(&w.shape),
                    shape_text(&target.shape)
                ));
            }
            Ok(j)
        })();
        match checked {
            Err(problem) => self.transform_problem(rule, &members, &[&to], problem),
            Ok(j) => {
                r.taken_target[j] = true;
                let compute = Compute::Dequantize {
                    scale,
                    scale_name: s.name.to_string(),
                    block: *block,
                    dtype: result.name().to_string(),
                };
                let why = format!("the block scales of {}, read by its dequantize", w.name);
                self.source_explained.insert(scale, why);
                let transform = Transform { compute: Some(compute), ..Transform::default() };
                self.pair_computed(weight, j, rule, transform);
            }
        }
    }

    /// A `quantize` source: floating, 2-D, into its FP8 weight and its scales
    /// (the target's names, in that order).
    pub(super) fn pair_quantize(&mut self, rules: &Rules, lookup: &NameLookup, r: &mut Renamed, k: usize) {
        let sources = self.source.entries();
        let (i, rule) = (r.splits[k].source, r.splits[k].rule);
        let Action::Quantize { block, dtype: fp8, .. } = &rules.rules()[rule].action else { return };
        let names: Vec<&str> = r.splits[k].to.iter().map(String::as_str).collect();
        let e = &sources[i];
        let checked = (|| {
            if !dtype::is_floating(e.dtype) {
                return Err(format!(
                    "{} is {}, quantize reads floating-point values",
                    e.name,
                    e.dtype.name()
                ));
            }
            let grid = scale_grid(&e.shape, *block).map_err(|err| format!("{}: {err}", e.name))?;
            let mut targets = Vec::new();
            for (name, shape) in names.iter().zip([&e.shape, &grid]) {
                let j = self.free_target(lookup, name, r)?;
                let target = &self.target.entries()[j];
                if &target.shape != shape {
                    return Err(format!(
                        "{name} is {}, quantize makes {}",
                        shape_text(&target.shape),
                        shape_text(shape)
                    ));
                }
                targets.push(j);
            }
            Ok(targets)
        })();
        match checked {
            Err(problem) => self.transform_problem(rule, &[i], &names, problem),
            Ok(targets) => {
                for (scales, j) in [false, true].into_iter().zip(targets) {
                    r.taken_target[j] = true;
                    let compute = Compute::Quantize { block: *block, dtype: fp8.name().to_string(), scales };
                    let transform = Transform { compute: Some(compute), ..Transform::default() };
                    self.pair_computed(i, j, rule, transform);
                }
            }
        }
    }
}
