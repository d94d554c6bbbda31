"""Ollama side of the export: the Go TEMPLATE reproduces the HF chat template, the Modelfile, registration.

Registration runs against ``OllamaStandIn`` (tests/export_models.py), a local stand-in for Ollama's
HTTP API that checks requests as the API documentation specifies: no Ollama server binary can be
installed in this environment, so the real one cannot be used.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from export_models import (
    FAMILIES,
    MISTRAL_TEMPLATE,
    OllamaStandIn,
    build_tokenizer,
    closed_port_url,
    llama_cpp_source,
)

from engine.export.gotemplate import GoTemplateError, ollama_data, render
from engine.export.ollama import OllamaError, default_model_name, modelfile_text, register, write_modelfile
from engine.export.templates import OllamaTemplate, TemplateNotRecognised, hf_renderer, ollama_template_for

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Who are you?"}],
    [
        {"role": "user", "content": "Say one word."},
        {"role": "assistant", "content": "Word."},
        {"role": "user", "content": "Two words now,\nplease."},
    ],
    [
        {"role": "system", "content": "Multi\nline system."},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
        {"role": "user", "content": "e {{ not a template }}"},
    ],
]


# ----- the Go template renderer -----


def test_go_renderer_trims_branches_ranges_and_variables() -> None:
    tpl = (
        "{{- range $i, $m := .Messages }}\n"
        '  {{- if eq $m.Role "user" }}U{{ $i }}:{{ $m.Content }}\n'
        '  {{- else if eq $m.Role "assistant" }} A:{{ .Content }}\n'
        "  {{- else }} S:{{ $m.Content }}{{ end }}\n"
        "{{- end }}|{{ len .Messages }}|{{ (index .Messages 0).Role }}|{{ and .System (eq 1 1) }}"
    )
    data = ollama_data(
        [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": "a"},
        ],
        system="",
    )
    assert render(tpl, data) == " S:sU1:u A:a|3|system|"


def test_go_renderer_scopes_and_assignment() -> None:
    tpl = '{{ $x := "a" }}{{ range .Messages }}{{ $x = .Content }}{{ end }}{{ $x }}{{ if not .System }}!{{ end }}'
    assert (
        render(tpl, ollama_data([{"role": "user", "content": "q"}, {"role": "user", "content": "z"}])) == "z!"
    )


def test_go_renderer_rejects_what_it_cannot_render_faithfully() -> None:
    with pytest.raises(GoTemplateError):
        render("{{ json .Messages }}", ollama_data([]))
    with pytest.raises(GoTemplateError):
        render("{{ if .System }}x", ollama_data([]))


# ----- template equivalence with the Hugging Face chat templates -----


@pytest.fixture(scope="session")
def real_tokenizers(test_cache_dir: Path) -> dict[str, object]:
    source = llama_cpp_source()
    if source is None:
        pytest.skip(
            "llama.cpp source tree not found (set LLAMA_CPP_SOURCE, see tests/export_models.py): "
            "the real Qwen2/Llama 3 tokenizers come from its ggml-vocab-*.gguf files"
        )
    from transformers import AutoTokenizer

    out: dict[str, object] = {}
    for family in FAMILIES:
        out[family] = AutoTokenizer.from_pretrained(
            str(build_tokenizer(test_cache_dir / "export", family, source))
        )
    return out


def _assert_equivalent(tokenizer: object, tmpl: OllamaTemplate) -> int:
    render_hf = hf_renderer(tokenizer)
    compared = 0
    for conv in CONVERSATIONS:
        try:
            expected = render_hf(conv)
        except Exception:
            continue  # the model's own template refuses this conversation (Mistral: system turns)
        assert render(tmpl.template, ollama_data(conv)) == expected, conv
        compared += 1
    return compared


@pytest.mark.parametrize(("family", "expected"), [("qwen2", "chatml"), ("llama", "llama3")])
def test_template_renders_conversations_exactly_like_hf(
    real_tokenizers: dict, family: str, expected: str
) -> None:
    tok = real_tokenizers[family]
    tmpl = ollama_template_for(tok)
    assert tmpl.family == expected
    assert _assert_equivalent(tok, tmpl) == len(CONVERSATIONS)
    if family == "qwen2":
        assert tmpl.default_system == "You are a helpful assistant"
        assert "<|im_end|>" in tmpl.stop
    else:
        assert "<|eot_id|>" in tmpl.stop
        # BOS is added by llama.cpp's tokenizer (add_bos_token), so the TEMPLATE must not print it
        assert "<|begin_of_text|>" not in tmpl.template


def test_mistral_template(real_tokenizers: dict) -> None:
    tok = real_tokenizers["llama"]
    saved = tok.chat_template
    try:
        tok.chat_template = MISTRAL_TEMPLATE
        tmpl = ollama_template_for(tok)
        assert tmpl.family == "mistral"
        assert _assert_equivalent(tok, tmpl) >= 2
        # Ollama sends system turns anyway: they go before the first user message.
        text = render(tmpl.template, ollama_data(CONVERSATIONS[1]))
        assert text == "[INST] Be kind.\n\nWho are you? [/INST]"
    finally:
        tok.chat_template = saved


def test_unknown_template_is_refused_not_guessed(real_tokenizers: dict) -> None:
    tok = real_tokenizers["qwen2"]
    saved = tok.chat_template
    try:
        tok.chat_template = "{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}{% endfor %}"
        with pytest.raises(TemplateNotRecognised, match="without TEMPLATE"):
            ollama_template_for(tok)
    finally:
        tok.chat_template = saved


# ----- Modelfile and registration -----


CHATML = OllamaTemplate(
    family="chatml",
    template="{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
    stop=["<|im_start|>", "<|im_end|>"],
)


def test_modelfile_has_from_template_stops_and_system(tmp_path: Path) -> None:
    gguf = tmp_path / "m-q4_k_m.gguf"
    gguf.write_bytes(b"GGUF")
    text = modelfile_text(gguf, CHATML, system="You are terse.", relative_to=tmp_path)
    assert text.splitlines()[0] == "FROM ./m-q4_k_m.gguf"
    assert f'TEMPLATE """{CHATML.template}"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|im_start|>"' in text
    assert 'SYSTEM """You are terse."""' in text
    with pytest.raises(OllamaError, match='"""'):
        modelfile_text(gguf, CHATML, system='bad """ quote')
    assert default_model_name("Job 2026-11-28 #3") == "job-2026-11-28-3"


