//! The transformer: Llama and Qwen2 over shared layers. Attention math and KV storage live
//! elsewhere: the model calls [`crate::attention::AttentionState::attend`] with its q and the
//! sequence's paged KV view.

mod config;
mod hf;
mod layers;
mod profile;
mod weights;

pub use config::{Arch, ModelConfig};
pub use layers::WeightPolicy;
pub use weights::{LogitsWanted, Model, SeqChunk};
