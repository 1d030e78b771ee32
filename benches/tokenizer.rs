//! What counting prompt tokens with OpenAI's BPE (feature `tiktoken`) costs
//! against the default `ceil(chars / 4)`, and how far the default is from the
//! true count.
//!
//! Run with `cargo bench --bench tokenizer --features tiktoken`. Printed once,
//! before criterion's groups:
//!
//! - `load`: the first `OpenAiEstimator::tokenizer(..)` of each encoding in
//!   the process, which loads its ranks;
//! - `accuracy`: for a small corpus (English prose, Rust code, JSON, Chinese,
//!   emoji, numbers, and a German and a Russian text), characters, the
//!   default's `ceil(chars / 4)`, the true tokens in `cl100k_base` and
//!   `o200k_base`, and the ratio default / true (below 1: the default
//!   undercounts, and lets more through than the budget says);
//! - `hostile`: the fastest of three `estimate_json` of a body of about
//!   1 MiB (the default `max_body_bytes`) that is the corpus over and over
//!   (for comparison), or one long run of spaces, of random letters or of
//!   punctuation, the worst cases for the BPE's split pattern and merges; and
//!   the text alone encoded whole by tiktoken-rs, as the estimator does not
//!   (it encodes long texts in pieces of 8 KiB).
//!
//! Criterion then times `OpenAiEstimator::estimate_json` of a chat body of
//! about 1 KB and one of about 16 KB (the corpus's texts as messages) with
//! each counter: `quarter_chars` (the default), `cl100k_base`, `o200k_base`.

// criterion's macros make undocumented functions.
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use serde_json::json;
use tollgate::openai::{OpenAiEstimator, Tokenizer};

const PROSE: &str = "Rate limiting protects a shared service from any single caller taking more than \
its share. A gateway in front of a language model has a harder job than most: one request may \
ask for a few tokens or for tens of thousands, so counting requests alone says little about the \
load they bring. The usual answer is a token budget per key, charged before the request is sent \
on, with an estimate of the prompt's length plus the most the answer may use, and settled once \
the model reports what it really used. The closer the estimate, the less the budget is \
overdrawn by clients that send long prompts, and the fewer honest clients are turned away.";

const CODE: &str = r#"impl<'c> Tally<'c> {
    fn text(&mut self, text: &str) {
        match self.counter {
            Counter::QuarterChars => self.chars += text.chars().count() as u64,
            Counter::Custom(count) => self.tokens(u64::from(count(text))),
        }
    }

    fn total(&self) -> u64 {
        self.tokens.saturating_add(self.chars.div_ceil(4))
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    for (i, arg) in args.iter().enumerate() {
        println!("{i:>3}: {arg:?} ({} bytes)", arg.len());
    }
    Ok(())
}"#;

const JSON: &str = r#"{"id":"chatcmpl-9x2","object":"chat.completion","created":1718000000,"model":"gpt-4o-2024-05-13","choices":[{"index":0,"message":{"role":"assistant","content":"The capital of France is Paris.","tool_calls":[{"id":"call_abc123","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Paris\",\"unit\":\"celsius\"}"}}]},"logprobs":null,"finish_reason":"tool_calls"}],"usage":{"prompt_tokens":82,"completion_tokens":17,"total_tokens":99},"system_fingerprint":"fp_3aa7262c27"}"#;

const CHINESE: &str = "限流用来保护共享的服务，使任何一个调用方都不能占用超过自己应得的份额。\
在语言模型前面的网关比大多数网关更难：一个请求可能只要几个词元，也可能要几万个，\
所以只数请求的个数，说明不了它们带来的负载。常见的做法是给每个密钥一个词元预算，\
在把请求转发出去之前，按提示的长度加上回答最多可能用到的长度预先扣除，\
等模型报告实际用量之后再结算。估计得越准，预算被长提示透支得越少。";

const EMOJI: &str = "Launch day! 🚀🚀 The team shipped it 🎉🎉🎉 — coffee ☕️☕️, pizza 🍕, \
and a few bugs 🐛🐛 squashed 🔨. Thanks everyone 🙏❤️ 👩‍💻👨‍💻 see you tomorrow 😴💤 \
🇫🇷🇩🇪🇯🇵 👍🏽👍🏿 🦀 Rust 🦀 ✅✅✅ ❌ ⚠️";

