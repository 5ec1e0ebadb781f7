"""Runs kvpress presses (PyPI kvpress==0.5.5, in its own virtualenv: it needs transformers < 5.3) on prompts
given as token ids. Called by kv_policies.py with a job file; prints one JSON line:
{press: {"outputs": [[token ids] per trial], "kv_bytes": mean bytes held after the context, "s_per_trial"}}.

What kvpress evaluates, done as its pipeline does (`KVPressTextGenerationPipeline.generate_answer`): the context
is prefilled under the press (compressed layer by layer), then the question and the answer are decoded
greedily from the compressed cache at their true positions, the question itself uncompressed.

Presses, all at the job's compression ratio (RazorAttention's at that length):
  streaming_llm   StreamingLLMPress (4 sinks + recent)
  snapkv          SnapKVPress (attention of the last 64 context tokens, pooled)
  knorm           KnormPress (smallest key norms kept)
  duo             DuoAttention-style: DuoAttentionPress with its head pattern replaced by our probe's retrieval
                  heads (full cache); the other heads keep 4 sinks + a recent window sized so that the overall
                  ratio is the job's. kvpress masks those keys instead of freeing them: its bytes held do not
                  shrink."""

import json
import sys
import time

import torch


def duo_press(ratio: float, retrieval: dict, n_layers: int, n_kv: int, context_len: int):
    from kvpress import DuoAttentionPress

    streaming = torch.ones(n_layers, n_kv, dtype=torch.bool)
    for layer, heads in retrieval.items():
        streaming[int(layer), heads] = False
    frac = streaming.float().mean().item()
    # ratio = frac × (1 − (sink + recent) / T)  →  recent = T (1 − ratio / frac) − sink
    sink = 4
    recent = max(1, int(context_len * (1 - min(0.999, ratio / frac)) - sink))

    class Press(DuoAttentionPress):
        def post_init_from_model(self, model):
            self.sink_size, self.recent_size = sink, recent
            self.streaming_mask = streaming.to(model.device)

    return Press(head_compression_ratio=frac)


def main():
    job = json.loads(open(sys.argv[1]).read())
    torch.set_num_threads(job["threads"])
    from kvpress import KnormPress, SnapKVPress, StreamingLLMPress
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    cfg = model.config
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    ratio = job["ratio"]
    out = {}
    for name in job["presses"]:
        outputs, held, t0 = [], [], time.perf_counter()
        for trial in job["trials"]:
            context = torch.tensor(trial["context"])[None]
            question = torch.tensor(trial["question"])[None]
            press = {"streaming_llm": lambda: StreamingLLMPress(compression_ratio=ratio),
                     "snapkv": lambda: SnapKVPress(compression_ratio=ratio),
                     "knorm": lambda: KnormPress(compression_ratio=ratio),
                     "duo": lambda: duo_press(ratio, job["retrieval_heads"], cfg.num_hidden_layers,
                                              cfg.num_key_value_heads, context.shape[1])}[name]()
            cache = DynamicCache()
            with torch.no_grad():
                with press(model):
                    model.model(input_ids=context, past_key_values=cache)
                held.append(sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers))
                n = context.shape[1]
                pos = torch.arange(n, n + question.shape[1])[None]
                logits = model(input_ids=question, past_key_values=cache, position_ids=pos, logits_to_keep=1).logits
                ids = [int(logits[0, -1].argmax())]
                pos = pos[:, -1:] + 1
                for i in range(11):
                    if ids[-1] in eos:
                        break
                    logits = model(input_ids=torch.tensor([[ids[-1]]]), past_key_values=cache,
                                   position_ids=pos + i).logits
                    ids.append(int(logits[0, -1].argmax()))
            outputs.append(ids)
        out[name] = {"outputs": outputs, "kv_bytes": int(sum(held) / len(held)),
                     "s_per_trial": (time.perf_counter() - t0) / len(job["trials"])}
        print(f"{name}: done", file=sys.stderr, flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
