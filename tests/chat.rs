//! Chat templates rendered as transformers renders them: every template of
//! `deploy/chat-templates/` and `tests/fixtures/chat/` over several
//! conversations, with and without the generation prompt, equals
//! `apply_chat_template`'s text and token ids saved by
//! `scripts/make_chat_fixture.py` (transformers 4.57), and a conversation the
//! template refuses (`raise_exception`) is refused with its message.
mod common;

use batchgen::chat::{Chat, ChatError, Message};

#[test]
fn every_template_renders_what_transformers_renders_token_for_token() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("tests/fixtures/chat-expected.json")).unwrap())
            .unwrap();
    let tokenizer = batchgen::tokenizer::Tokenizer::from_file(&common::fixture_dir().join("tokenizer.json")).unwrap();
    let cases = expected["cases"].as_array().unwrap();
    assert!(cases.len() >= 40, "{}", cases.len());
    let (mut rendered, mut refused) = (0, 0);
    for case in cases {
        let path = root.join(case["template"].as_str().unwrap());
        let chat = Chat::load(Some(path.to_str().unwrap()), &common::fixture_dir(), "<|endoftext|>").unwrap();
        let messages: Vec<Message> = case["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| Message {
                role: m["role"].as_str().unwrap().into(),
                content: m["content"].as_str().unwrap().into(),
                name: m.get("name").and_then(|n| n.as_str()).map(Into::into),
            })
            .collect();
        let add = case["add_generation_prompt"].as_bool().unwrap();
        let what = format!("{} on {} (generation prompt {add})", case["template"], case["conversation"]);
        let result = chat.render(&messages, add, &Default::default());
        match case.get("error") {
            Some(error) => {
                let Err(ChatError::Render { error: ours, .. }) = &result else { panic!("{what}: {result:?}") };
                assert!(ours.contains(error.as_str().unwrap()), "{what}: {ours} vs {error}");
                refused += 1;
            }
            None => {
                let text = result.unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_eq!(text, case["text"].as_str().unwrap(), "{what}");
                let ids: Vec<u32> =
                    case["ids"].as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as u32).collect();
                assert_eq!(tokenizer.encode(&text).unwrap(), ids, "{what}");
                rendered += 1;
            }
        }
    }
    assert!(rendered >= 40 && refused >= 2, "{rendered} rendered, {refused} refused");
}
