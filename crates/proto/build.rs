//! Compiles `proto/fleet.proto` with protox (a pure-Rust protobuf compiler),
//! so building Fleet never needs `protoc` on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let file = proto_dir.join("fleet.proto");
    // Relative to this package: cargo then checks the file of the checkout
    // being built, also when two checkouts share one target dir (an
    // absolute path would keep naming the first one's file).
    println!("cargo:rerun-if-changed=../../proto/fleet.proto");
    let descriptors = protox::compile([&file], [&proto_dir])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(descriptors)?;
    Ok(())
}
