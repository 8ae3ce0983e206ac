"""`--format ollama`: a directory Ollama registers with ``ollama create NAME -f Modelfile``.

Ollama runs GGUF files through llama.cpp: the Modelfile names the model (``FROM``), optionally a
LoRA adapter GGUF on top (``ADAPTER``), the prompt template in Ollama's own Go-template syntax
(``TEMPLATE``: the model's Jinja chat template cannot be used as it is), the stop tokens, the
system prompt the adapter was trained with, and sampling parameters. The templates written here
are the chat formats lorakit recognises in a chat template (ChatML, Llama 3); for any other the
Modelfile has no TEMPLATE line and Ollama falls back on its own detection from the GGUF's
``tokenizer.chat_template``, which the file says.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ChatFormat", "chat_format", "modelfile"]


@dataclass(frozen=True)
class ChatFormat:
    name: str
    marker: str
    """A string only this format's Jinja chat templates contain."""
    template: str
    """Ollama's TEMPLATE, over ``.Messages`` (the system prompt arrives as the first message)."""
    stops: tuple[str, ...]


_FORMATS = (
    ChatFormat(
        name="ChatML", marker="<|im_start|>",
        template=("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
                  "<|im_start|>assistant\n"),
        stops=("<|im_end|>",)),
    ChatFormat(
        name="Llama 3", marker="<|start_header_id|>",
        template=("{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
                  "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"),
        stops=("<|eot_id|>",)),
)


def chat_format(chat_template: str | None) -> ChatFormat | None:
    """The chat format a Jinja chat template writes, when lorakit knows it; else None."""
    return next((f for f in _FORMATS if chat_template and f.marker in chat_template), None)


def _quoted(text: str) -> str:
    if '"""' in text:
        raise ValueError('a Modelfile value cannot contain """')
    return f'"""{text}"""'


def modelfile(model_file: str, *, adapter_file: str | None, chat_template: str | None, system: str | None,
              context: int, name: str) -> tuple[str, list[str]]:
    """The Modelfile text for ``model_file`` (and ``adapter_file`` on top) in the same directory, and
    notes for the user."""
    notes = []
    lines = [f"# written by lorakit export; register it with: ollama create {name} -f Modelfile",
             f"FROM ./{model_file}"]
    if adapter_file:
        lines.append(f"ADAPTER ./{adapter_file}")
    chat = chat_format(chat_template)
    if chat is not None:
        lines.append(f"TEMPLATE {_quoted(chat.template)}")
        notes.append(f"TEMPLATE: the model's chat template is {chat.name}, written in Ollama's template syntax")
    else:
        notes.append("no TEMPLATE: lorakit does not recognise this chat template's format; Ollama detects one from "
                     "the GGUF's tokenizer.chat_template (check `ollama show --template`)")
    if system:
        lines.append(f"SYSTEM {_quoted(system)}")
    for stop in chat.stops if chat is not None else ():
        lines.append(f'PARAMETER stop "{stop}"')
    lines += ["PARAMETER temperature 0", f"PARAMETER num_ctx {context}"]
    return "\n".join(lines) + "\n", notes
