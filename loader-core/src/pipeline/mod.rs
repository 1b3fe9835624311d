//! The streaming pipeline: epoch plan, decrypt workers, batches, and the [`Loader`].
//!
//! ```no_run
//! # fn main() -> shardlock::Result<()> {
//! let loader = shardlock::Loader::builder("dataset/")
//!     .keyring("keyring.json")
//!     .token("job.token")
//!     .trust("issuer.key.pub")
//!     .batch_size(256)
//!     .seed(1)
//!     .build()?;
//! for batch in loader {
//!     let batch = batch?;
//!     let x = batch.tensor::<f32>("x")?;
//!     assert_eq!(x.shape[0], batch.len());
//! }
//! # Ok(()) }
//! ```

mod batch;
pub mod bench;
mod loader;
pub mod plan;

pub use batch::{Batch, BatchLayout, Element, FieldSlot, TensorView};
pub use loader::{Loader, LoaderBuilder, LoaderState, Next, DEFAULT_MEMORY_BUDGET};
pub use plan::{Remainder, Shuffle};
