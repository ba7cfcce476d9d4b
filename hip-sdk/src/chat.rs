//! Chat turns over a persistent context: rendering only the text a new turn adds.
//!
//! A chat session's context holds the conversation rendered by the model's chat template. A new
//! user turn appends `close + delta`: `close` finishes the previous assistant turn (the part of
//! the template after an assistant message's content, minus the end-of-sequence token the model
//! already generated), and `delta` is what rendering the conversation with the new user message
//! and the generation prompt adds to the rendering of the conversation so far.

use hip_core::loader::chat_template::{ChatTemplate, Message};

use crate::error::{Error, Result};

/// Stands in for an assistant message's content when looking for the text that closes a turn.
const SENTINEL: &str = "\u{E000}hip-sdk-turn\u{E000}";

/// The conversation state of a chat session (shared with the engine thread, which records the
/// end of each generated turn; saved in session files).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct ChatState {
    /// Messages whose rendering is in the context (the system message, finished turns).
    pub(crate) history: Vec<Message>,
    /// Whether any template text is in the context yet.
    pub(crate) rendered: bool,
    /// The last generated assistant turn, not yet closed.
    pub(crate) open: Option<OpenTurn>,
}

/// An assistant turn the model generated: its text, and the end-of-sequence token it ended with.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct OpenTurn {
    pub(crate) text: String,
    pub(crate) eos: Option<u32>,
}

/// What a new user turn appends to the context, and the conversation once it is in.
#[derive(Debug)]
pub(crate) struct TurnPrompt {
    pub(crate) text: String,
    pub(crate) history: Vec<Message>,
}

/// A chat template with the special-token strings it is rendered with.
#[derive(Debug, Clone)]
pub(crate) struct Chat {
    pub(crate) template: ChatTemplate,
    pub(crate) bos: String,
    pub(crate) eos: String,
}

fn render_err(e: hip_core::Error) -> Error {
    Error::invalid(format!("cannot render the chat template: {e}")).with_source(e)
}

impl Chat {
    fn render(&self, messages: &[Message], generation_prompt: bool) -> Result<String> {
        self.template.render(messages, generation_prompt, &self.bos, &self.eos).map_err(render_err)
    }

    /// The rendering of a lone system message, if the template renders it as a prefix of the
    /// conversations that follow (so that it can be prefilled, and shared by forks, up front).
    pub(crate) fn system_prefix(&self, system: &str) -> Result<Option<String>> {
        let sys = [Message::system(system)];
        let alone = self.render(&sys, false)?;
        let probe = self.render(&[Message::system(system), Message::user("?")], true)?;
        Ok((!alone.is_empty() && probe.starts_with(&alone)).then_some(alone))
    }

    /// The text that closes an assistant turn after its content, given the conversation before
    /// it; `eos_text` is left out when the model already generated it.
    fn close(&self, before: &[Message], eos_text: Option<&str>) -> Result<String> {
        let mut msgs = before.to_vec();
        msgs.push(Message::assistant(SENTINEL));
        let full = self.render(&msgs, false)?;
        let close = full.find(SENTINEL).map_or("", |i| &full[i + SENTINEL.len()..]);
        let close = match eos_text {
            Some(eos) if !eos.is_empty() => close.strip_prefix(eos).unwrap_or(close),
            _ => close,
        };
        Ok(close.to_owned())
    }

    /// The text a user turn appends to a context in `state`, up to the generation prompt.
    pub(crate) fn turn(
        &self,
        state: &ChatState,
        user: &str,
        decode: impl Fn(u32) -> Option<String>,
    ) -> Result<TurnPrompt> {
        self.extend(state, Message::user(user), true, decode)
    }

    /// The text one message appends to a context in `state` (no generation prompt).
    pub(crate) fn message(
        &self,
        state: &ChatState,
        message: Message,
        decode: impl Fn(u32) -> Option<String>,
    ) -> Result<TurnPrompt> {
        self.extend(state, message, false, decode)
    }

