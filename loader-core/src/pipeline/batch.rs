//! A batch: samples gathered field by field into one locked buffer from the pool.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::format::{DType, FieldKind};
use crate::memory::{BatchPool, LockedBuf};

/// Where one field lives inside a batch buffer.
#[derive(Clone, Debug)]
pub struct FieldSlot {
    /// Field name.
    pub name: Arc<str>,
    /// Position in the schema.
    pub schema_pos: usize,
    /// Tensor or bytes.
    pub kind: FieldKind,
    /// Byte offset of the values (64-byte aligned).
    pub offset: usize,
    /// Bytes of values.
    pub len: usize,
    /// For bytes and list fields: absolute offset of `samples + 1` little-endian u64
    /// offsets from `offset`, counted in bytes (bytes) or elements (list).
    pub offsets_at: Option<usize>,
}

/// Element types a tensor field can be viewed as.
pub trait Element: bytemuck::Pod {
    /// The matching dtype.
    const DTYPE: DType;
}

macro_rules! element {
    ($($t:ty => $d:ident),*) => { $(impl Element for $t { const DTYPE: DType = DType::$d; })* };
}
element!(u8 => U8, i8 => I8, i16 => I16, u16 => U16, i32 => I32, u32 => U32, i64 => I64, u64 => U64,
    half::f16 => F16, half::bf16 => Bf16, f32 => F32, f64 => F64);

/// A zero-copy typed view of one tensor field of a batch.
#[derive(Debug)]
pub struct TensorView<'a, T> {
    /// The values, C order.
    pub data: &'a [T],
    /// `[samples, ...field shape]`.
    pub shape: Vec<usize>,
}

/// What a batch holds, wherever its bytes live (host [`Batch`] or a device batch):
/// the field slots, the sample ids and the batch's place in its epoch.
#[derive(Clone, Debug)]
pub struct BatchLayout {
    pub(crate) slots: Arc<[FieldSlot]>,
    pub(crate) samples: Vec<u64>,
    pub(crate) index: u64,
    pub(crate) epoch: u64,
}

impl BatchLayout {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// True for an empty batch (never yielded by the loader).
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Position of this batch in its epoch.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// The epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Global sample ids (shard record offset + record), in batch order.
    pub fn sample_ids(&self) -> &[u64] {
        &self.samples
    }

    /// The field slots, in selection order.
    pub fn fields(&self) -> &[FieldSlot] {
        &self.slots
    }

    /// The slot of field `name`, or an error listing the fields there are.
    pub fn slot(&self, name: &str) -> Result<&FieldSlot> {
        self.slots.iter().find(|s| &*s.name == name).ok_or_else(|| {
            let names: Vec<&str> = self.slots.iter().map(|s| &*s.name).collect();
            Error::InvalidArgument(format!("no field {name:?} in this batch (fields: {})", names.join(", ")))
        })
    }

    /// A tensor field's slot, checked to hold `T` values, with the view's shape
    /// `[samples, ...field shape]`.
    pub fn tensor_slot<T: Element>(&self, name: &str) -> Result<(&FieldSlot, Vec<usize>)> {
        let s = self.slot(name)?;
        let FieldKind::Tensor { dtype, shape } = &s.kind else {
            return Err(Error::InvalidArgument(format!("field {name:?} holds bytes, not a tensor; use Batch::bytes")));
        };
        if *dtype != T::DTYPE {
            return Err(Error::InvalidArgument(format!("field {name:?} is {}, not {}", dtype.name(), T::DTYPE.name())));
        }
        let mut full = vec![self.len()];
        full.extend(shape.iter().map(|&d| d as usize));
        Ok((s, full))
    }
}

/// A batch of samples. Its plaintext lives in a page-locked buffer that is zeroized
/// and returned to the pool when the batch is dropped. Dereferences to its
/// [`BatchLayout`] (length, sample ids, fields).
pub struct Batch {
    pub(super) buf: Option<LockedBuf>,
    pub(super) pool: BatchPool,
    pub(super) layout: BatchLayout,
    /// Process that filled the batch.
    pub(super) pid: u32,
}

impl std::ops::Deref for Batch {
    type Target = BatchLayout;

    fn deref(&self) -> &BatchLayout {
        &self.layout
    }
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("epoch", &self.epoch)
            .field("index", &self.index)
            .field("samples", &self.samples.len())
            .finish()
    }
}

impl Batch {
    /// The batch's layout (fields, sample ids, position), to describe a copy of it.
    pub fn layout(&self) -> &BatchLayout {
        &self.layout
    }

    /// The whole batch buffer (bindings use it for the offsets of bytes fields).
    pub fn buffer_bytes(&self) -> &[u8] {
        self.bytes_of()
    }

    fn bytes_of(&self) -> &[u8] {
        self.buf.as_ref().map(|b| b.as_slice()).unwrap_or(&[])
    }

    /// Bytes of the buffer that hold this batch's data (values and offsets of every
    /// field); the rest is zero. A copy of this prefix is a copy of the batch.
    pub fn used_len(&self) -> usize {
        let n = self.len();
        self.slots
            .iter()
            .map(|s| (s.offset + s.len).max(s.offsets_at.map(|a| a + 8 * (n + 1)).unwrap_or(0)))
            .max()
            .unwrap_or(0)
            .min(self.bytes_of().len())
    }

    /// The raw bytes of a field's values (for a tensor field, `samples * value bytes`).
    pub fn field_bytes(&self, name: &str) -> Result<&[u8]> {
        let s = self.slot(name)?;
        Ok(&self.bytes_of()[s.offset..s.offset + s.len])
    }

    /// A typed, zero-copy view of a tensor field.
    pub fn tensor<T: Element>(&self, name: &str) -> Result<TensorView<'_, T>> {
        let (s, shape) = self.tensor_slot::<T>(name)?;
        let data = bytemuck::try_cast_slice(&self.bytes_of()[s.offset..s.offset + s.len])
            .map_err(|e| Error::Internal(format!("field {name:?} view: {e}")))?;
        Ok(TensorView { data, shape })
    }

    /// Value `i` of a bytes field, or the little-endian element bytes of value `i` of a
    /// list field.
    pub fn bytes(&self, name: &str, i: usize) -> Result<&[u8]> {
        let s = self.slot(name)?;
        let at = s
            .offsets_at
            .ok_or_else(|| Error::InvalidArgument(format!("field {name:?} is a tensor; use Batch::tensor")))?;
        if i >= self.len() {
            return Err(Error::InvalidArgument(format!("sample {i} of a batch of {}", self.len())));
        }
        let unit = match s.kind {
            FieldKind::List { dtype } => dtype.size(),
            _ => 1,
        };
        let b = self.bytes_of();
        let off = |j: usize| {
            let p = at + 8 * j;
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[p..p + 8]);
            u64::from_le_bytes(x) as usize * unit
        };
        Ok(&b[s.offset + off(i)..s.offset + off(i + 1)])
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            if std::process::id() == self.pid {
                self.pool.give(b);
            } else {
                // Dropped in a forked child (a tensor that outlived fork): the pool's
                // lock may have been held by a parent thread at fork time, so touching
                // it could deadlock. The child's copy-on-write pages go with the child.
                std::mem::forget(b);
            }
        }
    }
}
