//! The gRPC ecosystem around the API: health checking, reflection, rich error
//! details, compression and message limits.
mod common;

use std::time::Duration;

use batchgen::pb::{self, generation_client::GenerationClient};
use common::{request, start};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::codec::CompressionEncoding;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
use tonic_types::StatusExt;

async fn channel(addr: std::net::SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap()
}

async fn health(addr: std::net::SocketAddr, service: &str) -> ServingStatus {
    let mut client = HealthClient::new(channel(addr).await);
    let resp = client.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
    ServingStatus::try_from(resp.status).unwrap()
}

#[tokio::test]
async fn health_is_not_serving_while_loading_and_draining_but_alive() {
    // A server whose model never loads.
    let server = batchgen::server::Server::loading().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let front = server.clone();
    tokio::spawn(
        async move { batchgen::server::serve(listener, front, &Default::default(), std::future::pending()).await },
    );
    assert_eq!(health(addr, "").await, ServingStatus::NotServing);
    assert_eq!(health(addr, "batchgen.v1.Generation").await, ServingStatus::NotServing);
    // Alive while loading: a liveness probe must not restart it.
    assert_eq!(health(addr, "liveness").await, ServingStatus::Serving);
    let mut client = GenerationClient::connect(format!("http://{addr}")).await.unwrap();
    let status = client.generate(request(vec![1], 1)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(status.message(), "the model is still loading; retry shortly");
    assert!(status.get_details_retry_info().is_some());

    // A loaded one: SERVING, then NOT_SERVING once draining.
    let s = start().await;
    assert_eq!(health(s.addr, "").await, ServingStatus::Serving);
    assert_eq!(health(s.addr, "batchgen.v1.Generation").await, ServingStatus::Serving);
    batchgen::server::drain(&s.server, Duration::ZERO).await;
    assert_eq!(health(s.addr, "").await, ServingStatus::NotServing);
    assert_eq!(health(s.addr, "batchgen.v1.Generation").await, ServingStatus::NotServing);
    // ... and while draining.
    assert_eq!(health(s.addr, "liveness").await, ServingStatus::Serving);
}

#[tokio::test]
async fn reflection_lists_and_describes_the_services() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let s = start().await;
    let mut client = ServerReflectionClient::new(channel(s.addr).await);
    let requests = vec![
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        },
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol("batchgen.v1.Generation".into())),
        },
    ];
    let mut responses = client.server_reflection_info(tokio_stream::iter(requests)).await.unwrap().into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = responses.next().await.unwrap().unwrap().message_response
    else {
        panic!("no service list")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in ["batchgen.v1.Generation", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
    let Some(MessageResponse::FileDescriptorResponse(files)) =
        responses.next().await.unwrap().unwrap().message_response
    else {
        panic!("no file descriptor")
    };
    assert!(!files.file_descriptor_proto.is_empty());
}

#[tokio::test]
async fn errors_carry_bad_request_and_retry_info_details() {
    let mut s = start().await;
    let status = s.client.generate(request(vec![10, 60000], 4)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let bad = status.get_details_bad_request().expect("BadRequest details");
    assert_eq!(bad.field_violations.len(), 1);
    assert_eq!(bad.field_violations[0].field, "prompt_token_ids");
    assert!(bad.field_violations[0].description.contains("50257"), "{:?}", bad.field_violations[0]);

    let mut args = common::serve_args();
    args.limits.max_queue = 1;
    args.limits.max_batch_size = 1;
    let busy = common::start_with(args).await;
    let mut r = request(vec![464; 20], 150);
    r.stopping.as_mut().unwrap().ignore_eos = true;
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let (mut c, r) = (busy.client.clone(), r.clone());
            tokio::spawn(async move { c.generate(r).await })
        })
        .collect();
    let mut retry = None;
    for call in calls {
        if let Err(status) = call.await.unwrap() {
            assert_eq!(status.code(), Code::ResourceExhausted);
            retry = status.get_details_retry_info();
        }
    }
    let retry = retry.expect("an overloaded call carries RetryInfo");
    assert_eq!(retry.retry_delay, Some(Duration::from_secs(1)));
}

#[tokio::test]
async fn gzip_both_ways_and_oversize_messages_get_a_clear_error() {
    let s = start().await;
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{}", s.addr)).unwrap().connect().await.unwrap();
    let mut gz = GenerationClient::new(channel)
        .send_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Gzip)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let resp = gz.generate(request(vec![464; 30], 5)).await.unwrap();
    assert_eq!(resp.metadata().get("grpc-encoding").and_then(|v| v.to_str().ok()), Some("gzip"));
    assert_eq!(resp.into_inner().sequences[0].tokens.len(), 5);
    // A prompt of the whole context as text is far below the limit (1 MiB in
    // tests); a 2 MiB message is refused with a message that says so.
    let huge = pb::GenerateRequest { prompt: "x".repeat(2 << 20), ..Default::default() };
    let status = GenerationClient::connect(format!("http://{}", s.addr))
        .await
        .unwrap()
        .max_encoding_message_size(64 << 20)
        .generate(huge)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("message length too large"), "{}", status.message());
}
