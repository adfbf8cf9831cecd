//! Compiles `proto/longtake/v1/*.proto` and `proto/etcd/etcd.proto` with protox (pure Rust, no `protoc`) into tonic/prost code
//! in OUT_DIR, and writes the encoded descriptor set that server reflection serves.

use std::path::PathBuf;

use prost::Message;

const PROTOS: [&str; 2] = ["longtake/v1/render.proto", "longtake/v1/worker.proto"];

fn main() {
    println!("cargo:rerun-if-changed=proto");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let fds = match protox::compile(PROTOS, ["proto"]) {
        Ok(fds) => fds,
        Err(e) => panic!("cannot compile the .proto files: {e:?}"),
    };
    std::fs::write(out.join("longtake_descriptor.bin"), fds.encode_to_vec())
        .expect("write the descriptor set");
    tonic_prost_build::configure()
        .compile_fds(fds)
        .expect("generate the tonic/prost code");
    // etcd's KV and Lease API (a wire-compatible subset): clients only, and kept out of the
    // descriptor set that reflection serves.
    let etcd = match protox::compile(["etcd/etcd.proto"], ["proto"]) {
        Ok(fds) => fds,
        Err(e) => panic!("cannot compile etcd/etcd.proto: {e:?}"),
    };
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(etcd)
        .expect("generate the etcd client code");
}
