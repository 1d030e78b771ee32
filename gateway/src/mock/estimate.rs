//! The mock's request bodies and the token estimate made from
//! them before the rate limit decides.
//!
//! A file of its own, without HTTP, so that the fuzz target (`fuzz/`) and the
//! corpus replay test (`tests/layer/fuzz_corpora.rs`) run the same code as the
//! gateway: they include it with `#[path]`.

use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::Value;
use tollgate::TokenUsage;

/// Limits on what one mock request may make the mock generate, so that a
/// request cannot make it work for minutes.
pub(crate) const MAX_TOKENS_CAP: u32 = 100_000;
/// The most choices one request may ask for (OpenAI's bound on `n`), over
/// all its prompts: `n` times the number of prompts of a completion given
/// several.
pub(crate) const MAX_CHOICES: u32 = 128;
pub(crate) const MAX_TOKEN_MS: u64 = 10_000;

#[derive(Deserialize)]
struct CompletionRequest {
    model: String,
    prompt: Prompt,
    #[serde(flatten)]
    common: Common,
    /// A chat's field: see [`Unserved`].
    messages: Option<IgnoredAny>,
    /// A chat's tools, which OpenAI's completions do not take.
    tools: Option<IgnoredAny>,
    functions: Option<IgnoredAny>,
    /// Text after the insertion, which the model reads: prompt text.
    suffix: Option<String>,
    /// Candidates generated for each prompt, `n` of them returned; at
    /// least `n`, and not streamed beyond it.
    best_of: Option<u32>,
    #[serde(flatten)]
    unserved: Unserved,
}

/// A completion's `prompt`, in the shapes OpenAI's completions take it.
#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    /// One prompt.
    Text(String),
    /// Several prompts, each answered `n` times.
    Texts(Vec<String>),
    /// One prompt of token ids, one token each.
    Ids(Vec<u32>),
    /// Several prompts of token ids.
    IdLists(Vec<Vec<u32>>),
}

impl Prompt {
    /// The prompt's characters, its token ids, and how many prompts it is
    /// (each answered `n` times).
    fn size(&self) -> (usize, u64, usize) {
        match self {
            Prompt::Text(t) => (t.chars().count(), 0, 1),
            Prompt::Texts(ts) => (ts.iter().map(|t| t.chars().count()).sum(), 0, ts.len()),
            Prompt::Ids(ids) => (0, ids.len() as u64, 1),
            Prompt::IdLists(lists) => (0, lists.iter().map(|l| l.len() as u64).sum(), lists.len()),
        }
    }
}

#[derive(Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<Message>,
    #[serde(flatten)]
    common: Common,
    /// A completion's fields: see [`Unserved`].
    prompt: Option<IgnoredAny>,
    suffix: Option<IgnoredAny>,
    best_of: Option<IgnoredAny>,
    /// The tools the model may call, and the legacy functions: each
    /// definition's JSON, written compactly, is prompt text.
    tools: Option<Value>,
    functions: Option<Value>,
    #[serde(flatten)]
    unserved: Unserved,
}

/// The characters of tool definitions (`tools`, `functions`): each one's
/// JSON, written compactly; a value that is not an array, as one.
fn defined_chars(tools: &Option<Value>) -> usize {
    let chars = |t: &Value| t.to_string().chars().count();
    match tools {
        Some(Value::Array(tools)) => tools.iter().filter(|t| !t.is_null()).map(chars).sum(),
        None | Some(Value::Null) => 0,
        Some(tool) => chars(tool),
    }
}

/// The characters of a call the model made (a `tool_calls` entry's
/// `function` or `custom` object, or a legacy `function_call`): its `name`,
/// `arguments` and `input`, strings as text, other values as their JSON.
fn called_chars(call: &Value) -> usize {
    ["name", "arguments", "input"]
        .iter()
        .map(|field| match call.get(field) {
            Some(Value::String(text)) => text.chars().count(),
            None | Some(Value::Null) => 0,
            Some(other) => other.to_string().chars().count(),
        })
        .sum()
}

/// Fields that the gateway's estimate (tollgate's `OpenAiEstimator`) counts
/// but OpenAI's completions and chat completions do not take, so the mock
/// would not serve them: a Responses request's `instructions` and
/// `max_output_tokens`, a Messages request's `system`, llama.cpp's
/// `n_predict`, and the other route's prompt (`messages` beside a
/// completion's `prompt`, `prompt` beside a chat's `messages`). Such a
/// body is refused, as OpenAI refuses an argument it does not recognise,
/// so that the estimate made before the call and the usage the mock
/// answers count the same prompt and the same maximum. `null` is absence.
#[derive(Deserialize)]
struct Unserved {
    instructions: Option<IgnoredAny>,
    system: Option<IgnoredAny>,
    max_output_tokens: Option<IgnoredAny>,
    n_predict: Option<IgnoredAny>,
}

