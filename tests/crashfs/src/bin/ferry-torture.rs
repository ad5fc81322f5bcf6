//! `ferry-torture`: power-cut torture of ferry's journal (see `ferry_crashfs::torture`). Prints the
//! seed first and the tally last; exits 1 when any check failed.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match ferry_crashfs::torture::Options::parse(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("ferry-torture: {e}");
            return ExitCode::from(2);
        }
    };
    if ferry_crashfs::torture::run(&opts) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
