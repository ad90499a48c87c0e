//! Chunked tokenization and the chat template against ids from the Python `tokenizers` package
//! (reference/make_fixtures_tokenizer.py) on the same tokenizer.json.

use sha2::{Digest, Sha256};
use xsam::task::prompt::{chat_prompt, encode_chunks, PromptToken};

fn fixture() -> serde_json::Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/tokenizer_cases.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn chunked_encoding_matches_python_tokenizers() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    xsam::tokenizer::write_tokenizer(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let sha = format!("{:x}", Sha256::digest(&bytes));
    assert_eq!(
        sha,
        fx["tokenizer_sha256"].as_str().unwrap(),
        "the synthesised tokenizer.json changed: regenerate the fixture (see the script's docstring)"
    );
    let tok = xsam::tokenizer::load_tokenizer(&path).unwrap();
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<i64> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect();
        let got: Vec<i64> = encode_chunks(&tok, text, 1)
            .unwrap()
            .into_iter()
            .map(|t| match t {
                PromptToken::Id(i) => i as i64,
                PromptToken::Image => -200,
                PromptToken::Region(_) => -300,
            })
            .collect();
        assert_eq!(got, want, "prompt {text:?}");
    }
    for d in fx["decode"].as_array().unwrap() {
        let ids: Vec<u32> = d["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            tok.decode(&ids, false).unwrap(),
            d["text"].as_str().unwrap()
        );
    }
}

#[test]
fn chat_template_and_region_numbering() {
    assert_eq!(
        chat_prompt("Q?"),
        "<|user|>\n<image>\nQ?<|end|>\n<|assistant|>\n"
    );
    let tok = xsam::tokenizer::synthesize_tokenizer().unwrap();
    let p = encode_chunks(&tok, &chat_prompt("<p><region></p>, <p><region></p>"), 1).unwrap();
    let tags: Vec<_> = p
        .iter()
        .filter(|t| !matches!(t, PromptToken::Id(_)))
        .collect();
    assert_eq!(
        tags,
        [
            &PromptToken::Image,
            &PromptToken::Region(0),
            &PromptToken::Region(1)
        ]
    );
    assert_eq!(p[0], PromptToken::Id(1));
}
