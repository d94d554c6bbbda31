"""Length limits of the tools' text arguments, enforced by their input schemas (``maxLength``).

Generous for real use, small enough that no argument can blow up a message, a command line or the
store: a path is at most what Linux accepts (4096 bytes), a prompt fits comfortably in a small
model's context, a name is a name.
"""

from __future__ import annotations

MAX_PATH_CHARS = 4096  # PATH_MAX on Linux
MAX_NAME_CHARS = 256  # model presets, hub names, Ollama names, job ids
MAX_PROMPT_CHARS = 32_000  # try_model's prompt (about 8k tokens of English)
MAX_SYSTEM_CHARS = 8_000  # a system prompt
MAX_DATASETS = 100  # datasets in one SLAO series
