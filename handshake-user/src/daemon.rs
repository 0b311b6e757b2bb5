//! `handshake daemon`: wiring and lifetime. Binds the metrics address
//! first (a clash fails before the kernel is touched), loads and attaches
//! the programs, serves until SIGINT/SIGTERM, then detaches everything.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use anyhow::{Context as _, bail};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    config::DaemonConfig,
    http,
    loader::Observer,
    metrics::{self, SelfStats},
};

pub fn run(config: DaemonConfig) -> anyhow::Result<()> {
    let listener = std::net::TcpListener::bind(config.metrics_addr)
        .with_context(|| format!("cannot listen on --metrics-addr {}", config.metrics_addr))?;
    listener.set_nonblocking(true)?;

    let mut observer = Observer::load().context("loading the kernel programs")?;
    let counters = observer.take_counters()?;
    observer.attach_tracepoint();
    observer.attach_interfaces(
        &config.netns,
        &config.interfaces,
        config.ingress_hook,
        config.xdp_mode,
    )?;
    if observer.attachments().iter().all(|a| !a.attached) {
        let reasons: Vec<_> = observer
            .attachments()
            .iter()
            .map(|a| format!("{}: {}", a.probe, a.detail))
            .collect();
        observer.detach(&config.netns)?;
        bail!("no probe could be attached ({})", reasons.join("; "));
    }

    let attachments = observer.attachments().to_vec();
    let map_read_errors = Arc::new(AtomicU64::new(0));
    let render: http::Render = {
        let map_read_errors = Arc::clone(&map_read_errors);
        Arc::new(move || match counters.snapshot() {
            Ok(snapshot) => Ok(metrics::render(
                &snapshot,
                &attachments,
                SelfStats {
                    map_read_errors: map_read_errors.load(Ordering::Relaxed),
                },
            )),
            Err(error) => {
                map_read_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%error, "reading the counter maps failed");
                Err(format!("reading the counter maps failed: {error}"))
            }
        })
    };

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let served = runtime.block_on(async {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        tracing::info!(
            addr = %config.metrics_addr,
            netns = config.netns.name(),
            interfaces = ?config.interfaces,
            "serving metrics"
        );
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sigint = signal(SignalKind::interrupt())?;
        tokio::select! {
            () = http::serve(listener, render) => {}
            _ = sigterm.recv() => tracing::info!("SIGTERM: detaching"),
            _ = sigint.recv() => tracing::info!("SIGINT: detaching"),
        }
        Ok::<_, anyhow::Error>(())
    });
    drop(runtime);
    observer
        .detach(&config.netns)
        .context("detaching the kernel programs")?;
    tracing::info!("detached; exiting");
    served
}
