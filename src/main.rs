use clap::Parser;

use batchgen::config::{Cli, Command};

fn main() {
    if let Err(e) = run() {
        // `{:#}` prints the whole chain of causes on one line, without a backtrace.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let json = matches!(&cli.command, Command::Serve(a) if a.server.log_format == "json");
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,ort=warn".into());
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        logs.json().init();
    } else {
        logs.init();
    }
    let rt = tokio::runtime::Runtime::new()?;
    match cli.command {
        Command::Serve(args) => rt.block_on(serve(args)),
        Command::Bench(args) => rt.block_on(async {
            let levels = batchgen::bench::run(&args).await.map_err(|e| anyhow::anyhow!("{e}"))?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&levels)?);
            } else {
                print!("{}", batchgen::bench::table(&levels));
            }
            Ok(())
        }),
        Command::Generate(args) => {
            rt.block_on(async { batchgen::client::generate(&args).await.map_err(|e| anyhow::anyhow!("{e}")) })
        }
    }
}

async fn serve(args: batchgen::config::ServeArgs) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let listen = args.server.listen;
    let metrics_listen = args.server.metrics_listen;
    let grace = std::time::Duration::from_secs_f64(args.server.shutdown_grace.max(0.0));
    let loaded = tokio::task::spawn_blocking(move || batchgen::app::load(&args)).await??;
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let metrics_listener = tokio::net::TcpListener::bind(metrics_listen).await?;
    tracing::info!("metrics on http://{}/metrics", metrics_listener.local_addr()?);
    let (metrics_stop, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(batchgen::telemetry::serve(metrics_listener, batchgen::telemetry::install(), async {
        let _ = metrics_stopped.await;
    }));
    tracing::info!("serving on {} (ready {:.2?} after start)", listener.local_addr()?, started.elapsed());
    let state = loaded.state.clone();
    let shutdown = async move {
        shutdown_signal().await;
        batchgen::server::drain(&state, grace).await;
    };
    batchgen::server::serve(listener, loaded.state, shutdown).await?;
    let _ = metrics_stop.send(());
    tracing::info!("stopped");
    Ok(())
}

/// Completes on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => tracing::info!("Ctrl-C: shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
    }
}
