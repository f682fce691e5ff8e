//! The `schematic-sync` binary: parses the command line and hands over to the
//! library, so tests and benchmarks run the same code paths as users.

fn main() -> std::process::ExitCode {
    schematic_sync::cli::main()
}
