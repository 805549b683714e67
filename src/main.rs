//! The `walhook` binary; everything lives in the library.

fn main() -> std::process::ExitCode {
    walhook::cli::main()
}
