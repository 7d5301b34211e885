//! The exec shim for native replicas (see `macula_workloads::runtime`): started by a node with
//! the replica's spec, it sandboxes itself and becomes the replica.

fn main() {
    macula_workloads::runtime::sandbox::main()
}
