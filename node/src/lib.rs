//! kefu-node: the Kefu chat node.
//!
//! A tour, from the wire inwards:
//! - [`adapter`] — transports (WebSocket, raw TCP) behind one `ProtocolAdapter` trait;
//! - [`session`] — one connection: hello, auth ([`auth`], [`token`]), rate limits ([`rate_limit`]),
//!   frame validation ([`protocol`]), a bounded outbound queue ([`conn`]);
//! - [`engine`] — the single writer of conversations, agent load and the queue: assigns `seq`,
//!   applies idempotency, routes ([`router`]), filters ([`filter`]), releases acks and fan-out only once
//!   the [`store`] reports them durable; the offline [`inbox`] holds entries for absent recipients;
//! - [`ownership`] — which node owns a conversation (always this one, until the cluster arrives);
//! - [`api`] — the REST API; [`web`] — the embedded widget, demo site and agent console;
//!   [`server`] wires everything and shuts it down in order;
//! - [`config`], [`metrics`], [`model`], [`error`] — the rest.

pub mod adapter;
pub mod api;
pub mod auth;
pub mod config;
pub mod conn;
pub mod context;
pub mod engine;
pub mod error;
pub mod fd_table;
pub mod filter;
pub mod inbox;
pub mod metrics;
pub mod model;
pub mod ownership;
pub mod protocol;
pub mod rate_limit;
pub mod router;
pub mod server;
pub mod session;
pub mod store;
pub mod token;
pub mod web;

pub use config::Config;
pub use error::{Error, Result};
pub use server::{RunningNode, start};
