//! A deliberately small HTTP/1.1 server for `/metrics`: one request per
//! connection, bounded request size and time. Prometheus needs nothing more,
//! and a full HTTP stack would double the daemon's build.

use std::{sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

const MAX_REQUEST_BYTES: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Renders the body of `/metrics`, or a one-line error.
pub type Render = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// Serves until the future is dropped.
pub async fn serve(listener: TcpListener, render: Render) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let render = Arc::clone(&render);
                tokio::spawn(async move {
                    if let Err(error) = handle(stream, &render).await {
                        tracing::debug!(%error, "metrics request failed");
                    }
                });
            }
            Err(error) => {
                tracing::warn!(%error, "accepting a metrics connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(mut stream: TcpStream, render: &Render) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(512);
    let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let mut buf = [0u8; 1024];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await?;
            if n == 0 || request.len() + n > MAX_REQUEST_BYTES {
                break;
            }
            request.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if !matches!(read, Ok(Ok(()))) {
        return Ok(());
    }
    let line = request.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");

    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => match render() {
            Ok(body) => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", body),
            Err(error) => (
                "500 Internal Server Error",
                "text/plain; charset=utf-8",
                format!("{error}\n"),
            ),
        },
        // For readiness and liveness probes: the daemon answers once its
        // programs are attached, without rendering the metrics.
        ("GET", "/healthz") => ("200 OK", "text/plain; charset=utf-8", "ok\n".to_owned()),
        ("GET", "/") => (
            "200 OK",
            "text/plain; charset=utf-8",
            "handshake: metrics at /metrics\n".to_owned(),
        ),
        ("GET", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found\n".to_owned(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET\n".to_owned(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
