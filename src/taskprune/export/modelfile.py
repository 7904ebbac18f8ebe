"""An Ollama `Modelfile` for an exported GGUF: `ollama create NAME -f Modelfile`.

It names the GGUF (`FROM ./FILE.gguf`), the chat template as Ollama's Go TEMPLATE, the default
system prompt the Hugging Face template inserts (as SYSTEM), the stop tokens (the EOS ids generation
ends on) and the greedy decoding that `taskprune eval` uses (temperature 0, no repetition penalty).

The Jinja chat template is not interpreted: it is rendered with transformers on probe conversations
and compared with what each known turn format (ChatML, Llama 3, Gemma) produces for them. The first
format that reproduces the template's output exactly is written as the TEMPLATE; when none does, the
Modelfile has no TEMPLATE and says so (Ollama then falls back to the template it recognises from the
GGUF's `tokenizer.chat_template`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

MARKER = "# Modelfile written by taskprune export"


@dataclass(frozen=True)
class TurnFormat:
    """A chat format where every message is `head(role) + content + tail` and a generation prompt follows."""

    name: str
    head: str  # with {role}
    tail: str
    generation: str
    roles: dict[str, str] = field(default_factory=dict)  # HF role -> the role name the format writes
    system: bool = True  # has a system role

    def render(self, messages: list[dict], generation: bool = True) -> str:
        out = "".join(self.head.format(role=self.roles.get(m["role"], m["role"])) + m["content"] + self.tail
                      for m in messages)
        return out + (self.generation if generation else "")

    def go_template(self) -> str:
        """The same format in Ollama's template language (`.Messages`, `.Role`, `.Content`)."""
        role = "{{ .Role }}"
        for hf_role, name in self.roles.items():
            role = f'{{{{ if eq .Role "{hf_role}" }}}}{name}{{{{ else }}}}' + role + "{{ end }}"
        head = self.head.replace("{role}", role)
        return "{{- range .Messages }}" + head + "{{ .Content }}" + self.tail + "{{ end }}" + self.generation


FORMATS = (
    TurnFormat("chatml", "<|im_start|>{role}\n", "<|im_end|>\n", "<|im_start|>assistant\n"),
    TurnFormat("llama3", "<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>",
               "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    TurnFormat("gemma", "<start_of_turn>{role}\n", "<end_of_turn>\n", "<start_of_turn>model\n",
               roles={"assistant": "model"}, system=False),
)

_PROBES = ([{"role": "user", "content": "Write a function that adds two numbers."}],
           [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "It is 5."},
            {"role": "user", "content": "And 4 + 4?"}])
_SYSTEM_PROBE = [{"role": "system", "content": "You answer briefly."},
                 {"role": "user", "content": "Name a prime number."}]