def test_registration_uploads_blobs_and_creates_model(tmp_path: Path) -> None:
    gguf = tmp_path / "m-q4_k_m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 100)
    adapter = tmp_path / "m-lora.gguf"
    adapter.write_bytes(b"GGUF-adapter")
    modelfile = write_modelfile(tmp_path / "Modelfile", modelfile_text(gguf, CHATML, relative_to=tmp_path))
    with OllamaStandIn() as server:
        reg = register(
            "my-model:q4", gguf, modelfile, CHATML, system="Hi.", adapter_path=adapter, host=server.url
        )
    assert server.errors == []
    assert reg.run_command == "ollama run my-model:q4" and reg.method == "api"
    import hashlib

    digest = "sha256:" + hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert server.blobs[digest] == gguf.stat().st_size
    (req,) = server.created
    assert req["model"] == "my-model:q4"
    assert req["files"] == {"m-q4_k_m.gguf": digest}
    assert set(req["adapters"]) == {"m-lora.gguf"}
    assert req["template"] == CHATML.template
    assert req["parameters"]["stop"] == CHATML.stop
    assert req["system"] == "Hi."


def test_registration_without_ollama_says_how_to_do_it_by_hand(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    modelfile = write_modelfile(tmp_path / "Modelfile", modelfile_text(gguf, CHATML, relative_to=tmp_path))
    with pytest.raises(OllamaError) as err:
        register("mine", gguf, modelfile, CHATML, host=closed_port_url())
    assert f"ollama create mine -f {modelfile}" in str(err.value)
    assert gguf.exists() and modelfile.exists()
