//! The streaming pipeline: epoch plan, decrypt workers, batches, the [`Loader`], and
//! [`BatchStream`], what it shares with the device stage.
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
mod builder;
mod epoch;
mod gather;
mod loader;
mod mix;
mod plan;
mod stream;
mod tokens;

pub use batch::{Batch, BatchLayout, Element, FieldSlot, TensorView};
pub use builder::{LoaderBuilder, DEFAULT_MEMORY_BUDGET};
pub use loader::{Loader, LoaderState, WorkerPosition};
pub use mix::{Mix, MixBatch, MixState};
pub use plan::{Consumed, Remainder, Shuffle};
pub use stream::{BatchStream, Next};
pub use tokens::{TokenPosition, TokenStream, TokenWindows};
