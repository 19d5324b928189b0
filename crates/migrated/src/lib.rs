//! migrated: the per-host live migration agent.
#![warn(missing_docs)]
