"""A decoder-only transformer's shape: the numbers memory, defaults and presets depend on (no weights)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_target_names(targets: list[str] | str) -> list[str]:
    if targets == "all-linear" or isinstance(targets, str):
        return list(LINEAR_NAMES) if targets == "all-linear" else [n for n in LINEAR_NAMES if n == targets]
    known = [n for n in LINEAR_NAMES if n in targets]
    # Names this model family does not use (e.g. a fused "qkv_proj") can't be sized; assume all-linear.
    return known or list(LINEAR_NAMES)


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformer that memory and defaults depend on."""

    hidden_size: int
    num_layers: int
    vocab_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0: hidden_size // num_heads
    max_context: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    model_type: str = "llama"
    params: int = 0  # 0: computed from the shape

    def __post_init__(self) -> None:
        if (
            min(self.hidden_size, self.num_layers, self.vocab_size, self.intermediate_size, self.num_heads)
            <= 0
        ):
            raise ValueError(f"a model shape needs positive sizes, got {self}")
        if self.head_dim <= 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.params <= 0:
            object.__setattr__(self, "params", self.computed_params())

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear projection of one decoder layer."""
        h, q, kv, i = (
            self.hidden_size,
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
            self.intermediate_size,
        )
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def layer_linear_params(self) -> int:
        """Weights of the linear projections of all decoder layers (what NF4 quantises)."""
        return self.num_layers * sum(a * b for a, b in self.linear_dims().values())

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def computed_params(self) -> int:
        dims = self.linear_dims()
        biases = (dims["q_proj"][1] + 2 * dims["k_proj"][1]) if self.attention_bias else 0
        norms = 2 * self.hidden_size
        per_layer_other = biases + norms
        head = 0 if self.tie_word_embeddings else self.embedding_params
        return (
            self.layer_linear_params
            + self.num_layers * per_layer_other
            + self.hidden_size
            + self.embedding_params
            + head
        )

    def lora_params(self, rank: int, targets: list[str] | str = "all-linear") -> int:
        """Trainable LoRA parameters: r·(in+out) for each adapted projection of each layer."""
        names = lora_target_names(targets)
        dims = self.linear_dims()
        return self.num_layers * sum(rank * (dims[n][0] + dims[n][1]) for n in names)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
