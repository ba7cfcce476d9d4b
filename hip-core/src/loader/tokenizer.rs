//! Tokenizers: a HF `tokenizer.json`, or the byte-level BPE embedded in a GGUF file.
//!
//! [`Tokenizer`] wraps [`tokenizers::Tokenizer`] (cheap to clone: the inner tokenizer is shared) and
//! adds what generation needs: the end-of-sequence ids, a check that the tokenizer fits a model,
//! and [`DecodeStream`], an incremental detokenizer that only ever hands out complete UTF-8 text.
//!
//! GGUF files store the tokenizer as metadata (`tokenizer.ggml.*`). Only the `gpt2` model
//! (byte-level BPE: Llama 3, Qwen2, SmolLM2, StarCoder, …) is supported; the pre-tokenizer is
//! chosen from `tokenizer.ggml.pre` the way llama.cpp does it.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{NormalizerWrapper, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::{Error, Result};

/// The Qwen2 pre-tokenizer split pattern (from Qwen2's `tokenizer.json`).
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The Llama 3 pre-tokenizer split pattern (numbers in groups of up to three digits).
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Token strings that end a turn or a document in common chat models; those present in the
/// vocabulary count as end-of-sequence tokens.
const EOS_CANDIDATES: &[&str] = &["<|im_end|>", "<|endoftext|>"];

/// Further end-of-sequence spellings, recognised only for tokenizers read from `tokenizer.json`
/// (a GGUF file names its EOS token explicitly).
const JSON_EOS_CANDIDATES: &[&str] = &["</s>", "<|eot_id|>", "<|end_of_text|>", "<eos>", "<end_of_turn>"];

/// Beginning-of-sequence spellings recognised for tokenizers read from `tokenizer.json`.
const JSON_BOS_CANDIDATES: &[&str] = &["<s>", "<|begin_of_text|>", "<bos>"];

/// GGUF `tokenizer.ggml.token_type` of a control (special) token.
const TOKEN_TYPE_CONTROL: i64 = 3;
/// GGUF `tokenizer.ggml.token_type` of a user-defined token (matched verbatim, not special).
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Where GGUF metadata errors are attributed.
const GGUF_SOURCE: &str = "GGUF tokenizer metadata";