const NUMBERS: &str = "date,requests,tokens,p50_ms,p99_ms\n\
2024-06-01,1048576,73400320,41.7,388.25\n\
2024-06-02,998244,69877080,40.9,401.13\n\
2024-06-03,1123581,78650670,43.2,377.08\n\
2024-06-04,1000003,70000210,39.8,399.99\n\
2024-06-05,1234567,86419690,44.4,412.71\n\
pi=3.14159265358979323846, e=2.71828182845904523536, 0x7fffffff, 1e-9, -42, 1,000,000.00";

const GERMAN: &str = "Eine Ratenbegrenzung schützt einen gemeinsam genutzten Dienst davor, dass \
ein einzelner Aufrufer mehr als seinen Anteil beansprucht. Für Sprachmodelle ist das schwieriger: \
Ein Aufruf kann wenige oder zehntausende Tokens verlangen; daher zählt man Tokens je Schlüssel.";

const RUSSIAN: &str = "Ограничение частоты запросов защищает общий сервис от того, чтобы один \
клиент занимал больше своей доли. Для языковых моделей это сложнее: один запрос может потребовать \
несколько токенов или десятки тысяч, поэтому бюджет считают в токенах для каждого ключа.";

const CORPUS: [(&str, &str); 8] = [
    ("English prose", PROSE),
    ("Rust code", CODE),
    ("JSON", JSON),
    ("Chinese", CHINESE),
    ("emoji", EMOJI),
    ("numbers (CSV)", NUMBERS),
    ("German", GERMAN),
    ("Russian", RUSSIAN),
];

/// A chat body of about `bytes` bytes: a system message, then the corpus's
/// texts in turn as user and assistant messages, the last one cut short.
fn chat_body(bytes: usize) -> Vec<u8> {
    let body = |messages: &[serde_json::Value]| {
        serde_json::to_vec(&json!({"model": "gpt-4o", "messages": messages, "max_tokens": 256}))
            .unwrap()
    };
    let mut messages = vec![json!({"role": "system", "content": "You are a careful assistant."})];
    for (i, (_, text)) in CORPUS.iter().cycle().enumerate() {
        let role = if i % 2 == 0 { "user" } else { "assistant" };
        messages.push(json!({"role": role, "content": text}));
        if body(&messages).len() >= bytes {
            let mut text = text.to_string();
            while body(&messages).len() > bytes {
                text.pop();
                messages.last_mut().unwrap()["content"] = json!(text);
            }
            return body(&messages);
        }
    }
    unreachable!("the corpus cycles")
}

fn load() {
    println!("\n## load (first use in this process)\n");
    for t in [Tokenizer::Cl100kBase, Tokenizer::O200kBase] {
        let start = Instant::now();
        let e = OpenAiEstimator::new().tokenizer(t);
        println!(
            "{:12} {:>8.1} ms",
            t.name(),
            start.elapsed().as_secs_f64() * 1e3
        );
        black_box(e);
    }
}

fn accuracy() {
    println!("\n## accuracy: ceil(chars / 4) against the true tokens\n");
    println!(
        "| text | chars | bytes | ceil(chars / 4) | cl100k_base | o200k_base | ratio cl100k | ratio o200k |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut sums = [0u64; 5];
    for (name, text) in CORPUS {
        let chars = text.chars().count() as u64;
        let quarter = chars.div_ceil(4);
        let cl = Tokenizer::Cl100kBase.count(text);
        let o = Tokenizer::O200kBase.count(text);
        for (s, v) in sums
            .iter_mut()
            .zip([chars, text.len() as u64, quarter, cl, o])
        {
            *s += v;
        }
        println!(
            "| {name} | {chars} | {} | {quarter} | {cl} | {o} | {:.2} | {:.2} |",
            text.len(),
            quarter as f64 / cl as f64,
            quarter as f64 / o as f64
        );
    }
    let [chars, bytes, quarter, cl, o] = sums;
    println!(
        "| all together | {chars} | {bytes} | {quarter} | {cl} | {o} | {:.2} | {:.2} |",
        quarter as f64 / cl as f64,
        quarter as f64 / o as f64
    );
}

/// A string of `n` characters drawn from `alphabet`, reproducibly.
fn random(alphabet: &[u8], n: usize) -> String {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            alphabet[(x % alphabet.len() as u64) as usize] as char
        })
        .collect()
}

