//! Generated code only: the `fleet.v1` protobuf messages and the tonic
//! clients and servers for the `Control` and `Raft` services.

#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("fleet.v1");
}

pub use v1::*;
