//! The `tollgate-gateway` binary: see the library's documentation, or run it
//! with `--help`.

fn main() -> std::process::ExitCode {
    tollgate_gateway::main()
}
