//! Dataset schema: named fields, each a fixed dtype + shape, variable-length bytes, or a
//! variable-length list of one dtype (token ids).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Element type of a fixed-shape field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[allow(missing_docs)]
pub enum DType {
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    F16,
    Bf16,
    F32,
    F64,
    /// One byte per element, 0 (false) or 1 (true).
    Bool,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::U8 | DType::I8 | DType::Bool => 1,
            DType::I16 | DType::U16 | DType::F16 | DType::Bf16 => 2,
            DType::I32 | DType::U32 | DType::F32 => 4,
            DType::I64 | DType::U64 | DType::F64 => 8,
        }
    }

    /// The lowercase name used in schemas ("u8", "bf16", ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::U8 => "u8",
            DType::I8 => "i8",
            DType::I16 => "i16",
            DType::U16 => "u16",
            DType::I32 => "i32",
            DType::U32 => "u32",
            DType::I64 => "i64",
            DType::U64 => "u64",
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::Bool => "bool",
        }
    }

    /// Parses a name as printed by [`DType::name`].
    pub fn from_name(s: &str) -> Option<Self> {
        serde_json::from_value(serde_json::Value::String(s.to_owned())).ok()
    }
}

/// What a field holds.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum FieldKind {
    /// A tensor of fixed dtype and shape (an empty shape is a scalar).
    Tensor {
        /// Element type.
        dtype: DType,
        /// Shape of one sample's value.
        shape: Vec<u64>,
    },
    /// Variable-length bytes.
    Bytes,
    /// A variable-length 1-D sequence of `dtype` elements (little-endian), such as a
    /// document's token ids: stored as bytes whose length is a multiple of the element
    /// size; a batch gives its values and offsets counted in elements.
    List {
        /// Element type.
        dtype: DType,
    },
}

/// How the values of a field are stored (FORMAT.md section 5.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Each value is one zstd frame that declares its content size; the content is the
    /// value as section 5 lays it out.
    Zstd,
}

impl Compression {
    /// The name used in schemas (`"zstd"`).
    pub fn name(self) -> &'static str {
        match self {
            Compression::Zstd => "zstd",
        }
    }
}

/// A named field.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Field {
    /// Field name (1..=128 bytes of `[A-Za-z0-9_.-]`).
    pub name: String,
    /// What it holds.
    #[serde(flatten)]
    pub kind: FieldKind,
    /// How each value is stored: as is (`None`, the member is left out of the schema),
    /// or compressed one value at a time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compress: Option<Compression>,
}

impl Field {
    /// A fixed-shape tensor field.
    pub fn tensor(name: impl Into<String>, dtype: DType, shape: &[u64]) -> Self {
        Self { name: name.into(), kind: FieldKind::Tensor { dtype, shape: shape.to_vec() }, compress: None }
    }

    /// A variable-length bytes field.
    pub fn bytes(name: impl Into<String>) -> Self {
        Self { name: name.into(), kind: FieldKind::Bytes, compress: None }
    }

    /// A variable-length list field of `dtype` elements (token ids: u16, u32, i32, i64).
    pub fn list(name: impl Into<String>, dtype: DType) -> Self {
        Self { name: name.into(), kind: FieldKind::List { dtype }, compress: None }
    }

    /// This field with its values stored compressed (`Some`) or as they are.
    pub fn compressed(mut self, compress: Option<Compression>) -> Self {
        self.compress = compress;
        self
    }

    /// Byte length every stored value has: the value length of an uncompressed tensor
    /// field; `None` for bytes, lists and compressed fields (whose stored values vary).
    pub fn stored_len(&self) -> Option<u64> {
        if self.compress.is_some() {
            return None;
        }
        self.fixed_len()
    }

    /// Bytes per unit a variable-length value's length and offsets count: the element
    /// size of a list field, 1 for bytes; `None` for a tensor field.
    pub fn var_unit(&self) -> Option<usize> {
        match &self.kind {
            FieldKind::Tensor { .. } => None,
            FieldKind::Bytes => Some(1),
            FieldKind::List { dtype } => Some(dtype.size()),
        }
    }

    /// Byte length of one value, for fixed fields; `None` for bytes and lists.
    pub fn fixed_len(&self) -> Option<u64> {
        match &self.kind {
            FieldKind::Tensor { dtype, shape } => {
                shape.iter().try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d)).or(Some(u64::MAX))
            }
            FieldKind::Bytes | FieldKind::List { .. } => None,
        }
    }
}

