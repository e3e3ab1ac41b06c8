//! Generates the gRPC code from the .proto files in `proto/` with protox, a pure-Rust
//! protobuf compiler, so that building needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "spiffe/workload.proto",
        "carapace/types/v1/types.proto",
        "carapace/node/v1/node.proto",
        "carapace/admin/v1/admin.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed=proto/{f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
