//! A server with `--weights int8` (and `int8-fp32-head`), or with
//! `--kv-dtype fp16`: it reports the precision, and its greedy output follows
//! float32's (transformers') on the fixture closely — close, not equal,
//! which is why both are opt-in.
mod common;

use batchgen::config::GraphChoice;
use batchgen::graph::{KvDtype, Precision};
use batchgen::pb;
use common::ids;

#[tokio::test]
async fn int8_servers_generate_what_float32_does_almost_everywhere() {
    for precision in [Precision::Int8, Precision::Int8Fp32Head] {
        let mut args = common::serve_args();
        args.model.graph = GraphChoice::Built;
        args.model.weights = precision;
        let mut server = common::start_with(args).await;
        let info = server.client.model_info(pb::ModelInfoRequest {}).await.unwrap().into_inner();
        assert_eq!(info.weights, precision.to_string());
        let (same, total) = greedy_as_float32(&mut server, &precision.to_string()).await;
        assert!(
            same * 10 >= total * 8,
            "{precision}: {same} of {total} greedy tokens as float32 before a first difference"
        );
    }
}

#[tokio::test]
async fn float16_cache_servers_generate_what_float32_does_almost_everywhere() {
    for precision in [Precision::Fp32, Precision::Int8] {
        let mut args = common::serve_args();
        args.model.graph = GraphChoice::Built;
        args.model.weights = precision;
        args.model.kv_dtype = KvDtype::Fp16;
        let mut server = common::start_with(args).await;
        let info = server.client.model_info(pb::ModelInfoRequest {}).await.unwrap().into_inner();
        assert_eq!((info.weights.as_str(), info.kv_dtype.as_str()), (precision.name(), "float16"));
        let (same, total) = greedy_as_float32(&mut server, &format!("{precision} kv-fp16")).await;
        // float16 keys and values alone move the logits by about 1e-3 here;
        // with int8 weights the int8 bound above applies.
        let need = if precision == Precision::Fp32 { 9 } else { 8 };
        assert!(
            same * 10 >= total * need,
            "{precision} kv-fp16: {same} of {total} greedy tokens as float32 before a first difference"
        );
    }
}

/// Over the fixture's greedy cases: how many of float32's (transformers')
/// tokens the server generates position by position until the first
/// difference (after it the two continue from different texts), and of how
/// many.
async fn greedy_as_float32(server: &mut common::TestServer, what: &str) -> (usize, usize) {
    let exp = common::expected();
    let (mut same, mut total) = (0, 0);
    for name in ["one_token", "short", "long", "non_ascii", "emoji", "cjk"] {
        let case = &exp["greedy"][name];
        let want = ids(&case["output_ids"]);
        let seq = server.sequence(common::request(ids(&case["prompt_ids"]), want.len() as u32)).await;
        let got: Vec<u32> = seq.tokens.iter().map(|t| t.id).collect();
        assert!(!got.is_empty(), "{what} {name}");
        same += got.iter().zip(&want).take_while(|(a, b)| a == b).count();
        total += want.len();
    }
    (same, total)
}
