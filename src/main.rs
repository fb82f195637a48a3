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
    batchgen::logs::init(matches!(&cli.command, Command::Serve(a) if a.server.log_format == "json"));
    let rt = tokio::runtime::Runtime::new()?;
    match cli.command {
        Command::Serve(args) => rt.block_on(serve(*args)),
        Command::Bench(args) => rt.block_on(async {
            let levels = batchgen::bench::run(&args).await.map_err(|e| anyhow::anyhow!("{e}"))?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&levels)?);
            } else {
                print!("{}", batchgen::bench::table(&levels));
            }
            if let Some(dir) = &args.plot {
                let files = batchgen::bench::plot::write_with(dir, "this run", &levels, args.compare.as_deref())?;
                eprintln!("wrote {} charts into {}", files.len(), dir.display());
            }
            Ok(())
        }),
        Command::Plot(args) => {
            let levels = batchgen::bench::plot::read_run(&args.run)?;
            let name = args.run.file_stem().map_or("run".into(), |s| s.to_string_lossy().into_owned());
            let files = batchgen::bench::plot::write_with(&args.out, &name, &levels, args.compare.as_deref())?;
            for f in files {
                println!("{}", f.display());
            }
            Ok(())
        }
        Command::Eval(args) => {
            let report = batchgen::eval::run(&args)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", batchgen::eval::table(&report));
            }
            Ok(())
        }
        Command::Keygen(args) => {
            let limits = batchgen::server::auth::Limits {
                concurrency: args.concurrency,
                tokens_per_minute: args.tokens_per_minute,
                weight: args.weight,
                min_priority: args.min_priority,
            };
            let (key, line) = batchgen::server::auth::keygen(&args.name, limits).map_err(|e| anyhow::anyhow!(e))?;
            println!("{key}\n{line}");
            Ok(())
        }
        Command::Health(args) => match rt.block_on(batchgen::client::health(&args)) {
            Ok(status) => {
                println!("{status}");
                Ok(())
            }
            Err(why) => {
                eprintln!("{why}");
                std::process::exit(1);
            }
        },
        Command::Generate(args) => {
            rt.block_on(async { batchgen::client::generate(&args).await.map_err(|e| anyhow::anyhow!("{e}")) })
        }
    }
}

async fn serve(args: batchgen::config::ServeArgs) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let grace = std::time::Duration::from_secs_f64(args.server.shutdown_grace.max(0.0));
    let options = args.server.serve_options()?;
    let scheme = match &options.tls {
        Some(tls) if tls.mutual() => "TLS, client certificates required",
        Some(_) => "TLS",
        None => "plaintext",
    };
    // SIGHUP: read the certificates again (open connections keep theirs).
    tokio::spawn({
        let options = options.clone();
        async move {
            let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else { return };
            while hup.recv().await.is_some() {
                options.reload("SIGHUP");
            }
        }
    });
    // Listen first: health checks answer NOT_SERVING while the model loads.
    let listener = tokio::net::TcpListener::bind(args.server.listen).await?;
    let metrics_listener = tokio::net::TcpListener::bind(args.server.metrics_listen).await?;
    let metrics_at = metrics_listener.local_addr()?;
    let (metrics_stop, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(batchgen::telemetry::serve(metrics_listener, batchgen::telemetry::install(), async {
        let _ = metrics_stopped.await;
    }));
    let server = batchgen::server::Server::loading().await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let front = server.clone();
    // The HTTP front closes its listener with the gRPC one and lets its
    // requests finish (the drain ends them within the grace period).
    let (closing, closed) = tokio::sync::watch::channel(false);
    let mut http_at = None;
    let http = match args.server.http_listen.0 {
        Some(at) => {
            let listener = tokio::net::TcpListener::bind(at).await?;
            let scheme = if options.tls.is_some() { "https" } else { "http" };
            http_at = Some(format!("{scheme}://{}", listener.local_addr()?));
            let service = batchgen::server::GenerationService::new(server.clone(), &options);
            let front = batchgen::http::Http::new(service, server.clone(), batchgen::telemetry::install(), &options);
            let mut closed = closed.clone();
            Some(tokio::spawn(batchgen::http::serve(listener, front, options.tls.clone(), async move {
                let _ = closed.wait_for(|c| *c).await;
            })))
        }
        None => None,
    };
    // On SIGTERM the listener closes and every connection gets GOAWAY at
    // once, so balancers and clients send new calls elsewhere; the calls
    // already accepted (running or queued) go on for up to the grace period
    // (the drain), and the server stops when the last of them has ended.
    let shutdown = async move {
        tokio::select! {
            _ = shutdown_signal() => {}
            _ = stopped => {}
        }
        let _ = closing.send(true);
        let draining = tokio::spawn({
            let front = front.clone();
            async move { batchgen::server::drain(&front, grace).await }
        });
        // Health turns NOT_SERVING and new calls are refused before GOAWAY.
        let marked = || front.state().is_none_or(|s| s.draining.load(std::sync::atomic::Ordering::SeqCst));
        while !marked() && !draining.is_finished() {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    };
    let grpc_at = listener.local_addr()?;
    let http_text = http_at.as_deref().map_or("off".to_string(), |a| format!("{a} (OpenAI API, health, metrics)"));
    batchgen::log_fact!(
        "listening",
        text = format!(
            "listening: gRPC on {grpc_at} ({scheme}), HTTP on {http_text}, metrics on http://{metrics_at}/metrics; \
             NOT_SERVING while the model loads"
        ),
        grpc = %grpc_at,
        tls = scheme,
        http = http_at.as_deref().unwrap_or("off"),
        metrics = %metrics_at
    );
    let model = args.model.model.clone();
    let serving = tokio::spawn({
        let server = server.clone();
        async move { batchgen::server::serve(listener, server, &options, shutdown).await }
    });
    match tokio::task::spawn_blocking(move || batchgen::app::load(&args)).await? {
        Ok(loaded) => {
            let batchgen::app::Summary { graph, workers, prefix_cache_mib } = loaded.summary;
            let weights = loaded.state.weights.clone();
            let kv = if loaded.state.kv_dtype.contains("16") { "fp16" } else { "fp32" };
            server.ready(loaded.state).await;
            let seconds = started.elapsed().as_secs_f64();
            let cache = prefix_cache_mib.map_or("off".to_string(), |m| format!("{m} MiB"));
            let ort = batchgen::runtime::ORT_VERSION;
            batchgen::log_fact!(
                "ready",
                text = format!(
                    "ready in {seconds:.2} s: serving {model} on {grpc_at} with the {graph} graph, {weights} weights, \
                     {kv} KV cache, {workers} worker(s), prefix cache {cache}, ONNX Runtime {ort}"
                ),
                seconds,
                model = %model,
                grpc = %grpc_at,
                graph,
                weights = %weights,
                kv_dtype = kv,
                workers,
                prefix_cache_mib,
                onnxruntime = ort
            );
        }
        Err(e) => {
            let _ = stop.send(());
            let _ = serving.await;
            return Err(e.into());
        }
    }
    serving.await??;
    if let Some(http) = http {
        // Its calls ended with the drain; give the connections a moment to close.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), http).await;
    }
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
