//! Helpers the hip SDK examples share: where the assets are, reading text files, reporting
//! errors. The SDK itself is used in the examples: `rag.rs`, `chat.rs` and `persistent.rs`.
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};

/// The default model file: SmolLM2-135M-Instruct (8,192-token context) on the CPU.
#[cfg(not(feature = "cuda"))]
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct-q4_1.gguf";
/// The default model file: Qwen2.5-Coder-1.5B-Instruct (with the `cuda` feature).
#[cfg(feature = "cuda")]
pub const DEFAULT_MODEL: &str = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf";

/// `${HIP_ASSETS:-~/.cache/hip}`, where `scripts/fetch-assets.sh` puts models and texts.
pub fn assets_dir() -> PathBuf {
    let home = PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/hip");
    std::env::var_os("HIP_ASSETS").map_or(home, PathBuf::from)
}

/// The model to load: `arg`, else `$HIP_MODEL`, else [`DEFAULT_MODEL`] in [`assets_dir`].
pub fn model_path(arg: Option<OsString>) -> PathBuf {
    arg.or_else(|| std::env::var_os("HIP_MODEL"))
        .map_or_else(|| assets_dir().join(DEFAULT_MODEL), PathBuf::from)
}

/// The text of every text file under `paths` (files, or folders walked in name order), each
/// after a `# file name` line. A named file must be UTF-8 text; in folders, hidden entries,
/// symbolic links and other files are skipped.
///
/// # Errors
///
/// A path that cannot be read, a named file that is not text, no text at all.
pub fn read_text_files(paths: &[PathBuf]) -> Result<String> {
    let mut out = String::new();
    for path in paths {
        read(path, true, &mut out)?;
    }
    if out.is_empty() {
        bail!("no text files in {paths:?}");
    }
    Ok(out)
}

fn read(path: &Path, named: bool, out: &mut String) -> Result<()> {
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if meta.is_dir() {
        let entries = std::fs::read_dir(path).with_context(|| format!("cannot list {}", path.display()))?;
        let mut entries = entries.collect::<std::io::Result<Vec<_>>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries.iter().filter(|e| !e.file_name().to_string_lossy().starts_with('.')) {
            if !e.file_type()?.is_symlink() {
                read(&e.path(), false, out)?;
            }
        }
        return Ok(());
    }
    if !meta.is_file() && !named {
        return Ok(()); // sockets, pipes, devices
    }
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    match String::from_utf8(bytes) {
        Ok(text) if !text.contains('\0') => {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            out.push_str(&format!("# {name}\n\n{}\n\n", text.trim()));
        }
        _ if named => bail!("{} is not a UTF-8 text file", path.display()),
        _ => {}
    }
    Ok(())
}

/// The exit code of an example's result; prints the error, with a hint when a model or a
/// default text is missing.
pub fn exit_code(result: Result<()>) -> ExitCode {
    let Err(e) = result else { return ExitCode::SUCCESS };
    match e.downcast_ref::<hip_sdk::Error>() {
        Some(e) => eprintln!("error: {e}"), // the SDK's message already tells the cause
        None => eprintln!("error: {e:#}"),
    }
    let io = e.root_cause().downcast_ref::<std::io::Error>().map(std::io::Error::kind);
    if io == Some(std::io::ErrorKind::NotFound) || e.downcast_ref().is_some_and(hip_sdk::Error::is_load) {
        eprintln!("hint: pass a GGUF model file (or set HIP_MODEL) and existing documents;");
        eprintln!("      `bash scripts/fetch-assets.sh smollm2 texts` fetches the default model and texts");
    }
    ExitCode::FAILURE
}
