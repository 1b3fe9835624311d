//! Operations on whole datasets that the data owner and the security team run:
//! [`verify`] (authenticate everything, release nothing), [`rotate`] (rewrap every DEK
//! under another KEK) and [`upload_dir`] (copy a packed dataset to object storage).
//! They compose the layers below; nothing below depends on them.

mod rotate;
mod upload;
mod verify;

pub use rotate::rotate;
pub use upload::upload_dir;
pub use verify::{verify, verify_at, ShardReport, VerifyOptions, VerifyReport};
