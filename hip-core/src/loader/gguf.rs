//! GGUF model files: metadata, the model configuration, tensors (kept quantized) and a fingerprint.

use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::QTensor;
use candle_core::Device;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::model::{Arch, ModelConfig};

/// An open GGUF file: its parsed header and a reader for tensor data.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    reader: BufReader<File>,
}

impl GgufFile {
    /// Opens and parses the header of a GGUF file.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be opened; [`Error::Format`] when it is not a valid
    /// GGUF file (bad magic, truncated header).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| {
            Error::format(path.display().to_string(), format!("not a readable GGUF file: {e}"))
        })?;
        let me = GgufFile { path, content, reader };
        me.check_tensor_extents()?;
        Ok(me)
    }

    /// The parsed header.
    pub fn content(&self) -> &Content {
        &self.content
    }

    /// The file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn where_(&self) -> String {
        self.path.display().to_string()
    }

    /// Fails when a tensor's data would reach past the end of the file (a truncated download).
    fn check_tensor_extents(&self) -> Result<()> {
        let len = std::fs::metadata(&self.path)
            .map_err(|source| Error::Io { path: self.path.clone(), source })?
            .len();
        for (name, info) in &self.content.tensor_infos {
            let elems = info.shape.elem_count() as u64;
            let bsize = info.ggml_dtype.block_size() as u64;
            let bytes = elems / bsize * info.ggml_dtype.type_size() as u64;
            let end = self.content.tensor_data_offset + info.offset + bytes;
            if end > len {
                return Err(Error::format(
                    self.where_(),
                    format!("truncated: tensor {name} ends at byte {end} but the file has {len} bytes"),
                ));
            }
        }
        Ok(())
    }

    /// A metadata value.
    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn meta_u32(&self, key: &str) -> Result<u32> {
        let v =
            self.meta(key).ok_or_else(|| Error::format(self.where_(), format!("missing metadata {key}")))?;
        v.to_u32().map_err(|_| Error::format(self.where_(), format!("metadata {key} is not an integer")))
    }

    fn meta_f32_or(&self, key: &str, default: f32) -> f32 {
        self.meta(key).and_then(|v| v.to_f32().ok()).unwrap_or(default)
    }

    /// The model configuration from the metadata (`general.architecture` and its keys).
    ///
    /// # Errors
    /// [`Error::UnsupportedArchitecture`] for anything but llama and qwen2; [`Error::Format`] for
    /// missing or inconsistent keys.
    pub fn config(&self) -> Result<ModelConfig> {
        let arch_name = self
            .meta("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .ok_or_else(|| Error::format(self.where_(), "missing metadata general.architecture"))?;
        let arch = match arch_name.as_str() {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => return Err(Error::UnsupportedArchitecture(other.to_string())),
        };
        let p = &arch_name;
        let hidden = self.meta_u32(&format!("{p}.embedding_length"))? as usize;
        let heads = self.meta_u32(&format!("{p}.attention.head_count"))? as usize;
        let kv_heads = self.meta_u32(&format!("{p}.attention.head_count_kv"))? as usize;
        let layers = self.meta_u32(&format!("{p}.block_count"))? as usize;
        let ffn = self.meta_u32(&format!("{p}.feed_forward_length"))? as usize;
        let context_length = self.meta_u32(&format!("{p}.context_length")).unwrap_or(4096) as usize;
        let rms_eps = self.meta_f32_or(&format!("{p}.attention.layer_norm_rms_epsilon"), 1e-6);
        let rope_theta = self.meta_f32_or(&format!("{p}.rope.freq_base"), 10_000.0);
        let embd = self
            .content
            .tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| Error::format(self.where_(), "missing tensor token_embd.weight"))?;
        let vocab_size = embd.shape.dims().first().copied().unwrap_or(0);
        let vocab_size = if embd.shape.dims().len() == 2 && embd.shape.dims()[1] == hidden {
            vocab_size
        } else {
            // GGUF stores [hidden, vocab] in ggml order; candle reverses it to [vocab, hidden].
            return Err(Error::format(
                self.where_(),
                format!("token_embd.weight has shape {:?}, expected [vocab, {hidden}]", embd.shape.dims()),
            ));
        };
        if heads == 0 || kv_heads == 0 || hidden % heads != 0 || heads % kv_heads != 0 {
            return Err(Error::format(
                self.where_(),
                format!("inconsistent heads: embedding {hidden}, heads {heads}, kv heads {kv_heads}"),
            ));
        }
        let head_dim = hidden / heads;
        if let Ok(rope_dim) = self.meta_u32(&format!("{p}.rope.dimension_count")) {
            if rope_dim as usize != head_dim {
                return Err(Error::format(
                    self.where_(),
                    format!("partial rotary embeddings ({rope_dim} of {head_dim} dims) are not supported"),
                ));
            }
        }
        let cfg = ModelConfig {
            arch,
            vocab_size,
            hidden,
            layers,
            heads,
            kv_heads,
            head_dim,
            ffn,
            rope_theta,
            rms_eps,
            context_length,
            tied_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads one tensor, kept in its stored (quantized) type.
    ///
    /// # Errors
    /// [`Error::Format`] naming the tensor when it is missing or unreadable.
    pub fn tensor(&mut self, name: &str, device: &Device) -> Result<QTensor> {
        if !self.content.tensor_infos.contains_key(name) {
            return Err(Error::format(self.where_(), format!("missing tensor {name}")));
        }
        let where_ = self.where_();
        self.content
            .tensor(&mut self.reader, name, device)
            .map_err(|e| Error::format(where_, format!("tensor {name}: {e}")))
    }

    /// Whether the file has a tensor called `name`.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// A stable hex fingerprint of the model: SHA-256 over the architecture metadata (every key
    /// except tokenizer and general.* strings that do not change the math) and every tensor's
    /// name, type, shape and offset. Two files with the same fingerprint run the same model.
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        let mut keys: Vec<&String> = self
            .content
            .metadata
            .keys()
            .filter(|k| !k.starts_with("tokenizer.") && !k.starts_with("general."))
            .collect();
        keys.sort();
        for k in keys {
            h.update(k.as_bytes());
            h.update(format!("{:?}", self.content.metadata[k]).as_bytes());
        }
        let mut names: Vec<&String> = self.content.tensor_infos.keys().collect();
        names.sort();
        for n in names {
            let info = &self.content.tensor_infos[n];
            h.update(n.as_bytes());
            h.update(format!("{:?}{:?}{}", info.ggml_dtype, info.shape.dims(), info.offset).as_bytes());
        }
        // Tie the fingerprint to the weight bytes cheaply: hash a sample of the data section.
        let mut f = match File::open(&self.path) {
            Ok(f) => f,
            Err(_) => return format!("{:x}", h.finalize()),
        };
        let mut buf = vec![0u8; 4096];
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        for i in 0..16u64 {
            let pos = self.content.tensor_data_offset
                + (len.saturating_sub(self.content.tensor_data_offset)) * i / 16;
            if f.seek(std::io::SeekFrom::Start(pos)).is_ok() {
                let n = f.read(&mut buf).unwrap_or(0);
                h.update(&buf[..n]);
            }
        }
        format!("{:x}", h.finalize())
    }
}