fn tok_err(e: impl fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

/// A text tokenizer: encode text to token ids and decode ids back to text.
///
/// Cloning is cheap (the vocabulary is shared).
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<tokenizers::Tokenizer>,
    vocab_size: usize,
    eos: Vec<u32>,
    bos: Option<u32>,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("eos_token_ids", &self.eos)
            .field("bos_token_id", &self.bos)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Reads a Hugging Face `tokenizer.json`.
    ///
    /// A file that cannot be read gives [`Error::Io`]; one that does not parse, [`Error::Format`].
    /// End-of-sequence ids are the special tokens among `<|im_end|>`, `<|endoftext|>`, `</s>`,
    /// `<|eot_id|>`, `<|end_of_text|>`, `<eos>` and `<end_of_turn>` that the vocabulary holds.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        Self::from_bytes(&bytes).map_err(|e| match e {
            Error::Tokenizer(what) => Error::format(path.display().to_string(), what),
            e => e,
        })
    }

    /// Parses the contents of a Hugging Face `tokenizer.json`.
    pub fn from_bytes(json: &[u8]) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(json)
            .map_err(|e| Error::Tokenizer(format!("invalid tokenizer.json: {e}")))?;
        let mut eos = Vec::new();
        for t in EOS_CANDIDATES.iter().chain(JSON_EOS_CANDIDATES) {
            if let Some(id) = inner.token_to_id(t) {
                if !eos.contains(&id) {
                    eos.push(id);
                }
            }
        }
        let bos = JSON_BOS_CANDIDATES.iter().find_map(|t| inner.token_to_id(t));
        Ok(Self::wrap(inner, eos, bos))
    }

    /// Wraps an existing [`tokenizers::Tokenizer`] with the given end/beginning-of-sequence ids.
    pub fn from_tokenizer(inner: tokenizers::Tokenizer, eos_token_ids: Vec<u32>, bos: Option<u32>) -> Self {
        Self::wrap(inner, eos_token_ids, bos)
    }

    fn wrap(inner: tokenizers::Tokenizer, eos: Vec<u32>, bos: Option<u32>) -> Self {
        let max_id = inner.get_vocab(true).into_values().max().map_or(0, |m| m as usize + 1);
        let vocab_size = max_id.max(inner.get_vocab_size(true));
        Self { inner: Arc::new(inner), vocab_size, eos, bos }
    }

    /// Builds the tokenizer embedded in GGUF metadata.
    ///
    /// Requires `tokenizer.ggml.model == "gpt2"` (byte-level BPE) and reads `tokenizer.ggml.tokens`,
    /// `tokenizer.ggml.merges` and, if present, `tokenizer.ggml.token_type` (control tokens, type 3,
    /// become special tokens; user-defined ones, type 4, are matched verbatim),
    /// `tokenizer.ggml.{bos,eos,eot,eom}_token_id` and `tokenizer.ggml.add_bos_token`.
    ///
    /// The pre-tokenizer follows `tokenizer.ggml.pre`: `smollm` / `starcoder` / `refact` (single
    /// digits, then GPT-2 byte-level splitting), `qwen2` / `deepseek-r1-qwen` (NFC, Qwen2 regex),
    /// `llama-bpe` / `llama3` (Llama 3 regex), `gpt-2` / `default` or absent (GPT-2 byte-level).
    /// Any other value, or another tokenizer model, is an [`Error::Tokenizer`].
    pub fn from_gguf(content: &Content) -> Result<Self> {
        let md = &content.metadata;
        let model = md
            .get("tokenizer.ggml.model")
            .ok_or_else(|| Error::format(GGUF_SOURCE, "missing tokenizer.ggml.model"))?;
        let model = as_str(model, "tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(Error::Tokenizer(format!(
                "unsupported GGUF tokenizer model {model:?} (only \"gpt2\", byte-level BPE, is supported)"
            )));
        }
        let pre = match md.get("tokenizer.ggml.pre") {
            Some(v) => Some(as_str(v, "tokenizer.ggml.pre")?),
            None => None,
        };

        let tokens = string_array(md, "tokenizer.ggml.tokens")?;
        if tokens.is_empty() {
            return Err(Error::format(GGUF_SOURCE, "tokenizer.ggml.tokens is empty"));
        }
        let merges = string_array(md, "tokenizer.ggml.merges")?
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                m.split_once(' ').map(|(a, b)| (a.to_owned(), b.to_owned())).ok_or_else(|| {
                    Error::format(GGUF_SOURCE, format!("tokenizer.ggml.merges[{i}] = {m:?} is not \"A B\""))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let token_types = match md.get("tokenizer.ggml.token_type") {
            Some(v) => {
                let v = as_array(v, "tokenizer.ggml.token_type")?;
                if v.len() != tokens.len() {
                    return Err(Error::format(
                        GGUF_SOURCE,
                        format!(
                            "tokenizer.ggml.token_type has {} entries for {} tokens",
                            v.len(),
                            tokens.len()
                        ),
                    ));
                }
                v.iter().map(|t| as_int(t, "tokenizer.ggml.token_type")).collect::<Result<Vec<_>>>()?
            }
            None => vec![1; tokens.len()],
        };

        let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.to_string(), i as u32)).collect();
        if vocab.len() != tokens.len() {
            tracing::warn!(
                tokens = tokens.len(),
                distinct = vocab.len(),
                "GGUF vocabulary has duplicate tokens; the last id of each wins"
            );
        }

        let (normalizer, pre_tokenizer, ignore_merges) = pre_tokenizer_for(pre)?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(ignore_merges)
            .build()
            .map_err(|e| Error::Tokenizer(format!("cannot build BPE from GGUF metadata: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        if let Some(n) = normalizer {
            inner.with_normalizer(Some(n)).map_err(tok_err)?;
        }
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::new(false, false, false))));

        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&token_types)
            .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL)
            .map(|(s, _)| AddedToken::from(s.to_string(), true).normalized(false))
            .collect();
        let user: Vec<AddedToken> = tokens
            .iter()
            .zip(&token_types)
            .filter(|(_, &t)| t == TOKEN_TYPE_USER_DEFINED)
            .map(|(s, _)| AddedToken::from(s.to_string(), false).normalized(false))
            .collect();
        inner.add_special_tokens(specials).map_err(tok_err)?;
        inner.add_tokens(user).map_err(tok_err)?;

        let token_id = |key: &str| -> Result<Option<u32>> {
            match md.get(key) {
                None => Ok(None),
                Some(v) => {
                    let id = as_int(v, key)?;
                    if id < 0 || id as usize >= tokens.len() {
                        tracing::warn!(key, id, "GGUF token id out of range, ignored");
                        Ok(None)
                    } else {
                        Ok(Some(id as u32))
                    }
                }
            }
        };
        let bos = token_id("tokenizer.ggml.bos_token_id")?;
        let mut eos = Vec::new();
        for key in
            ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"]
        {
            if let Some(id) = token_id(key)? {
                if !eos.contains(&id) {
                    eos.push(id);
                }
            }
        }
        for t in EOS_CANDIDATES {
            if let Some(id) = inner.token_to_id(t) {
                if !eos.contains(&id) {
                    eos.push(id);
                }
            }
        }

        let add_bos = match md.get("tokenizer.ggml.add_bos_token") {
            Some(Value::Bool(b)) => *b,
            _ => false,
        };
        let post = match (add_bos, bos) {
            (true, Some(bos_id)) => {
                let bos_tok = tokens[bos_id as usize];
                let tp = TemplateProcessing::builder()
                    .try_single(format!("{bos_tok} $A"))
                    .and_then(|b| b.try_pair(format!("{bos_tok} $A {bos_tok} $B")))
                    .map_err(tok_err)?
                    .special_tokens(vec![(bos_tok, bos_id)])
                    .build()
                    .map_err(tok_err)?;
                PostProcessorWrapper::Template(tp)
            }
            _ => PostProcessorWrapper::ByteLevel(ByteLevel::new(false, false, false)),
        };
        inner.with_post_processor(Some(post));

        Ok(Self::wrap(inner, eos, bos))
    }

    /// Encodes `text` to token ids. With `add_special_tokens`, the tokenizer's post-processor
    /// adds its markers (e.g. BOS for models that want it); special tokens written in the text
    /// (`<|im_start|>`, …) are always recognised as such.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, add_special_tokens).map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes token ids to text, leaving out special tokens if `skip_special_tokens`.
    /// Bytes that do not form valid UTF-8 come out as U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(tok_err)
    }

    /// An incremental detokenizer over this tokenizer; see [`DecodeStream`].
    pub fn decode_stream(&self, skip_special_tokens: bool) -> DecodeStream {
        DecodeStream::new(self.clone(), skip_special_tokens)
    }

    /// Number of token ids (one more than the largest id, added tokens included).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The id of a token string (`"<|im_end|>"`, `"Hello"`, …), if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of an id, if any.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Ids that end generation: the GGUF `eos` (and `eot`/`eom`) token ids, plus `<|im_end|>` and
    /// `<|endoftext|>` when the vocabulary has them. May be empty.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos
    }

    /// Whether `id` ends generation (is one of [`Self::eos_token_ids`]).
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos.contains(&id)
    }

    /// The beginning-of-sequence id, if the tokenizer names one.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos
    }

    /// Replaces the end-of-sequence ids (e.g. with those of a model's generation config).
    pub fn with_eos_token_ids(mut self, ids: Vec<u32>) -> Self {
        self.eos = ids;
        self
    }

    /// Checks that every token id is a row of the model's embedding matrix of `model_vocab_size`
    /// rows. A model may have more rows than the tokenizer has tokens (padding), not fewer.
    pub fn check_vocab(&self, model_vocab_size: usize) -> Result<()> {
        if self.vocab_size > model_vocab_size {
            return Err(Error::Tokenizer(format!(
                "tokenizer has {} token ids but the model's embedding has only {model_vocab_size} rows: \
                 wrong tokenizer for this model",
                self.vocab_size
            )));
        }
        let bad: Vec<u32> = self
            .eos
            .iter()
            .chain(self.bos.iter())
            .copied()
            .filter(|&id| id as usize >= model_vocab_size)
            .collect();
        if !bad.is_empty() {
            return Err(Error::Tokenizer(format!(
                "special token ids {bad:?} are outside the model's {model_vocab_size} embedding rows"
            )));
        }
        Ok(())
    }

    /// The wrapped [`tokenizers::Tokenizer`].
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// (normalizer, pre-tokenizer, BPE ignore_merges) for a GGUF `tokenizer.ggml.pre` value.
fn pre_tokenizer_for(pre: Option<&str>) -> Result<(Option<NormalizerWrapper>, PreTokenizerWrapper, bool)> {
    let split = |pattern: &str| -> Result<PreTokenizerWrapper> {
        let s = Split::new(SplitPattern::Regex(pattern.to_owned()), SplitDelimiterBehavior::Isolated, false)
            .map_err(|e| Error::Tokenizer(format!("pre-tokenizer regex: {e}")))?;
        Ok(PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Split(s),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)),
        ])))
    };
    let gpt2 = || PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true));
    Ok(match pre {
        None | Some("default") | Some("gpt-2") | Some("gpt2") => (None, gpt2(), false),
        Some("smollm") | Some("starcoder") | Some("refact") => (
            None,
            PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                gpt2(),
            ])),
            false,
        ),
        Some("qwen2") | Some("deepseek-r1-qwen") => {
            (Some(NormalizerWrapper::NFC(NFC)), split(QWEN2_PATTERN)?, false)
        }
        Some("llama-bpe") | Some("llama3") => (None, split(LLAMA3_PATTERN)?, true),
        Some(other) => {
            return Err(Error::Tokenizer(format!(
                "unsupported GGUF pre-tokenizer {other:?} (supported: smollm, starcoder, refact, qwen2, \
                 deepseek-r1-qwen, llama-bpe, llama3, gpt-2, default)"
            )))
        }
    })
}

