//! The merge formulas, on one tensor at a time: every input's value of one
//! output tensor, already in the compute dtype (float32, float64 for a float64
//! output), in, the merged value out.
//!
//! - linear (Wortsman et al. 2022, model soups): `Σ wᵢ·xᵢ / Σ wᵢ`;
//! - task arithmetic (Ilharco et al. 2023): `base + λ·Σ wᵢ·(xᵢ − base)`;
//! - TIES (Yadav et al. 2023): task vectors `τᵢ = xᵢ − base` trimmed to their
//!   top `⌈density·n⌉` magnitudes (elements equal to the smallest kept
//!   magnitude are kept too), a sign elected per element by the summed mass
//!   `sign(Σ wᵢ·τᵢ)`, and the disjoint mean `Σ wᵢ·τᵢ·[agree] / Σ wᵢ·[agree]`
//!   over the inputs whose sign agrees; `base + λ·mean`;
//! - DARE (Yu et al. 2024): each task vector's elements dropped with
//!   probability `1 − density` and the rest rescaled by `1/density`, then
//!   combined linearly (`dare-linear`: `base + λ·Σ wᵢ·τ̃ᵢ`) or as TIES does
//!   after its trim (`dare-ties`);
//! - SLERP (as in mergekit): spherical interpolation at `t` between two
//!   tensors seen as vectors, linear where they are near parallel.
//!
//! The drop masks of DARE come from `keep_mask`, a documented counter-based
//! generator (SplitMix64), so that they are reproducible from the seed alone —
//! independent of threads, of the order tensors are written in and of
//! libtorch's generator — and can be recomputed outside transplant.
use tch::{Kind, Tensor};

/// Near-parallel tensors (|cos| above this) are interpolated linearly by SLERP
/// (mergekit's `DOT_THRESHOLD`).
pub(super) const SLERP_DOT_THRESHOLD: f64 = 0.9995;

type R<T> = Result<T, tch::TchError>;

/// `Σ wᵢ·xᵢ / Σ wᵢ`.
pub(super) fn linear(xs: &[Tensor], weights: &[f64]) -> R<Tensor> {
    let total: f64 = weights.iter().sum();
    let mut sum = xs[0].f_mul_scalar(weights[0])?;
    for (x, &w) in xs.iter().zip(weights).skip(1) {
        sum = sum.f_add(&x.f_mul_scalar(w)?)?;
    }
    sum.f_div_scalar(total)
}

/// `base + λ·Σ wᵢ·τᵢ`.
pub(super) fn task_sum(base: &Tensor, deltas: &[Tensor], weights: &[f64], lambda: f64) -> R<Tensor> {
    let mut sum = deltas[0].f_mul_scalar(weights[0])?;
    for (d, &w) in deltas.iter().zip(weights).skip(1) {
        sum = sum.f_add(&d.f_mul_scalar(w)?)?;
    }
    base.f_add(&sum.f_mul_scalar(lambda)?)
}

/// The number of elements TIES keeps of `n` at `density`: `⌈density·n⌉`, at least one.
pub(super) fn kept_count(n: i64, density: f64) -> i64 {
    ((density * n as f64).ceil() as i64).clamp(1, n.max(1))
}

/// `delta` with all but its `⌈density·n⌉` largest magnitudes set to zero
/// (every element as large as the smallest of those is kept).
pub(super) fn trim(delta: &Tensor, density: f64) -> R<Tensor> {
    let n = delta.numel() as i64;
    if n == 0 || density >= 1.0 {
        return Ok(delta.shallow_clone());
    }
    let magnitude = delta.f_abs()?;
    let (top, _) = magnitude.f_reshape([-1])?.f_topk(kept_count(n, density), 0, true, false)?;
    let threshold = top.f_min()?;
    let keep = magnitude.f_ge_tensor(&threshold)?;
    delta.f_mul(&keep.f_to_kind(delta.kind())?)
}

/// TIES' sign election and disjoint mean of (already sparsified) task
/// vectors: `base + λ·Σ wᵢ·τᵢ·[agree] / Σ wᵢ·[agree]`.
pub(super) fn elect_and_mean(base: &Tensor, deltas: &[Tensor], weights: &[f64], lambda: f64) -> R<Tensor> {
    let weighted: Vec<Tensor> =
        deltas.iter().zip(weights).map(|(d, &w)| d.f_mul_scalar(w)).collect::<R<Vec<_>>>()?;
    let mut mass = weighted[0].shallow_clone();
    for w in &weighted[1..] {
        mass = mass.f_add(w)?;
    }
    let elected = mass.f_sign()?;
    let mut sum = Tensor::f_zeros_like(base)?;
    let mut divisor = Tensor::f_zeros_like(base)?;
    for (w, &weight) in weighted.iter().zip(weights) {
        let agree = w.f_sign()?.f_eq_tensor(&elected)?.f_to_kind(base.kind())?;
        sum = sum.f_add(&w.f_mul(&agree)?)?;
        divisor = divisor.f_add(&agree.f_mul_scalar(weight)?)?;
    }
    // Where no input agrees (every τᵢ zero there), the sum is zero too.
    let none = divisor.f_eq(0.0)?;
    let divisor = divisor.f_masked_fill(&none, 1.0)?;
    base.f_add(&sum.f_div(&divisor)?.f_mul_scalar(lambda)?)
}

/// DARE: `delta` with each element kept where `keep_mask` says (probability
/// `density`) and divided by `density`.
pub(super) fn drop_and_rescale(delta: &Tensor, density: f64, key: u64) -> R<Tensor> {
    if density >= 1.0 {
        return Ok(delta.shallow_clone());
    }
    let mask = keep_mask(key, delta.numel(), density);
    let mask = Tensor::f_from_slice(&mask)?.f_reshape(delta.size())?.f_to_kind(delta.kind())?;
    delta.f_mul(&mask)?.f_div_scalar(density)
}

