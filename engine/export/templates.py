"""The model's Hugging Face chat template, expressed as an Ollama (Go text/template) TEMPLATE.

Jinja cannot be translated to Go templates in general, so we do not translate: we keep a Go
template per chat format (ChatML/Qwen, Llama 3, Mistral [INST]) and pick the one that renders a
set of probe conversations *exactly* as the model's own Jinja template does (rendered by
transformers, compared with our Go renderer). That comparison is the proof, so a model whose
template matches none of them gets no TEMPLATE and a clear warning instead of a wrong one.

Ollama tokenises the rendered prompt with the GGUF's tokenizer, which adds BOS itself when the
GGUF says so; a template that prints the BOS token would double it. So we compare against the
Jinja output with its leading BOS removed when the tokenizer adds BOS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.export.gotemplate import ollama_data, render

PROBES: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hello there."}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Tell me a joke."}],
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "It is 4."},
        {"role": "user", "content": "And 3+3?"},
    ],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one."},
    ],
]


@dataclass
class OllamaTemplate:
    family: str
    template: str
    stop: list[str]
    default_system: str | None = None
    checked_conversations: int = 0
    notes: list[str] = field(default_factory=list)


class TemplateNotRecognised(ValueError):
    """No known Go template reproduces the model's chat template."""


def _chatml(default_system: str | None) -> str:
    default = ""
    if default_system is not None:
        default = (
            '{{- if and (eq $i 0) (ne $m.Role "system") }}<|im_start|>system\n'
            + default_system.replace("{{", '{{ "{{" }}')
            + "<|im_end|>\n{{ end }}"
        )
    return (
        "{{- range $i, $m := .Messages }}"
        + default
        + "<|im_start|>{{ $m.Role }}\n{{ $m.Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    )


LLAMA3 = (
    "{{- range $i, $m := .Messages }}<|start_header_id|>{{ $m.Role }}<|end_header_id|>\n\n"
    "{{ $m.Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
)


# Mistral-Instruct v0.1/v0.2: [INST] user [/INST]answer</s>. Its Jinja rejects system messages;
# Ollama sends them anyway, so the system text is put before the first user message.
def _mistral(eos: str) -> str:
    return (
        "{{- range $i, $m := .Messages }}"
        '{{- if eq $m.Role "user" }}[INST] '
        '{{ if and (eq $i 1) (eq (index $.Messages 0).Role "system") }}{{ (index $.Messages 0).Content }}\n\n{{ end }}'
        "{{ $m.Content }} [/INST]"
        '{{- else if eq $m.Role "assistant" }}{{ $m.Content }}' + eos + "{{- end }}{{- end }}"
    )


def _default_chatml_system(render_hf: Callable[[list[dict[str, str]]], str]) -> str | None:
    text = render_hf(PROBES[0])
    head = "<|im_start|>system\n"
    if text.startswith(head) and "<|im_end|>\n" in text:
        return text[len(head) : text.index("<|im_end|>\n")]
    return None


def hf_renderer(tokenizer: Any) -> Callable[[list[dict[str, str]]], str]:
    """Render a conversation with the tokenizer's Jinja template, as the GGUF runtime will see it."""
    bos = getattr(tokenizer, "bos_token", None)
    adds_bos = bool(bos) and tokenizer("x", add_special_tokens=True)["input_ids"][:1] == [
        tokenizer.bos_token_id
    ]

    def render_hf(messages: list[dict[str, str]]) -> str:
        text: str = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if adds_bos and bos and text.startswith(bos):
            text = text[len(bos) :]
        return text

    return render_hf


def _stop_tokens(family: str, tokenizer: Any) -> list[str]:
    stops = {
        "chatml": ["<|im_start|>", "<|im_end|>"],
        "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "mistral": ["[INST]", "[/INST]"],
    }[family]
    eos = getattr(tokenizer, "eos_token", None)
    if eos and eos not in stops:
        stops.append(eos)
    return stops


def _matches(template: str, render_hf: Callable[[list[dict[str, str]]], str]) -> int:
    """How many probe conversations render identically (0 if any differs or none could be rendered)."""
    checked = 0
    for probe in PROBES:
        try:
            expected = render_hf(probe)
        except Exception:  # the Jinja template rejects this shape (e.g. a system turn): skip it
            continue
        if render(template, ollama_data(probe)) != expected:
            return 0
        checked += 1
    return checked


def ollama_template_for(tokenizer: Any) -> OllamaTemplate:
    """The Go TEMPLATE equivalent to ``tokenizer``'s chat template, or ``TemplateNotRecognised``."""
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateNotRecognised(
            "the tokenizer has no chat template, so there is no chat format to reproduce"
        )
    render_hf = hf_renderer(tokenizer)
    default_system = None
    try:
        default_system = _default_chatml_system(render_hf)
    except Exception:
        default_system = None
    candidates = [
        ("chatml", _chatml(default_system), default_system),
        ("llama3", LLAMA3, None),
        ("mistral", _mistral(getattr(tokenizer, "eos_token", None) or "</s>"), None),
    ]
    for family, template, default in candidates:
        checked = _matches(template, render_hf)
        if checked >= 2:
            return OllamaTemplate(
                family=family,
                template=template,
                stop=_stop_tokens(family, tokenizer),
                default_system=default,
                checked_conversations=checked,
            )
    raise TemplateNotRecognised(
        "the model's chat template is not one of the formats the exporter can express for Ollama "
        "(ChatML/Qwen, Llama 3, Mistral [INST]); the Modelfile is written without TEMPLATE — add one by hand"
    )
