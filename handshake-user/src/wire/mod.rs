//! The local API's vocabulary, shared by the daemon that answers and the
//! CLI that asks: the request words, the JSON views, and the names both
//! print (address families, roles, outcomes, TCP states). Plain data: no
//! I/O, nothing from the daemon or the kernel.

mod names;
mod views;

use std::fmt;

pub use names::{Family, Outcome, Role, STATES, Source, state_by_name, state_name};
pub use views::{
    Attribution, CloseGroupView, ConnView, Endpoint, Endpoints, Forecast, ListenerView, ProbeView,
    SocketView, StatesView, StatusView, TableView, TimeWaitView, TlsView,
};

/// Where the daemon listens and the CLI asks, unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/handshake/handshake.sock";

/// TIME_WAIT endpoints and forecasts a `timewait` request lists when it
/// names no number.
pub const DEFAULT_TOP: usize = 10;

/// One request: a single line on the API socket, answered with one line
/// of JSON (or `{"error": ...}`), or with the metrics text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Recent and in-progress handshakes: [`ConnView`]s.
    /// The newest `newest` of them only, when given: for readers that
    /// ask often (`handshake watch`).
    Conns { newest: Option<usize> },
    /// Recent TLS hellos: [`TlsView`]s.
    Tls,
    /// A fresh census of every watched namespace: [`StatesView`]s.
    States,
    /// A fresh census: [`TimeWaitView`]s with `top` entries per list.
    TimeWait { top: usize },
    /// A fresh census listing the sockets in `state` (kernel number):
    /// [`SocketView`]s.
    Sockets { state: u32 },
    /// A fresh census of every listener: [`ListenerView`]s.
    Listeners,
    /// Listeners and workloads by how their connections closed, the `top`
    /// slowest or most reset: [`CloseGroupView`]s.
    Closes { top: usize },
    /// The daemon about itself: [`StatusView`].
    Status,
    /// What `/metrics` serves, in Prometheus text format (not JSON): for
    /// readers on the host that should not open a TCP connection, which
    /// the daemon would count as a handshake.
    Metrics,
}

/// A request line the daemon cannot answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("sockets needs a TCP state, e.g. close_wait")]
    SocketsNeedState,
    #[error("unknown request {0:?}")]
    Unknown(String),
}

impl Request {
    /// Reads one request line; a `timewait` count that is not a number
    /// lists [`DEFAULT_TOP`].
    pub fn parse(line: &str) -> Result<Self, RequestError> {
        let mut words = line.split_whitespace();
        let word = words.next().unwrap_or("");
        let argument = words.next();
        match word {
            "conns" => Ok(Self::Conns {
                newest: argument.and_then(|n| n.parse().ok()),
            }),
            "tls" => Ok(Self::Tls),
            "states" => Ok(Self::States),
            "metrics" => Ok(Self::Metrics),
            "status" => Ok(Self::Status),
            "listeners" => Ok(Self::Listeners),
            "closes" => Ok(Self::Closes {
                top: argument.and_then(|n| n.parse().ok()).unwrap_or(DEFAULT_TOP),
            }),
            "timewait" => Ok(Self::TimeWait {
                top: argument.and_then(|n| n.parse().ok()).unwrap_or(DEFAULT_TOP),
            }),
            "sockets" => argument
                .and_then(state_by_name)
                .map(|state| Self::Sockets { state })
                .ok_or(RequestError::SocketsNeedState),
            other => Err(RequestError::Unknown(other.to_owned())),
        }
    }
}

/// The request line, as [`Request::parse`] reads it.
impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Conns { newest: None } => f.write_str("conns"),
            Self::Conns { newest: Some(n) } => write!(f, "conns {n}"),
            Self::Tls => f.write_str("tls"),
            Self::States => f.write_str("states"),
            Self::Metrics => f.write_str("metrics"),
            Self::Status => f.write_str("status"),
            Self::Listeners => f.write_str("listeners"),
            Self::Closes { top } => write!(f, "closes {top}"),
            Self::TimeWait { top } => write!(f, "timewait {top}"),
            Self::Sockets { state } => write!(f, "sockets {}", state_name(*state)),
        }
    }
}

/// The answer to a request the daemon refused.
pub fn error_body(message: &str) -> String {
    serde_json::json!({ "error": message }).to_string()
}

/// The message of an answer [`error_body`] made, if it is one.
pub fn error_of(answer: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(answer.trim()).ok()?;
    Some(value.get("error")?.as_str()?.to_owned())
}

#[cfg(test)]
mod tests {
    use handshake_common::abi::tcp_state;

    use super::*;

    #[test]
    fn every_request_reads_back_as_written() {
        for request in [
            Request::Conns { newest: None },
            Request::Conns { newest: Some(500) },
            Request::Tls,
            Request::States,
            Request::Metrics,
            Request::Status,
            Request::Listeners,
            Request::Closes { top: 4 },
            Request::TimeWait { top: 3 },
            Request::Sockets {
                state: tcp_state::CLOSE_WAIT,
            },
        ] {
            assert_eq!(Request::parse(&request.to_string()), Ok(request));
        }
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        assert_eq!(
            Request::parse("sockets"),
            Err(RequestError::SocketsNeedState)
        );
        assert_eq!(
            Request::parse("sockets half-open"),
            Err(RequestError::SocketsNeedState)
        );
        assert_eq!(
            Request::parse("gossip").unwrap_err().to_string(),
            "unknown request \"gossip\""
        );
        assert_eq!(
            Request::parse("timewait lots"),
            Ok(Request::TimeWait { top: DEFAULT_TOP })
        );
        let body = error_body("no census");
        assert_eq!(error_of(&body).as_deref(), Some("no census"));
        assert_eq!(error_of("[]"), None);
    }
}
