"""Context-aware reward model: input format, Bradley–Terry rows, TRL's loss against a hand computation, the
two-step marginal, training and evaluation end to end on the tiny model."""

import json
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
    relevance = build_reversal_set().relevance[0]
    both = bt_rows([], "both", [relevance])
    assert [r["chosen"] for r in both] == [format_text(relevance["prompt"], relevance["chosen"], relevance[k])
                                           for k in ("criteria", "scenario")]
    assert bt_rows([], "none", [relevance]) == [{"chosen": format_text(relevance["prompt"], relevance["chosen"]),
                                                "rejected": format_text(relevance["prompt"], relevance["rejected"])}]


def test_two_step_equals_the_direct_preference_when_the_context_is_certain():
    assert two_step([1.0, 0.0], [0.8, 0.1]) == pytest.approx(0.8)
    assert two_step([0.25, 0.75], [0.8, 0.4]) == pytest.approx(0.5)
    with pytest.raises(InfinictxError):
        two_step([0.5, 0.6], [0.1, 0.2])


@pytest.fixture(scope="module")
def gemma_like_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a tokenizer like Gemma's: <bos> first, a <pad> of its own (so the <eos> training appends
    is where the reward is read), padding on the left."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-gemma-like")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_special_tokens({"bos_token": "<bos>", "pad_token": "<pad>"})
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                              special_tokens=[("<bos>", tok.bos_token_id)])
    tok.save_pretrained(out)
    config = json.loads((out / "tokenizer_config.json").read_text())   # as Gemma's says it (save drops the side)
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "left"}))
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lm.resize_token_embeddings(len(tok))
    lm.config.bos_token_id, lm.config.pad_token_id = tok.bos_token_id, tok.pad_token_id
    lm.save_pretrained(out)
    again = AutoTokenizer.from_pretrained(out)
    assert again("Q?").input_ids[0] == again.bos_token_id and again.padding_side == "left"
    return out