/// SLERP between `a` (t = 0) and `b` (t = 1), each seen as one vector: the
/// angle from their normalized dot product (in float64); where |cos| exceeds
/// [`SLERP_DOT_THRESHOLD`] or either is zero, linear interpolation.
pub(super) fn slerp(a: &Tensor, b: &Tensor, t: f64) -> R<Tensor> {
    let lerp = || a.f_mul_scalar(1.0 - t)?.f_add(&b.f_mul_scalar(t)?);
    let (a64, b64) = (a.f_to_kind(Kind::Double)?, b.f_to_kind(Kind::Double)?);
    let norm_a = a64.f_norm()?.f_double_value(&[])?;
    let norm_b = b64.f_norm()?.f_double_value(&[])?;
    if norm_a == 0.0 || norm_b == 0.0 || !norm_a.is_finite() || !norm_b.is_finite() {
        return lerp();
    }
    let dot = a64.f_mul(&b64)?.f_sum(Kind::Double)?.f_double_value(&[])? / (norm_a * norm_b);
    if dot.abs() > SLERP_DOT_THRESHOLD {
        return lerp();
    }
    let theta = dot.clamp(-1.0, 1.0).acos();
    let sin = theta.sin();
    let s0 = ((1.0 - t) * theta).sin() / sin;
    let s1 = (t * theta).sin() / sin;
    a.f_mul_scalar(s0)?.f_add(&b.f_mul_scalar(s1)?)
}

/// SplitMix64's finalizer.
pub(super) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// SplitMix64's increment (the golden ratio).
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// 64-bit FNV-1a of `bytes`.
pub(super) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// The key of DARE's mask for model `model` (its place among the merged
/// models, from 0) and output tensor `name`: FNV-1a of `"{seed}/{model}/{name}"`.
pub(super) fn mask_key(seed: u64, model: usize, name: &str) -> u64 {
    fnv1a(format!("{seed}/{model}/{name}").as_bytes())
}

/// DARE's keep mask for `n` elements in row-major order: element `e` is kept
/// (1) when `u = (mix(key + (e+1)·φ) >> 11) · 2⁻⁵³ < density`, φ being
/// SplitMix64's golden increment — SplitMix64 run from `key`.
pub(super) fn keep_mask(key: u64, n: usize, density: f64) -> Vec<u8> {
    const SCALE: f64 = 1.0 / (1u64 << 53) as f64;
    (0..n as u64)
        .map(|e| {
            let u = (mix(key.wrapping_add((e + 1).wrapping_mul(GOLDEN))) >> 11) as f64 * SCALE;
            u8::from(u < density)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(values: &[f32]) -> Tensor {
        Tensor::from_slice(values)
    }

    fn values(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t.reshape([-1])).unwrap()
    }

    #[test]
    fn linear_is_a_weighted_mean() {
        let out = linear(&[t(&[1.0, 2.0]), t(&[3.0, 6.0])], &[1.0, 3.0]).unwrap();
        assert_eq!(values(&out), [2.5, 5.0]);
    }

    #[test]
    fn ties_trims_elects_and_averages_the_agreeing() {
        let base = t(&[0.0; 4]);
        // Trimmed to 2 of 4: [0, -3, 0, 2] and [1, 0, 0, 4]... as the halves.
        let a = trim(&t(&[0.5, -3.0, 0.1, 2.0]), 0.5).unwrap();
        let b = trim(&t(&[1.0, 1.0, 0.0, 4.0]), 0.5).unwrap();
        assert_eq!(values(&a), [0.0, -3.0, 0.0, 2.0]);
        // Ties at the threshold (1.0, 1.0) are kept.
        assert_eq!(values(&b), [1.0, 1.0, 0.0, 4.0]);
        let out = elect_and_mean(&base, &[a, b], &[1.0, 1.0], 1.0).unwrap();
        // Element 1: mass -3 + 1 < 0, only a agrees: -3. Element 3: both: 3.
        assert_eq!(values(&out), [1.0, -3.0, 0.0, 3.0]);
    }

    #[test]
    fn dare_masks_are_reproducible_and_keep_about_density() {
        let a = keep_mask(mask_key(7, 0, "w"), 100_000, 0.3);
        assert_eq!(a, keep_mask(mask_key(7, 0, "w"), 100_000, 0.3));
        assert_ne!(a, keep_mask(mask_key(8, 0, "w"), 100_000, 0.3));
        assert_ne!(a, keep_mask(mask_key(7, 1, "w"), 100_000, 0.3));
        let kept = a.iter().filter(|&&k| k == 1).count() as f64 / 1e5;
        assert!((kept - 0.3).abs() < 0.01, "{kept}");
        // SplitMix64 from 0: its first output is known.
        assert_eq!(mix(GOLDEN), 0xE220_A839_7B1D_CDAF);
    }

    #[test]
    fn slerp_keeps_the_norm_of_orthogonal_unit_vectors() {
        let out = slerp(&t(&[1.0, 0.0]), &t(&[0.0, 1.0]), 0.5).unwrap();
        let h = std::f32::consts::FRAC_1_SQRT_2;
        let v = values(&out);
        assert!((v[0] - h).abs() < 1e-6 && (v[1] - h).abs() < 1e-6, "{v:?}");
        // Parallel: linear.
        assert_eq!(values(&slerp(&t(&[1.0, 2.0]), &t(&[2.0, 4.0]), 0.5).unwrap()), [1.5, 3.0]);
    }
}
