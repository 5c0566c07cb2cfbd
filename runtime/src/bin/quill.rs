//! The `quill` binary: parses the command line and hands it to [`quill::cli`].

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = quill::cli::Cli::parse();
    match quill::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
