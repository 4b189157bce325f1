//! The extension pipeline: the registry that resolves extension ids and the
//! invoker that calls them over NATS request/reply.

pub mod invoker;
pub mod registry;
