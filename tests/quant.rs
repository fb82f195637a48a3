//! A server with `--weights int8` (and `int8-fp32-head`): it reports the
//! precision, and its greedy output follows float32's (transformers') on the
//! fixture closely — close, not equal, which is why the precision is opt-in.
mod common;

use batchgen::config::GraphChoice;
use batchgen::graph::Precision;
use batchgen::pb;
use common::ids;

#[tokio::test]
async fn int8_servers_generate_what_float32_does_almost_everywhere() {
    let exp = common::expected();
    for precision in [Precision::Int8, Precision::Int8Fp32Head] {
        let mut args = common::serve_args();
        args.model.graph = GraphChoice::Built;
        args.model.weights = precision;
        let mut server = common::start_with(args).await;
        let info = server.client.model_info(pb::ModelInfoRequest {}).await.unwrap().into_inner();
        assert_eq!(info.weights, precision.to_string());
        let (mut same, mut total) = (0, 0);
        for name in ["one_token", "short", "long", "non_ascii", "emoji", "cjk"] {
            let case = &exp["greedy"][name];
            let want = ids(&case["output_ids"]);
            let seq = server.sequence(common::request(ids(&case["prompt_ids"]), want.len() as u32)).await;
            let got: Vec<u32> = seq.tokens.iter().map(|t| t.id).collect();
            assert!(!got.is_empty(), "{precision} {name}");
            // Position by position until the first difference (after it the
            // two continue from different texts).
            same += got.iter().zip(&want).take_while(|(a, b)| a == b).count();
            total += want.len();
        }
        assert!(
            same * 10 >= total * 8,
            "{precision}: {same} of {total} greedy tokens as float32 before a first difference"
        );
    }
}
