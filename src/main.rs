//! `mayfly`: see `mayfly --help`. All logic lives in the library.

fn main() -> std::process::ExitCode {
    mayfly::cli::run()
}
