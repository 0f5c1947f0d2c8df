//! Element types by the names PyTorch gives them (`float32`, `bfloat16`, `uint16`, ...).
//!
//! [`Dtype`] names every element type PyTorch 2.13 can save, including those
//! tch's `Kind` has no variant for (`uint16`, `uint32`, `uint64`,
//! `float8_e8m0fnu`, `float4_e2m1fn_x2`, the `bits` types). A tensor of such a
//! dtype is a libtorch tensor of that dtype all the same (made through the
//! shim from its c10 code): libtorch moves its elements (views, `cat`,
//! `contiguous`, copies between tensors of the same dtype), and
//! [`Dtype::of`] names it where `Tensor::kind` would panic.
use tch::{Kind, Tensor};

macro_rules! dtypes {
    ($($variant:ident $name:literal $c10:literal $code:literal $size:literal $kind:expr;)*) => {
        /// An element type, by PyTorch's name.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[non_exhaustive]
        pub enum Dtype {
            $(#[doc = concat!("`torch.", $name, "`")] $variant,)*
        }

        impl Dtype {
            /// Every dtype, in c10's order of definition here.
            pub const ALL: &'static [Dtype] = &[$(Dtype::$variant),*];

            /// PyTorch's name (`str(torch.float32)` without `torch.`).
            pub fn name(self) -> &'static str {
                match self { $(Dtype::$variant => $name,)* }
            }

            /// c10's name of the scalar type (`Float`, `UInt16`): TorchScript
            /// archives name storages `torch.<c10 name>Storage`.
            pub fn c10_name(self) -> &'static str {
                match self { $(Dtype::$variant => $c10,)* }
            }

            /// c10's `ScalarType` code (c10/core/ScalarType.h).
            pub fn code(self) -> i32 {
                match self { $(Dtype::$variant => $code,)* }
            }

            /// Bytes per element (a `float4_e2m1fn_x2` or `bits4x2` element holds two values in one byte).
            pub fn size(self) -> usize {
                match self { $(Dtype::$variant => $size,)* }
            }

            /// tch's `Kind` of this dtype, where tch has one.
            pub fn kind(self) -> Option<Kind> {
                match self { $(Dtype::$variant => $kind,)* }
            }

            /// The dtype of c10 code `code`.
            pub fn from_code(code: i32) -> Option<Dtype> {
                match code { $($code => Some(Dtype::$variant),)* _ => None }
            }
        }
    };
}

dtypes! {
    UInt8 "uint8" "Byte" 0 1 Some(Kind::Uint8);
    Int8 "int8" "Char" 1 1 Some(Kind::Int8);
    Int16 "int16" "Short" 2 2 Some(Kind::Int16);
    Int32 "int32" "Int" 3 4 Some(Kind::Int);
    Int64 "int64" "Long" 4 8 Some(Kind::Int64);
    Float16 "float16" "Half" 5 2 Some(Kind::Half);
    Float32 "float32" "Float" 6 4 Some(Kind::Float);
    Float64 "float64" "Double" 7 8 Some(Kind::Double);
    Complex32 "complex32" "ComplexHalf" 8 4 Some(Kind::ComplexHalf);
    Complex64 "complex64" "ComplexFloat" 9 8 Some(Kind::ComplexFloat);
    Complex128 "complex128" "ComplexDouble" 10 16 Some(Kind::ComplexDouble);
    Bool "bool" "Bool" 11 1 Some(Kind::Bool);
    QInt8 "qint8" "QInt8" 12 1 Some(Kind::QInt8);
    QUInt8 "quint8" "QUInt8" 13 1 Some(Kind::QUInt8);
    QInt32 "qint32" "QInt32" 14 4 Some(Kind::QInt32);
    BFloat16 "bfloat16" "BFloat16" 15 2 Some(Kind::BFloat16);
    QUInt4x2 "quint4x2" "QUInt4x2" 16 1 None;
    QUInt2x4 "quint2x4" "QUInt2x4" 17 1 None;
    Bits1x8 "bits1x8" "Bits1x8" 18 1 None;
    Bits2x4 "bits2x4" "Bits2x4" 19 1 None;
    Bits4x2 "bits4x2" "Bits4x2" 20 1 None;
    Bits8 "bits8" "Bits8" 21 1 None;
    Bits16 "bits16" "Bits16" 22 2 None;
    Float8E5M2 "float8_e5m2" "Float8_e5m2" 23 1 Some(Kind::Float8e5m2);
    Float8E4M3Fn "float8_e4m3fn" "Float8_e4m3fn" 24 1 Some(Kind::Float8e4m3fn);
    Float8E5M2Fnuz "float8_e5m2fnuz" "Float8_e5m2fnuz" 25 1 Some(Kind::Float8e5m2fnuz);
    Float8E4M3Fnuz "float8_e4m3fnuz" "Float8_e4m3fnuz" 26 1 Some(Kind::Float8e4m3fnuz);
    UInt16 "uint16" "UInt16" 27 2 None;
    UInt32 "uint32" "UInt32" 28 4 None;
    UInt64 "uint64" "UInt64" 29 8 None;
    Float8E8M0Fnu "float8_e8m0fnu" "Float8_e8m0fnu" 44 1 None;
    Float4E2M1FnX2 "float4_e2m1fn_x2" "Float4_e2m1fn_x2" 45 1 None;
}

