//! The gateway's integration tests, and the cross-process tests of the whole
//! path: real nats-server, real processes, real HTTP, spans over real OTLP/gRPC.

mod api;
mod durability;
mod e2e;
mod front_door;
mod fuzz;
mod hygiene;
mod process;
mod security;
mod traces_pipeline;
