//! `batchgen bench --roofline` against the real server: the roofline is
//! measured with the ONNX Runtime the tests use, each closed-loop level gets
//! its bound, and the bound is the lower of the compute and bandwidth ones.
mod common;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_closed_loop_level_gets_the_bound_measured_here() {
    let server = common::start().await;
    use clap::Parser;
    let cli = batchgen::config::Cli::try_parse_from([
        "batchgen",
        "bench",
        "--target",
        &format!("http://{}", server.addr),
        "--roofline",
        "--roofline-threads",
        "1",
        "--concurrency",
        "4",
        "--requests",
        "4",
        "--prompt-tokens",
        "8",
        "--new-tokens",
        "8",
    ])
    .unwrap();
    let batchgen::config::Command::Bench(args) = cli.command else { panic!("not bench") };
    let levels = batchgen::bench::run(&args).await.unwrap();
    assert_eq!(levels.len(), 2, "the sequential baseline and concurrency 4");
    for l in &levels {
        let bound = l.bound_tokens_per_second.expect("a bound per closed-loop level");
        assert!(bound.is_finite() && bound > 0.0, "{bound}");
    }
    let table = batchgen::bench::table(&levels);
    assert!(table.contains("% of the bound"), "{table}");
}

#[test]
fn the_bound_is_the_lower_of_compute_and_bandwidth() {
    let runtime =
        batchgen::runtime::init(std::env::var_os("ORT_DYLIB_PATH").as_deref().map(std::path::Path::new)).unwrap();
    let shape = batchgen::bench::roofline::ModelShape { layers: 2, width: 32, inner: 128, vocab: 50257 };
    let r = batchgen::bench::roofline::measure(
        &runtime.env,
        1,
        shape,
        batchgen::bench::roofline::Precision::Int8Fp32Head,
        2,
        &[1, 8],
        100,
    )
    .unwrap();
    assert!(r.machine.fp32_ops > 1e8 && r.machine.int8_ops > 1e8 && r.machine.bandwidth > 1e6, "{:?}", r.machine);
    for b in &r.bounds {
        assert_eq!(b.tokens_per_second, b.compute_tokens_per_second.min(b.bandwidth_tokens_per_second));
        assert!(b.gemms_tokens_per_second > 0.0);
    }
    // More rows share one read of the weights: a higher bandwidth bound.
    assert!(r.bounds[1].bandwidth_tokens_per_second > r.bounds[0].bandwidth_tokens_per_second);
    assert!(r.table().contains("bound tok/s"));
}
