//! `mayfly`: see `mayfly --help`. All logic lives in the library.

/// mimalloc instead of glibc malloc: the request path allocates many small, short-lived
/// buffers on two or more runtime threads, where glibc's arenas cost about a sixth of the
/// broker's CPU (docs/benchmarks.md, "Allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    mayfly::cli::run()
}
