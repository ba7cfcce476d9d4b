//! Chat templates: the Jinja templates Hugging Face tokenizers (and GGUF files, under
//! `tokenizer.chat_template`) carry to turn a conversation into a prompt.
//!
//! Rendering uses minijinja configured like `transformers`' `apply_chat_template`: `trim_blocks`
//! and `lstrip_blocks` on, the globals `raise_exception(msg)` and `strftime_now(format)`, a
//! `tojson` filter that writes JSON the way Python's `json.dumps` does, and the Python string and
//! dict methods templates commonly call (`.strip()`, `.startswith()`, `.split()`, `.items()`, …).

use std::fmt::Write as _;

use candle_core::quantized::gguf_file::{Content, Value as GgufValue};
use minijinja::value::{from_args, Kwargs, Value, ValueKind};
use minijinja::{Environment, ErrorKind, State};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The name the template is registered under.
const NAME: &str = "chat_template";

/// GGUF metadata key of the chat template.
pub const GGUF_CHAT_TEMPLATE_KEY: &str = "tokenizer.chat_template";

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `"system"`, `"user"`, `"assistant"` (or whatever the template knows).
    pub role: String,
    /// The message text.
    pub content: String,
}

impl Message {
    /// A message with the given role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// A compiled chat template.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
}

fn template_err(e: minijinja::Error) -> Error {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        let _ = write!(msg, ": {s}");
        src = s.source();
    }
    Error::ChatTemplate(msg)
}

impl ChatTemplate {
    /// Compiles a Jinja chat template; a syntax error is an [`Error::ChatTemplate`].
    pub fn new(source: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.set_unknown_method_callback(python_method);
        env.add_template_owned(NAME, source.to_owned()).map_err(template_err)?;
        Ok(Self { env, source: source.to_owned() })
    }

    /// The template stored in GGUF metadata (`tokenizer.chat_template`), if there is one.
    pub fn from_gguf(content: &Content) -> Result<Option<Self>> {
        match content.metadata.get(GGUF_CHAT_TEMPLATE_KEY) {
            None => Ok(None),
            Some(GgufValue::String(s)) => Self::new(s).map(Some),
            Some(v) => Err(Error::format(
                "GGUF metadata",
                format!("{GGUF_CHAT_TEMPLATE_KEY} is a {:?}, not a string", v.value_type()),
            )),
        }
    }

    /// The template source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders a conversation. With `add_generation_prompt` the prompt ends with the header of
    /// an assistant turn (e.g. `<|im_start|>assistant\n`), ready for generation. `bos_token` and
    /// `eos_token` are exposed to the template under those names.
    ///
    /// Errors (including `raise_exception` calls in the template) are [`Error::ChatTemplate`]
    /// with the template's message.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String> {
        self.render_with(messages, add_generation_prompt, bos_token, eos_token, Value::UNDEFINED)
    }

    /// Like [`Self::render`], with extra template variables (e.g. `tools`, `documents`) from any
    /// serializable map; its entries override the standard ones.
    pub fn render_with<S: Serialize>(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        bos_token: &str,
        eos_token: &str,
        extra: S,
    ) -> Result<String> {
        let tmpl = self.env.get_template(NAME).map_err(template_err)?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token,
            eos_token => eos_token,
            ..Value::from_serialize(extra)
        };
        tmpl.render(ctx).map_err(template_err)
    }
}

// ---- template globals and filters -----------------------------------------------------------------

fn raise_exception(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

/// `strftime_now(format)`: the current UTC date and time, formatted with the common `strftime`
/// directives (`%Y %y %m %d %e %B %b %A %a %H %I %M %S %p %j %%`).
fn strftime_now(format: &str) -> std::result::Result<String, minijinja::Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Ok(strftime(format, secs))
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];

