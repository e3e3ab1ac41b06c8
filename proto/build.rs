//! Generates the gRPC code from the .proto files in `proto/` with protox, a pure-Rust
//! protobuf compiler, so that building needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "spiffe/workload.proto",
        "carapace/types/v1/types.proto",
        "carapace/node/v1/node.proto",
        "carapace/admin/v1/admin.proto",
        "carapace/upstream/v1/upstream.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed=proto/{f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;

    // Envoy's Secret Discovery Service (v3) and the messages it carries, from the vendored
    // minimal set under proto/envoy-api (see its README). A second pass so that the type
    // URLs (`Any` packing) and the single include file apply to these packages only; the
    // Envoy comments are dropped, as rustdoc would run their examples as doctests.
    println!("cargo:rerun-if-changed=proto/envoy-api");
    let envoy_files = [
        "envoy/service/secret/v3/sds.proto",
        "envoy/extensions/transport_sockets/tls/v3/secret.proto",
        "envoy/extensions/transport_sockets/tls/v3/tls_spiffe_validator_config.proto",
    ];
    let envoy_fds = protox::compile(envoy_files, ["proto/envoy-api"])?;
    let mut envoy_config = tonic_prost_build::Config::new();
    envoy_config
        .enable_type_names()
        .type_name_domain(["."], "type.googleapis.com")
        .disable_comments(["."]);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .disable_comments(["."])
        .include_file("envoy_sds.rs")
        .compile_fds_with_config(envoy_fds, envoy_config)?;
    Ok(())
}
