//! FP8 block scales, as DeepSeek-V3 and the checkpoints that follow it store
//! them: a 2-D `weight` in `float8_e4m3fn` (or `float8_e5m2`) beside
//! `weight_scale_inv`, float32, one scale per `B`×`B` block of the weight
//! (`[ceil(rows / B), ceil(cols / B)]`, the last blocks partial). The value of
//! an element is `weight × scale` of its block, worked out in float32.
//!
//! [`dequantize`] and [`quantize`] compute values (they are no views); the
//! copy verifies what a dequantize wrote against [`dequantize_by_blocks`],
//! the same arithmetic reached another way (each block against its one scale,
//! not a scale spread over the weight).
use std::fmt;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::dtype::Dtype;

/// The name FP8 checkpoints give a weight's block scales: `X.weight` has
/// `X.weight_scale_inv`.
pub(crate) const SCALE_SUFFIX: &str = "_scale_inv";

/// The largest finite value of an FP8 format, or `None` for any other dtype.
pub(crate) fn fp8_max(dtype: Dtype) -> Option<f64> {
    match dtype {
        Dtype::Float8E4M3Fn => Some(448.0),
        Dtype::Float8E5M2 => Some(57344.0),
        _ => None,
    }
}

/// The grid of block scales a weight of `shape` has with blocks of `block`:
/// `[ceil(rows / block), ceil(cols / block)]`; or why there is none.
pub(crate) fn scale_grid(shape: &[i64], block: i64) -> Result<Vec<i64>, String> {
    if block <= 0 {
        return Err(format!("block size {block} is not positive"));
    }
    match shape {
        [rows, cols] if *rows >= 0 && *cols >= 0 => {
            Ok(vec![rows / block + i64::from(rows % block != 0), cols / block + i64::from(cols % block != 0)])
        }
        _ => Err(format!("block scales belong to 2-D weights, this one is {shape:?}")),
    }
}

fn dtype_of(tensor: &Tensor) -> Option<Dtype> {
    tensor.f_kind().ok().map(Dtype::from)
}

fn torch(e: tch::TchError) -> String {
    e.to_string()
}

/// Checks `weight` (FP8, 2-D) and `scale` (float32, on its block grid).
fn check(weight: &Tensor, scale: &Tensor, block: i64) -> Result<(i64, i64, Vec<i64>), String> {
    let dtype = dtype_of(weight);
    if dtype.and_then(fp8_max).is_none() {
        let name = dtype.map_or("a dtype tch has no kind for", |d| d.name());
        return Err(format!("the weight is {name}, dequantize reads float8_e4m3fn or float8_e5m2"));
    }
    let shape = weight.size();
    let grid = scale_grid(&shape, block)?;
    if dtype_of(scale) != Some(Dtype::Float32) {
        let name = dtype_of(scale).map_or("a dtype tch has no kind for", |d| d.name());
        return Err(format!("the scales are {name}, dequantize reads float32 scales"));
    }
    if scale.size() != grid {
        return Err(format!(
            "the scales are {:?}, a {shape:?} weight in blocks of {block} has {grid:?}",
            scale.size()
        ));
    }
    Ok((shape[0], shape[1], grid))
}

/// `weight × scale` of each element's block, in float32, as `out`.
pub(crate) fn dequantize(weight: &Tensor, scale: &Tensor, block: i64, out: Kind) -> Result<Tensor, String> {
    let (rows, cols, _) = check(weight, scale, block)?;
    let spread = scale
        .f_repeat_interleave_self_int(block, 0, None)
        .and_then(|s| s.f_narrow(0, 0, rows))
        .and_then(|s| s.f_repeat_interleave_self_int(block, 1, None))
        .and_then(|s| s.f_narrow(1, 0, cols))
        .map_err(torch)?;
    let values = weight.f_to_kind(Kind::Float).and_then(|w| w.f_mul(&spread)).map_err(torch)?;
    values.f_to_kind(out).map_err(torch)
}