/// Formats the UTC time `secs` since the Unix epoch.
fn strftime(format: &str, secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    let (h, mi, s) = (tod / 3600, tod % 3600 / 60, tod % 60);
    // Civil-from-days (Howard Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_mar = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_mar + 2) / 153;
    let d = doy_mar - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cum[(m - 1) as usize] + d + i64::from(leap && m > 2);
    let month = MONTHS[(m - 1) as usize];
    let wd = WEEKDAYS[weekday];

    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let _ = match chars.next() {
            Some('Y') => write!(out, "{y}"),
            Some('y') => write!(out, "{:02}", y.rem_euclid(100)),
            Some('m') => write!(out, "{m:02}"),
            Some('d') => write!(out, "{d:02}"),
            Some('e') => write!(out, "{d:2}"),
            Some('B') => write!(out, "{month}"),
            Some('b') | Some('h') => write!(out, "{}", &month[..3]),
            Some('A') => write!(out, "{wd}"),
            Some('a') => write!(out, "{}", &wd[..3]),
            Some('H') => write!(out, "{h:02}"),
            Some('I') => write!(out, "{:02}", if h % 12 == 0 { 12 } else { h % 12 }),
            Some('M') => write!(out, "{mi:02}"),
            Some('S') => write!(out, "{s:02}"),
            Some('p') => write!(out, "{}", if h < 12 { "AM" } else { "PM" }),
            Some('j') => write!(out, "{yday:03}"),
            Some('%') => write!(out, "%"),
            Some(other) => write!(out, "%{other}"),
            None => write!(out, "%"),
        };
    }
    out
}

/// `tojson(indent=None, ensure_ascii=False, sort_keys=False, separators=None)`, as
/// `transformers` defines it (Python's `json.dumps`, not HTML-escaped).
fn tojson(
    value: &Value,
    indent: Option<Value>,
    kwargs: Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    let indent = match indent {
        Some(v) => Some(v),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_owned()),
            None => Some(" ".repeat(usize::try_from(v)?)),
        },
    };
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = match separators {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        Some(_) => {
            return Err(minijinja::Error::new(ErrorKind::InvalidOperation, "separators must be a pair"))
        }
        None if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        None => (", ".to_owned(), ": ".to_owned()),
    };
    let opts = JsonOpts { indent, item_sep, key_sep, ensure_ascii, sort_keys };
    let mut out = String::new();
    write_json(&mut out, value, &opts, 0)?;
    Ok(Value::from_safe_string(out))
}

struct JsonOpts {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    ensure_ascii: bool,
    sort_keys: bool,
}

fn write_json_str(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !c.is_ascii()) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn newline_indent(out: &mut String, opts: &JsonOpts, level: usize) {
    if let Some(ind) = &opts.indent {
        out.push('\n');
        for _ in 0..level {
            out.push_str(ind);
        }
    }
}

fn write_json(
    out: &mut String,
    v: &Value,
    opts: &JsonOpts,
    level: usize,
) -> std::result::Result<(), minijinja::Error> {
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if let Ok(f) = f64::try_from(v.clone()) {
                if !v.is_integer() && !f.is_finite() {
                    out.push_str(if f.is_nan() {
                        "NaN"
                    } else if f > 0.0 {
                        "Infinity"
                    } else {
                        "-Infinity"
                    });
                    return Ok(());
                }
            }
            let _ = write!(out, "{v}");
        }
        ValueKind::String => write_json_str(out, v.as_str().unwrap_or_default(), opts.ensure_ascii),
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if opts.sort_keys {
                keys.sort();
            }
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline_indent(out, opts, level + 1);
                match k.as_str() {
                    Some(s) => write_json_str(out, s, opts.ensure_ascii),
                    None => write_json_str(out, &k.to_string(), opts.ensure_ascii),
                }
                out.push_str(&opts.key_sep);
                write_json(out, &v.get_item(k)?, opts, level + 1)?;
            }
            newline_indent(out, opts, level);
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline_indent(out, opts, level + 1);
                write_json(out, item, opts, level + 1)?;
            }
            newline_indent(out, opts, level);
            out.push(']');
        }
        _ => write_json_str(out, &v.to_string(), opts.ensure_ascii),
    }
    Ok(())
}

// ---- Python methods -------------------------------------------------------------------------------

fn unknown_method() -> minijinja::Error {
    minijinja::Error::from(ErrorKind::UnknownMethod)
}

/// Strings a `startswith`/`endswith` argument stands for: a string or a tuple/list of strings.
fn affixes(v: &Value) -> std::result::Result<Vec<String>, minijinja::Error> {
    if let Some(s) = v.as_str() {
        return Ok(vec![s.to_owned()]);
    }
    v.try_iter()?
        .map(|x| {
            x.as_str().map(str::to_owned).ok_or_else(|| {
                minijinja::Error::new(ErrorKind::InvalidOperation, "expected a string or a tuple of strings")
            })
        })
        .collect()
}

