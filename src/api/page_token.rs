//! Page tokens: the codec lives in `sluice-proto` (a library crate) so the
//! fuzz targets under `fuzz/` can reach it; this re-export keeps the API
//! modules' `page_token::…` paths.

pub use sluice_proto::page_token::*;