fn as_str<'a>(v: &'a Value, key: &str) -> Result<&'a str> {
    match v {
        Value::String(s) => Ok(s),
        v => Err(Error::format(GGUF_SOURCE, format!("{key} is a {:?}, not a string", v.value_type()))),
    }
}

fn as_array<'a>(v: &'a Value, key: &str) -> Result<&'a [Value]> {
    match v {
        Value::Array(a) => Ok(a),
        v => Err(Error::format(GGUF_SOURCE, format!("{key} is a {:?}, not an array", v.value_type()))),
    }
}

fn as_int(v: &Value, key: &str) -> Result<i64> {
    Ok(match *v {
        Value::U8(x) => x.into(),
        Value::I8(x) => x.into(),
        Value::U16(x) => x.into(),
        Value::I16(x) => x.into(),
        Value::U32(x) => x.into(),
        Value::I32(x) => x.into(),
        Value::I64(x) => x,
        Value::U64(x) => i64::try_from(x)
            .map_err(|_| Error::format(GGUF_SOURCE, format!("{key} = {x} is out of range")))?,
        ref v => {
            return Err(Error::format(
                GGUF_SOURCE,
                format!("{key} is a {:?}, not an integer", v.value_type()),
            ))
        }
    })
}

fn string_array<'a>(md: &'a std::collections::HashMap<String, Value>, key: &str) -> Result<Vec<&'a str>> {
    let v = md.get(key).ok_or_else(|| Error::format(GGUF_SOURCE, format!("missing {key}")))?;
    as_array(v, key)?.iter().map(|t| as_str(t, key)).collect()
}