fn strip_chars<'a>(s: &'a str, chars: Option<&str>, left: bool, right: bool) -> &'a str {
    let pred = |c: char| match chars {
        Some(set) => set.contains(c),
        None => c.is_whitespace(),
    };
    let s = if left { s.trim_start_matches(pred) } else { s };
    if right {
        s.trim_end_matches(pred)
    } else {
        s
    }
}

fn py_title(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut prev_cased = false;
    for c in s.chars() {
        if c.is_alphabetic() {
            if prev_cased {
                out.extend(c.to_lowercase());
            } else {
                out.extend(c.to_uppercase());
            }
            prev_cased = true;
        } else {
            out.push(c);
            prev_cased = false;
        }
    }
    out
}

fn py_split(s: &str, sep: Option<&str>, maxsplit: i64) -> std::result::Result<Vec<Value>, minijinja::Error> {
    let max = if maxsplit < 0 { usize::MAX } else { maxsplit as usize };
    let parts: Vec<Value> = match sep {
        Some("") => return Err(minijinja::Error::new(ErrorKind::InvalidOperation, "empty separator")),
        Some(sep) => {
            if max == usize::MAX {
                s.split(sep).map(Value::from).collect()
            } else {
                s.splitn(max.saturating_add(1), sep).map(Value::from).collect()
            }
        }
        None => {
            let mut parts = Vec::new();
            let mut rest = s.trim_start();
            while !rest.is_empty() {
                if parts.len() == max {
                    parts.push(Value::from(rest));
                    break;
                }
                let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
                parts.push(Value::from(&rest[..end]));
                rest = rest[end..].trim_start();
            }
            parts
        }
    };
    Ok(parts)
}

