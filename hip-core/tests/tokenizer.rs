//! Tokenizer and chat-template tests against real model files.
//!
//! Needs `${HIP_ASSETS:-~/.cache/hip}/smollm2-135m-instruct-q4_1.gguf` and `moby-dick.txt`
//! (`scripts/fetch-assets.sh`, which `make test` runs first). The Qwen checks run only when
//! `scripts/fetch-assets.sh qwen05` (or `qwen15`) has been run.
//!
//! The expected SmolLM2 ids were computed independently with the Python `tokenizers` package
//! (0.23.3) from the same GGUF vocabulary and merges (read with the `gguf` package).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};
use hip_core::loader::chat_template::{ChatTemplate, Message};
use hip_core::loader::tokenizer::Tokenizer;
use hip_core::Error;

const SMOLLM2: &str = "smollm2-135m-instruct-q4_1.gguf";
const MOBY: &str = "moby-dick.txt";

fn assets() -> PathBuf {
    std::env::var_os("HIP_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/hip"))
}

/// A required asset: a missing one fails the test with instructions.
fn required(name: &str) -> PathBuf {
    let p = assets().join(name);
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-assets.sh (it downloads SmolLM2-135M-Instruct and the test \
         texts into $HIP_ASSETS, default ~/.cache/hip)",
        p.display()
    );
    p
}

/// An opt-in asset: `None` (with a note) when absent.
fn optional(name: &str) -> Option<PathBuf> {
    let p = assets().join(name);
    if p.is_file() {
        Some(p)
    } else {
        eprintln!("note: {} absent, skipping (scripts/fetch-assets.sh qwen05 fetches it)", p.display());
        None
    }
}

fn read_gguf(path: &Path) -> Content {
    let mut f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Content::read(&mut f).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn smollm2() -> (Tokenizer, Content) {
    let content = read_gguf(&required(SMOLLM2));
    let tok = Tokenizer::from_gguf(&content).expect("SmolLM2 tokenizer from GGUF");
    (tok, content)
}

fn moby_prefix(chars: usize) -> String {
    let text = std::fs::read_to_string(required(MOBY)).unwrap();
    text.chars().take(chars).collect()
}

const SAMPLES: &[&str] = &[
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces  \n\n\ttabs\r\nand CRLF",
    "Digits: 0 7 42 3.14159 1234567890 -12e5",
    "unicode: héllo wörld, naïve café, Ελληνικά, русский, 日本語のテキスト, 한국어",
    "emoji: 🦀🚀👩‍👩‍👧‍👦 ✓ ∑ √2 ≠ π",
    "code: fn main() { println!(\"{}\", x >> 2 | 0xFF); } // é",
    "",
];

#[test]
fn smollm2_metadata_facts() {
    let (tok, _) = smollm2();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.token_id("<|im_start|>"), Some(1));
    assert_eq!(tok.token_id("<|im_end|>"), Some(2));
    assert_eq!(tok.token_id("<|endoftext|>"), Some(0));
    assert_eq!(tok.bos_token_id(), Some(1));
    // GGUF eos (2 = <|im_end|>) first, then <|endoftext|>.
    assert_eq!(tok.eos_token_ids(), &[2, 0]);
    assert!(tok.is_eos(2) && !tok.is_eos(1));
    assert_eq!(tok.id_to_token(19556).as_deref(), Some("Hello"));
}

#[test]
fn smollm2_round_trips() {
    let (tok, _) = smollm2();
    let moby = moby_prefix(2000);
    assert_eq!(moby.chars().count(), 2000);
    for text in SAMPLES.iter().copied().chain([moby.as_str()]) {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text, "ids {ids:?}");
        assert_eq!(tok.decode(&ids, true).unwrap(), text);
        assert!(ids.iter().all(|&id| (id as usize) < tok.vocab_size()));
        // SmolLM2 adds no BOS: add_special_tokens changes nothing.
        assert_eq!(tok.encode(text, true).unwrap(), ids);
    }
}

#[test]
fn smollm2_known_ids() {
    let (tok, _) = smollm2();
    let cases: &[(&str, &[u32])] = &[
        ("Hello world", &[19556, 905]),
        ("The capital of France is", &[504, 3575, 282, 4649, 314]),
        // Digits are split one by one.
        ("12345 apples", &[33, 34, 35, 36, 37, 13855]),
        // Special tokens in the text are recognised.
        ("<|im_start|>user\nHi<|im_end|>", &[1, 4093, 198, 26843, 2]),
        (
            "héllo wörld 🦀 日本語",
            &[88, 2756, 31394, 267, 29989, 400, 15107, 116, 218, 17097, 241, 115, 40993, 179, 120, 248],
        ),
    ];
    for (text, want) in cases {
        assert_eq!(tok.encode(text, false).unwrap(), *want, "{text:?}");
        assert_eq!(tok.decode(want, false).unwrap(), *text);
    }
    let moby = tok.encode(&moby_prefix(2000), false).unwrap();
    assert_eq!(moby.len(), 495);
    assert_eq!(
        &moby[..20],
        &[
            5229, 41958, 216, 33, 30, 450, 6364, 616, 30, 198, 198, 12800, 549, 46588, 30, 2015, 929, 3156,
            1265, 15661
        ]
    );
    // Special tokens can be left out when decoding.
    assert_eq!(tok.decode(&[1, 4093, 198, 26843, 2], true).unwrap(), "user\nHi");
}

