//! Element types by the names PyTorch gives them (`float32`, `bfloat16`, `int64`, ...).
use tch::Kind;

/// PyTorch's name of an element type (`str(torch.float32)` without `torch.`).
pub fn name(kind: Kind) -> &'static str {
    match kind {
        Kind::Uint8 => "uint8",
        Kind::Int8 => "int8",
        Kind::Int16 => "int16",
        Kind::Int => "int32",
        Kind::Int64 => "int64",
        Kind::Half => "float16",
        Kind::Float => "float32",
        Kind::Double => "float64",
        Kind::ComplexHalf => "complex32",
        Kind::ComplexFloat => "complex64",
        Kind::ComplexDouble => "complex128",
        Kind::Bool => "bool",
        Kind::QInt8 => "qint8",
        Kind::QUInt8 => "quint8",
        Kind::QInt32 => "qint32",
        Kind::BFloat16 => "bfloat16",
        Kind::Float8e5m2 => "float8_e5m2",
        Kind::Float8e4m3fn => "float8_e4m3fn",
        Kind::Float8e5m2fnuz => "float8_e5m2fnuz",
        Kind::Float8e4m3fnuz => "float8_e4m3fnuz",
    }
}

/// The element type PyTorch calls `name`; short forms (`f32`, `bf16`, `i64`) too.
pub fn parse(name: &str) -> Option<Kind> {
    let kind = match name.strip_prefix("torch.").unwrap_or(name) {
        "uint8" | "u8" => Kind::Uint8,
        "int8" | "i8" => Kind::Int8,
        "int16" | "i16" | "short" => Kind::Int16,
        "int32" | "i32" | "int" => Kind::Int,
        "int64" | "i64" | "long" => Kind::Int64,
        "float16" | "f16" | "half" => Kind::Half,
        "float32" | "f32" | "float" => Kind::Float,
        "float64" | "f64" | "double" => Kind::Double,
        "bfloat16" | "bf16" => Kind::BFloat16,
        "bool" => Kind::Bool,
        "complex64" => Kind::ComplexFloat,
        "complex128" => Kind::ComplexDouble,
        _ => return None,
    };
    Some(kind)
}

/// Bytes per element.
pub fn size(kind: Kind) -> usize {
    kind.elt_size_in_bytes()
}

/// The kind of number a tensor holds: modules whose leaves differ in it are not
/// the same layer (a float cast to another float is a cast, not a new kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DtypeClass {
    /// Floating point of any width.
    Floating,
    /// Complex of any width.
    Complex,
    /// Integers, signed or not.
    Integer,
    /// Booleans.
    Bool,
}

/// Floating point of any width.
pub fn is_floating(kind: Kind) -> bool {
    matches!(kind, Kind::Half | Kind::Float | Kind::Double | Kind::BFloat16)
}

/// Complex of any width.
pub fn is_complex(kind: Kind) -> bool {
    matches!(kind, Kind::ComplexHalf | Kind::ComplexFloat | Kind::ComplexDouble)
}

/// The kind of number `kind` holds.
pub fn class(kind: Kind) -> DtypeClass {
    match kind {
        Kind::Bool => DtypeClass::Bool,
        k if is_complex(k) => DtypeClass::Complex,
        k if is_floating(k) => DtypeClass::Floating,
        _ => DtypeClass::Integer,
    }
}

/// The largest finite magnitude, or integer bounds, of a dtype (`None`: any
/// value fits, as far as a check needs to know).
pub fn range(kind: Kind) -> Option<(f64, f64)> {
    Some(match kind {
        Kind::Half => (-65504.0, 65504.0),
        Kind::BFloat16 | Kind::Float => (-f32::MAX as f64, f32::MAX as f64),
        Kind::Uint8 => (0.0, 255.0),
        Kind::Int8 => (-128.0, 127.0),
        Kind::Int16 => (i16::MIN as f64, i16::MAX as f64),
        Kind::Int => (i32::MIN as f64, i32::MAX as f64),
        Kind::Bool => (0.0, 1.0),
        _ => return None,
    })
}

/// Why converting any `from` tensor to `to` loses information, whatever its
/// values: the imaginary part dropped, fractions truncated. (Whether the values
/// fit `to`'s range is checked by the copy, which reads them.)
pub fn static_loss(from: Kind, to: Kind) -> Option<String> {
    if from == to {
        return None;
    }
    let (from_name, to_name) = (name(from), name(to));
    if is_complex(from) && !is_complex(to) {
        return Some(format!("{from_name} to {to_name} drops the imaginary part"));
    }
    if (is_floating(from) || is_complex(from)) && !(is_floating(to) || is_complex(to)) {
        return Some(format!("{from_name} to {to_name} truncates fractions"));
    }
    None
}

/// c10's `ScalarType` code of `kind` (c10/core/ScalarType.h), for the shim.
pub fn scalar_type(kind: Kind) -> i32 {
    match kind {
        Kind::Uint8 => 0,
        Kind::Int8 => 1,
        Kind::Int16 => 2,
        Kind::Int => 3,
        Kind::Int64 => 4,
        Kind::Half => 5,
        Kind::Float => 6,
        Kind::Double => 7,
        Kind::ComplexHalf => 8,
        Kind::ComplexFloat => 9,
        Kind::ComplexDouble => 10,
        Kind::Bool => 11,
        Kind::QInt8 => 12,
        Kind::QUInt8 => 13,
        Kind::QInt32 => 14,
        Kind::BFloat16 => 15,
        Kind::Float8e5m2 => 23,
        Kind::Float8e4m3fn => 24,
        Kind::Float8e5m2fnuz => 25,
        Kind::Float8e4m3fnuz => 26,
    }
}

/// The element types the formats hold, for tests that go through them all.
#[cfg(test)]
pub(crate) const COMMON_KINDS: [Kind; 10] = [
    Kind::Uint8,
    Kind::Int8,
    Kind::Int16,
    Kind::Int,
    Kind::Int64,
    Kind::Half,
    Kind::Float,
    Kind::Double,
    Kind::BFloat16,
    Kind::Bool,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for kind in COMMON_KINDS {
            assert_eq!(parse(name(kind)), Some(kind));
        }
        assert_eq!(parse("bf16"), Some(Kind::BFloat16));
        assert_eq!(parse("torch.float16"), Some(Kind::Half));
        assert_eq!(parse("float128"), None);
    }
}
