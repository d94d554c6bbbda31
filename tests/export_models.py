"""Tiny Llama- and Qwen2-family models with real tokenizers, for the GGUF export tests.

The tokenizers are the real Qwen2 and Llama 3 vocabularies, read from the vocabulary-only GGUF
files that ship in llama.cpp's source tree (``vendor/llama.cpp/models/ggml-vocab-*.gguf`` in the
llama-cpp-python source distribution), so the tests need no hub. The same source tree holds
llama.cpp's own ``convert_hf_to_gguf.py``, which the tests use as the reference converter.

Where the source tree is: ``$LLAMA_CPP_SOURCE`` (the ``llama.cpp`` folder itself), else the
parts the tests need, fetched once from PyPI's source distribution of the installed
llama-cpp-python into the test cache (``$BACKPROP_TEST_CACHE``, else ``~/.cache/backprop-mcp-tests``;
~77 MB downloaded, a few MB kept). Without network and without either, the export tests skip.

Model sizes are multiples of 256 so that k-quants really quantize (llama.cpp falls back to other
types for rows that are not). Everything is built once and cached under the given folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

FAMILIES = ("qwen2", "llama")
VOCAB_FILES = {"qwen2": "ggml-vocab-qwen2.gguf", "llama": "ggml-vocab-llama-bpe.gguf"}

# Meta-Llama-3-8B-Instruct's chat template (the vocabulary GGUF carries none).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Mistral-7B-Instruct-v0.2's chat template.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)


def llama_cpp_source() -> Path | None:
    env = os.environ.get("LLAMA_CPP_SOURCE")
    if env:
        p = Path(env)
        return p if (p / "convert_hf_to_gguf.py").is_file() and (p / "models").is_dir() else None
    return _fetched_llama_cpp_source()


def _fetched_llama_cpp_source() -> Path | None:
    """The converter (with its conversion/ and gguf-py/ packages) and the vocabulary GGUFs from
    llama-cpp-python's sdist, fetched once."""
    import importlib.metadata
    import tarfile
    import tempfile
    import urllib.request

    try:
        version = importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        return None
    root = Path(os.environ.get("BACKPROP_TEST_CACHE") or Path.home() / ".cache" / "backprop-mcp-tests")
    final = root / f"llama.cpp-{version}"
    if (final / "convert_hf_to_gguf.py").is_file():
        return final
    try:
        index = urllib.request.Request(  # PEP 691: the simple index as JSON
            "https://pypi.org/simple/llama-cpp-python/",
            headers={"Accept": "application/vnd.pypi.simple.v1+json"},
        )
        with urllib.request.urlopen(index, timeout=30) as r:
            files = json.load(r)["files"]
        url = next(f["url"] for f in files if f["filename"] == f"llama_cpp_python-{version}.tar.gz")
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            archive = Path(tmp) / "sdist.tar.gz"
            with urllib.request.urlopen(url, timeout=300) as r, open(archive, "wb") as f:
                shutil.copyfileobj(r, f)
            prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
            with tarfile.open(archive) as tar:
                wanted = [
                    m
                    for m in tar.getmembers()
                    if m.isfile()
                    and m.name.startswith(prefix)
                    and (
                        m.name.startswith((prefix + "gguf-py/", prefix + "conversion/"))
                        or m.name.startswith(prefix + "models/ggml-vocab-")
                        or ("/" not in m.name[len(prefix) :] and m.name.endswith(".py"))
                    )
                ]
                for m in wanted:
                    m.name = m.name[len(prefix) :]
                tar.extractall(Path(tmp) / "llama.cpp", members=wanted, filter="data")
            (Path(tmp) / "llama.cpp").rename(final)
    except (OSError, StopIteration, KeyError, ValueError):
        return None  # offline: the export tests skip with the reason
    return final


def _publish(tmp: Path, final: Path) -> Path:
    if final.exists():
        shutil.rmtree(tmp, ignore_errors=True)
        return final
    tmp.rename(final)
    return final


def build_tokenizer(cache: Path, family: str, source: Path) -> Path:
    """The real tokenizer of ``family`` saved as a Hugging Face folder (slow once: ~10-30 s)."""
    final = cache / f"tokenizer-{family}"
    if (final / "tokenizer_config.json").is_file():
        return final
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(source / "models"), gguf_file=VOCAB_FILES[family])
    if family == "llama":
        # As the real Llama 3 tokenizer: BOS is added by the post-processor, and a chat template.
        from tokenizers.processors import TemplateProcessing

        bos = tok.bos_token
        tok._tokenizer.post_processor = TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.bos_token_id)]
        )
        tok.chat_template = LLAMA3_TEMPLATE
    tmp = cache / f".tokenizer-{family}.{os.getpid()}"
    tok.save_pretrained(str(tmp))
    return _publish(tmp, final)


def build_model(cache: Path, family: str, tokenizer_dir: Path) -> Path:
    """A 2-layer random model (hidden 256, MLP 512, 4 heads / 2 KV heads) with the tokenizer beside it."""
    final = cache / f"model-{family}"
    if (final / "config.json").is_file():
        return final
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(0)
    common = dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=1024,
        initializer_range=0.02,  # transformers' default
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **common))
    # Random models with a 150k vocabulary have near-tied logits everywhere, so an argmax check
    # would measure noise. Unit-variance embeddings and an output matrix equal to the embedding
    # (stored separately for Llama) give each position a decisive next token, as trained models
    # usually have, while the random layers and the LoRA still change every logit.
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
        if family == "llama":
            model.lm_head.weight.copy_(model.model.embed_tokens.weight)
    tmp = cache / f".model-{family}.{os.getpid()}"
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    return _publish(tmp, final)


