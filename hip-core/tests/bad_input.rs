//! Bad model files give typed errors that say what and where: missing, truncated, not GGUF,
//! an unknown architecture.

mod common;

use std::path::PathBuf;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use common::smollm2;
use hip_core::model::Model;
use hip_core::Error;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hip-bad-input-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

#[test]
fn missing_file_is_an_io_error_naming_the_path() {
    let err = Model::from_gguf("/no/such/model.gguf", &Device::Cpu).unwrap_err();
    assert!(matches!(err, Error::Io { ref path, .. } if path.ends_with("model.gguf")), "{err}");
}

#[test]
fn truncated_and_foreign_files_are_format_errors() {
    let bytes = std::fs::read(smollm2()).unwrap();
    let cut = tmp("truncated.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = Model::from_gguf(&cut, &Device::Cpu).unwrap_err();
    assert!(matches!(err, Error::Format { ref what, .. } if what.contains("truncated")), "{err}");

    let header_only = tmp("header.gguf");
    std::fs::write(&header_only, &bytes[..1000]).unwrap();
    assert!(matches!(Model::from_gguf(&header_only, &Device::Cpu), Err(Error::Format { .. })));

    let text = tmp("text.gguf");
    std::fs::write(&text, b"this is not a model").unwrap();
    let err = Model::from_gguf(&text, &Device::Cpu).unwrap_err();
    assert!(matches!(err, Error::Format { ref path, .. } if path.ends_with("text.gguf")), "{err}");
}

#[test]
fn unknown_architecture_is_named() {
    let path = tmp("gpt2.gguf");
    let w = QTensor::quantize(
        &Tensor::zeros((4, 32), candle_core::DType::F32, &Device::Cpu).unwrap(),
        GgmlDType::F32,
    )
    .unwrap();
    let arch = Value::String("gpt2".into());
    let mut f = std::fs::File::create(&path).unwrap();
    gguf_file::write(&mut f, &[("general.architecture", &arch)], &[("token_embd.weight", &w)]).unwrap();
    drop(f);
    let err = Model::from_gguf(&path, &Device::Cpu).unwrap_err();
    assert!(matches!(err, Error::UnsupportedArchitecture(ref a) if a == "gpt2"), "{err}");
}
