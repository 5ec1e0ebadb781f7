"""Context-aware reward model: input format, Bradley–Terry rows, TRL's loss against a hand computation, the
two-step marginal, training and evaluation end to end on the tiny model."""

import math

import pytest
import torch

from infinictx.core.errors import InfinictxError
from infinictx.data.preferences import build_reversal_set
from infinictx.reward.carm import bt_rows, format_text, load_reward_model, rewards, two_step

pytest.importorskip("trl")


def test_context_slot_and_bt_rows():
    assert format_text("Q?", "A.") == "User: Q?\nAssistant: A."
    assert format_text("Q?", "A.", "Be brief.").startswith("Context: Be brief.\nUser: Q?")
    with pytest.raises(InfinictxError, match="empty"):
        format_text("Q?", "A.", "  ")
    row = build_reversal_set().train[0]
    rows = bt_rows([row], "criteria")
    assert rows[0]["chosen"] == format_text(row["prompt"], row["response_a"], row["criteria_x"])
    assert rows[1]["chosen"] == format_text(row["prompt"], row["response_b"], row["criteria_y"])
    none = bt_rows([row], "none")
    assert all("Context:" not in r["chosen"] for r in none) and none[0]["chosen"] == none[1]["rejected"]
    with pytest.raises(InfinictxError, match="view"):
        bt_rows([row], "both-ways")


def test_two_step_equals_the_direct_preference_when_the_context_is_certain():
    assert two_step([1.0, 0.0], [0.8, 0.1]) == pytest.approx(0.8)
    assert two_step([0.25, 0.75], [0.8, 0.4]) == pytest.approx(0.5)
    with pytest.raises(InfinictxError):
        two_step([0.5, 0.6], [0.1, 0.2])


def test_trl_loss_and_gradients_equal_a_hand_computation(tiny_model_dir, tmp_path):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    model, tok = load_reward_model(tiny_model_dir)
    rows = bt_rows(build_reversal_set().train[:2], "criteria")
    args = RewardConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to=[], use_cpu=True,
                        max_length=512)
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    model.train()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    r_c = rewards(model, tok, [r["chosen"] for r in rows]).requires_grad_(False)
    r_r = rewards(model, tok, [r["rejected"] for r in rows])
    by_hand = -torch.nn.functional.logsigmoid(r_c - r_r).mean()
    assert float(loss.detach()) == pytest.approx(float(by_hand), rel=1e-5)
    # the gradient of the same formula, written out, on the same padded batch
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    c, r = logits.chunk(2)
    (-torch.log(torch.sigmoid(c - r))).mean().backward()
    for n, p in model.named_parameters():
        if n in got:
            assert torch.allclose(p.grad, got[n], atol=1e-5, rtol=1e-3), n
    assert math.isfinite(float(loss))


def test_training_and_evaluation_end_to_end(tiny_model_dir, tmp_path):
    from infinictx.reward.carm import RewardConfig, evaluate, train

    data = build_reversal_set()
    record = train(tiny_model_dir, bt_rows(data.train[:6], "both"), RewardConfig(epochs=1, batch=4, rank=4),
                   tmp_path / "rm")
    assert record["steps"] >= 1 and (tmp_path / "rm" / "adapter_config.json").exists()
    model, tok = load_reward_model(tiny_model_dir, tmp_path / "rm")
    out = evaluate(model, tok, data.test[:4], data.adversarial[:4])
    assert 0 <= out["criteria"]["accuracy"] <= 1 and 0 <= out["scenario"]["reversal_consistency"] <= 1
    assert set(out["adversarial"]) == {"no_context", "irrelevant_context", "flipped"}