def _hf(tokenizer, messages: list[dict]) -> str | None:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template may refuse a role (Gemma's system): not this probe then
        return None


def _without_bos(text: str | None, bos: str, ours: str) -> tuple[str | None, str]:
    """The template's text without a leading BOS the turn format does not write (the tokenizer adds BOS
    through add_bos, and llama.cpp does the same from the GGUF), and the format's text."""
    if text is not None and bos and text.startswith(bos) and not ours.startswith(bos):
        text = text[len(bos):]
    return text, ours


def translate(tokenizer) -> tuple[TurnFormat, str | None] | None:
    """(the turn format, the default system prompt or None) that reproduces the tokenizer's chat template
    on the probe conversations, or None when none does."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    # A BOS the template writes as text is left to the tokenizer only where it adds one itself (llama.cpp then
    # does too, from the GGUF's add_bos flag).
    ids = tokenizer("a")["input_ids"]
    adds_bos = tokenizer.bos_token_id is not None and len(ids) > 1 and ids[0] == tokenizer.bos_token_id
    bos = tokenizer.bos_token if adds_bos else ""
    for fmt in FORMATS:
        default, ok = None, True
        for probe in _PROBES:
            text, ours = _without_bos(_hf(tokenizer, probe), bos, fmt.render(probe))
            if text is None:
                ok = False
                break
            if text != ours and fmt.system and text.endswith(ours):
                head = fmt.head.format(role="system")
                inserted = text[:-len(ours)]
                if inserted.startswith(head) and inserted.endswith(fmt.tail):
                    found = inserted[len(head):-len(fmt.tail)] if fmt.tail else inserted[len(head):]
                    if default in (None, found):
                        default = found
                        continue
            if text != ours:
                ok = False
                break
        if ok and fmt.system:
            text, ours = _without_bos(_hf(tokenizer, _SYSTEM_PROBE), bos, fmt.render(_SYSTEM_PROBE))
            ok = text is None or text == ours
        if ok:
            return fmt, default
    return None


def _quote(text: str) -> str:
    if '"""' in text:
        raise ValueError('a template or system prompt with """ cannot be written to a Modelfile')
    return f'"""{text}"""'


def stop_tokens(tokenizer, generation_eos) -> list[str]:
    """The texts of the ids generation ends on: the tokenizer's EOS and the generation config's."""
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    ids += [generation_eos] if isinstance(generation_eos, int) else list(generation_eos or [])
    return list(dict.fromkeys(tokenizer.convert_ids_to_tokens(i) for i in ids if i is not None))


def modelfile_text(gguf_name: str, tokenizer, generation_eos=None, context_length: int | None = None) -> str:
    """The Modelfile for `gguf_name` (a file name beside it) and this checkpoint's tokenizer."""
    lines = [MARKER, f"# Create the model with: ollama create NAME -f {'Modelfile'}", f"FROM ./{gguf_name}", ""]
    found = translate(tokenizer)
    if found is None:
        lines += ["# The chat template was not translated (not ChatML, Llama 3 or Gemma turns); Ollama uses the",
                  "# template it recognises from the GGUF's tokenizer.chat_template.", ""]
    else:
        fmt, default = found
        lines += [f"# {fmt.name} turns, checked against the checkpoint's chat template", f"TEMPLATE {_quote(fmt.go_template())}"]
        if default:
            lines.append(f"SYSTEM {_quote(default)}")
        lines.append("")
    lines.append("# Greedy decoding, as taskprune eval generates (temperature 0, no sampling, no repetition penalty)")
    lines += ["PARAMETER temperature 0", "PARAMETER top_k 1", "PARAMETER top_p 1", "PARAMETER min_p 0",
              "PARAMETER repeat_penalty 1", "PARAMETER seed 0"]
    if context_length:
        lines.append(f"PARAMETER num_ctx {min(context_length, 4096)}")
    lines += [f'PARAMETER stop "{token}"' for token in stop_tokens(tokenizer, generation_eos)]
    return "\n".join(lines) + "\n"


def check_modelfile(path: Path, overwrite: bool) -> None:
    """Refuse an existing Modelfile unless `overwrite`, and then only one taskprune wrote."""
    from taskprune.atomic import OutputExistsError
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    if not overwrite:
        raise OutputExistsError(f"{path} exists; export somewhere else, pass --overwrite, or --no-modelfile")
    if path.is_symlink() or not path.is_file() or not path.read_text(errors="replace").startswith(MARKER):
        raise OutputExistsError(f"{path} is not a Modelfile taskprune wrote; --overwrite only replaces one: export "
                                f"somewhere else, remove it yourself, or pass --no-modelfile")


def write_modelfile(ckpt: Path, gguf_path: Path, path: Path | None = None) -> Path:
    """Write the Modelfile for the GGUF at `gguf_path`, exported from the checkpoint `ckpt` (default:
    `Modelfile` beside the GGUF)."""
    import json

    from transformers import AutoTokenizer

    from taskprune.export.gguf import atomic_file
    ckpt, gguf_path = Path(ckpt), Path(gguf_path)
    path = Path(path) if path else gguf_path.parent / "Modelfile"
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    generation = {}
    if (ckpt / "generation_config.json").is_file():
        generation = json.loads((ckpt / "generation_config.json").read_text())
    config = json.loads((ckpt / "config.json").read_text())
    text = modelfile_text(gguf_path.name, tokenizer, generation.get("eos_token_id", config.get("eos_token_id")),
                          config.get("max_position_embeddings"))
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