fn hostile() {
    println!("\n## hostile bodies of about 1 MiB: the fastest of three estimate_json each\n");
    let n = 1 << 20;
    let mut corpus = String::new();
    for (_, text) in CORPUS.iter().cycle() {
        if corpus.len() + text.len() + 1 > n - 64 {
            break;
        }
        corpus.push_str(text);
        corpus.push('\n');
    }
    let runs = [
        ("the corpus, over and over", corpus),
        ("spaces", " ".repeat(n - 64) + "x"),
        (
            "random letters",
            random(b"abcdefghijklmnopqrstuvwxyz", n - 64),
        ),
        (
            "random punctuation",
            random(b"!#$%&()*+,-./:;<=>?@[]^_{|}~", n - 64),
        ),
    ];
    println!("| body | counter | tokens | time |");
    println!("|---|---|---:|---:|");
    for (name, text) in &runs {
        let body =
            serde_json::to_vec(&json!({"model": "m", "prompt": text, "max_tokens": 0})).unwrap();
        for (counter, e) in estimators() {
            let (tokens, took) = fastest(|| e.estimate_json(&body).unwrap().tokens);
            println!(
                "| {name} ({} bytes) | {counter} | {tokens} | {took:.1} ms |",
                body.len()
            );
        }
        // The text encoded whole, as tiktoken-rs alone would.
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        for (counter, bpe) in [
            ("cl100k_base whole", tiktoken_rs::cl100k_base_singleton()),
            ("o200k_base whole", tiktoken_rs::o200k_base_singleton()),
        ] {
            let (tokens, took) =
                fastest(|| std::panic::catch_unwind(|| bpe.encode_ordinary(text).len()).ok());
            match tokens {
                Some(n) => println!("| {name} (the text alone) | {counter} | {n} | {took:.1} ms |"),
                None => {
                    println!("| {name} (the text alone) | {counter} | panics | {took:.1} ms |")
                }
            }
        }
        std::panic::set_hook(hook);
    }
}

/// What `f` returns, and the least of its times over three calls, in ms
/// (the first call also fills the regex engine's caches).
fn fastest<T>(mut f: impl FnMut() -> T) -> (T, f64) {
    let mut best = f64::INFINITY;
    let mut out = None;
    for _ in 0..3 {
        let start = Instant::now();
        out = Some(black_box(f()));
        best = best.min(start.elapsed().as_secs_f64() * 1e3);
    }
    (out.unwrap(), best)
}

fn estimators() -> [(&'static str, OpenAiEstimator); 3] {
    [
        ("quarter_chars", OpenAiEstimator::new()),
        (
            "cl100k_base",
            OpenAiEstimator::new().tokenizer(Tokenizer::Cl100kBase),
        ),
        (
            "o200k_base",
            OpenAiEstimator::new().tokenizer(Tokenizer::O200kBase),
        ),
    ]
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("estimate_json");
    for size in [1024, 16 * 1024] {
        let body = chat_body(size);
        let name = format!("{}KB", size / 1024);
        let counts: Vec<_> = estimators()
            .iter()
            .map(|(n, e)| format!("{n} {}", e.estimate_json(&body).unwrap().tokens))
            .collect();
        println!(
            "chat body {name}: {} bytes; estimates (with max_tokens 256): {}",
            body.len(),
            counts.join(", ")
        );
        group.throughput(Throughput::Bytes(body.len() as u64));
        for (counter, e) in estimators() {
            group.bench_with_input(BenchmarkId::new(counter, &name), &body, |b, body| {
                b.iter(|| e.estimate_json(black_box(body)).unwrap())
            });
        }
    }
    group.finish();
}

fn main() {
    if !std::env::args().any(|a| a == "--list") {
        load();
        accuracy();
        hostile();
    }
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    bench(&mut c);
    c.final_summary();
}
