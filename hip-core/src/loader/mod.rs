//! Loading models, tokenizers and chat templates from files.

pub mod chat_template;
pub mod gguf;
pub mod tokenizer;
