"""Runs the PyPI package temp-lora-pipeline==0.0.1 (an unofficial HF-pipeline Temp-Lora) in its own virtualenv
(it needs transformers < 5, peft < 0.9). Called by generation.py; prints one JSON line with its timing.

Settings are matched to ours: LoRA r/alpha on all linear layers but the LM head, dropout 0, `num_epoch` = steps,
prefix_length = L_x = L_T = W − Δ, stride_length = Δ, greedy with repetition penalty 1.12, exactly N tokens.
Two of its behaviours are worked around so that it trains a LoRA at all:
- it only creates the LoRA for prompts longer than max_position_embeddings (otherwise it fine-tunes the whole
  model), so we create it first with its own `_create_temp_lora()`;
- it only generates chunk by chunk when prompt + N exceeds max_position_embeddings, so that is set to W."""

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch


def v4_model_dir(src: Path) -> Path:
    """A copy of our converted model directory that transformers 4.x reads (rope_theta at the top level)."""
    out = Path(tempfile.mkdtemp(prefix="tlp-model-"))
    cfg = json.loads((src / "config.json").read_text())
    cfg["rope_theta"] = cfg.get("rope_parameters", {}).get("rope_theta", 10000.0)
    cfg["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(cfg))
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(src / "model.safetensors"), "pt") as f:
        has_format = (f.metadata() or {}).get("format") == "pt"
    if has_format:
        (out / "model.safetensors").symlink_to(src / "model.safetensors")
    else:  # transformers 4.x insists on the "format" metadata entry
        save_file(load_file(str(src / "model.safetensors")), str(out / "model.safetensors"), metadata={"format": "pt"})
    # tokenizers 0.15 (what transformers 4.38 needs) reads BPE merges as "a b" strings, not ["a", "b"] pairs
    tok = json.loads((src / "tokenizer.json").read_text())
    tok["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]]
    tok["model"].pop("ignore_merges", None)
    (out / "tokenizer.json").write_text(json.dumps(tok))
    return out


def main():
    args = json.loads(sys.argv[1])
    if args.get("threads"):
        torch.set_num_threads(args["threads"])
    from peft import LoraConfig
    from temp_lora_pipeline import TempLoraCompletionPipeline, TempLoraTuningConfig
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    model_dir = v4_model_dir(Path(args["model_dir"]))
    tok = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"), eos_token="<|im_end|>",
                                  pad_token="<|im_end|>")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    window, chunk = args["window"], args["chunk"]
    model.config.max_position_embeddings = window
    lora = LoraConfig(r=args["rank"], lora_alpha=args["alpha"], lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    pipe = TempLoraCompletionPipeline(model=model, tokenizer=tok, lora_config=lora, prefix_length=window - chunk,
                                      stride_length=chunk, lora_training_config=TempLoraTuningConfig(
                                          learning_rate=args["lr"], num_epoch=args["steps"]))
    pipe._create_temp_lora()
    prompt = tok.decode(args["prompt_ids"])
    n = args["tokens"]
    t0 = time.perf_counter()
    out = pipe(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, repetition_penalty=1.12,
               return_full_text=False)
    wall = time.perf_counter() - t0
    shutil.rmtree(model_dir, ignore_errors=True)
    print(json.dumps({"wall_s": wall, "tokens": n, "tokens_per_s": n / wall,
                      "text_chars": len(out[0]["generated_text"])}))


if __name__ == "__main__":
    main()