def build_adapter(cache: Path, family: str, model_dir: Path) -> Path:
    """A LoRA adapter (r=8, all linear layers) with random, non-zero A and B."""
    final = cache / f"adapter-{family}"
    if (final / "adapter_config.json").is_file():
        return final
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)  # a visible change of the model, like a trained adapter
    tmp = cache / f".adapter-{family}.{os.getpid()}"
    peft_model.save_pretrained(str(tmp))
    cfg_path = tmp / "adapter_config.json"
    data = json.loads(cfg_path.read_text())
    data["base_model_name_or_path"] = str(model_dir)
    cfg_path.write_text(json.dumps(data, indent=2))
    return _publish(tmp, final)


def build_job(root: Path, family: str, model_dir: Path, adapter_dir: Path) -> Path:
    """A finished fine-tune job folder (spec.json + result.json naming the adapter), as the worker leaves it."""
    from engine.contract.spec import DatasetSettings, FinetuneSpec, JobResult, write_result, write_spec

    job = root / f"job-{family}"
    job.mkdir(parents=True, exist_ok=True)
    write_spec(job, FinetuneSpec(model=str(model_dir), dataset=DatasetSettings(path="data.jsonl")))
    write_result(job, JobResult(status="succeeded", kind="finetune", artifacts={"adapter": str(adapter_dir)}))
    return job


class OllamaStandIn:
    """A local stand-in for Ollama's HTTP API, checking requests as Ollama's API documentation specifies.

    It exists because no Ollama server can be installed here (it is in no package registry we can
    reach). It implements what registration uses: ``POST /api/blobs/sha256:<hex>`` (the body's sha256
    must equal the digest in the path: 201, else 400), ``POST /api/create`` (a valid model name, and
    every digest in ``files``/``adapters`` must have been uploaded: 200 ``{"status": "success"}``,
    else 400 with an error) and ``GET /api/tags`` (the created models).
    """

    def __init__(self) -> None:
        import hashlib
        import re
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.blobs: dict[str, int] = {}  # digest -> size
        self.created: list[dict] = []
        self.errors: list[str] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def _reply(self, code: int, body: dict | None = None) -> None:
                data = json.dumps(body or {}).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length", "0")))

            def do_GET(self) -> None:
                if self.path == "/api/tags":
                    self._reply(
                        200, {"models": [{"name": c["model"], "model": c["model"]} for c in stand_in.created]}
                    )
                else:
                    self._reply(404, {"error": "not found"})

            def do_POST(self) -> None:
                body = self._body()
                m = re.fullmatch(r"/api/blobs/(sha256:[0-9a-f]{64})", self.path)
                if m:
                    digest = "sha256:" + hashlib.sha256(body).hexdigest()
                    if digest != m.group(1):
                        stand_in.errors.append(f"digest mismatch {m.group(1)} vs {digest}")
                        self._reply(400, {"error": "digest mismatch"})
                        return
                    stand_in.blobs[digest] = len(body)
                    self._reply(201)
                    return
                if self.path == "/api/create":
                    req = json.loads(body)
                    problems = []
                    if not re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9._:/-]*", str(req.get("model", ""))):
                        problems.append(f"invalid model name {req.get('model')!r}")
                    refs = {**(req.get("files") or {}), **(req.get("adapters") or {})}
                    if not req.get("files"):
                        problems.append("no files")
                    for fname, digest in refs.items():
                        if digest not in stand_in.blobs:
                            problems.append(f"{fname}: blob {digest} was never uploaded")
                    if problems:
                        stand_in.errors.extend(problems)
                        self._reply(400, {"error": "; ".join(problems)})
                        return
                    stand_in.created.append(req)
                    self._reply(200, {"status": "success"})
                    return
                self._reply(404, {"error": "not found"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> OllamaStandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def closed_port_url() -> str:
    """A local URL where nothing listens (the port was just released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def read_gguf(path: Path) -> tuple[dict, dict]:
    """Metadata and tensors of a GGUF file: ``{key: value}``, ``{name: (type, shape, bytes)}``.

    A minimal reader for the tests: gguf.GGUFReader builds an object per array element and takes
    ~20 s on a 150k-token vocabulary; this takes well under a second.
    """
    import struct

    import gguf

    data = Path(path).read_bytes()
    pos = 0

    def take(fmt: str):  # noqa: ANN202
        nonlocal pos
        vals = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return vals[0] if len(vals) == 1 else vals

    def string() -> str:
        nonlocal pos
        n = take("Q")
        s = data[pos : pos + n].decode("utf-8", errors="surrogateescape")
        pos += n
        return s

    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def value(vtype: int):  # noqa: ANN202
        if vtype == 8:
            return string()
        if vtype == 9:
            sub, n = take("I"), take("Q")
            return [value(sub) for _ in range(n)]
        return take(scalar[vtype])

    assert data[:4] == b"GGUF"
    pos = 4
    _version, n_tensors, n_kv = take("I"), take("Q"), take("Q")
    kv = {}
    for _ in range(n_kv):
        key = string()
        kv[key] = value(take("I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = [take("Q") for _ in range(take("I"))]
        infos.append((name, dims, take("I"), take("Q")))
    align = int(kv.get("general.alignment", 32))
    start = (pos + align - 1) // align * align
    ends = sorted(off for *_, off in infos) + [len(data) - start]
    tensors = {}
    for name, dims, ttype, off in infos:
        nxt = min(e for e in ends if e > off) if any(e > off for e in ends) else len(data) - start
        qtype = gguf.GGMLQuantizationType(ttype)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        n = 1
        for d in dims:
            n *= d
        nbytes = n // block * size
        assert nbytes <= nxt - off
        tensors[name] = (qtype.name, dims, data[start + off : start + off + nbytes])
    return kv, tensors
