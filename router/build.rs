//! Generates the `beamline.router.v1.Router` gRPC server and client with
//! tonic's manual builder: the messages are hand-written prost structs in
//! `src/grpc.rs` (mirrored in `proto/router.proto` for other languages), so
//! the build needs no `protoc`.

fn main() {
    let decide = tonic_build::manual::Method::builder()
        .name("decide")
        .route_name("Decide")
        .input_type("crate::grpc::DecideRequest")
        .output_type("crate::grpc::DecideResponse")
        .codec_path("tonic_prost::ProstCodec")
        .build();
    let service = tonic_build::manual::Service::builder()
        .name("Router")
        .package("beamline.router.v1")
        .method(decide)
        .build();
    tonic_build::manual::Builder::new().compile(&[service]);
    println!("cargo:rerun-if-changed=build.rs");
}
