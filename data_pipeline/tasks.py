"""Task data: `.jsonl` records that say what a model is asked and what it should answer.

A record of a `.jsonl` file in `data.paths` is one of
- `{"text": ...}`: a document; every token is learned (the corpus format);
- `{"prompt": ..., "response": ...}`: the two strings concatenated exactly as written (put any separator,
  such as "\\nAnswer:", in the prompt); only the response's tokens and the EOS after it are learned;
- `{"messages": [{"role": ..., "content": ...}, ...]}` (the common chat form): rendered with the
  tokenizer's chat template when it has one, else with the plain template below; only the assistant
  messages' tokens (and the EOS) are learned.

Plain template (a tokenizer without `chat_template`, e.g. the SentencePiece one the pipeline trains):

    user: What is the capital of France?
    assistant: Paris.

i.e. each message is "<role>: <content>", messages are separated by "\\n", and the learned part of an
assistant message is its content (the "assistant: " header is context).

Everything else is context: its labels are -100 (`objectives.lm.IGNORE_INDEX`), so the teacher, the soft labels and the
students learn responses, never prompts. A token counts as learned when any of its characters lies in a
learned span (a token that merges the prompt's last space with the response's first word is learned).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

ROLES_LEARNED = ("assistant",)

Span = tuple[int, int]  # [start, end) characters of a document's text


@dataclass(frozen=True)
class Document:
    """One document of a corpus: its text and, for task data, what of it is learned.

    spans: learned character ranges of `text`; () = the whole text (a plain document).
    messages: a chat record as written (role, content); rendered again with the tokenizer's chat
        template where the tokenizer has one (`render`), else `text` is its plain rendering.
    """

    text: str
    spans: tuple[Span, ...] = ()
    messages: tuple[tuple[str, str], ...] = ()

    @property
    def is_task(self) -> bool:
        return bool(self.spans)

    @property
    def prompt(self) -> str:
        """The text before the first learned span (a task's question; the whole text of a plain document)."""
        return self.text[: self.spans[0][0]] if self.spans else self.text

    @property
    def reference(self) -> str:
        """The first learned span (a task's reference response); "" for a plain document."""
        return self.text[slice(*self.spans[0])] if self.spans else ""


def _render_plain(messages: Sequence[tuple[str, str]]) -> tuple[str, tuple[Span, ...]]:
    text, spans = "", []
    for i, (role, content) in enumerate(messages):
        text += ("\n" if i else "") + f"{role}: "
        if role in ROLES_LEARNED:
            spans.append((len(text), len(text) + len(content)))
        text += content
    return text, tuple(spans)


def _messages(value: Any) -> tuple[tuple[str, str], ...] | None:
    if not isinstance(value, list) or not value:
        return None
    out = []
    for m in value:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            return None
        out.append((m["role"], m["content"]))
    return tuple(out)


def parse_record(record: Any) -> Document | None:
    """A `.jsonl` record as a Document; None when it is none of the three forms (the reader counts a bad line).

    A prompt/response record needs a non-blank response; a chat record at least one non-blank
    assistant message (otherwise nothing would be learned from it).
    """
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("text"), str):
        return Document(record["text"])
    prompt, response = record.get("prompt"), record.get("response")
    if isinstance(prompt, str) and isinstance(response, str):
        if not response.strip():
            return None
        return Document(prompt + response, ((len(prompt), len(prompt) + len(response)),))
    messages = _messages(record.get("messages"))
    if messages is None or not any(r in ROLES_LEARNED and c.strip() for r, c in messages):
        return None
    text, spans = _render_plain(messages)
    return Document(text, spans, messages)


def render(tok: Any, doc: Document) -> tuple[str, tuple[Span, ...]]:
    """(text, learned spans) of `doc` as the tokenizer should see it.

    A chat record with a tokenizer that has a chat template: each assistant message's span is what
    rendering the conversation up to it adds to rendering the conversation before it with the generation
    prompt (the template's own markup around the message stays context). Anything else: as read.
    """
    if not (doc.messages and getattr(tok, "chat_template", None)):
        return doc.text, doc.spans
    msgs = [{"role": r, "content": c} for r, c in doc.messages]
    text, spans = "", []
    for i, (role, _) in enumerate(doc.messages):
        if role not in ROLES_LEARNED:
            continue
        before = tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
        upto = tok.apply_chat_template(msgs[: i + 1], tokenize=False)
        if not (before.startswith(text) and upto.startswith(before)):
            raise ValueError(
                "the tokenizer's chat template does not render a conversation as a prefix of its "
                "continuation; convert the records to prompt/response"
            )
        spans.append((len(before), len(upto)))
        text = upto
    full = tok.apply_chat_template(msgs, tokenize=False)
    if not full.startswith(text):
        raise ValueError(
            "the tokenizer's chat template renders the whole conversation differently from its turns"
        )
    return full, tuple(spans)


def learned_tokens(offsets: Sequence[tuple[int, int]], spans: Sequence[Span]) -> list[bool]:
    """Per token (character offsets [start, end) in the text): does any of its characters lie in a span?
    No spans = every token is learned."""
    if not spans:
        return [True] * len(offsets)
    return [any(s < he and ls < e for ls, he in spans) for s, e in offsets]


def encode_documents(tok: Any, docs: Sequence[Document]) -> list[tuple[list[int], list[bool]]]:
    """(token ids, learned per token) of each document, without specials (callers append EOS).

    The ids are those of the whole text in one call (the same ids a plain document of that text gets);
    which of them are learned comes from the tokenizer's character offsets. Plain documents skip the
    offset computation.
    """
    rendered = [render(tok, d) for d in docs]
    if not any(spans for _, spans in rendered):
        ids = tok([t for t, _ in rendered], add_special_tokens=False)["input_ids"]
        return [(i, [True] * len(i)) for i in ids]
    enc = tok([t for t, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    return [
        (ids, learned_tokens(offsets, spans))
        for ids, offsets, (_, spans) in zip(enc["input_ids"], enc["offset_mapping"], rendered, strict=True)
    ]