/// The unknown-method callback: Python `str` and `dict` methods templates use.
fn python_method(
    _state: &State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> std::result::Result<Value, minijinja::Error> {
    match value.kind() {
        ValueKind::String => {
            let s = value.as_str().unwrap_or_default();
            Ok(match method {
                "strip" | "lstrip" | "rstrip" => {
                    let (chars,): (Option<&str>,) = from_args(args)?;
                    Value::from(strip_chars(s, chars, method != "rstrip", method != "lstrip"))
                }
                "startswith" | "endswith" => {
                    let (arg,): (Value,) = from_args(args)?;
                    let hits = affixes(&arg)?;
                    Value::from(hits.iter().any(|a| {
                        if method == "startswith" {
                            s.starts_with(a.as_str())
                        } else {
                            s.ends_with(a.as_str())
                        }
                    }))
                }
                "split" => {
                    let (sep, maxsplit): (Option<&str>, Option<i64>) = from_args(args)?;
                    Value::from(py_split(s, sep, maxsplit.unwrap_or(-1))?)
                }
                "upper" => {
                    let _: () = from_args(args)?;
                    Value::from(s.to_uppercase())
                }
                "lower" => {
                    let _: () = from_args(args)?;
                    Value::from(s.to_lowercase())
                }
                "title" => {
                    let _: () = from_args(args)?;
                    Value::from(py_title(s))
                }
                "capitalize" => {
                    let _: () = from_args(args)?;
                    let mut c = s.chars();
                    Value::from(match c.next() {
                        Some(f) => f.to_uppercase().chain(c.flat_map(char::to_lowercase)).collect::<String>(),
                        None => String::new(),
                    })
                }
                "replace" => {
                    let (old, new, count): (&str, &str, Option<i64>) = from_args(args)?;
                    Value::from(match count {
                        Some(n) if n >= 0 => s.replacen(old, new, n as usize),
                        _ => s.replace(old, new),
                    })
                }
                "find" => {
                    let (sub,): (&str,) = from_args(args)?;
                    Value::from(s.find(sub).map_or(-1, |b| s[..b].chars().count() as i64))
                }
                "count" => {
                    let (sub,): (&str,) = from_args(args)?;
                    Value::from(if sub.is_empty() { s.chars().count() + 1 } else { s.matches(sub).count() })
                }
                "join" => {
                    let (items,): (Value,) = from_args(args)?;
                    let parts: Vec<String> = items.try_iter()?.map(|v| v.to_string()).collect();
                    Value::from(parts.join(s))
                }
                "isdigit" | "isalpha" | "isalnum" | "isspace" | "islower" | "isupper" => {
                    let _: () = from_args(args)?;
                    let ok = !s.is_empty()
                        && match method {
                            "isdigit" => s.chars().all(|c| c.is_ascii_digit()),
                            "isalpha" => s.chars().all(char::is_alphabetic),
                            "isalnum" => s.chars().all(char::is_alphanumeric),
                            "isspace" => s.chars().all(char::is_whitespace),
                            "islower" => {
                                s.chars().any(char::is_lowercase) && !s.chars().any(char::is_uppercase)
                            }
                            _ => s.chars().any(char::is_uppercase) && !s.chars().any(char::is_lowercase),
                        };
                    Value::from(ok)
                }
                _ => return Err(unknown_method()),
            })
        }
        ValueKind::Map => Ok(match method {
            "items" => {
                let _: () = from_args(args)?;
                let pairs: Vec<Value> = value
                    .try_iter()?
                    .map(|k| {
                        let v = value.get_item(&k).unwrap_or(Value::UNDEFINED);
                        Value::from(vec![k, v])
                    })
                    .collect();
                Value::from(pairs)
            }
            "keys" => {
                let _: () = from_args(args)?;
                Value::from(value.try_iter()?.collect::<Vec<_>>())
            }
            "values" => {
                let _: () = from_args(args)?;
                let vals: Vec<Value> =
                    value.try_iter()?.map(|k| value.get_item(&k).unwrap_or(Value::UNDEFINED)).collect();
                Value::from(vals)
            }
            "get" => {
                let (key, default): (Value, Option<Value>) = from_args(args)?;
                match value.get_item(&key) {
                    Ok(v) if !v.is_undefined() => v,
                    _ => default.unwrap_or(Value::from(())),
                }
            }
            _ => return Err(unknown_method()),
        }),
        _ => Err(unknown_method()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_known_dates() {
        assert_eq!(strftime("%Y-%m-%d %H:%M:%S %a %j", 0), "1970-01-01 00:00:00 Thu 001");
        // 2024-07-26 12:34:56 UTC, a Friday, day 208 of a leap year.
        assert_eq!(strftime("%d %b %Y, %A %I%p %j %%", 1_721_997_296), "26 Jul 2024, Friday 12PM 208 %");
        assert_eq!(strftime("%d %B %Y", 951_782_400), "29 February 2000");
    }

    #[test]
    fn python_methods_and_tojson() {
        let t = ChatTemplate::new(
            "{{ '  a b  '.strip() }}|{{ 'xhix'.strip('x') }}|{{ 'abc'.startswith(('z', 'a')) }}|\
             {{ 'a,b,,c'.split(',') | length }}|{{ ' a  b '.split() | join('+') }}|{{ 'hello world'.title() }}|\
             {{ {'k': 1}.items() | list | length }}|{{ {'k': 1}.get('z', 'd') }}|\
             {{ {'a': [1, 2.5, 'é\"'], 'b': none} | tojson }}|{{ [1] | tojson(indent=2) }}",
        )
        .unwrap();
        let out = t.render(&[], false, "", "").unwrap();
        assert_eq!(
            out,
            "a b|hi|True|4|a+b|Hello World|1|d|{\"a\": [1, 2.5, \"é\\\"\"], \"b\": null}|[\n  1\n]"
        );
    }

    #[test]
    fn raise_exception_is_a_chat_template_error() {
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}").unwrap();
        match t.render(&[], false, "", "") {
            Err(Error::ChatTemplate(m)) => assert!(m.contains("roles must alternate"), "{m}"),
            other => panic!("expected a chat template error, got {other:?}"),
        }
        assert!(matches!(ChatTemplate::new("{% for %}"), Err(Error::ChatTemplate(_))));
    }

    #[test]
    fn chatml_template() {
        let src = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        let t = ChatTemplate::new(src).unwrap();
        let out = t.render(&[Message::system("S"), Message::user("U")], true, "", "").unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
        );
    }
}
