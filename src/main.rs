//! The `schematic-sync` binary: parses the command line and hands over to the
//! library, so tests and benchmarks run the same code paths as users.

/// Ingest allocates and frees a small string or map for every JSON field of
/// every message; mimalloc's thread-local free lists do that in about half
/// the time of glibc's malloc, which was a fifth of the CPU spent parsing
/// a batch. Version 2 (the `v2` feature): v3 kept about 8 MB more resident
/// for the same load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    schematic_sync::cli::main()
}