@pytest.mark.parametrize("tokenizer", ["plain", "gemma-like"])
def test_trl_loss_and_gradients_equal_a_hand_computation(tokenizer, tiny_model_dir, gemma_like_dir, tmp_path):
    """`rewards` reads each text's reward as training does: the same tokens (a <bos> where the tokenizer adds one,
    the <eos> TRL appends) and the same positions (right padding, whatever the tokenizer's side)."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    model, tok = load_reward_model(gemma_like_dir if tokenizer == "gemma-like" else tiny_model_dir)
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
    rows = [{**r, "half": k % 2} for k, r in enumerate(data.test[:4])]
    out = evaluate(model, tok, rows, data.adversarial[:4], group_by=("dimension", "half"))
    assert 0 <= out["criteria"]["accuracy"] <= 1 and 0 <= out["scenario"]["reversal_consistency"] <= 1
    by_dim = out["criteria"]["by_dimension"]   # the pairs' accuracy split by dimension, weighted back to the total
    assert sum(v["pairs"] for v in by_dim.values()) == 4
    assert sum(v["accuracy"] * v["pairs"] for v in by_dim.values()) / 4 == pytest.approx(out["criteria"]["accuracy"])
    by_half = out["scenario"]["by_half"]   # any column: here two halves of two pairs each
    assert {k: v["pairs"] for k, v in by_half.items()} == {0: 2, 1: 2}
    assert sum(v["accuracy"] for v in by_half.values()) / 2 == pytest.approx(out["scenario"]["accuracy"])
    assert set(out["adversarial"]) == {"no_context", "irrelevant_context", "flipped"}
    # texts shared by rows are scored once and the verdicts stay those of each row: every row twice, same accuracy
    twice = evaluate(model, tok, rows + rows)
    assert twice["criteria"]["accuracy"] == pytest.approx(out["criteria"]["accuracy"])
    assert twice["scenario"]["reversal_consistency"] == pytest.approx(out["scenario"]["reversal_consistency"])


def test_training_stopped_at_a_checkpoint_resumes_to_the_same_adapter(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    from infinictx.reward.carm import RewardConfig, train

    rows = bt_rows(build_reversal_set().train[:6], "both")   # 24 rows: 6 steps an epoch at batch 4
    cfg = RewardConfig(epochs=2, batch=4, rank=4, checkpoint_every=2)
    whole = train(tiny_model_dir, rows, cfg, tmp_path / "whole")

    class Kill(TrainerCallback):   # the process dies right after the step-6 checkpoint
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 6:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_model_dir, rows, cfg, tmp_path / "cut", callbacks=[Kill()])
    class Count(TrainerCallback):
        steps = 0

        def on_step_end(self, args, state, control, **kwargs):
            Count.steps += 1

    resumed = train(tiny_model_dir, rows, cfg, tmp_path / "cut", callbacks=[Count()])
    assert Count.steps == 6, "the resumed run redid the steps before its checkpoint"
    assert whole["resumed_from"] is None and resumed["resumed_from"] == "checkpoint-6"
    assert resumed["steps"] == whole["steps"] == 12
    assert not list((tmp_path / "cut").glob("checkpoint-*"))
    Count.steps = 0   # a run that ended is not trained again: its record comes back
    assert train(tiny_model_dir, rows, cfg, tmp_path / "cut", callbacks=[Count()]) == resumed and Count.steps == 0
    a = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cut" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # a checkpoint of another setup is not resumed (it is removed)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_model_dir, rows, cfg, tmp_path / "other", callbacks=[Kill()])
    changed = train(tiny_model_dir, rows, RewardConfig(epochs=2, batch=4, rank=4, checkpoint_every=2, lr=1e-4),
                    tmp_path / "other")
    assert changed["resumed_from"] is None
    with pytest.raises(InfinictxError, match="checkpoint_every"):
        RewardConfig(checkpoint_every=-1)


def test_context_posterior_is_calibrated_against_a_neutral_situation(tiny):
    from infinictx.reward.carm import NEUTRAL_SITUATION, context_posterior

    candidates = ["The user wants the short answer.", "The user wants every step explained."]
    # the neutral situation itself carries no evidence: both criteria as likely as before
    assert torch.allclose(context_posterior(tiny, NEUTRAL_SITUATION, candidates), torch.tensor([0.5, 0.5]))
    post = context_posterior(tiny, "The user is in a hurry.", candidates)
    assert post.sum().item() == pytest.approx(1.0) and not torch.allclose(post, torch.tensor([0.5, 0.5]))
    # a cache kept across calls gives the same posterior, from the stored log-likelihoods
    cache = {}
    assert torch.equal(context_posterior(tiny, "The user is in a hurry.", candidates, cache), post)
    assert len(cache) == 4
    assert torch.equal(context_posterior(tiny, "The user is in a hurry.", candidates[::-1], cache), post.flip(0))
    assert len(cache) == 4


def test_reward_commands(tiny_model_dir, tmp_path, capsys):
    import json

    from infinictx.fronts.cli import main

    data = build_reversal_set()
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in data.train[:6]))
    out = tmp_path / "rm"
    common = ["--model", str(tiny_model_dir), "--threads", "1"]
    assert main(["reward-train", str(pairs), "--out", str(out), "--epochs", "1", "--batch", "4", "--rank", "4",
                 *common]) == 0
    assert (out / "adapter_config.json").exists() and not (tmp_path / "rm.partial").exists()
    capsys.readouterr()
    assert main(["reward-score", str(pairs), "--adapter", str(out), "--json", str(tmp_path / "s.json"), *common]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["pairs"] == 6 and scored == json.loads((tmp_path / "s.json").read_text())
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "Hi?", "response": "Hello.", "context": "Be brief."}) + "\n"
                    + json.dumps({"prompt": "Hi?", "response": "Hello."}) + "\n")
    assert main(["reward-score", str(rows), "--adapter", str(out), "--out", str(tmp_path / "r.jsonl"), *common]) == 0
    got = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(got) == 2 and all(isinstance(r["reward"], float) for r in got) and got[0]["reward"] != got[1]["reward"]
    # bad input: one line, exit 2, nothing written
    capsys.readouterr()
    assert main(["reward-train", str(pairs), "--out", str(out), *common]) == 2   # the folder is not empty
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "response_a": "a"}) + "\n")
    assert main(["reward-train", str(bad), "--out", str(tmp_path / "rm2"), *common]) == 2
    assert main(["reward-score", str(tmp_path / "none.jsonl"), *common]) == 2
    assert main(["reward-score", str(pairs), "--adapter", str(tmp_path), *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("infinictx: error:") for line in err)
    assert not (tmp_path / "rm2").exists()


def test_reward_model_keeps_tied_embeddings_saved_as_lm_head(tiny_model_dir, tmp_path):
    """Our GGUF conversions store tied embeddings once, as lm_head.weight: the classification model (no lm_head)
    must still start from the language model's embeddings, not random ones."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    ckpt = tmp_path / "lm-head-only"
    shutil.copytree(tiny_model_dir, ckpt)
    state = load_file(ckpt / "model.safetensors")
    emb = state.pop("model.embed_tokens.weight", None)
    state["lm_head.weight"] = emb if emb is not None else state["lm_head.weight"]
    save_file(state, ckpt / "model.safetensors", metadata={"format": "pt"})
    want = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).get_input_embeddings().weight
    model, _ = load_reward_model(ckpt)
    assert torch.equal(model.get_input_embeddings().weight, want)


def test_rewards_batched_by_length_come_back_in_the_order_given(tiny_model_dir):
    model, tok = load_reward_model(tiny_model_dir)
    texts = [format_text("Q?", "A." * n, "Be brief." if n % 2 else None) for n in (9, 1, 30, 4, 17, 2)]
    alone = torch.cat([rewards(model, tok, [t]) for t in texts])
    assert torch.allclose(rewards(model, tok, texts, batch=4), alone, atol=1e-5)
