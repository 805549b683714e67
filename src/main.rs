//! The `walhook` binary; everything lives in the library.

/// mimalloc: fewer cycles per allocation than glibc's malloc on walhook's many small,
/// short-lived buffers, and less memory held back across threads. Built with `no_thp`:
/// with transparent huge pages, its arenas grew the idle footprint from 13 to 26 MiB.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc v3's `mi_option_e` (libmimalloc-sys does not export
/// it for v3). Re-check the enum when bumping libmimalloc-sys.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> std::process::ExitCode {
    // Return freed pages to the OS at once rather than after 1 s on the next allocation of the
    // same thread: after a burst, idle tokio workers otherwise keep its peak resident for good
    // (measured: 50 MiB idle after a 100k-event drain, 31 MiB with immediate purging, at no
    // measurable CPU cost; see BENCHMARKS.md). MIMALLOC_PURGE_DELAY still overrides this.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a plain integer option; valid at any time.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
    }
    walhook::cli::main()
}
