//! The test backend's executable; the server lives in the `surge-echo` crate.

fn main() -> std::process::ExitCode {
    match surge_echo::run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("surge-echo: {message}");
            std::process::ExitCode::FAILURE
        }
    }
}
