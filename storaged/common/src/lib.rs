//! What the project's daemons and tools share, one concern a module:
//!
//! - [`logging`]: `tracing` to stderr, as text or JSON lines; [`man`] (feature `man`): the
//!   manual pages of a binary, from its command line definition; [`openapi`] (feature
//!   `openapi`): the check of a daemon's checked-in OpenAPI document;
//! - [`config`]: reading a TOML settings file;
//! - [`faults`]: the crash points of the fault matrix; [`corpus`]: the fuzz corpora replayed
//!   by the unit tests;
//! - [`error`]: an error and its causes on one line, for API answers and exit messages;
//! - [`http`]: the HTTP/1.1 + JSON client for TCP and Unix-socket APIs (storaged's REST API,
//!   migrated's, a VMM's), every request with a deadline;
//! - [`signal`]: waiting for SIGTERM or SIGINT;
//! - [`token`]: the cluster token that guards the REST APIs on TCP (and, with the `server`
//!   feature, the axum middleware that checks it);
//! - [`store`] (feature `store`): opening the redb databases the daemons keep their records in;
//! - [`tls`]: TLS with the cluster's host certificates, and the identity a peer's certificate
//!   proves; [`pki`] (feature `pki`): making the CA and the host certificates;
//!   [`tls_listener`] (feature `server`): an axum listener in mutual TLS that tells the
//!   handlers which host called.
#![warn(missing_docs)]

pub mod config;
pub mod corpus;
pub mod error;
pub mod faults;
pub mod http;
pub mod logging;
#[cfg(feature = "man")]
pub mod man;
#[cfg(feature = "openapi")]
pub mod openapi;
#[cfg(feature = "pki")]
pub mod pki;
pub mod signal;
#[cfg(feature = "store")]
pub mod store;
pub mod tls;
#[cfg(feature = "server")]
pub mod tls_listener;
pub mod token;
