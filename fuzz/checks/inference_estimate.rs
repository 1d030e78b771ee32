//! The reference server's token estimate of hostile request bodies
//! (`gateway/src/mock/estimate.rs`).
//!
//! Shared by the `inference_estimate` fuzz target and
//! `tests/layer/fuzz_corpora.rs`; the module that includes this file declares
//! the `estimate` module beside it (the fuzz target at its crate root).
//!
//! Input: bit 0 of byte 0 picks the route (chat completions or completions);
//! the rest is the body.

use serde_json::Value;

use super::estimate::{Job, MAX_CHOICES, MAX_TOKEN_MS, MAX_TOKENS_CAP};

/// The largest body the server reads.
const MAX_BODY: usize = 1 << 20;

/// Checks that an accepted body is estimated as documented,
/// `ceil(prompt_chars / 4) + token_ids + max_tokens × candidates`, within the
/// caps, with a prompt part never more than the body's size can account for.
pub(crate) fn check(data: &[u8]) {
    let Some((&flags, body)) = data.split_first() else {
        return;
    };
    if body.len() > MAX_BODY {
        return;
    }
    let chat = flags & 1 == 1;
    let job = match Job::parse(chat, body) {
        Ok(job) => job,
        Err(message) => {
            assert!(!message.is_empty());
            return;
        }
    };
    assert!((1..=MAX_CHOICES).contains(&job.choices));
    assert!((job.choices..=MAX_CHOICES).contains(&job.candidates));
    assert!(!job.stream || job.candidates == job.choices);
    // What the mock generates is capped; what the client allows
    // (`max_tokens`) is not, and the estimate charges it.
    assert!(
        u64::from(job.completion_tokens) * u64::from(job.candidates) <= u64::from(MAX_TOKENS_CAP)
    );
    assert!(job.token_ms <= MAX_TOKEN_MS);

    // The same body read as plain JSON gives the same prompt and maximum.
    // serde_json skips the values of unknown fields without checking their
    // strings (invalid UTF-8, lone surrogate escapes), so an accepted body
    // need not be strict JSON: what it holds there is in no field the
    // estimate reads, and only the bounds below apply to it.
    if let Ok(value) = serde_json::from_slice::<Value>(body) {
        agrees_with_plain_json(&job, chat, &value);
    }

    let expected = job
        .prompt_tokens
        .saturating_add(u64::from(job.max_tokens) * u64::from(job.candidates))
        .min(u64::from(u32::MAX));
    assert_eq!(u64::from(job.estimate()), expected);
    // A prompt character takes at least one byte of body (a quarter of a
    // token), a token id at least two (a digit and a comma or bracket), a
    // tool definition's character, written compactly, at least a quarter
    // of one (`1e15,` is `1000000000000000.0,`): a client cannot make the
    // prompt's part of the estimate exceed what its body holds.
    assert!(job.prompt_tokens <= body.len() as u64);
}

/// Checks the job against the prompt and `max_tokens` that `value` holds.
fn agrees_with_plain_json(job: &Job, chat: bool, value: &Value) {
    let (chars, ids, prompts) = if chat {
        let chars = value["messages"]
            .as_array()
            .expect("a chat body has messages")
            .iter()
            .map(|m| content_chars(&m["content"]) + calls_chars(m))
            .sum::<usize>()
            + defined_chars(&value["tools"])
            + defined_chars(&value["functions"]);
        (chars, 0, 1)
    } else {
        let (chars, ids, prompts) = prompt_size(&value["prompt"]);
        let suffix = value["suffix"].as_str().map_or(0, |s| s.chars().count());
        (chars + suffix, ids, prompts)
    };
    let max_tokens = value
        .get("max_completion_tokens")
        .and_then(Value::as_u64)
        .or_else(|| value.get("max_tokens").and_then(Value::as_u64))
        .unwrap_or(16);
    assert_eq!(job.prompt_tokens, (chars as u64).div_ceil(4) + ids);
    assert_eq!(u64::from(job.max_tokens), max_tokens);
    let n = value.get("n").and_then(Value::as_u64).unwrap_or(1);
    assert_eq!(u64::from(job.choices), n * prompts);
    let best_of = value.get("best_of").and_then(Value::as_u64).unwrap_or(n);
    assert_eq!(u64::from(job.candidates), best_of * prompts);
}

/// A completion's `prompt`: its characters, its token ids, and how many
/// prompts it is (a string or token ids: one; strings or lists of token
/// ids: each one).
fn prompt_size(prompt: &Value) -> (usize, u64, u64) {
    match prompt {
        Value::String(s) => (s.chars().count(), 0, 1),
        Value::Array(items) if items.iter().all(Value::is_string) => (
            items
                .iter()
                .filter_map(Value::as_str)
                .map(|s| s.chars().count())
                .sum(),
            0,
            items.len() as u64,
        ),
        Value::Array(items) if items.iter().all(Value::is_u64) => (0, items.len() as u64, 1),
        Value::Array(lists) => (
            0,
            lists
                .iter()
                .map(|l| l.as_array().expect("a list of token id lists").len() as u64)
                .sum(),
            lists.len() as u64,
        ),
        other => panic!("a completion's prompt is text, texts or token ids, not {other}"),
    }
}

/// The characters of a chat message's `content`: a string's, the text parts'
/// of an array of content parts, none when it is null or absent.
fn content_chars(content: &Value) -> usize {
    match content {
        Value::String(s) => s.chars().count(),
        Value::Array(parts) => parts
            .iter()
            .filter(|p| p["type"] == "text")
            .filter_map(|p| p["text"].as_str())
            .map(|t| t.chars().count())
            .sum(),
        Value::Null => 0,
        other => panic!("a message's content is a string, parts or null, not {other}"),
    }
}

/// The characters of tool definitions: each one's JSON, written compactly.
fn defined_chars(tools: &Value) -> usize {
    let chars = |t: &Value| t.to_string().chars().count();
    match tools {
        Value::Array(tools) => tools.iter().filter(|t| !t.is_null()).map(chars).sum(),
        Value::Null => 0,
        tool => chars(tool),
    }
}

/// The characters of a message's calls of tools: each call's name,
/// arguments and input (strings as text, other values as JSON).
fn calls_chars(message: &Value) -> usize {
    let call = |c: &Value| -> usize {
        ["name", "arguments", "input"]
            .iter()
            .map(|f| match &c[f] {
                Value::String(s) => s.chars().count(),
                Value::Null => 0,
                other => other.to_string().chars().count(),
            })
            .sum()
    };
    let tool_calls: usize = message["tool_calls"].as_array().map_or(0, |calls| {
        calls
            .iter()
            .flat_map(|c| [&c["function"], &c["custom"]])
            .filter(|f| !f.is_null())
            .map(call)
            .sum()
    });
    let legacy = if message["function_call"].is_null() {
        0
    } else {
        call(&message["function_call"])
    };
    tool_calls + legacy
}
