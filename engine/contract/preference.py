"""The preference methods' settings (dpo, kto, orpo), as a job's spec declares them (its ``preference``
section), with trl's names, defaults and meanings. Torch-free, like the whole contract; the maths is
engine.training.preference_objectives, proven equal to trl's in tests/test_preference_maths.py.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in a setting is an error


# trl's DPO loss variants the engine computes (each proven equal to DPOTrainer's in tests/test_preference_maths.py);
# trl's list-valued loss_type takes one here. aot/aot_unpaired (sorted over a batch) and discopop are left out.
DpoLoss = Literal[
    "sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down",
    "sigmoid_norm",
]  # fmt: skip
KtoLoss = Literal["kto", "apo_zero_unpaired"]
DPO_LOSSES: tuple[str, ...] = DpoLoss.__args__  # type: ignore[attr-defined]
KTO_LOSSES: tuple[str, ...] = KtoLoss.__args__  # type: ignore[attr-defined]
PreferenceLoss = Literal[DpoLoss, KtoLoss]  # one Literal (nested ones flatten): one list of choices


class PreferenceSettings(_Strict):
    """The preference methods' own settings (dpo, kto, orpo)."""

    beta: float = Field(
        0.1,
        gt=0,
        le=100,
        description="dpo/kto: how far the model may move from the reference (higher: closer to it); "
        "orpo: the weight of the odds-ratio term beside the answers' negative log-likelihood",
    )
    loss_type: PreferenceLoss | None = Field(
        None,
        description="dpo: sigmoid (DPO, the default), hinge (SLiC), ipo, robust (noisy labels), exo_pair, "
        "nca_pair, bco_pair, sppo_hard, apo_zero, apo_down, sigmoid_norm; kto: kto (the default) or "
        "apo_zero_unpaired",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0.0,
        lt=0.5,
        description="dpo's robust and exo_pair losses: the assumed share of preference labels that are flipped",
    )
    desirable_weight: float = Field(
        1.0, gt=0, le=100, description="kto: weight of the desirable (label true) examples' losses"
    )
    undesirable_weight: float = Field(
        1.0, gt=0, le=100, description="kto: weight of the undesirable (label false) examples' losses"
    )
    max_prompt_length: int | None = Field(
        None,
        ge=1,
        le=131072,
        description="prompt tokens kept (the end, nearest the answer); default: from the data's prompts",
    )

    def loss_for(self, method: str) -> str:
        """The loss the method computes: the one given, else trl's default for it."""
        return self.loss_type or {"dpo": "sigmoid", "kto": "kto"}.get(method, method)


def preference_settings_problem(method: str, settings: PreferenceSettings) -> str | None:
    """What is wrong with ``settings`` for ``method`` (a loss it does not have), in words; None if nothing."""
    loss = settings.loss_type
    allowed = {"dpo": DPO_LOSSES, "kto": KTO_LOSSES}.get(method, ())
    if loss is not None and loss not in allowed:
        choices = f"one of {', '.join(allowed)}" if allowed else "none (orpo has one loss)"
        return f"loss_type '{loss}' is not one of {method}'s losses: use {choices}"
    if loss == "exo_pair" and settings.label_smoothing == 0:
        return "loss_type 'exo_pair' needs label_smoothing > 0 (its paper suggests 0.001)"
    return None
