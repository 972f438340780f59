//! `sluice-sim`: a fleet of simulated MQTT devices, Sluice's load generator.
//!
//! Parses the command line, runs the fleet (the library does the work),
//! prints the report and exits with its status. Ctrl-C stops the devices
//! gracefully (drain, disconnect, report); a second Ctrl-C exits at once.

use std::io::IsTerminal;
use std::process::ExitCode;

use sluice_simulator::{NoDeviceConnected, parse_args, run_until};

// The load generator shares the machine with the server it measures; a
// faster allocator leaves more of it to the server.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status when no device could connect at all.
const EXIT_NO_CONNECTION: u8 = 3;
/// Exit status when Ctrl-C is pressed a second time.
const EXIT_INTERRUPTED: i32 = 130;

fn main() -> ExitCode {
    let mut config = match parse_args(std::env::args_os()) {
        Ok(config) => config,
        // Prints help, version or the usage error; exits 0 or 2.
        Err(e) => e.exit(),
    };
    config.progress |= std::io::stderr().is_terminal();
    let json = config.json;
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = match runtime.block_on(run_until(config, interrupted())) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("error: {e:#}");
            return if e.downcast_ref::<NoDeviceConnected>().is_some() {
                ExitCode::from(EXIT_NO_CONNECTION)
            } else {
                ExitCode::FAILURE
            };
        }
    };
    if json {
        println!("{}", report.to_json());
    } else {
        println!("{report}");
    }
    for problem in report.problems() {
        eprintln!("error: {problem}");
    }
    ExitCode::from(report.exit_status())
}

/// Completes on the first Ctrl-C; from then on a second one exits at once.
async fn interrupted() {
    if tokio::signal::ctrl_c().await.is_err() {
        // No signal handling here: only --duration/--count end the run.
        return std::future::pending().await;
    }
    eprintln!("interrupted: stopping, draining and disconnecting (Ctrl-C again to quit now)");
    tokio::spawn(async {
        if tokio::signal::ctrl_c().await.is_ok() {
            std::process::exit(EXIT_INTERRUPTED);
        }
    });
}