/// [`dequantize`] worked out block by block: the weight padded to whole
/// blocks, each block times its one scale (broadcast), the padding dropped.
/// The same float32 products, reached without spreading the scales.
pub(crate) fn dequantize_by_blocks(
    weight: &Tensor,
    scale: &Tensor,
    block: i64,
    out: Kind,
) -> Result<Tensor, String> {
    let (rows, cols, grid) = check(weight, scale, block)?;
    let padded = pad(&weight.f_to_kind(Kind::Float).map_err(torch)?, &grid, block)?;
    padded
        .f_reshape([grid[0], block, grid[1], block])
        .and_then(|b| b.f_mul(&scale.f_reshape([grid[0], 1, grid[1], 1])?))
        .and_then(|b| b.f_reshape([grid[0] * block, grid[1] * block]))
        .and_then(|b| b.f_narrow(0, 0, rows))
        .and_then(|b| b.f_narrow(1, 0, cols))
        .and_then(|b| b.f_to_kind(out))
        .map_err(torch)
}

/// `values` (2-D, float32) padded with zeros to whole blocks of the grid.
fn pad(values: &Tensor, grid: &[i64], block: i64) -> Result<Tensor, String> {
    let padded =
        Tensor::f_zeros([grid[0] * block, grid[1] * block], (Kind::Float, values.device())).map_err(torch)?;
    let (rows, cols) = (values.size()[0], values.size()[1]);
    padded
        .f_narrow(0, 0, rows)
        .and_then(|p| p.f_narrow(1, 0, cols))
        .and_then(|mut p| p.f_copy_(values))
        .map_err(torch)?;
    Ok(padded)
}

/// Quantizes `values` (2-D, floating) into `fp8` in blocks of `block`, each
/// block scaled by its largest magnitude: `scale_inv = amax / fp8_max` (1 for
/// a block of zeros), `weight = values / scale_inv` rounded to `fp8`.
/// Returns the weight and its float32 scales.
pub(crate) fn quantize(values: &Tensor, block: i64, fp8: Dtype) -> Result<(Tensor, Tensor), String> {
    let max = fp8_max(fp8)
        .ok_or_else(|| format!("quantize writes float8_e4m3fn or float8_e5m2, not {}", fp8.name()))?;
    let kind = fp8.kind().ok_or_else(|| format!("tch has no kind for {}", fp8.name()))?;
    if !dtype_of(values).is_some_and(crate::dtype::is_floating) {
        let name = dtype_of(values).map_or("a dtype tch has no kind for", |d| d.name());
        return Err(format!("quantize reads floating-point values, these are {name}"));
    }
    let shape = values.size();
    let grid = scale_grid(&shape, block)?;
    let values = values.f_to_kind(Kind::Float).map_err(torch)?;
    let finite = values.f_isfinite().and_then(|f| f.f_all()).map_err(torch)?;
    if !bool::try_from(&finite).map_err(torch)? {
        return Err("the values are not all finite (an infinity or NaN has no FP8 block scale)".into());
    }
    let blocks = pad(&values, &grid, block)?.f_reshape([grid[0], block, grid[1], block]).map_err(torch)?;
    let amax = blocks.f_abs().and_then(|a| a.f_amax([1, 3], false)).map_err(torch)?;
    let scale =
        amax.f_div_scalar(max).and_then(|s| s.f_where_scalarother(&s.f_ne(0.0)?, 1.0)).map_err(torch)?;
    let weight = blocks
        .f_div(&scale.f_reshape([grid[0], 1, grid[1], 1]).map_err(torch)?)
        .and_then(|b| b.f_clamp(-max, max))
        .and_then(|b| b.f_reshape([grid[0] * block, grid[1] * block]))
        .and_then(|b| b.f_narrow(0, 0, shape[0]))
        .and_then(|b| b.f_narrow(1, 0, shape[1]))
        .and_then(|b| b.f_to_kind(kind))
        .map_err(torch)?;
    Ok((weight, scale))
}

/// Values a pair computes from its source (DESIGN.md: ops that compute are
/// verified against the arithmetic done independently).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "compute", rename_all = "lowercase")]
pub enum Compute {
    /// `weight × scale` per block of `block`×`block` (the source is the FP8
    /// weight; `scale` the source entry of its float32 block scales), as `dtype`.
    Dequantize {
        /// Index of the scales' source entry.
        scale: usize,
        /// The scales' source name.
        scale_name: String,
        /// The block size.
        block: i64,
        /// The result's dtype name (`bfloat16`, `float32`).
        dtype: String,
    },
    /// The source quantized into FP8 `dtype` in blocks of `block`: the weight,
    /// or (`scales`) its float32 block scales.
    Quantize {
        /// The block size.
        block: i64,
        /// The FP8 dtype's name (`float8_e4m3fn`, `float8_e5m2`).
        dtype: String,
        /// Whether this pair writes the scales (else the weight).
        scales: bool,
    },
}

