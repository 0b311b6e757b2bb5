//! The `handshake` binary: parses flags, runs the command, and on failure
//! prints the whole error chain on one line and exits non-zero.

use std::{io::IsTerminal as _, process::ExitCode};

use clap::Parser as _;
use handshake_user::{
    cli::{self, client},
    daemon::{self, config::DaemonConfig},
};

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    // The CLI's output is often piped into `head`: a reader that goes away
    // ends the command quietly, as it ends other tools (Rust ignores
    // SIGPIPE, and `println!` panics on the EPIPE that follows). Not the
    // daemon: an API client that hangs up must not kill it.
    if !matches!(args.command, cli::Command::Daemon(_)) {
        // SAFETY: restores the default disposition, before any thread.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let result = match args.command {
        cli::Command::Daemon(flags) => DaemonConfig::try_from(flags).and_then(daemon::run),
        cli::Command::Conns(flags) => client::conns(&flags),
        cli::Command::States(flags) => client::states(&flags),
        cli::Command::Tls(flags) => client::tls(&flags),
        cli::Command::Timewait(flags) => client::timewait(&flags),
        cli::Command::Listeners(flags) => client::listeners(&flags),
        cli::Command::Closes(flags) => client::closes(&flags),
        cli::Command::Status(flags) => client::status(&flags),
        cli::Command::Watch(flags) => cli::watch::run(&flags),
        cli::Command::Completions { shell } => {
            cli::completions(shell);
            Ok(())
        }
        cli::Command::Manpages { dir } => cli::manpages(&dir),
        cli::Command::Prepare { instance, owner } => {
            daemon::persist::prepare(&instance, &owner).map_err(Into::into)
        }
        cli::Command::Reset { instance } => daemon::persist::reset(&instance)
            .map(|removed| println!("instance {instance}: removed {removed} pinned maps and files"))
            .map_err(Into::into),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("handshake: {error:#}");
            ExitCode::FAILURE
        }
    }
}