/// Incremental detokenizer: feed generated ids one at a time with [`DecodeStream::step`] and get
/// back only text that is final.
///
/// A piece is released only when the decoded text does not end in an incomplete UTF-8 sequence
/// (a multi-byte character split over several byte-level tokens is held back until it is
/// complete), so a piece never splits a character. Call [`DecodeStream::flush`] at the end: it
/// releases whatever is still held back (as U+FFFD if it never became valid UTF-8). For byte-level
/// tokenizers the concatenation of all pieces, flush included, equals
/// [`Tokenizer::decode`] of all the ids.
///
/// Internally it decodes a short window of recent ids (the TGI / `tokenizers` prefix-offset
/// scheme), so each step costs a few tokens' worth of decoding however long the output grows.
#[derive(Debug, Clone)]
pub struct DecodeStream {
    tokenizer: Tokenizer,
    skip_special_tokens: bool,
    /// Ids from the start of the decoding window on.
    ids: Vec<u32>,
    /// Ids of the window already released (`ids[..read]`).
    read: usize,
    /// `decode(ids[..read])`.
    prefix_text: String,
}

impl DecodeStream {
    /// A stream over `tokenizer`.
    pub fn new(tokenizer: Tokenizer, skip_special_tokens: bool) -> Self {
        Self { tokenizer, skip_special_tokens, ids: Vec::new(), read: 0, prefix_text: String::new() }
    }