#[test]
fn smollm2_chat_template() {
    let (tok, content) = smollm2();
    let tmpl = ChatTemplate::from_gguf(&content).unwrap().expect("SmolLM2 GGUF has a chat template");
    let messages = [Message::system("You are terse."), Message::user("What is 2+2?")];
    let prompt = tmpl.render(&messages, true, "<|im_start|>", "<|im_end|>").unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    assert!(prompt.ends_with("<|im_start|>assistant\n"));
    // Without a system message the template supplies its default one; without the generation
    // prompt there is no assistant header.
    let prompt = tmpl.render(&[Message::user("Hi")], false, "", "").unwrap();
    assert!(
        prompt.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"),
        "{prompt}"
    );
    assert!(prompt.ends_with("<|im_start|>user\nHi<|im_end|>\n"), "{prompt}");
    // The markers encode as single special tokens.
    let ids = tok.encode(&prompt, false).unwrap();
    assert_eq!(ids[0], 1);
    assert_eq!(ids.iter().filter(|&&id| id == 1).count(), 2);
    assert_eq!(ids.iter().filter(|&&id| id == 2).count(), 2);
    assert_eq!(*ids.last().unwrap(), 198); // "\n"
}

#[test]
fn smollm2_decode_stream() {
    let (tok, _) = smollm2();
    let moby = moby_prefix(2000);
    let chat = "<|im_start|>user\nCrabs 🦀🦀 and 日本語<|im_end|>\n";
    for text in SAMPLES.iter().copied().chain([moby.as_str(), chat]) {
        let ids = tok.encode(text, false).unwrap();
        for skip in [false, true] {
            let mut stream = tok.decode_stream(skip);
            let mut pieces = Vec::new();
            for &id in &ids {
                if let Some(p) = stream.step(id).unwrap() {
                    pieces.push(p);
                }
            }
            if let Some(p) = stream.flush().unwrap() {
                pieces.push(p);
            }
            let joined: String = pieces.concat();
            assert_eq!(joined, tok.decode(&ids, skip).unwrap(), "skip={skip}");
            assert!(pieces.iter().all(|p| !p.contains(char::REPLACEMENT_CHARACTER)), "{pieces:?}");
        }
    }

    // A 4-byte emoji is spread over several byte tokens: nothing comes out until it is complete.
    let ids = tok.encode("a🦀", false).unwrap();
    assert!(ids.len() >= 3, "{ids:?}");
    let mut stream = tok.decode_stream(false);
    assert_eq!(stream.step(ids[0]).unwrap().as_deref(), Some("a"));
    for &id in &ids[1..ids.len() - 1] {
        assert_eq!(stream.step(id).unwrap(), None);
    }
    assert!(stream.pending() > 0);
    assert_eq!(stream.step(*ids.last().unwrap()).unwrap().as_deref(), Some("🦀"));
    assert_eq!(stream.flush().unwrap(), None);

    // An incomplete character left at the end comes out of flush() as U+FFFD, like decode().
    let mut stream = tok.decode_stream(false);
    assert_eq!(stream.step_all(&ids[..ids.len() - 1]).unwrap(), "a");
    let rest = stream.flush().unwrap().unwrap();
    assert_eq!(format!("a{rest}"), tok.decode(&ids[..ids.len() - 1], false).unwrap());
    assert!(rest.contains(char::REPLACEMENT_CHARACTER));
}

#[test]
fn check_vocab_rejects_a_smaller_model() {
    let (tok, _) = smollm2();
    tok.check_vocab(49152).unwrap();
    tok.check_vocab(151936).unwrap();
    match tok.check_vocab(32000) {
        Err(Error::Tokenizer(msg)) => assert!(msg.contains("49152") && msg.contains("32000"), "{msg}"),
        other => panic!("expected Error::Tokenizer, got {other:?}"),
    }
}

#[test]
fn bad_tokenizer_json_path_is_io_error() {
    let path = assets().join("no-such-dir/tokenizer.json");
    match Tokenizer::from_file(&path) {
        Err(Error::Io { path: p, .. }) => assert_eq!(p, path),
        other => panic!("expected Error::Io, got {other:?}"),
    }
}

