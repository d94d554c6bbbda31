"""What each preference method computes over a few units (pairs or judged answers): the step's loss and
its figures, from per-sequence log-probabilities (engine.training.token_logps) and trl's maths
(engine.training.preference_loss).

A step's loss is the mean over its units (and, for orpo, the answers' NLL over the step's chosen tokens),
so the step tells an objective its units first (``start_step``) and then asks for each micro-batch's
share of that loss (``micro_loss``); figures come back as sums and ``means`` divides them once. kto also
measures its reference point in each micro-batch, as trl's KTOTrainer does in each forward: the policy's and
the reference's log-probabilities of mismatched answers (a prompt with another example's answer), without
gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from engine.contract.preference import PreferenceSettings
from engine.data.preference_tokens import PreferenceTokens
from engine.training.batching import IGNORE
from engine.training.fast_step import prepare_batches
from engine.training.preference_loss import (
    Pairs,
    dpo_figures,
    dpo_losses,
    kl_reference_point,
    kto_figures,
    kto_losses,
    orpo_figures,
    orpo_odds,
)
from engine.training.reference import answer_tokens
from engine.training.token_logps import position_logps, sequence_sums


@dataclass
class Sequences:
    """What micro-batches are collated from: token ids and labels (IGNORE: no target) per sequence."""

    input_ids: list[list[int]]
    labels: list[list[int]]


@dataclass
class Compute:
    """Where and how forward passes run."""

    pad_id: int
    device: str
    autocast_dtype: Any = None

    def autocast(self) -> Any:
        dtype = self.autocast_dtype
        return torch.autocast(device_type=self.device.split(":")[0], dtype=dtype, enabled=dtype is not None)


@dataclass
class Forward:
    """One micro-batch's per-sequence sums: answer log-probability, its token count (both over the answer's
    positions), and for ``whole`` rows the log-probability of every token after the first."""

    answer: torch.Tensor
    whole: torch.Tensor | None
    real_tokens: int


def forward(
    model: Any, data: Sequences, seqs: list[int], c: Compute, prompt_lengths: torch.Tensor | None = None
) -> Forward:
    """Log-probabilities of ``seqs`` (one row each). With ``prompt_lengths`` (one per sequence, on the device)
    the labels may cover prompts too: ``answer`` then keeps the positions from the prompt's end and
    ``whole`` sums them all."""
    (b,) = prepare_batches([[s] for s in seqs], data, len(seqs), c.pad_id, c.device, varlen=False)
    with c.autocast():
        logps = position_logps(model, b)
    width = b.input_ids.shape[1]
    rows = torch.div(b.gather_index, width, rounding_mode="floor")
    if prompt_lengths is None:
        return Forward(sequence_sums(logps, rows, len(seqs)), None, b.real_tokens)
    in_answer = (b.gather_index - rows * width + 1) >= prompt_lengths.index_select(0, rows)
    answer = sequence_sums(logps * in_answer, rows, len(seqs))
    return Forward(answer, sequence_sums(logps, rows, len(seqs)), b.real_tokens)


class Objective:
    """A preference method over ``data``'s units; subclasses: ``Dpo``, ``Kto``, ``Orpo``."""

    needs_reference = True

    def __init__(self, data: PreferenceTokens, settings: PreferenceSettings, method: str, c: Compute):
        self.data, self.settings, self.c = data, settings, c
        self.loss_type = settings.loss_for(method)
        self.beta = settings.beta
        self.view = Sequences(data.input_ids, data.labels)
        self.ref = torch.zeros(0)
        self.tokens = answer_tokens(data.labels, list(range(len(data.input_ids)))).to(c.device)
        self.units_in_step = 1

    def reference_sequences(self) -> list[int]:
        """The sequences of ``view`` whose reference log-probabilities the loss needs."""
        return list(range(len(self.view.input_ids)))

    def set_reference(self, values: torch.Tensor) -> None:
        self.ref = values.to(self.c.device)

    def sequences(self, units: list[int]) -> list[int]:
        return [s for u in units for s in self.data.units[u]]

    def start_step(self, units: list[int]) -> None:
        self.units_in_step = max(1, len(units))

    def micro_loss(self, model: Any, units: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        """This micro-batch's share of the step's loss, its figures (sums) and its non-padding tokens."""
        raise NotImplementedError

    def means(self, sums: dict[str, float], units: int) -> dict[str, float]:
        """The step's figures, as trl logs them, from their sums over ``units``."""
        return {k: v / max(1, units) for k, v in sums.items()}


class Dpo(Objective):
    def micro_loss(self, model: Any, units: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        seqs = self.sequences(units)
        f = forward(model, self.view, seqs, self.c)
        idx = torch.tensor(seqs, device=self.c.device)
        ref, tokens = self.ref.index_select(0, idx), self.tokens.index_select(0, idx)
        p = Pairs(f.answer[0::2], f.answer[1::2], ref[0::2], ref[1::2], tokens[0::2], tokens[1::2])
        losses = dpo_losses(p, self.loss_type, self.beta, self.settings.label_smoothing)
        return losses.sum() / self.units_in_step, dpo_figures(p, self.beta), f.real_tokens


class Kto(Objective):
    """KTO over judged answers; the reference point z0 comes from each answer's mismatched partner: the
    next example's answer (in the data's order) whose prompt differs, after this example's prompt (trl
    rotates the answers of a batch by one)."""

    def __init__(self, data: PreferenceTokens, settings: PreferenceSettings, method: str, c: Compute):
        super().__init__(data, settings, method, c)
        self.desirable = torch.tensor(data.desirable, dtype=torch.bool, device=c.device)
        self.uses_kl = self.loss_type == "kto"
        self.kl_sequence: list[int] = []  # per unit: its mismatched sequence in ``view``
        if self.uses_kl:
            self.view = Sequences(list(data.input_ids), list(data.labels))
            for u, partner in enumerate(mismatched_partners(data)):
                self.kl_sequence.append(len(self.view.input_ids))
                ids, labels = _with_answer_of(data, data.units[u][0], data.units[partner][0])
                self.view.input_ids.append(ids)
                self.view.labels.append(labels)

    def reference_point(self, model: Any, units: list[int]) -> torch.Tensor:
        """z0 of one micro-batch: its units' mismatched answers, measured with the policy as it is now (trl's
        KTOTrainer takes it from each forward's own batch, so under gradient accumulation each micro-batch has
        its own)."""
        if not self.uses_kl:
            return torch.zeros((), device=self.c.device)
        kl_seqs = [self.kl_sequence[u] for u in units]
        with torch.no_grad():
            policy = forward(model, self.view, kl_seqs, self.c).answer
        ref = self.ref.index_select(0, torch.tensor(kl_seqs, device=self.c.device))
        return kl_reference_point(policy, ref)

    def micro_loss(self, model: Any, units: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        kl = self.reference_point(model, units)  # before the forward that keeps activations: a lower peak
        seqs = self.sequences(units)
        f = forward(model, self.view, seqs, self.c)
        ref = self.ref.index_select(0, torch.tensor(seqs, device=self.c.device))
        good = self.desirable.index_select(0, torch.tensor(units, device=self.c.device))
        s = self.settings
        losses = kto_losses(
            f.answer, ref, good, kl, loss_type=self.loss_type, beta=self.beta,
            desirable_weight=s.desirable_weight, undesirable_weight=s.undesirable_weight,
        )  # fmt: skip
        figures = kto_figures(f.answer, ref, good, kl, self.beta)
        figures["kl"] = kl * len(units)  # the step's kl: its micro-batches' z0, weighted by their units
        return losses.sum() / self.units_in_step, figures, f.real_tokens

    def means(self, sums: dict[str, float], units: int) -> dict[str, float]:
        good, bad = sums.pop("count/chosen", 0.0), sums.pop("count/rejected", 0.0)
        out = {
            "kl": sums["kl"] / max(1, units),
            "rewards/accuracies": sums["rewards/accuracies"] / max(1, units),
        }
        for side, n in (("chosen", good), ("rejected", bad)):
            if n:
                out[f"rewards/{side}"] = sums[f"rewards/{side}"] / n
                out[f"logps/{side}"] = sums[f"logps/{side}"] / n
        if good and bad:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out


class Orpo(Objective):
    """ORPO: the chosen answers' negative log-likelihood (over every token of the sequence, prompt included,
    as trl's ORPOTrainer computes it) minus beta times the mean log-sigmoid of the log odds ratio of the
    answers' mean per-token log-probabilities. No reference model."""

    needs_reference = False

    def __init__(self, data: PreferenceTokens, settings: PreferenceSettings, method: str, c: Compute):
        super().__init__(data, settings, method, c)
        chosen = {unit[0] for unit in data.units}
        labels = [
            list(ids) if s in chosen else lab
            for s, (ids, lab) in enumerate(zip(data.input_ids, data.labels, strict=True))
        ]
        self.view = Sequences(data.input_ids, labels)
        self.prompt_lengths = torch.tensor(data.prompt_lengths, device=c.device)
        self.nll_tokens_in_step = 1

    def start_step(self, units: list[int]) -> None:
        super().start_step(units)
        self.nll_tokens_in_step = max(
            1, sum(len(self.data.input_ids[self.data.units[u][0]]) - 1 for u in units)
        )

    def micro_loss(self, model: Any, units: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        seqs = self.sequences(units)
        idx = torch.tensor(seqs, device=self.c.device)
        f = forward(model, self.view, seqs, self.c, self.prompt_lengths.index_select(0, idx))
        assert f.whole is not None
        means = f.answer / self.tokens.index_select(0, idx)
        ratio, log_odds = orpo_odds(means[0::2], means[1::2])
        nll = -f.whole[0::2].sum()
        loss = nll / self.nll_tokens_in_step - self.beta * ratio.sum() / self.units_in_step
        figures = orpo_figures(means[0::2], means[1::2], ratio, log_odds, self.beta)
        figures["nll_loss"] = nll.detach()
        tokens = sum(len(self.view.input_ids[s]) - 1 for s in seqs[0::2])
        figures["nll_tokens"] = torch.tensor(float(tokens), device=nll.device)
        return loss, figures, f.real_tokens

    def means(self, sums: dict[str, float], units: int) -> dict[str, float]:
        tokens = sums.pop("nll_tokens", 1.0)
        out = super().means(sums, units)
        out["nll_loss"] = sums["nll_loss"] / max(1.0, tokens)
        return out


def mismatched_partners(data: PreferenceTokens) -> list[int]:
    """For each unit, the next unit (cyclically) whose prompt differs; the previous one where all prompts match."""
    prompts = [tuple(data.input_ids[u[0]][: data.prompt_lengths[u[0]]]) for u in data.units]
    n = len(prompts)
    out = []
    for i in range(n):
        j = next((k % n for k in range(i + 1, i + n) if prompts[k % n] != prompts[i]), (i - 1) % n)
        out.append(j)
    return out


def _with_answer_of(data: PreferenceTokens, prompt_seq: int, answer_seq: int) -> tuple[list[int], list[int]]:
    """``prompt_seq``'s prompt followed by ``answer_seq``'s answer (labels on the answer)."""
    p, q = data.prompt_lengths[prompt_seq], data.prompt_lengths[answer_seq]
    return data.input_ids[prompt_seq][:p] + data.input_ids[answer_seq][q:], [IGNORE] * p + data.labels[
        answer_seq
    ][q:]


OBJECTIVES: dict[str, type[Objective]] = {"dpo": Dpo, "kto": Kto, "orpo": Orpo}


def objective_for(method: str, data: PreferenceTokens, settings: PreferenceSettings, c: Compute) -> Objective:
    return OBJECTIVES[method](data, settings, method, c)
