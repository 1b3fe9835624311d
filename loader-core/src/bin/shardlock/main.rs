//! The `shardlock` command-line tool: a thin layer over the library.

mod args;
mod cli;
mod commands;
mod output;

use std::process::ExitCode;

use clap::Parser;

use shardlock::Error;

use crate::cli::{Cli, Command};
use crate::commands::audit::audit_cmd;
use crate::commands::bench::bench_cmd;
use crate::commands::inspect::inspect_cmd;
use crate::commands::keyd::keyd_cmd;
use crate::commands::keygen::keygen_cmd;
use crate::commands::pack::{assemble_cmd, pack_cmd};
use crate::commands::rotate::rotate_cmd;
use crate::commands::token::token_cmd;
use crate::commands::upload::upload_cmd;
use crate::commands::verify::verify_cmd;

/// Image decoders allocate through Rust's allocator; inside a decode this one hands them
/// locked memory that is wiped afterwards (everything else goes to the system).
#[global_allocator]
static ALLOC: shardlock::ScratchAlloc = shardlock::ScratchAlloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, Error> {
    match cli.command {
        Command::Keygen(k) => keygen_cmd(k)?,
        Command::Pack(a) => pack_cmd(a)?,
        Command::Token(t) => token_cmd(t)?,
        Command::Bench(a) => bench_cmd(a)?,
        Command::Audit(c) => return audit_cmd(c),
        Command::Inspect(a) => return inspect_cmd(a),
        Command::Upload(a) => upload_cmd(a)?,
        Command::Verify(a) => return verify_cmd(a),
        Command::Rotate(a) => rotate_cmd(a)?,
        Command::Keyd(a) => keyd_cmd(a)?,
        Command::Assemble(a) => assemble_cmd(a)?,
    }
    Ok(ExitCode::SUCCESS)
}