    fn extend(
        &self,
        state: &ChatState,
        message: Message,
        generation_prompt: bool,
        decode: impl Fn(u32) -> Option<String>,
    ) -> Result<TurnPrompt> {
        let mut history = state.history.clone();
        let mut text = String::new();
        if let Some(open) = &state.open {
            let eos_text = open.eos.and_then(&decode);
            text.push_str(&self.close(&history, eos_text.as_deref())?);
            history.push(Message::assistant(open.text.clone()));
        }
        let base = if state.rendered { self.render(&history, false)? } else { String::new() };
        history.push(message);
        let full = self.render(&history, generation_prompt)?;
        match full.strip_prefix(&base) {
            Some(delta) => text.push_str(delta),
            None => {
                // The template rewrites earlier turns (some drop reasoning, say): the context
                // cannot be rewritten, so append what differs after the common prefix.
                let common = common_prefix(&base, &full);
                tracing::warn!(
                    common,
                    base = base.len(),
                    "the chat template re-renders earlier turns differently; appending the difference"
                );
                text.push_str(&full[common..]);
            }
        }
        Ok(TurnPrompt { text, history })
    }
}

/// Length in bytes of the longest common prefix of `a` and `b`, at a character boundary.
fn common_prefix(a: &str, b: &str) -> usize {
    a.char_indices().zip(b.chars()).find(|((_, x), y)| x != y).map_or(a.len().min(b.len()), |((i, _), _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str =
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}\
        <|im_start|>system\nDefault.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n\
        {{ message['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}\
        <|im_start|>assistant\n{% endif %}";

    fn chat() -> Chat {
        Chat {
            template: ChatTemplate::new(CHATML).unwrap(),
            bos: "<|im_start|>".into(),
            eos: "<|im_end|>".into(),
        }
    }

    fn decode(id: u32) -> Option<String> {
        (id == 2).then(|| "<|im_end|>".to_owned())
    }

    #[test]
    fn turns_render_incrementally() {
        let chat = chat();
        let mut state = ChatState::default();
        let t1 = chat.turn(&state, "Hi", decode).unwrap();
        assert_eq!(
            t1.text,
            "<|im_start|>system\nDefault.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        state.history = t1.history;
        state.rendered = true;
        // The model ended its answer with <|im_end|>: only the newline is missing.
        state.open = Some(OpenTurn { text: "Hello!".into(), eos: Some(2) });
        let t2 = chat.turn(&state, "Bye", decode).unwrap();
        assert_eq!(t2.text, "\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n");
        // Cut short (max tokens): the whole close is added.
        state.history = t2.history;
        state.open = Some(OpenTurn { text: "See".into(), eos: None });
        let t3 = chat.turn(&state, "?", decode).unwrap();
        assert_eq!(t3.text, "<|im_end|>\n<|im_start|>user\n?<|im_end|>\n<|im_start|>assistant\n");
        assert_eq!(t3.history.len(), 5);
    }

    #[test]
    fn messages_render_without_the_generation_prompt() {
        let chat = chat();
        let state = ChatState { history: vec![Message::system("S")], rendered: true, open: None };
        let m = chat.message(&state, Message::user("Doc"), decode).unwrap();
        assert_eq!(m.text, "<|im_start|>user\nDoc<|im_end|>\n");
        let state = ChatState { history: m.history, rendered: true, open: None };
        let t = chat.turn(&state, "Q?", decode).unwrap();
        assert_eq!(t.text, "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n");
        // After a generated answer the message first closes the assistant turn.
        let open = Some(OpenTurn { text: "A".into(), eos: Some(2) });
        let state = ChatState { history: t.history, rendered: true, open };
        let m = chat.message(&state, Message::user("More"), decode).unwrap();
        assert_eq!(m.text, "\n<|im_start|>user\nMore<|im_end|>\n");
        assert_eq!(m.history.len(), 5);
    }

    #[test]
    fn system_prompt_is_a_prefix() {
        let chat = chat();
        let pre = chat.system_prefix("Be terse.").unwrap().unwrap();
        assert_eq!(pre, "<|im_start|>system\nBe terse.<|im_end|>\n");
        let state = ChatState { history: vec![Message::system("Be terse.")], rendered: true, open: None };
        let t = chat.turn(&state, "Hi", decode).unwrap();
        assert_eq!(t.text, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn common_prefix_respects_char_boundaries() {
        assert_eq!(common_prefix("abc", "abd"), 2);
        assert_eq!(common_prefix("ab", "abc"), 2);
        assert_eq!(common_prefix("é", "è"), 0);
    }
}
