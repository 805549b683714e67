//! The `walhook` binary; everything lives in the library.

/// mimalloc: fewer cycles per allocation than glibc's malloc on walhook's many small,
/// short-lived buffers, and less memory held back across threads.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    walhook::cli::main()
}