impl From<Kind> for Dtype {
    fn from(kind: Kind) -> Self {
        match kind {
            Kind::Uint8 => Dtype::UInt8,
            Kind::Int8 => Dtype::Int8,
            Kind::Int16 => Dtype::Int16,
            Kind::Int => Dtype::Int32,
            Kind::Int64 => Dtype::Int64,
            Kind::Half => Dtype::Float16,
            Kind::Float => Dtype::Float32,
            Kind::Double => Dtype::Float64,
            Kind::ComplexHalf => Dtype::Complex32,
            Kind::ComplexFloat => Dtype::Complex64,
            Kind::ComplexDouble => Dtype::Complex128,
            Kind::Bool => Dtype::Bool,
            Kind::QInt8 => Dtype::QInt8,
            Kind::QUInt8 => Dtype::QUInt8,
            Kind::QInt32 => Dtype::QInt32,
            Kind::BFloat16 => Dtype::BFloat16,
            Kind::Float8e5m2 => Dtype::Float8E5M2,
            Kind::Float8e4m3fn => Dtype::Float8E4M3Fn,
            Kind::Float8e5m2fnuz => Dtype::Float8E5M2Fnuz,
            Kind::Float8e4m3fnuz => Dtype::Float8E4M3Fnuz,
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.name())
    }
}

impl serde::Serialize for Dtype {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl Dtype {
    /// The dtype of `tensor`, also where tch has no `Kind` for it (where
    /// `Tensor::kind` would panic).
    pub fn of(tensor: &Tensor) -> Result<Dtype, tch::TchError> {
        match tensor.f_kind() {
            Ok(kind) => Ok(kind.into()),
            Err(tch::TchError::UnknownKind(code)) => {
                Dtype::from_code(code).ok_or(tch::TchError::UnknownKind(code))
            }
            Err(e) => Err(e),
        }
    }

    /// tch's `Kind`, or an error naming the dtype and what needed it: for
    /// live tensors and casts, which tch can only do with a `Kind`.
    pub fn require_kind(self, what: &str) -> Result<Kind, tch::TchError> {
        self.kind().ok_or_else(|| {
            tch::TchError::Kind(format!("{what}: dtype {} has no tch Kind; refused", self.name()))
        })
    }

    /// A float that `--dtype` converts and the lossy-cast checks know:
    /// float16, bfloat16, float32, float64 (not the float8 and float4 types,
    /// which are stored formats, kept as they are).
    pub fn is_castable_float(self) -> bool {
        matches!(self, Dtype::Float16 | Dtype::BFloat16 | Dtype::Float32 | Dtype::Float64)
    }

    /// Whether casts from and to this dtype are refused: the 8- and 4-bit
    /// floats, the unsigned integers wider than 8 bits, the `bits` and
    /// quantized types. Their bytes move unchanged; a cast would need a
    /// conversion tch does not name (or one that rounds).
    pub fn is_stored_only(self) -> bool {
        !(self.is_castable_float()
            || matches!(
                self,
                Dtype::UInt8
                    | Dtype::Int8
                    | Dtype::Int16
                    | Dtype::Int32
                    | Dtype::Int64
                    | Dtype::Bool
                    | Dtype::Complex64
                    | Dtype::Complex128
            ))
    }
}

/// PyTorch's name of an element type (`str(torch.float32)` without `torch.`).
pub fn name(dtype: impl Into<Dtype>) -> &'static str {
    dtype.into().name()
}

/// The element type PyTorch calls `name`; short forms (`f32`, `bf16`, `i64`) too.
pub fn parse(name: &str) -> Option<Dtype> {
    let name = name.strip_prefix("torch.").unwrap_or(name);
    let short = match name {
        "u8" => Dtype::UInt8,
        "i8" => Dtype::Int8,
        "i16" | "short" => Dtype::Int16,
        "i32" | "int" => Dtype::Int32,
        "i64" | "long" => Dtype::Int64,
        "f16" | "half" => Dtype::Float16,
        "f32" | "float" => Dtype::Float32,
        "f64" | "double" => Dtype::Float64,
        "bf16" => Dtype::BFloat16,
        "u16" => Dtype::UInt16,
        "u32" => Dtype::UInt32,
        "u64" => Dtype::UInt64,
        "cfloat" => Dtype::Complex64,
        "cdouble" => Dtype::Complex128,
        "chalf" => Dtype::Complex32,
        _ => return Dtype::ALL.iter().copied().find(|d| d.name() == name),
    };
    Some(short)
}

/// Bytes per element.
pub fn size(dtype: impl Into<Dtype>) -> usize {
    dtype.into().size()
}