    /// Adds one id; returns the newly completed text, if any.
    pub fn step(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids, self.skip_special_tokens)?;
        if text.len() <= self.prefix_text.len() || text.ends_with(char::REPLACEMENT_CHARACTER) {
            return Ok(None);
        }
        let piece = self.suffix(&text);
        // Slide the window: the ids just released become the new prefix.
        self.ids.drain(..self.read);
        self.read = self.ids.len();
        self.prefix_text = self.tokenizer.decode(&self.ids, self.skip_special_tokens)?;
        Ok(Some(piece))
    }

    /// Adds several ids; returns the text completed by them (possibly empty).
    pub fn step_all(&mut self, ids: &[u32]) -> Result<String> {
        let mut out = String::new();
        for &id in ids {
            if let Some(p) = self.step(id)? {
                out.push_str(&p);
            }
        }
        Ok(out)
    }

    /// Releases the text still held back (an incomplete character comes out as U+FFFD) and
    /// resets the stream.
    pub fn flush(&mut self) -> Result<Option<String>> {
        let text = self.tokenizer.decode(&self.ids, self.skip_special_tokens)?;
        let piece = self.suffix(&text);
        self.ids.clear();
        self.read = 0;
        self.prefix_text.clear();
        Ok(if piece.is_empty() { None } else { Some(piece) })
    }

    /// Number of ids fed in but not yet released as text.
    pub fn pending(&self) -> usize {
        self.ids.len() - self.read
    }

    /// The tokenizer the stream decodes with.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// `text` minus the already released prefix.
    fn suffix(&self, text: &str) -> String {
        if let Some(rest) = text.strip_prefix(self.prefix_text.as_str()) {
            return rest.to_owned();
        }
        // Decoders that rewrite the window's start (none of the byte-level ones do): drop the
        // longest common prefix, on a character boundary.
        let common = text
            .char_indices()
            .zip(self.prefix_text.chars())
            .take_while(|((_, a), b)| a == b)
            .last()
            .map_or(0, |((i, c), _)| i + c.len_utf8());
        text[common..].to_owned()
    }
}
