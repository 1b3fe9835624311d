//! The record index at the start of every shard's plaintext.
//!
//! ```text
//! u64 LE  record count n
//! u32 LE  field count F (must equal the schema's)
//! u32 LE  reserved, 0
//! (n*F + 1) x u64 LE  offsets into the record area: field f of record i spans
//!                     [off[i*F + f], off[i*F + f + 1]); off[0] = 0, non-decreasing,
//!                     off[n*F] = length of the record area
//! record area: the field values, record after record, fields in schema order
//! ```
//! The index is inside the encrypted payload because record sizes are information.

use std::path::Path;

use zeroize::Zeroizing;

use super::schema::Schema;
use crate::error::{Error, Result};

/// Bytes before the offsets.
pub const PROLOGUE_LEN: usize = 16;

/// Byte length of the index for `records` records of `fields` fields.
pub fn index_len(records: u64, fields: usize) -> Option<u64> {
    records.checked_mul(fields as u64)?.checked_add(1)?.checked_mul(8)?.checked_add(PROLOGUE_LEN as u64)
}

/// A parsed and validated record index.
pub struct RecordIndex {
    records: u64,
    fields: usize,
    offsets: Zeroizing<Vec<u64>>,
    data_start: u64,
}

impl RecordIndex {
    /// Reads the record count and field count from the 16-byte prologue.
    pub fn parse_prologue(prologue: &[u8], path: &Path) -> Result<(u64, usize)> {
        if prologue.len() < PROLOGUE_LEN {
            return Err(Error::Format { what: "record index", path: path.to_owned(), detail: "short prologue".into() });
        }
        let mut n = [0u8; 8];
        n.copy_from_slice(&prologue[..8]);
        let f = u32::from_le_bytes([prologue[8], prologue[9], prologue[10], prologue[11]]);
        Ok((u64::from_le_bytes(n), f as usize))
    }

    /// Parses the whole index (`bytes` = prologue + offsets) and checks it against the
    /// schema and the plaintext length. `path` only names the file in errors.
    pub fn parse(bytes: &[u8], schema: &Schema, plaintext_len: u64, path: &Path) -> Result<Self> {
        let bad = |detail: String| Error::Format { what: "record index", path: path.to_owned(), detail };
        let (records, fields) = Self::parse_prologue(bytes, path)?;
        if bytes[12..16] != [0, 0, 0, 0] {
            return Err(bad("reserved prologue bytes are not zero".into()));
        }
        if fields != schema.fields.len() {
            return Err(bad(format!("index has {fields} fields, schema has {}", schema.fields.len())));
        }
        let len = index_len(records, fields).ok_or_else(|| bad("record count overflows".into()))?;
        if len != bytes.len() as u64 {
            return Err(bad(format!("index is {} bytes, expected {len}", bytes.len())));
        }
        let count = (records as usize) * fields + 1;
        let mut offsets = Zeroizing::new(Vec::with_capacity(count));
        for c in bytes[PROLOGUE_LEN..].chunks_exact(8) {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            offsets.push(u64::from_le_bytes(b));
        }
        // Compressed fields store frames of any length (their content is checked when
        // a value is decompressed).
        let fixed: Vec<Option<u64>> = schema.fields.iter().map(|f| f.stored_len()).collect();
        // Element size of uncompressed list fields (their values are whole elements), 1 otherwise.
        let unit: Vec<u64> = schema
            .fields
            .iter()
            .map(|f| if f.compress.is_some() { 1 } else { f.var_unit().unwrap_or(1) as u64 })
            .collect();
        if offsets[0] != 0 {
            return Err(bad("first offset is not 0".into()));
        }
        for (j, w) in offsets.windows(2).enumerate() {
            let span = w[1].checked_sub(w[0]).ok_or_else(|| bad(format!("offsets decrease at entry {j}")))?;
            if let Some(want) = fixed[j % fields] {
                if span != want {
                    return Err(bad(format!(
                        "record {} field {:?} has {span} bytes, schema says {want}",
                        j / fields,
                        schema.fields[j % fields].name
                    )));
                }
            } else if span % unit[j % fields] != 0 {
                return Err(bad(format!(
                    "record {} field {:?} has {span} bytes, not whole elements of {} bytes (a list field)",
                    j / fields,
                    schema.fields[j % fields].name,
                    unit[j % fields]
                )));
            }
        }
        if len.checked_add(offsets[count - 1]) != Some(plaintext_len) {
            return Err(bad("record area length disagrees with the payload length".into()));
        }
        Ok(Self { records, fields, offsets, data_start: len })
    }

    /// Number of records.
    pub fn len(&self) -> u64 {
        self.records
    }

    /// Number of fields per record.
    pub fn fields(&self) -> usize {
        self.fields
    }

    /// True if the shard has no records.
    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// Plaintext byte range `[start, end)` of field `field` of record `record`.
    pub fn field_range(&self, record: u64, field: usize) -> (u64, u64) {
        let j = record as usize * self.fields + field;
        (self.data_start + self.offsets[j], self.data_start + self.offsets[j + 1])
    }

    /// Plaintext byte range of a whole record (all its fields).
    pub fn record_range(&self, record: u64) -> (u64, u64) {
        let j = record as usize * self.fields;
        (self.data_start + self.offsets[j], self.data_start + self.offsets[j + self.fields])
    }
}

/// Builds the index bytes for records whose field lengths are given in order.
pub fn encode(records: u64, fields: usize, field_lens: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(PROLOGUE_LEN + 8 * (field_lens.len() + 1));
    out.extend_from_slice(&records.to_le_bytes());
    out.extend_from_slice(&(fields as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    let mut off = 0u64;
    out.extend_from_slice(&off.to_le_bytes());
    for &l in field_lens {
        off += l;
        out.extend_from_slice(&off.to_le_bytes());
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::format::{DType, Field};

    /// Index rule 6 for a list field: its values are whole elements.
    #[test]
    fn a_list_value_of_partial_elements_is_refused() {
        let schema = Schema::new(vec![Field::list("t", DType::U16)]).unwrap();
        let parse = |lens: &[u64]| {
            let idx = encode(lens.len() as u64, 1, lens);
            let total: u64 = lens.iter().sum();
            RecordIndex::parse(&idx, &schema, idx.len() as u64 + total, Path::new("s.slk"))
        };
        assert!(parse(&[0, 2, 6]).is_ok());
        let e = parse(&[2, 3]).err().unwrap().to_string();
        assert!(e.contains("record 1 field \"t\" has 3 bytes, not whole elements of 2"), "{e}");
    }
}
