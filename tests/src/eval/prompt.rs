//! The synthetic prompts: the standard passkey prompt (repeated filler sentences with a 5-digit
//! key) and the needle prompt (a fact inserted into natural text, then a question about it). Both
//! are built in token space, so a prompt has exactly the requested number of tokens.

use std::path::Path;

use hip_core::loader::tokenizer::Tokenizer;

use super::error::{EvalError, Result};

/// The passkey task's instruction (Mohtashami & Jaggi 2023, "Landmark Attention").
pub const PASSKEY_INTRO: &str = "There is an important info hidden inside a lot of irrelevant text. \
Find it and memorize it. I will quiz you about the important information there.\n";
/// The passkey task's filler, repeated.
pub const PASSKEY_FILLER: &str =
    " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";
/// The question closing a passkey prompt; the model completes it with the key.
pub const PASSKEY_QUESTION: &str = "\nWhat is the pass key? The pass key is";

/// The needle task's instruction.
pub const NEEDLE_INTRO: &str = "Read the following text carefully and answer the question at the end.\n";
/// Answers of the needle fact (one per trial, picked by the seed).
pub const NEEDLE_NAMES: [&str; 12] = [
    "Biscuit", "Pepper", "Waffles", "Muffin", "Noodle", "Pickles", "Gizmo", "Sprout", "Marble", "Pumpkin",
    "Toffee", "Mango",
];

/// One prompt with its expected answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    /// The prompt's tokens.
    pub tokens: Vec<u32>,
    /// The answer the model should produce.
    pub expected: String,
    /// Token index where the key / needle starts.
    pub inserted_at: usize,
}

/// Checks that every depth lies in [0, 1].
///
/// # Errors
/// [`EvalError::DepthOutOfRange`] for the first that does not (NaN included).
pub fn check_depths(depths: &[f64]) -> Result<()> {
    match depths.iter().find(|d| !(0.0..=1.0).contains(*d)) {
        Some(&d) => Err(EvalError::DepthOutOfRange(d)),
        None => Ok(()),
    }
}

