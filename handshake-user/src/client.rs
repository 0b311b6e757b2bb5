//! The CLI side of the local API: `handshake conns`. Asks the daemon over
//! its Unix socket and prints a table, or JSON with `--json`.

use std::{
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{
    api::ConnView,
    cli::{ConnsFlags, OutcomeFlag, RoleFlag},
};

/// Sends one request and returns the daemon's answer.
pub fn request(socket: &Path, request: &str) -> anyhow::Result<String> {
    let mut stream = UnixStream::connect(socket).map_err(|error| {
        anyhow::anyhow!(
            "no daemon answers on {} ({error}); start one with `handshake daemon`",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(format!("{request}\n").as_bytes())?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .with_context(|| format!("reading the daemon's answer on {}", socket.display()))?;
    if answer.trim_start().starts_with("{\"error\"") {
        bail!("the daemon refused {request:?}: {}", answer.trim());
    }
    Ok(answer)
}

pub fn conns(flags: &ConnsFlags) -> anyhow::Result<()> {
    let answer = request(&flags.api_socket, "conns")?;
    let mut views: Vec<ConnView> =
        serde_json::from_str(&answer).context("decoding the daemon's answer")?;
    views.retain(|v| {
        flags
            .port
            .is_none_or(|p| v.local_port == p || v.remote_port == p)
            && flags.role.is_none_or(|r| v.role == role_name(r))
            && flags.outcome.is_none_or(|o| v.outcome == outcome_name(o))
    });
    if flags.json {
        println!("{}", serde_json::to_string_pretty(&views)?);
        return Ok(());
    }
    println!(
        "{:<6} {:<11} {:<41} {:<41} {:>10} {:>10} {:>10} {:>5} {:>8}",
        "ROLE", "OUTCOME", "LOCAL", "REMOTE", "CONNECT", "SYN>SYNACK", "SYNACK>ACK", "RETX", "AGE"
    );
    for v in &views {
        let endpoint = |addr: &str, port: u16| {
            if v.family == "ipv6" {
                format!("[{addr}]:{port}")
            } else {
                format!("{addr}:{port}")
            }
        };
        let us = |d: Option<f64>| d.map_or_else(|| "-".to_owned(), |d| format!("{d:.0}us"));
        println!(
            "{:<6} {:<11} {:<41} {:<41} {:>10} {:>10} {:>10} {:>5} {:>7.1}s",
            v.role,
            v.outcome,
            endpoint(&v.local_addr, v.local_port),
            endpoint(&v.remote_addr, v.remote_port),
            us(v.connect_us),
            us(v.syn_to_synack_us),
            us(v.synack_to_ack_us),
            v.syn_retransmits + v.synack_retransmits,
            v.age_s
        );
    }
    Ok(())
}

const fn role_name(role: RoleFlag) -> &'static str {
    match role {
        RoleFlag::Client => "client",
        RoleFlag::Server => "server",
    }
}

const fn outcome_name(outcome: OutcomeFlag) -> &'static str {
    match outcome {
        OutcomeFlag::Established => "established",
        OutcomeFlag::Refused => "refused",
        OutcomeFlag::Reset => "reset",
        OutcomeFlag::Timeout => "timeout",
        OutcomeFlag::InProgress => "in_progress",
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_missing_daemon_is_one_clear_line() {
        let error = super::request(std::path::Path::new("/nonexistent/handshake.sock"), "conns")
            .unwrap_err()
            .to_string();
        assert!(error.contains("no daemon answers on /nonexistent/handshake.sock"));
        assert!(!error.contains('\n'));
    }
}
