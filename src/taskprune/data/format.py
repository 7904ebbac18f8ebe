"""Turn examples into model input text: raw or through the chat template, prompt or prompt+response."""

from __future__ import annotations

from typing import Literal, get_args

from taskprune.data.core import Example

Template = Literal["chat", "raw"]
Content = Literal["prompt", "prompt+response"]  # what a capture runs over
TEMPLATES, CONTENTS = get_args(Template), get_args(Content)


def format_text(tokenizer, example: Example, template: str = "chat", content: str = "prompt") -> str:
    """The text fed to the model for capture.

    `template="chat"` puts the prompt in a user turn (with the generation prompt, or followed by
    the reference as the assistant turn when `content="prompt+response"`); `"raw"` uses the text as is.
    """
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    if content not in CONTENTS:
        raise ValueError(f"content must be one of {CONTENTS}, got {content!r}")
    with_response = content == "prompt+response"
    if with_response and not example.response:
        raise ValueError(f"{example.id} has no reference response; use content='prompt'")
    if template == "raw":
        return example.prompt + ("\n" + example.response if with_response else "")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template; use template='raw'")
    messages = [{"role": "user", "content": example.prompt}]
    if with_response:
        messages.append({"role": "assistant", "content": example.response})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=not with_response)
