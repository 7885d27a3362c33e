//! OpenAI request bodies: arbitrary bytes posted to `/v1/completions` or
//! `/v1/chat/completions` are either refused with an OpenAI error (a 4xx
//! status and a message) or become a request within the worker's limits;
//! the parser and the checks never panic.
#![no_main]

use engine::generate::ModelCard;
use engine::openai::Limits;
use engine::openai::tokenizer::SimTokenizer;
use engine::openai::types::{ChatCompletionRequest, CompletionRequest};
use engine::openai::validate::Checker;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let limits = Limits::for_context(2048);
    let tokenizer = SimTokenizer::new(129_280);
    let models = [ModelCard {
        id: "deepseek-v4-pro".into(),
        owned_by: "rackscale".into(),
    }];
    let checker = Checker {
        limits: &limits,
        tokenizer: &tokenizer,
        models: &models,
    };
    let result = if which & 1 == 0 {
        match serde_json::from_slice::<CompletionRequest>(body) {
            Ok(req) => checker.completion(req, "fuzz".into()),
            Err(_) => return,
        }
    } else {
        match serde_json::from_slice::<ChatCompletionRequest>(body) {
            Ok(req) => checker.chat(req, "fuzz".into()),
            Err(_) => return,
        }
    };
    match result {
        Ok(v) => {
            let r = &v.request;
            assert!(!r.prompt.is_empty());
            assert!(r.prompt.len() <= limits.max_prompt_tokens as usize);
            assert!(r.max_tokens >= 1 && r.max_tokens <= limits.max_tokens);
            assert!(r.prompt.len() + r.max_tokens as usize <= limits.max_context_tokens as usize);
        }
        Err(e) => {
            let status = e.status.as_u16();
            assert!((400..500).contains(&status), "a refusal is a 4xx: {status}");
            assert!(!e.message.is_empty());
        }
    }
});