#[test]
fn malformed_tokenizer_json_is_format_error() {
    let dir = std::env::temp_dir().join(format!("hip-tokenizer-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, b"{\"model\": 42}").unwrap();
    let res = Tokenizer::from_file(&path);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(matches!(res, Err(Error::Format { .. })), "{res:?}");
}

fn synthetic_gguf(metadata: Vec<(&str, Value)>) -> Content {
    Content {
        magic: VersionedMagic::GgufV3,
        metadata: metadata.into_iter().map(|(k, v)| (k.to_owned(), v)).collect::<HashMap<_, _>>(),
        tensor_infos: HashMap::new(),
        tensor_data_offset: 0,
    }
}

fn strings(v: &[&str]) -> Value {
    Value::Array(v.iter().map(|s| Value::String(s.to_string())).collect())
}

#[test]
fn gguf_unsupported_tokenizers_are_rejected() {
    let c = synthetic_gguf(vec![
        ("tokenizer.ggml.model", Value::String("llama".into())),
        ("tokenizer.ggml.tokens", strings(&["<unk>", "a"])),
    ]);
    match Tokenizer::from_gguf(&c) {
        Err(Error::Tokenizer(msg)) => assert!(msg.contains("\"llama\""), "{msg}"),
        other => panic!("expected Error::Tokenizer, got {other:?}"),
    }
    let c = synthetic_gguf(vec![
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("made-up".into())),
        ("tokenizer.ggml.tokens", strings(&["a", "b", "ab"])),
        ("tokenizer.ggml.merges", strings(&["a b"])),
    ]);
    match Tokenizer::from_gguf(&c) {
        Err(Error::Tokenizer(msg)) => assert!(msg.contains("made-up"), "{msg}"),
        other => panic!("expected Error::Tokenizer, got {other:?}"),
    }
    // A tiny well-formed one works, and a missing chat template is None.
    let c = synthetic_gguf(vec![
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens", strings(&["a", "b", "ab", "<|im_end|>"])),
        ("tokenizer.ggml.merges", strings(&["a b"])),
        (
            "tokenizer.ggml.token_type",
            Value::Array(vec![Value::I32(1), Value::I32(1), Value::I32(1), Value::I32(3)]),
        ),
    ]);
    let tok = Tokenizer::from_gguf(&c).unwrap();
    assert_eq!(tok.encode("abab<|im_end|>", false).unwrap(), vec![2, 2, 3]);
    assert_eq!(tok.eos_token_ids(), &[3]);
    assert_eq!(tok.bos_token_id(), None);
    assert!(ChatTemplate::from_gguf(&c).unwrap().is_none());
}

/// Opt-in: the Qwen tokenizer built from each Qwen GGUF agrees with Qwen's `tokenizer.json`.
#[test]
fn qwen_gguf_matches_tokenizer_json() {
    let Some(json) = optional("qwen-tokenizer.json") else { return };
    let ggufs: Vec<PathBuf> = ["qwen2.5-coder-0.5b-instruct.gguf", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"]
        .iter()
        .filter_map(|n| optional(n))
        .collect();
    if ggufs.is_empty() {
        return;
    }
    let from_json = Tokenizer::from_file(&json).unwrap();
    assert_eq!(from_json.token_id("<|im_end|>"), Some(151645));
    assert_eq!(from_json.eos_token_ids()[..2], [151645, 151643]);

    let moby = moby_prefix(20_000);
    let paragraph: String = moby.split("\n\n").skip(1).take(3).collect::<Vec<_>>().join("\n\n");
    assert!(paragraph.len() > 500, "{paragraph:?}");
    let chat = "<|im_start|>system\nYou are Qwen.<|im_end|>\n<|im_start|>user\nPrint 12345 in Rust 🦀: \
                fn main() {\n    println!(\"{}\", 12_345);\n}\n<|im_end|>\n<|im_start|>assistant\n";
    for path in ggufs {
        let content = read_gguf(&path);
        let from_gguf = Tokenizer::from_gguf(&content).unwrap();
        assert_eq!(from_gguf.vocab_size(), 151936);
        from_gguf.check_vocab(151936).unwrap();
        from_json.check_vocab(151936).unwrap();
        assert_eq!(from_gguf.eos_token_ids(), &[151645, 151643]);
        for text in [paragraph.as_str(), moby.as_str(), chat].into_iter().chain(SAMPLES.iter().copied()) {
            let a = from_gguf.encode(text, false).unwrap();
            let b = from_json.encode(text, false).unwrap();
            assert_eq!(a, b, "{}: {text:?}", path.display());
            assert_eq!(from_gguf.decode(&a, false).unwrap(), text);
        }
        let tmpl = ChatTemplate::from_gguf(&content).unwrap().expect("Qwen GGUF has a chat template");
        let prompt = tmpl.render(&[Message::user("Hi")], true, "", "<|im_end|>").unwrap();
        assert_eq!(
            prompt,
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        eprintln!("{}: GGUF tokenizer agrees with qwen-tokenizer.json", path.display());
    }
}
