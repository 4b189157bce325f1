//! The router's integration tests: a real nats-server, the router (and, where
//! the path needs them, the gateway and the worker with its sample extension
//! services) as processes, spans over real OTLP/gRPC, metrics scraped.

mod extensions;
mod grpc;
mod policy_file;
mod support;
