"""Checks on text that a user hands the runtime (prompts, negative prompts).

`check_prompt` is the one gate: the CLI, `Runtime.generate`, the text engine and the HTTP layer call it
before any work starts, so a hostile prompt is a one-line ValueError, never a traceback deep inside a
tokenizer or an encoder.

MAX_PROMPT_CHARS bounds a prompt at 2000 characters. The text encoders read at most a few hundred
tokens (a token is ~4 characters of English text), so 2000 characters covers any prompt that can reach
the model; longer text would only be cut off after the tokenizer spent time and memory on it.
"""

from __future__ import annotations

MAX_PROMPT_CHARS = 2000


def check_prompt(text: object, field: str = "prompt") -> str:
    """Return `text` when it is a usable prompt; raise a one-line ValueError otherwise.

    Refused: anything but a str; text that cannot be encoded as UTF-8 (lone surrogates, e.g. from
    undecodable command-line bytes); NUL characters; more than MAX_PROMPT_CHARS characters.
    """
    if not isinstance(text, str):
        raise ValueError(f"{field} must be a string, got {type(text).__name__}; pass the text itself")
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(
            f"{field} has {len(text)} characters, more than the {MAX_PROMPT_CHARS} allowed; shorten it"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{field} is not valid UTF-8 text (character {exc.start} is {text[exc.start]!r}, "
            "a lone surrogate); pass text in UTF-8"
        ) from None
    if "\x00" in text:
        raise ValueError(f"{field} contains a NUL character at {text.index(chr(0))}; remove it")
    return text
