//! storaged: block volumes over NBD with per-host leases.
#![warn(missing_docs)]
