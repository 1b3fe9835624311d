//! One module per command family.

pub(crate) mod audit;
pub(crate) mod bench;
pub(crate) mod inspect;
pub(crate) mod keyd;
pub(crate) mod keygen;
pub(crate) mod pack;
pub(crate) mod rotate;
pub(crate) mod token;
pub(crate) mod upload;
pub(crate) mod verify;