/// The fields of every sample of a dataset, in record order.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schema {
    /// Fields, in the order they are stored in each record.
    pub fields: Vec<Field>,
}

/// Upper bound on one fixed field value, to reject absurd schemas early.
const MAX_FIXED_LEN: u64 = 1 << 40;

impl Schema {
    /// Builds and validates a schema.
    pub fn new(fields: Vec<Field>) -> Result<Self> {
        let s = Self { fields };
        s.validate().map_err(|detail| Error::InvalidArgument(format!("schema: {detail}")))?;
        Ok(s)
    }

    /// Checks names (non-empty, unique, portable) and sizes.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.fields.is_empty() {
            return Err("a schema needs at least one field".into());
        }
        if self.fields.len() > 1024 {
            return Err(format!("{} fields (at most 1024)", self.fields.len()));
        }
        let mut seen = std::collections::HashSet::new();
        for f in &self.fields {
            let ok = !f.name.is_empty()
                && f.name.len() <= 128
                && f.name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
            if !ok {
                return Err(format!("field name {:?} must be 1-128 characters of [A-Za-z0-9_.-]", f.name));
            }
            if !seen.insert(&f.name) {
                return Err(format!("duplicate field name {:?}", f.name));
            }
            if let FieldKind::Tensor { shape, .. } = &f.kind {
                if shape.len() > 16 {
                    return Err(format!("field {:?}: {} dimensions (at most 16)", f.name, shape.len()));
                }
                if f.fixed_len().is_none_or(|n| n > MAX_FIXED_LEN) {
                    return Err(format!("field {:?}: one value would exceed 1 TiB", f.name));
                }
            }
        }
        Ok(())
    }

    /// Canonical encoding: compact JSON of this struct, field order as declared.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        // Serialising plain structs, enums, strings and integers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// SHA-256 of [`Schema::canonical_bytes`]; bound into every shard header.
    pub fn digest(&self) -> [u8; 32] {
        crate::crypto::sha256(&self.canonical_bytes())
    }

    /// Position of a field by name.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.fields.iter().position(|f| f.name == name)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The canonical bytes and digests FORMAT.md section 6.1 gives as examples.
    #[test]
    fn canonical_encoding_matches_the_format_examples() {
        let cases = [
            (
                Schema::new(vec![Field::tensor("x", DType::F32, &[3, 4]), Field::tensor("label", DType::I64, &[])]),
                r#"{"fields":[{"name":"x","kind":"tensor","dtype":"f32","shape":[3,4]},{"name":"label","kind":"tensor","dtype":"i64","shape":[]}]}"#,
                "6debca89422fd90ec315061aadddcc54fa09c914c054cbfa23c84ec4e83c6401",
            ),
            (
                Schema::new(vec![Field::bytes("data")]),
                r#"{"fields":[{"name":"data","kind":"bytes"}]}"#,
                "6bb1c74450a1436e223753dd7afb17b0339ab836a919315028964178c92b2aaa",
            ),
            (
                Schema::new(vec![Field::list("tokens", DType::U32)]),
                r#"{"fields":[{"name":"tokens","kind":"list","dtype":"u32"}]}"#,
                "629012733e7611be516d0cf99cf57337df44aa51429b9763a79a9d466efd5903",
            ),
            (
                Schema::new(vec![
                    Field::tensor("x", DType::U8, &[2]).compressed(Some(Compression::Zstd)),
                    Field::bytes("jpg").compressed(Some(Compression::Zstd)),
                ]),
                r#"{"fields":[{"name":"x","kind":"tensor","dtype":"u8","shape":[2],"compress":"zstd"},{"name":"jpg","kind":"bytes","compress":"zstd"}]}"#,
                "88799ed72e451bd66bf57c2010731729beb467e5f32273b7756a168ba17ba97e",
            ),
        ];
        for (schema, bytes, digest) in cases {
            let s = schema.unwrap();
            assert_eq!(String::from_utf8(s.canonical_bytes()).unwrap(), bytes);
            assert_eq!(hex::encode(s.digest()), digest);
            let back: Schema = serde_json::from_str(bytes).unwrap();
            assert_eq!(back, s);
        }
        let list = Field::list("t", DType::U16);
        assert_eq!((list.fixed_len(), list.var_unit()), (None, Some(2)));
    }
}