impl Compute {
    /// The dtype the computed values have.
    pub(crate) fn dtype(&self) -> Option<crate::dtype::Dtype> {
        match self {
            Compute::Dequantize { dtype, .. } | Compute::Quantize { dtype, scales: false, .. } => {
                crate::dtype::parse(dtype)
            }
            Compute::Quantize { scales: true, .. } => Some(crate::dtype::Dtype::Float32),
        }
    }

    /// The shape of the computed values, from the source's (after its ops).
    pub(crate) fn shape(&self, shape: &[i64]) -> Result<Vec<i64>, String> {
        match self {
            Compute::Quantize { block, scales: true, .. } => scale_grid(shape, *block),
            Compute::Dequantize { block, .. } | Compute::Quantize { block, .. } => {
                scale_grid(shape, *block)?;
                Ok(shape.to_vec())
            }
        }
    }

    /// The values, from the source `tensor` (after its ops) and, for a
    /// dequantize, the `scale` tensor.
    pub(crate) fn apply(&self, tensor: &Tensor, scale: Option<&Tensor>) -> Result<Tensor, String> {
        let unknown = || format!("{self}: unknown dtype");
        match self {
            Compute::Dequantize { block, scale_name, dtype, .. } => {
                let scale = scale.ok_or_else(|| format!("no tensor for the scales {scale_name}"))?;
                let dtype = crate::dtype::parse(dtype).ok_or_else(unknown)?;
                let kind = dtype.require_kind("dequantize").map_err(|e| e.to_string())?;
                dequantize(tensor, scale, *block, kind)
            }
            Compute::Quantize { block, dtype, scales } => {
                let fp8 = crate::dtype::parse(dtype).ok_or_else(unknown)?;
                let (weight, scale) = quantize(tensor, *block, fp8)?;
                Ok(if *scales { scale } else { weight })
            }
        }
    }

    /// What a dequantize wrote, worked out independently of [`Compute::apply`]
    /// (block by block); `None` for a quantize.
    pub(crate) fn check_value(
        &self,
        tensor: &Tensor,
        scale: Option<&Tensor>,
    ) -> Option<Result<Tensor, String>> {
        let Compute::Dequantize { block, .. } = self else { return None };
        let kind = self.dtype().and_then(crate::dtype::Dtype::kind)?;
        Some(
            scale
                .ok_or_else(|| "no scales".to_string())
                .and_then(|s| dequantize_by_blocks(tensor, s, *block, kind)),
        )
    }
}