/// A deterministic 64-bit mix (splitmix64) of the seed and the cell, for keys and needles.
pub fn cell_seed(seed: u64, length: usize, depth: f64, trial: usize) -> u64 {
    let mut z = seed
        ^ (length as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (depth.to_bits()).rotate_left(17)
        ^ (trial as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Builds passkey prompts for one tokenizer.
#[derive(Debug, Clone)]
pub struct PasskeyBuilder {
    intro: Vec<u32>,
    filler: Vec<u32>,
    question: Vec<u32>,
}

impl PasskeyBuilder {
    /// Tokenizes the fixed parts.
    ///
    /// # Errors
    /// Tokenizer errors.
    pub fn new(tok: &Tokenizer) -> Result<Self> {
        Ok(PasskeyBuilder {
            intro: tok.encode(PASSKEY_INTRO, false)?,
            filler: tok.encode(PASSKEY_FILLER, false)?,
            question: tok.encode(PASSKEY_QUESTION, false)?,
        })
    }

    /// Tokens of a prompt besides the filler (with a 5-digit key).
    pub fn overhead(&self, tok: &Tokenizer) -> Result<usize> {
        Ok(self.intro.len() + self.question.len() + tok.encode(&key_line(10000), false)?.len())
    }

    /// The prompt of `length` tokens with the key at `depth` of the filler (snapped to the start
    /// of a filler repetition), the key drawn from `seed`.
    ///
    /// # Errors
    /// A length too short to hold the fixed parts and one filler repetition.
    pub fn build(&self, tok: &Tokenizer, length: usize, depth: f64, seed: u64) -> Result<Prompt> {
        let key = 10000 + (seed % 90000) as u32;
        let line = tok.encode(&key_line(key), false)?;
        let fixed = self.intro.len() + line.len() + self.question.len();
        if length < fixed + self.filler.len() {
            return Err(EvalError::arg(
                "--lengths",
                format!(
                    "{length} tokens cannot hold a passkey prompt (at least {} needed)",
                    fixed + self.filler.len()
                ),
            ));
        }
        let n_fill = length - fixed;
        let fill: Vec<u32> = self.filler.iter().copied().cycle().take(n_fill).collect();
        let unit = self.filler.len();
        // Snap to a repetition boundary; depth 1 puts the key right before the question.
        let at = if depth >= 1.0 {
            n_fill
        } else {
            ((depth * n_fill as f64 / unit as f64).round() as usize * unit).min(n_fill)
        };
        let mut tokens = Vec::with_capacity(length);
        tokens.extend_from_slice(&self.intro);
        tokens.extend_from_slice(&fill[..at]);
        let inserted_at = tokens.len();
        tokens.extend_from_slice(&line);
        tokens.extend_from_slice(&fill[at..]);
        tokens.extend_from_slice(&self.question);
        debug_assert_eq!(tokens.len(), length);
        Ok(Prompt { tokens, expected: key.to_string(), inserted_at })
    }
}

fn key_line(key: u32) -> String {
    format!(" The pass key is {key}. Remember it. {key} is the pass key.")
}

/// The first run of ASCII digits in `text` (the model's passkey answer), if any.
pub fn first_number(text: &str) -> Option<&str> {
    let start = text.find(|c: char| c.is_ascii_digit())?;
    let rest = &text[start..];
    let end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
    Some(&rest[..end])
}

/// Builds needle-in-a-haystack prompts over a natural text.
#[derive(Debug, Clone)]
pub struct NeedleBuilder {
    intro: Vec<u32>,
    haystack: Vec<u32>,
    /// Whether haystack token `i` ends a sentence (a needle may follow it).
    sentence_end: Vec<bool>,
}

/// The needle sentence for `name`.
pub fn needle_sentence(name: &str) -> String {
    format!(" The special magic word is {name}. Remember it: the special magic word is {name}.")
}
/// The question closing a needle prompt; the model completes it with the word.
pub const NEEDLE_QUESTION: &str = "\nWhat is the special magic word? The special magic word is";

impl NeedleBuilder {
    /// Tokenizes the haystack text (enough of it for `max_length` tokens).
    ///
    /// # Errors
    /// [`EvalError::TextTooShort`] when the text has fewer than `max_length` tokens; I/O and
    /// tokenizer errors.
    pub fn new(tok: &Tokenizer, text: &Path, max_length: usize) -> Result<Self> {
        let haystack = text_tokens(tok, text, max_length, "the longest needle prompt")?;
        let sentence_end = haystack
            .iter()
            .map(|&t| {
                let s = tok.decode(&[t], false).unwrap_or_default();
                let s = s.trim_end();
                s.ends_with('.') || s.ends_with('!') || s.ends_with('?')
            })
            .collect();
        Ok(NeedleBuilder { intro: tok.encode(NEEDLE_INTRO, false)?, haystack, sentence_end })
    }

    /// The prompt of `length` tokens with the needle after the sentence end nearest to `depth`
    /// of the haystack part, the answer drawn from `seed`.
    ///
    /// # Errors
    /// A length too short for the fixed parts, or longer than the haystack allows.
    pub fn build(&self, tok: &Tokenizer, length: usize, depth: f64, seed: u64) -> Result<Prompt> {
        let name = NEEDLE_NAMES[(seed % NEEDLE_NAMES.len() as u64) as usize];
        let needle = tok.encode(&needle_sentence(name), false)?;
        let question = tok.encode(NEEDLE_QUESTION, false)?;
        let fixed = self.intro.len() + needle.len() + question.len();
        if length < fixed + 16 {
            return Err(EvalError::arg(
                "--lengths",
                format!("{length} tokens cannot hold a needle prompt (at least {} needed)", fixed + 16),
            ));
        }
        let n_hay = length - fixed;
        if n_hay > self.haystack.len() {
            return Err(EvalError::arg(
                "--lengths",
                format!("{length} is longer than the prepared haystack"),
            ));
        }
        let target = (depth * n_hay as f64).round() as usize;
        let at = if target == 0 || target >= n_hay {
            target.min(n_hay)
        } else {
            // The nearest sentence end (the needle goes after it).
            (1..n_hay)
                .filter(|&i| self.sentence_end[i - 1])
                .min_by_key(|&i| i.abs_diff(target))
                .unwrap_or(target)
        };
        let mut tokens = Vec::with_capacity(length);
        tokens.extend_from_slice(&self.intro);
        tokens.extend_from_slice(&self.haystack[..at]);
        let inserted_at = tokens.len();
        tokens.extend_from_slice(&needle);
        tokens.extend_from_slice(&self.haystack[at..n_hay]);
        tokens.extend_from_slice(&question);
        debug_assert_eq!(tokens.len(), length);
        Ok(Prompt { tokens, expected: name.to_string(), inserted_at })
    }
}

/// The first `n` tokens of a text file.
///
/// # Errors
/// [`EvalError::TextTooShort`] (naming `why`) when the text has fewer; I/O and tokenizer errors.
pub fn text_tokens(tok: &Tokenizer, text: &Path, n: usize, why: &str) -> Result<Vec<u32>> {
    let s = std::fs::read_to_string(text).map_err(|source| EvalError::Io { path: text.into(), source })?;
    // Roughly 4 characters a token; tokenize generously and cut.
    let end = s.char_indices().nth(n.saturating_mul(8)).map(|(i, _)| i).unwrap_or(s.len());
    let mut ids = tok.encode(&s[..end], false)?;
    if ids.len() < n {
        return Err(EvalError::TextTooShort { path: text.into(), have: ids.len(), want: n, why: why.into() });
    }
    ids.truncate(n);
    Ok(ids)
}
