//! storaged's client side: everything a process needs to use storaged without linking the
//! daemon (its server framework, its database).
//!
//! - [`protocol`]: the NBD wire format and the project's lease extension, whose messages are
//!   in [`lease`];
//! - [`option`]: the handshake's options as the server decodes them;
//! - [`meta`]: metadata contexts (`base:allocation`) and block status;
//! - [`codec`]: the transmission phase's framing (`tokio_util::codec`), for servers and clients;
//! - [`nbd`]: the lease-aware async NBD client (the VMM's disks, the tests);
//! - [`api`]: the REST API's request and answer types, lease states among them;
//! - [`rest`]: the REST API's client; [`cluster`]: the types of cluster mode's routes;
//! - [`stream`]: an NBD socket, plaintext or TLS, on either side;
//! - [`fuzz`]: the parsers of bytes from another party as the fuzzer drives them.
//!
//! A lease-aware client sends the project option [`protocol::NBD_OPT_LEASE`] (0x4C45_4153)
//! before `NBD_OPT_GO`; a standby connection asks for promotion with
//! [`protocol::NBD_CMD_LEASE_FLIP`]. Both are specified in [`protocol`].
#![warn(missing_docs)]

pub mod api;
pub mod cluster;
pub mod codec;
pub mod fuzz;
pub mod group;
pub mod lease;
pub mod meta;
pub mod nbd;
pub mod option;
pub mod protocol;
pub mod rest;
pub mod stream;
