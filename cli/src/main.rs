//! `unbusy`: the command.
//!
//! ```text
//! unbusy up --provider NAME=URL [--provider NAME=URL ...] [options]   Envoy with unbusy in front
//! unbusy filter > unbusy_envoy.wasm                                   the built-in filter
//! unbusy diagnose URL | --provider NAME=URL ... [--json] [options]     what is wrong, phase by phase
//! ```
//! See [`up`] for `unbusy up` and [`diagnose`] for `unbusy diagnose`. The Envoy filter's `.wasm` is built into the binary (`build.rs`),
//! so `cargo install --path cli` gives a command that works from any directory; Envoy itself
//! comes from `PATH` or `--envoy`.

mod diagnose;
mod private;
mod up;

use std::io::Write;
use std::process::ExitCode;

const USAGE: &str =
    "usage: unbusy up --provider NAME=URL [--provider NAME=URL ...] [--listen ADDR] \
[--admin ADDR] [--config FILE] [--concurrency N] [--envoy PATH] [--filter PATH] [--print-config] \
[--store http://HOST:PORT | --redis URL | --redis-cluster URL,URL...]
       unbusy filter > unbusy_envoy.wasm
       unbusy diagnose [URL ...] [--provider NAME=URL ...] [--key-env VAR] [--model MODEL] [--json] [--cacert FILE]
                       [--dns-timeout D] [--connect-timeout D] [--tls-timeout D]
                       [--headers-timeout D] [--token-timeout D]
         exit: 0 healthy, 3 network/DNS, 4 TLS, 5 proxy, 6 key/balance, 7 rate limited,
               8 overloaded, 9 provider error
       unbusy --version";

/// Why a command failed.
pub(crate) enum Failure {
    /// The command line is wrong (or help was asked for, with an empty message): usage follows.
    Usage(String),
    /// Anything else.
    Other(String),
}

impl From<String> for Failure {
    fn from(e: String) -> Self {
        Failure::Other(e)
    }
}

/// The filter's `.wasm` built into this binary (see `build.rs`), if it was built.
#[cfg(unbusy_embedded_filter)]
pub(crate) const EMBEDDED_FILTER: Option<&[u8]> =
    Some(include_bytes!(env!("UNBUSY_EMBEDDED_FILTER")));
/// The filter's `.wasm` built into this binary (see `build.rs`), if it was built.
#[cfg(not(unbusy_embedded_filter))]
pub(crate) const EMBEDDED_FILTER: Option<&[u8]> = None;

/// What to say when the binary has no filter built in and none was given.
pub(crate) const NO_FILTER: &str = "this unbusy was built without the Envoy filter (it was not \
built when unbusy was compiled): pass --filter PATH, or run `make filter` and build unbusy again \
(`cargo install --path cli`)";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let result = match args.next().as_deref() {
        Some("up") => up::run(args),
        Some("filter") => filter(args),
        Some("diagnose") => diagnose::run(args),
        Some("--version" | "-V") => {
            println!("unbusy {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
        Some("-h" | "--help" | "help") => Err(Failure::Usage(String::new())),
        Some(other) => Err(Failure::Usage(format!("unknown command {other:?}"))),
        None => Err(Failure::Usage("a command is required".into())),
    };
    match result {
        Ok(code) => code,
        Err(Failure::Usage(e)) if e.is_empty() => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Err(Failure::Usage(e)) => {
            eprintln!("unbusy: {e}\n{USAGE}");
            ExitCode::from(2)
        }
        Err(Failure::Other(e)) => {
            eprintln!("unbusy: {e}");
            ExitCode::from(1)
        }
    }
}

/// `unbusy filter`: writes the built-in filter's `.wasm` to stdout (for an Envoy configured by
/// hand, such as `examples/envoy/envoy.yaml`).
fn filter(mut args: impl Iterator<Item = String>) -> Result<ExitCode, Failure> {
    if let Some(arg) = args.next() {
        return Err(Failure::Usage(format!("unbusy filter: unexpected {arg:?}")));
    }
    let wasm = EMBEDDED_FILTER.ok_or(NO_FILTER.to_string())?;
    let mut out = std::io::stdout().lock();
    out.write_all(wasm)
        .and_then(|()| out.flush())
        .map_err(|e| format!("writing the filter: {e}"))?;
    Ok(ExitCode::SUCCESS)
}
