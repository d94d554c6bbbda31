"""engine.training.checkpoints: checkpoints written in the background hold the state of their step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from engine.training.checkpoints import CheckpointWriter, list_checkpoints, load_checkpoint


def _lora_model(tiny_model_dir: Path) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))


def _trainer(model: Any) -> tuple[Any, Any]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))


def _step(model: Any, optimizer: Any, scheduler: Any) -> None:
    ids = torch.arange(2, 18).reshape(2, 8)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def _lora_state(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_a_checkpoint_holds_its_step_while_training_goes_on(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = _lora_model(tiny_model_dir)
    optimizer, scheduler = _trainer(model)
    _step(model, optimizer, scheduler)
    at_save = _lora_state(model)
    moments = {k: v["exp_avg"].clone() for k, v in optimizer.state_dict()["state"].items()}
    writer = CheckpointWriter(tmp_path / "checkpoints")
    writer.save(1, model, optimizer, scheduler, {"loss_history": [{"step": 1, "loss": 2.0}]})
    _step(model, optimizer, scheduler)  # the next step changes weights and moments in place at once
    assert any(not torch.equal(at_save[n], p) for n, p in model.named_parameters() if p.requires_grad)
    written = writer.wait()
    assert written is not None and written[0] == 1 and written[1] == tmp_path / "checkpoints" / "step-000001"
    assert writer.wait() is None and writer.finished() is None  # each write is reported once

    fresh = _lora_model(tiny_model_dir)
    fresh_optimizer, fresh_scheduler = _trainer(fresh)
    state = load_checkpoint(written[1], fresh, fresh_optimizer, fresh_scheduler)
    assert state == {"step": 1, "loss_history": [{"step": 1, "loss": 2.0}]}
    for name, value in _lora_state(fresh).items():
        assert torch.equal(value, at_save[name]), name
    for k, v in fresh_optimizer.state_dict()["state"].items():
        assert torch.equal(v["exp_avg"], moments[k])
    assert fresh_scheduler.last_epoch == 1


def test_writes_keep_the_newest_two_and_a_failed_write_is_raised(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    model = _lora_model(tiny_model_dir)
    optimizer, scheduler = _trainer(model)
    root = tmp_path / "checkpoints"
    writer = CheckpointWriter(root)
    for step in (10, 20, 30):
        writer.save(step, model, optimizer, scheduler, {})
        with pytest.raises(RuntimeError, match="still being written"):
            writer.save(step, model, optimizer, scheduler, {})
        writer.wait()
    assert [p.name for p in list_checkpoints(root)] == ["step-000020", "step-000030"]

    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the checkpoints' folder should be")
    failing = CheckpointWriter(blocked)
    failing.save(1, model, optimizer, scheduler, {})
    with pytest.raises(OSError):
        failing.wait()
    assert failing.wait() is None  # the error is given once; the writer can go on