impl Unserved {
    /// The first field given, with `other`, the other route's prompt.
    fn first(&self, other: (&'static str, &Option<IgnoredAny>)) -> Option<&'static str> {
        [
            other,
            ("instructions", &self.instructions),
            ("system", &self.system),
            ("max_output_tokens", &self.max_output_tokens),
            ("n_predict", &self.n_predict),
        ]
        .into_iter()
        .find_map(|(name, v)| v.is_some().then_some(name))
    }
}

/// OpenAI's answer to an argument its route does not take.
fn unrecognized(name: &str) -> String {
    format!("Unrecognized request argument supplied: {name}")
}

#[derive(Deserialize)]
struct Message {
    #[allow(dead_code)]
    role: String,
    /// A string, an array of content parts, or none (an assistant turn
    /// that only calls tools), as OpenAI's chat messages take it.
    #[serde(default)]
    content: Option<Content>,
    /// An assistant turn's calls of tools: their names and arguments are
    /// prompt text.
    tool_calls: Option<Value>,
    /// An assistant turn's legacy call.
    function_call: Option<Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

/// A content part: `{"type":"text","text":…}` counts its text; other parts
/// (images, audio, files) count nothing, as tollgate's `OpenAiEstimator`
/// counts them by default. The Responses API's text parts (`input_text`,
/// `output_text`), which that estimator counts as text, are refused, as
/// OpenAI's chat completions refuse them.
#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

/// The Responses API's text parts, which a chat message does not take.
const RESPONSES_TEXT_PARTS: [&str; 2] = ["input_text", "output_text"];

impl Message {
    /// A part of a type the chat API does not take but the estimate
    /// counts as text.
    fn responses_part(&self) -> Option<&str> {
        match &self.content {
            Some(Content::Parts(parts)) => parts
                .iter()
                .map(|p| p.kind.as_str())
                .find(|k| RESPONSES_TEXT_PARTS.contains(k)),
            _ => None,
        }
    }

    fn chars(&self) -> usize {
        let calls: usize = match &self.tool_calls {
            Some(Value::Array(calls)) => calls
                .iter()
                .flat_map(|c| [c.get("function"), c.get("custom")])
                .flatten()
                .map(called_chars)
                .sum(),
            _ => 0,
        };
        let legacy = self.function_call.as_ref().map_or(0, called_chars);
        calls + legacy + self.content_chars()
    }

    fn content_chars(&self) -> usize {
        match &self.content {
            Some(Content::Text(t)) => t.chars().count(),
            Some(Content::Parts(parts)) => parts
                .iter()
                .filter(|p| p.kind == "text")
                .filter_map(|p| p.text.as_deref())
                .map(|t| t.chars().count())
                .sum(),
            None => 0,
        }
    }
}

#[derive(Deserialize)]
struct Common {
    max_tokens: Option<u32>,
    /// What OpenAI's chat API now names `max_tokens`; it wins over it here
    /// (the gateway's estimate, tollgate's, takes the larger of the two).
    max_completion_tokens: Option<u32>,
    /// `null` is its absence, as everywhere in OpenAI's API.
    stream: Option<bool>,
    /// Choices to generate (OpenAI's `n`, 1 to [`MAX_CHOICES`]).
    n: Option<u32>,
    mock_completion_tokens: Option<u32>,
    mock_token_ms: Option<u64>,
    /// A streamed answer fails (the model broke) after this many tokens.
    mock_fail_after: Option<u32>,
    stream_options: Option<StreamOptions>,
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// What the mock will generate for one request.
pub(crate) struct Job {
    pub(crate) chat: bool,
    pub(crate) model: String,
    pub(crate) prompt_tokens: u64,
    /// What the request allows; the answer's `finish_reason` is `length`
    /// when the mock produced all of it. (The gateway estimates with
    /// tollgate's `OpenAiEstimator`; the fuzz check holds [`Job::estimate`]
    /// to the documented rule.)
    pub(crate) max_tokens: u32,
    /// Tokens of each choice.
    pub(crate) completion_tokens: u32,
    /// Choices answered, each with `completion_tokens`: `n` for each
    /// prompt (a completion may give several), choice `prompt × n + j`
    /// answering prompt `prompt`, as OpenAI numbers them.
    pub(crate) choices: u32,
    /// Choices generated (and counted in the usage): a completion's
    /// `best_of` candidates for each prompt, or `choices`.
    pub(crate) candidates: u32,
    pub(crate) token_ms: u64,
    pub(crate) stream: bool,
    /// `stream_options.include_usage`: a streamed answer ends with a chunk
    /// that carries the usage.
    pub(crate) include_usage: bool,
    pub(crate) fail_after: Option<u32>,
    /// Where the actual tokens are reported, when the plan has a token budget.
    pub(crate) usage: Option<TokenUsage>,
}

impl Job {
    /// The job a completion (or, with `chat`, a chat completion) body asks for.
    pub(crate) fn parse(chat: bool, body: &[u8]) -> Result<Job, String> {
        let bad = |e: serde_json::Error| format!("invalid request body: {e}");
        if chat {
            let req: ChatRequest = serde_json::from_slice(body).map_err(bad)?;
            if let Some(name) = req.unserved.first(("prompt", &req.prompt)) {
                return Err(unrecognized(name));
            }
            if let Some(name) = [("suffix", &req.suffix), ("best_of", &req.best_of)]
                .into_iter()
                .find_map(|(name, v)| v.is_some().then_some(name))
            {
                return Err(unrecognized(name));
            }
            if let Some(kind) = req.messages.iter().find_map(Message::responses_part) {
                return Err(format!(
                    "Invalid value: '{kind}'. A chat message's text part is of type 'text'"
                ));
            }
            let chars = req.messages.iter().map(Message::chars).sum::<usize>()
                + defined_chars(&req.tools)
                + defined_chars(&req.functions);
            Job::new(true, req.model, (chars, 0, 1), None, &req.common)
        } else {
            let req: CompletionRequest = serde_json::from_slice(body).map_err(bad)?;
            if let Some(name) = req.unserved.first(("messages", &req.messages)) {
                return Err(unrecognized(name));
            }
            if let Some(name) = [("tools", &req.tools), ("functions", &req.functions)]
                .into_iter()
                .find_map(|(name, v)| v.is_some().then_some(name))
            {
                return Err(unrecognized(name));
            }
            let (chars, ids, prompts) = req.prompt.size();
            let suffix = req.suffix.as_deref().map_or(0, |s| s.chars().count());
            Job::new(
                false,
                req.model,
                (chars + suffix, ids, prompts),
                req.best_of,
                &req.common,
            )
        }
    }

    /// Tokens reserved before the call:
    /// `ceil(prompt_chars / 4) + token_ids + max_tokens × candidates`.
    #[allow(dead_code)]
    pub(crate) fn estimate(&self) -> u32 {
        u32::try_from(self.prompt_tokens)
            .unwrap_or(u32::MAX)
            .saturating_add(self.max_tokens.saturating_mul(self.candidates))
    }

    /// The job of a request whose prompt has `chars` characters, `ids`
    /// token ids, and is `prompts` prompts.
    fn new(
        chat: bool,
        model: String,
        (chars, ids, prompts): (usize, u64, usize),
        best_of: Option<u32>,
        c: &Common,
    ) -> Result<Job, String> {
        let max_tokens = c.max_completion_tokens.or(c.max_tokens).unwrap_or(16);
        let completion_tokens = c.mock_completion_tokens.unwrap_or(max_tokens);
        let n = c.n.unwrap_or(1);
        if !(1..=MAX_CHOICES).contains(&n) {
            return Err(format!("n must be from 1 to {MAX_CHOICES}"));
        }
        if prompts == 0 {
            return Err("prompt must not be an empty list".to_owned());
        }
        let best_of = best_of.unwrap_or(n);
        if best_of < n {
            return Err("best_of must be greater than or equal to n".to_owned());
        }
        let stream = c.stream.unwrap_or(false);
        if stream && best_of > n {
            return Err("best_of greater than n cannot be streamed".to_owned());
        }
        let of = |per_prompt: u32| {
            u32::try_from(prompts)
                .ok()
                .and_then(|p| p.checked_mul(per_prompt))
                .filter(|&c| c <= MAX_CHOICES)
                .ok_or_else(|| {
                    format!(
                        "n (or best_of) times the number of prompts must be at most {MAX_CHOICES}"
                    )
                })
        };
        let (choices, candidates) = (of(n)?, of(best_of)?);
        // What the mock generates, for every candidate, stays within the
        // cap whatever `n` and however many prompts. `max_tokens` alone is
        // not capped: a client may allow a model's whole context (128,000
        // for some) and ask the mock for a short answer; the estimate
        // charges what it allows.
        if completion_tokens.saturating_mul(candidates) > MAX_TOKENS_CAP {
            return Err(format!(
                "the tokens generated (mock_completion_tokens, or max_tokens without it), times n (for each prompt), must be at most {MAX_TOKENS_CAP}"
            ));
        }
        let token_ms = c.mock_token_ms.unwrap_or(5);
        if token_ms > MAX_TOKEN_MS {
            return Err(format!("mock_token_ms must be at most {MAX_TOKEN_MS}"));
        }
        Ok(Job {
            chat,
            model,
            prompt_tokens: (chars as u64).div_ceil(4) + ids,
            max_tokens,
            completion_tokens,
            choices,
            candidates,
            token_ms,
            stream,
            include_usage: c
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage == Some(true)),
            fail_after: c.mock_fail_after,
            usage: None,
        })
    }
}