/// The kind of number a tensor holds: modules whose leaves differ in it are not
/// the same layer (a float cast to another float is a cast, not a new kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DtypeClass {
    /// Floating point of any width.
    Floating,
    /// Complex of any width.
    Complex,
    /// Integers, signed or not (and raw `bits` and quantized types).
    Integer,
    /// Booleans.
    Bool,
}

/// Floating point of any width, the float8 and float4 types included.
pub fn is_floating(dtype: impl Into<Dtype>) -> bool {
    let dtype = dtype.into();
    dtype.is_castable_float()
        || matches!(
            dtype,
            Dtype::Float8E5M2
                | Dtype::Float8E4M3Fn
                | Dtype::Float8E5M2Fnuz
                | Dtype::Float8E4M3Fnuz
                | Dtype::Float8E8M0Fnu
                | Dtype::Float4E2M1FnX2
        )
}

/// Complex of any width.
pub fn is_complex(dtype: impl Into<Dtype>) -> bool {
    matches!(dtype.into(), Dtype::Complex32 | Dtype::Complex64 | Dtype::Complex128)
}

/// The kind of number `dtype` holds.
pub fn class(dtype: impl Into<Dtype>) -> DtypeClass {
    match dtype.into() {
        Dtype::Bool => DtypeClass::Bool,
        d if is_complex(d) => DtypeClass::Complex,
        d if is_floating(d) => DtypeClass::Floating,
        _ => DtypeClass::Integer,
    }
}

/// The largest finite magnitude, or integer bounds, of a dtype (`None`: any
/// value fits, as far as a check needs to know).
pub fn range(dtype: impl Into<Dtype>) -> Option<(f64, f64)> {
    Some(match dtype.into() {
        Dtype::Float16 => (-65504.0, 65504.0),
        Dtype::BFloat16 | Dtype::Float32 => (-f32::MAX as f64, f32::MAX as f64),
        Dtype::UInt8 => (0.0, 255.0),
        Dtype::Int8 => (-128.0, 127.0),
        Dtype::Int16 => (i16::MIN as f64, i16::MAX as f64),
        Dtype::Int32 => (i32::MIN as f64, i32::MAX as f64),
        Dtype::Bool => (0.0, 1.0),
        _ => return None,
    })
}

/// Why converting any `from` tensor to `to` loses information, whatever its
/// values: the imaginary part dropped, fractions truncated, or a dtype whose
/// casts are refused ([`Dtype::is_stored_only`]). (Whether the values fit
/// `to`'s range is checked by the copy, which reads them.)
pub fn static_loss(from: impl Into<Dtype>, to: impl Into<Dtype>) -> Option<String> {
    let (from, to) = (from.into(), to.into());
    if from == to {
        return None;
    }
    let (from_name, to_name) = (from.name(), to.name());
    if from.is_stored_only() || to.is_stored_only() {
        let which = if from.is_stored_only() { from_name } else { to_name };
        return Some(format!(
            "{from_name} to {to_name}: casts of {which} are refused (its bytes move unchanged only)"
        ));
    }
    if is_complex(from) && !is_complex(to) {
        return Some(format!("{from_name} to {to_name} drops the imaginary part"));
    }
    if (is_floating(from) || is_complex(from)) && !(is_floating(to) || is_complex(to)) {
        return Some(format!("{from_name} to {to_name} truncates fractions"));
    }
    None
}

/// c10's `ScalarType` code of `dtype` (c10/core/ScalarType.h), for the shim.
pub fn scalar_type(dtype: impl Into<Dtype>) -> i32 {
    dtype.into().code()
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
        for &dtype in Dtype::ALL {
            assert_eq!(parse(dtype.name()), Some(dtype));
            assert_eq!(Dtype::from_code(dtype.code()), Some(dtype));
            if let Some(kind) = dtype.kind() {
                assert_eq!(Dtype::from(kind), dtype);
                assert_eq!(kind.elt_size_in_bytes(), dtype.size(), "{dtype}");
            }
        }
        assert_eq!(parse("bf16"), Some(Dtype::BFloat16));
        assert_eq!(parse("torch.float16"), Some(Dtype::Float16));
        assert_eq!(parse("float128"), None);
    }

    #[test]
    fn tensors_of_dtypes_tch_cannot_name_are_named() {
        let bytes = Tensor::zeros([8], (Kind::Uint8, tch::Device::Cpu));
        let f32 = bytes.view_dtype(Kind::Float);
        assert_eq!(Dtype::of(&f32).unwrap(), Dtype::Float32);
        assert!(Dtype::UInt16.require_kind("a cast").unwrap_err().to_string().contains("uint16"));
        assert!(static_loss(Dtype::UInt16, Dtype::Int32).is_some());
        assert!(static_loss(Dtype::Float8E4M3Fn, Dtype::Float32).is_some());
        assert!(static_loss(Dtype::Float32, Dtype::Float16).is_none());
    }
}