impl fmt::Display for Compute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Compute::Dequantize { scale_name, block, dtype, .. } => {
                write!(f, "dequantize({block}, {dtype}) with {scale_name}")
            }
            Compute::Quantize { block, dtype, scales } => {
                write!(f, "quantize({block}, {dtype}){}", if *scales { ": the block scales" } else { "" })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn random(rows: i64, cols: i64, seed: i64) -> Tensor {
        tch::manual_seed(seed);
        Tensor::randn([rows, cols], (Kind::Float, Device::Cpu)) * 3.0
    }

    #[test]
    fn the_grid_counts_partial_blocks() {
        assert_eq!(scale_grid(&[300, 128], 128).unwrap(), vec![3, 1]);
        assert_eq!(scale_grid(&[0, 5], 4).unwrap(), vec![0, 2]);
        assert!(scale_grid(&[4, 4, 4], 2).unwrap_err().contains("2-D"));
        assert!(scale_grid(&[4, 4], 0).unwrap_err().contains("not positive"));
    }

    #[test]
    fn dequantize_multiplies_each_block_by_its_scale() {
        let weight = Tensor::ones([3, 5], (Kind::Float, Device::Cpu)).to_kind(Kind::Float8e4m3fn);
        let scale = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).reshape([2, 3]);
        let out = dequantize(&weight, &scale, 2, Kind::Float).unwrap();
        let expected = Tensor::from_slice(&[
            1.0f32, 1., 2., 2., 3., //
            1., 1., 2., 2., 3., //
            4., 4., 5., 5., 6.,
        ])
        .reshape([3, 5]);
        assert!(out.equal(&expected));
        assert!(dequantize_by_blocks(&weight, &scale, 2, Kind::Float).unwrap().equal(&expected));
    }

    #[test]
    fn wrong_inputs_are_named() {
        let weight = Tensor::ones([3, 5], (Kind::Float, Device::Cpu));
        let scale = Tensor::ones([2, 2], (Kind::Float, Device::Cpu));
        assert!(dequantize(&weight, &scale, 2, Kind::Float)
            .unwrap_err()
            .contains("float32, dequantize reads"));
        let weight = weight.to_kind(Kind::Float8e5m2);
        let err = dequantize(&weight, &scale, 2, Kind::Float).unwrap_err();
        assert!(err.contains("the scales are [2, 2], a [3, 5] weight in blocks of 2 has [2, 3]"), "{err}");
        let half = Tensor::ones([2, 2], (Kind::Half, Device::Cpu));
        assert!(dequantize(&weight, &half, 2, Kind::Float).unwrap_err().contains("scales are float16"));
        let inf = Tensor::from_slice(&[f32::INFINITY, 1.0]).reshape([1, 2]);
        assert!(quantize(&inf, 2, Dtype::Float8E4M3Fn).unwrap_err().contains("not all finite"));
        assert!(quantize(&half, 2, Dtype::Float16).unwrap_err().contains("not float16"));
    }

    #[test]
    fn the_largest_magnitude_of_a_block_is_the_format_maximum() {
        let values = random(130, 70, 1);
        for fp8 in [Dtype::Float8E4M3Fn, Dtype::Float8E5M2] {
            let (weight, scale) = quantize(&values, 64, fp8).unwrap();
            assert_eq!(scale.size(), vec![3, 2]);
            let peak = weight.to_kind(Kind::Float).abs().max().double_value(&[]);
            assert_eq!(peak, fp8_max(fp8).unwrap());
        }
        let zeros = Tensor::zeros([4, 4], (Kind::Float, Device::Cpu));
        let (weight, scale) = quantize(&zeros, 2, Dtype::Float8E4M3Fn).unwrap();
        assert!(scale.equal(&Tensor::ones([2, 2], (Kind::Float, Device::Cpu))));
        assert!(weight.to_kind(Kind::Float).equal(&zeros));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(48))]
            /// dequantize(quantize(x)) is within the FP8 format's rounding:
            /// half a unit in the last place of a normal value (2^-4 of its
            /// magnitude in e4m3, 2^-3 in e5m2), or half the smallest
            /// subnormal step times the block's scale, plus float32 rounding.
            #[test]
            fn a_round_trip_stays_within_fp8_rounding(
                rows in 1i64..40, cols in 1i64..40, block in 1i64..17, seed in 0i64..1000, e5m2 in any::<bool>()
            ) {
                let (fp8, relative, subnormal) = if e5m2 {
                    (Dtype::Float8E5M2, 2f64.powi(-3), 2f64.powi(-16))
                } else {
                    (Dtype::Float8E4M3Fn, 2f64.powi(-4), 2f64.powi(-9))
                };
                let values = random(rows, cols, seed);
                let (weight, scale) = quantize(&values, block, fp8).unwrap();
                let back = dequantize(&weight, &scale, block, Kind::Float).unwrap();
                prop_assert!(back.equal(&dequantize_by_blocks(&weight, &scale, block, Kind::Float).unwrap()));
                let spread = scale
                    .repeat_interleave_self_int(block, 0, None).narrow(0, 0, rows)
                    .repeat_interleave_self_int(block, 1, None).narrow(1, 0, cols);
                let bound = values.abs() * (relative + 1e-6) + spread * (subnormal / 2.0) + 1e-30;
                let error = (&back - &values).abs();
                let worst = (&error - &bound).max().double_value(&[]);
                prop_assert!(worst <= 0.0, "error exceeds the bound by {worst}");
            }
        }
    }
}
