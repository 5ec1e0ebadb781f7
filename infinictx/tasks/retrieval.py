"""Retrieval evaluations every method is judged on: find one fact planted deep in a long input.

  passkey  the Landmark / LongLLaMA prompt: a task line, filler sentences ("The grass is green. ..."), the
           needle "The pass key is NNNNN. Remember it. NNNNN is the pass key." at a chosen depth, more filler,
           then "What is the pass key? The pass key is"; greedy decoding; exact match of the number.
  kv       a long dictionary of random 6-digit keys and values, one line each; the question names one key
           (at a chosen depth) and the answer is its value, exact match. Whole lines only: the prompt is at
           most the asked length (a few tokens shorter).
  niah, multikey, multivalue, vartrack   RULER-style facts planted in a real book (`planted.py`); multivalue and
           vartrack ask several items and are scored per item.

The prompt is built from token pieces (task, repeated filler or dictionary lines, needle, question), so its
length is exact in tokens. Trials are seeded: trial t at one length puts the needle at depth t/(trials−1)
(0 = start, 1 = just before the question), with a fresh random passkey (or dictionary) each time. Every trial
runs a fresh session: the prompt is absorbed chunk by chunk (a memory stores it, Temp-Lora trains on it, the
window only keeps it as history) and the answer is generated greedily. A session that declares the `question`
capability (RAG: it retrieves with the question) is handed the question separately; the others read it as the
end of the prompt. A session that can `fork` reads the prefix its trials share only once."""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..core.cost import ModelShape
from ..core.errors import InfinictxError
from ..core.files import atomic_write, write_json
from ..core.progress import progress_bar
from ..core.registry import setting
from ..core.session import Sampler, Session
from .base import Outputs, Result, Task
from .planted import PLANTED_BUILDERS
from .report import wilson_interval

TASKS = ("passkey", "kv", "niah", "multikey", "multivalue", "vartrack")
PASSKEY_TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                "I will quiz you about the important information there.")
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = " What is the pass key? The pass key is"
KV_TASK = "Below is a long list of keys and their values. Remember the value of every key.\n"
KV_LINE = "key {key}: value {value}.\n"
KV_QUESTION = "\nWhat is the value of key {key}? The value of key {key} is"
ANSWER_TOKENS = 12
def parse_lengths(text: str) -> list[int]:
    """'1k,2k,4096' -> [1024, 2048, 4096]."""
    out = []
    for part in str(text).split(","):
        part = part.strip().lower()
        if not part:
            continue
        m = re.fullmatch(r"(\d+(?:\.\d+)?)(k?)", part)
        if not m:
            raise InfinictxError(f"bad length {part!r}: use numbers of tokens like 4096 or 4k")
        out.append(int(float(m.group(1)) * (1024 if m.group(2) else 1)))
    if not out or min(out) < 1:
        raise InfinictxError("give at least one positive length, e.g. --lengths 1k,2k,4k")
    return out


@dataclass
class Trial:
    ids: torch.Tensor       # the prompt
    answer: str             # expected answer (digits)
    depth: float            # where the needle sits, 0..1
    question_start: int     # where the question begins in `ids`
    needle_at: int          # where the needle (the passkey sentence, the asked key's line) begins in `ids`
    needle_len: int         # its length in tokens
    answers: list[str] | None = None   # several expected items (multivalue, vartrack), scored per item
    answer_tokens: int = ANSWER_TOKENS  # tokens generated for the answer
    wrong: list[str] | None = None     # items that make an answer wrong when named (vartrack's decoy chain)
    evidence: list[tuple[int, int]] | None = None   # (position, length) of every needle the answer needs
                                                    # (default: the needle)
    answer_start: int | None = None   # where the answer's given beginning ("The pass key is") starts in `ids`

    @property
    def needle(self) -> range:
        """Token positions of the needle in `ids`."""
        return range(self.needle_at, self.needle_at + self.needle_len)

    def evidence_shown(self, spans: list[tuple[int, int]]) -> float:
        """The share of the evidence needles that lie whole inside one of `spans` (what a RAG prompt showed)."""
        needles = self.evidence or [(self.needle_at, self.needle_len)]
        inside = sum(any(a <= at and at + n <= b for a, b in spans) for at, n in needles)
        return inside / len(needles)


def tokens_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def answer_offset(tokenizer, question: str, cut: int | None = None) -> int | None:
    """Where the answer's given beginning (`question[cut:]`, by default what follows the last "?", e.g. " The
    pass key is") starts among the question's tokens: the number of tokens of `question[:cut]`, when they are the
    first tokens of the whole question (None when the tokenizer merges across the cut, or there is no "?" to cut
    at and no `cut`). A chat-format reader (RAG) puts the asking part in the user's turn and this beginning in the
    assistant's."""
    if cut is None:
        if "?" not in question:   # nothing marks where the asking ends
            return None
        cut = question.rindex("?") + 1
    whole, asking = tokens_of(tokenizer, question), tokens_of(tokenizer, question[:cut])
    return len(asking) if whole[:len(asking)] == asking and 0 < len(asking) < len(whole) else None


def _after(start: int, offset: int | None) -> int | None:
    return None if offset is None else start + offset


def passkey_trial(tokenizer, length: int, depth: float, rng: random.Random) -> Trial:
    key = str(rng.randint(10000, 99999))
    task, filler = tokens_of(tokenizer, PASSKEY_TASK), tokens_of(tokenizer, PASSKEY_FILLER)
    needle, question = tokens_of(tokenizer, PASSKEY_NEEDLE.format(key=key)), tokens_of(tokenizer, PASSKEY_QUESTION)
    room = length - len(task) - len(needle) - len(question)
    if room < 0:
        raise InfinictxError(f"length {length} is too short for the passkey prompt "
                             f"(needs at least {length - room} tokens)")
    n_fill, rest = divmod(room, len(filler))
    before = round(depth * n_fill)
    ids = task + filler * before + needle + filler * (n_fill - before) + filler[:rest] + question
    start = len(ids) - len(question)
    return Trial(torch.tensor(ids), key, depth, start, len(task) + before * len(filler), len(needle),
                 answer_start=_after(start, answer_offset(tokenizer, PASSKEY_QUESTION)))


def kv_trial(tokenizer, length: int, depth: float, rng: random.Random) -> Trial:
    task = tokens_of(tokenizer, KV_TASK)
    # room for the question: its length with the widest key, plus a margin for tokenizer merges
    question_room = max(len(tokens_of(tokenizer, KV_QUESTION.format(key=k))) for k in (100000, 555555, 999999)) + 4
    lines, used, total = [], set(), len(task) + question_room
    while True:
        key, value = rng.randint(100000, 999999), rng.randint(100000, 999999)
        if key in used:
            continue
        line = tokens_of(tokenizer, KV_LINE.format(key=key, value=value))
        if total + len(line) > length and lines:
            break
        used.add(key)
        lines.append((key, value, line))
        total += len(line)
    pick = min(len(lines) - 1, round(depth * (len(lines) - 1)))
    key, value, line = lines[pick]
    question = tokens_of(tokenizer, KV_QUESTION.format(key=key))
    ids = task + [t for _, _, line in lines for t in line] + question
    if len(ids) > length:
        raise InfinictxError(f"length {length} is too short for the key-value prompt")
    start = len(ids) - len(question)
    return Trial(torch.tensor(ids), str(value), depth, start, len(task) + sum(len(x) for _, _, x in lines[:pick]),
                 len(line), answer_start=_after(start, answer_offset(tokenizer, KV_QUESTION.format(key=key))))


TRIAL_BUILDERS = {"passkey": passkey_trial, "kv": kv_trial, **PLANTED_BUILDERS}


def full_cache_bytes(model, tokens: int, dtype: torch.dtype) -> int:
    """Bytes of a full KV cache over `tokens` tokens: layers × KV heads × head dim × (K and V) × tokens."""
    s = ModelShape.from_config(model.config)
    return s.layers * s.kv_heads * s.head_dim * 2 * tokens * torch.empty(0, dtype=dtype).element_size()


def answer_of(text: str) -> str:
    m = re.search(r"\d+", text)
    return m.group(0) if m else ""


def score_output(trial: Trial, text: str) -> tuple[int, int, bool]:
    """(items found, items asked, whether the trial is right). One answer: the first number in the output must
    be it. Several: each is looked for as a whole word; the trial is right when all are there and none of the
    `wrong` ones."""
    if not trial.answers:
        ok = answer_of(text) == trial.answer
        return int(ok), 1, ok
    words = set(re.findall(r"\w+", text))
    hits = sum(a in words for a in trial.answers)
    ok = hits == len(trial.answers) and not any(w in words for w in trial.wrong or [])
    return hits, len(trial.answers), ok


def ask(session: Session, prompt: torch.Tensor, n_tokens: int = ANSWER_TOKENS, start: int = 0,
        question_at: int | None = None, answer_at: int | None = None,
        on_read: Callable[[int], None] | None = None) -> tuple[torch.Tensor, int | None]:
    """Absorb the prompt chunk by chunk, then answer greedily (no repetition penalty: the answer repeats
    digits of the prompt on purpose). Returns the answer tokens and the KV bytes the session held once the
    prompt was in and `end_prompt` had run (a policy may compress there; None for a session that keeps no cache
    between steps). `start` tokens of the prompt were absorbed already (a forked session); `prompt` is the rest.
    `question_at`: where the question begins in `prompt`; a session with the `question` capability gets it
    through `session.question`, any other reads it as the rest of the prompt; `answer_at`: where the answer's
    given beginning starts in `prompt` (handed over with the question). `on_read(n)`: called after each chunk with
    the prompt tokens read so far (counting `start`), for progress."""
    caps = session.capabilities
    split = question_at if caps.question and question_at is not None else len(prompt)
    for s in range(0, split, session.chunk):
        session.absorb(prompt[s:min(split, s + session.chunk)])
        if on_read is not None:
            on_read(start + min(split, s + session.chunk))
    if split < len(prompt):
        session.question(prompt[split:], answer_at=None if answer_at is None else answer_at - split)
    session.end_prompt()
    kv_bytes = session.kv_bytes() if caps.kv_bytes else None
    context = min(start + len(prompt), session.window - n_tokens)
    return session.generate_chunk(n_tokens, context, Sampler(repetition_penalty=1.0, ban_eos=False)), kv_bytes


def _start(make_session, shared, trial: Trial, built: list, t: int, depths: list, on_read=None):
    """A session for `trial`. Sessions that can fork (deterministic state from the tokens read) read the
    prefix that all trials with a deeper needle share only once: trials run in order of depth, a shared
    session reads ahead chunk by chunk up to this trial's needle, and each trial continues from a fork of it.
    Returns (session, the shared session to keep or None). `on_read(n)`: progress, as in `ask`."""
    probe = shared or make_session()
    caps = probe.capabilities
    if not (caps.fork or caps.snapshot):
        return probe, None
    shared = probe
    later = [built[u] for u in range(len(built)) if depths[u] >= depths[t]]
    # tokens all remaining trials agree on (short of the question, for a session that reads it as a question)
    common = trial.question_start if probe.capabilities.question else len(trial.ids)
    for other in later:
        n = min(common, len(other.ids))
        same = (trial.ids[:n] == other.ids[:n]).int()
        common = n if bool(same.all()) else int(same.argmin())
    have = len(shared.history)
    if not torch.equal(shared.history, trial.ids[:have]):  # should not happen; start over to be safe
        shared.close()
        shared, have = make_session(), 0
    while have + shared.chunk <= common - 1:  # leave at least one token for the trial itself
        shared.absorb(trial.ids[have:have + shared.chunk])
        have += shared.chunk
        if on_read is not None:
            on_read(have)
    if caps.fork:
        return shared.fork(), shared
    return _Restoring(shared), shared


class _Restoring:
    """A trial run on the shared session itself (one that cannot fork but can snapshot: an adapter on it): on
    leaving, the session goes back to the prefix it had read, instead of closing."""

    def __init__(self, session: Session):
        self.session, self.state = session, session.snapshot()

    def __enter__(self) -> Session:
        return self.session

    def __exit__(self, *exc):
        self.session.restore(self.state)
        return False


@dataclass
class RetrievalResult:
    task: str
    method: str
    config: dict
    results: list = field(default_factory=list)
    wall_s: float = 0.0
    meta: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"task": self.task, "method": self.method, **self.meta, "window": self.config.get("window"),
                "config": self.config, "results": self.results, "wall_s": round(self.wall_s, 3)}


def length_row(length: int, rows: list, prompt_tokens: int, kv_bytes_full: int, wall_s: float) -> dict:
    """One length's summary from its per-trial rows (None = not run yet): accuracy over the trials run, with
    its 95% Wilson interval. A task that asks several items per trial is scored per item (its `items`)."""
    done = [r for r in rows if r is not None]
    correct = sum(r.get("hits", int(r["ok"])) for r in done)
    items = sum(r.get("items", 1) for r in done)
    lo, hi = wilson_interval(correct, items)
    row = {"length": length, "accuracy": correct / items if items else 0.0, "trials": len(done),
           "correct": correct, "ci95": [round(lo, 4), round(hi, 4)], "prompt_tokens": prompt_tokens,
           "s_per_trial": round(wall_s / max(1, len(done)), 3), "wall_s": round(wall_s, 3),
           "complete": len(done) == len(rows), "per_trial": rows}
    if items != len(done):
        row.update(items=items, trials_right=sum(r["ok"] for r in done))
    shown = [r["evidence_shown"] for r in done if r.get("evidence_shown") is not None]
    if shown:
        row["evidence_shown"] = round(sum(shown) / len(shown), 4)
    held = [r["kv_bytes"] for r in done if r.get("kv_bytes") is not None]
    if held:
        row["kv_bytes"] = int(sum(held) / len(held))
    row["kv_bytes_full"] = kv_bytes_full
    return row


def check_resumable(previous: dict, task: str, method: str, config: dict, trials: int, seed: int):
    """A partial run continues only under the same task, method, settings, seed and trial count."""
    mine = {"task": task, "method": method, "config": config, "seed": seed}
    theirs = {k: previous.get(k) for k in mine}
    if theirs != mine or any(len(r.get("per_trial", [])) != trials for r in previous.get("results", [])):
        raise InfinictxError("the partial results on disk come from a different run (task, method, settings, seed "
                             "or trials differ): delete the .partial.json file or write to another --json")


def build_trials(tokenizer, task: str, length: int, trials: int, seed: int) -> tuple[list[float], list[Trial]]:
    """The seeded trials of one length: (depths, trials); trial t puts its needle at depth t/(trials−1)."""
    rng = random.Random(f"{seed}-{task}-{length}")
    depths = [t / (trials - 1) if trials > 1 else 0.5 for t in range(trials)]
    return depths, [TRIAL_BUILDERS[task](tokenizer, length, depth, rng) for depth in depths]


def run_trial(session: Session, tokenizer, trial: Trial, depth: float, on_read=None) -> dict:
    """Read the rest of `trial`'s prompt (after what `session` has read), answer, and score: the trial's row."""
    start = len(session.history)
    out, held = ask(session, trial.ids[start:], trial.answer_tokens, start=start,
                    question_at=trial.question_start - start,
                    answer_at=None if trial.answer_start is None else trial.answer_start - start, on_read=on_read)
    # a retriever: was the evidence in the prompt it built?
    shown = session.shown_spans() if session.capabilities.question else None
    text = tokenizer.decode(out.tolist())
    hits, items, ok = score_output(trial, text)
    row = {"depth": round(depth, 3), "needle_at": trial.needle_at, "ok": bool(ok),
           "answer": " ".join(trial.answers) if trial.answers else trial.answer,
           "output": text.strip()[:40 if items == 1 else 120]}
    if items > 1:
        row.update(hits=hits, items=items)
    if held is not None:
        row["kv_bytes"] = held
    if shown is not None:
        row["evidence_shown"] = round(trial.evidence_shown(shown), 4)
    return row


def retrieval_unit(make_session: Callable[[], Session], tokenizer, task: str, length: int, trials: int, t: int,
                   seed: int = 0) -> dict:
    """One trial as a unit of work on its own (a Ray worker's): a fresh session reads the whole prompt (no prefix
    shared with other trials; the same answer, since forking is exact). Returns the row and what the merge needs."""
    t0 = time.perf_counter()
    depths, built = build_trials(tokenizer, task, length, trials, seed)
    trial = built[t]
    with make_session() as session:
        row = run_trial(session, tokenizer, trial, depths[t])
        return {"length": length, "t": t, "row": row, "method": session.method, "config": session.describe(),
                "prompt_tokens": len(trial.ids),
                "kv_bytes_full": full_cache_bytes(session.model, len(trial.ids), session.lm.dtype),
                "wall_s": time.perf_counter() - t0}


def _previous(resume: dict | None, lengths: list[int]) -> dict:
    previous = {r["length"]: r for r in (resume or {}).get("results", [])}
    return {n: previous[n] for n in lengths if n in previous}


def run_retrieval(make_session: Callable[[], Session], tokenizer, task: str, lengths: list[int], trials: int,
                  seed: int = 0, progress: bool = True, on_trial_done: Callable | None = None,
                  resume: dict | None = None) -> RetrievalResult:
    """Accuracy per length over `trials` seeded trials with the needle at evenly spread depths.

    `on_trial_done(result)` is called after every trial with the results so far (an unfinished length has
    `complete: False` and None for the trials not run yet). `resume`: such a partial summary of the same run;
    its finished trials are kept, not rerun, so a run stopped at any trial continues where it was. Each trial's
    outcome depends only on its seeded prompt, so the results equal an uninterrupted run's."""
    if task not in TRIAL_BUILDERS:
        raise InfinictxError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if trials < 1:
        raise InfinictxError("--trials must be >= 1")
    t0 = time.perf_counter()
    previous = _previous(resume, lengths)
    rows_by_length = dict(previous)
    result = (RetrievalResult(task=resume["task"], method=resume["method"], config=resume["config"])
              if resume else None)
    checked = resume is None

    def publish():
        result.results = [rows_by_length[n] for n in lengths if n in rows_by_length]

    # trials finished before a resume count as done from the start (so the bar's rate is this sitting's)
    resumed = sum(r is not None for n in lengths for r in (previous.get(n, {}).get("per_trial") or []))
    with progress_bar(progress, len(lengths) * trials, "trial", task, initial=resumed) as bar:
        for length in lengths:
            depths, built = build_trials(tokenizer, task, length, trials, seed)
            old = previous.get(length, {})
            rows = list(old.get("per_trial") or [None] * trials)
            wall = float(old.get("wall_s", 0.0))
            shared = None  # a session that has read the prompt prefix common to the remaining trials
            for t in sorted(range(trials), key=lambda t: depths[t]):
                if rows[t] is not None:
                    continue
                trial_t0 = time.perf_counter()
                trial = built[t]
                done = [r for r in rows if r is not None]
                score = f"{sum(r['ok'] for r in done)}/{len(done)}"

                def on_read(n: int):   # a long prompt takes minutes: show how far this trial has read
                    bar.set_postfix(length=length, acc=score, read=f"{n:,}/{len(trial.ids):,}")

                session, prefix = _start(make_session, shared, trial, built, t, depths, on_read)
                if prefix is not None:
                    shared = prefix
                meta = session.session if isinstance(session, _Restoring) else session
                if not checked:
                    check_resumable(resume, task, meta.method, meta.describe(), trials, seed)
                    checked = True
                if result is None:
                    result = RetrievalResult(task=task, method=meta.method, config=meta.describe())
                with session as reader:
                    rows[t] = run_trial(reader, tokenizer, trial, depths[t], on_read)
                    model, dtype = reader.model, reader.lm.dtype
                wall += time.perf_counter() - trial_t0
                done = [r for r in rows if r is not None]
                bar.set_postfix(length=length, acc=f"{sum(r['ok'] for r in done)}/{len(done)}")
                bar.update(1)
                rows_by_length[length] = length_row(length, rows, len(trial.ids), full_cache_bytes(
                    model, len(trial.ids), dtype), wall)
                publish()
                if on_trial_done is not None:
                    on_trial_done(result)
            if shared is not None:
                shared.close()
    publish()
    result.wall_s = time.perf_counter() - t0 + float((resume or {}).get("wall_s", 0.0))
    return result


def run_retrieval_units(executor, task: str, lengths: list[int], trials: int, seed: int = 0, progress: bool = True,
                        on_trial_done: Callable | None = None, resume: dict | None = None) -> RetrievalResult:
    """`run_retrieval` with every trial a unit of work handed to `executor` (`infinictx.executors`: Ray workers,
    or in-process): the same rows, merged in the same summary and partial file, in whatever order they finish.
    Seconds per trial are each unit's own (a worker reads its whole prompt: no prefix shared between trials)."""
    t0 = time.perf_counter()
    previous = _previous(resume, lengths)
    rows = {n: list(previous.get(n, {}).get("per_trial") or [None] * trials) for n in lengths}
    walls = {n: float(previous.get(n, {}).get("wall_s", 0.0)) for n in lengths}
    units = [(n, t) for n in lengths for t in range(trials) if rows[n][t] is None]
    result = (RetrievalResult(task=resume["task"], method=resume["method"], config=resume["config"])
              if resume else None)
    rows_by_length = dict(previous)
    checked = resume is None
    with progress_bar(progress, len(lengths) * trials, "trial", task,
                      initial=len(lengths) * trials - len(units)) as bar:
        for out in executor.map(units):
            if not checked:
                check_resumable(resume, task, out["method"], out["config"], trials, seed)
                checked = True
            if result is None:
                result = RetrievalResult(task=task, method=out["method"], config=out["config"])
            n = out["length"]
            rows[n][out["t"]] = out["row"]
            walls[n] += out["wall_s"]
            rows_by_length[n] = length_row(n, rows[n], out["prompt_tokens"], out["kv_bytes_full"], walls[n])
            result.results = [rows_by_length[m] for m in lengths if m in rows_by_length]
            done = [r for m in lengths for r in rows[m] if r is not None]
            bar.set_postfix(acc=f"{sum(r['ok'] for r in done)}/{len(done)}")
            bar.update(1)
            if on_trial_done is not None:
                on_trial_done(result)
    if result is None:   # nothing left to run
        result = RetrievalResult(task=resume["task"], method=resume["method"], config=resume["config"])
        result.results = [rows_by_length[m] for m in lengths if m in rows_by_length]
    result.wall_s = time.perf_counter() - t0 + float((resume or {}).get("wall_s", 0.0))
    return result


def read_partial(path: Path, model_name: str, weights: str | None = None) -> dict | None:
    """The partial results an interrupted run left at `path` (None if there are none). `weights`: the model's
    weights fingerprint; a partial file that records another one (a retrained checkpoint under the same name)
    is refused."""
    if not path.exists():
        return None
    import json

    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InfinictxError(f"cannot read the partial results {path}: {exc}; delete it to start over")
    if previous.get("model") != model_name:
        raise InfinictxError(f"the partial results {path} are for model {previous.get('model')!r}, not "
                             f"{model_name!r}: delete it or write to another --json")
    if weights and previous.get("weights", weights) != weights:
        raise InfinictxError(f"the partial results {path} were measured with other weights of {model_name!r} "
                             "(retrained?): delete it or write to another --json")
    return previous


@dataclass
class RetrievalTask(Task):
    """retrieval accuracy against prompt length (passkey or key-value lookup)"""

    task: str = setting("passkey", "what to retrieve: a passkey in filler text, a value in a key-value list, or "
                        "facts planted in a book (niah, multikey, multivalue, vartrack: tasks/planted.py)",
                        choices=TASKS)
    lengths: str | list = setting("1k,2k,4k", "prompt lengths in tokens, e.g. 1k,2k,4k,...,64k",
                                  parse=parse_lengths)
    trials: int = setting(20, "trials per length, needle depths spread evenly")
    seed: int = setting(0, "seed of the prompts (passkeys, dictionaries)")

    name = "passkey"
    default_method = "window"
    method_defaults = {"window": {"window": 1024}, "temp-lora": {"window": 1024}}
    splits = True   # a unit is one trial: (length, trial index)

    def run_unit(self, lm, config, unit) -> dict:
        length, t = unit
        return retrieval_unit(lambda: config.make_session(lm), lm.tokenizer, self.task, length, self.trials, t,
                              self.seed)

    def check(self, config):
        if self.task not in TRIAL_BUILDERS:
            raise InfinictxError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        text = self.lengths if isinstance(self.lengths, str) else ",".join(map(str, self.lengths))
        self.lengths = parse_lengths(text)
        if self.trials < 1:
            raise InfinictxError("--trials must be >= 1")

    def run(self, lm, config, inputs, outputs: Outputs, progress: bool, executor=None) -> Result:
        from .report import accuracy_markdown

        partial = Path(outputs.json).with_suffix(".partial.json") if outputs.json else None
        # A checkpoint retrained under the same name (smollm2-fot) must not continue another one's partial run.
        weights = lm.fingerprint[:16]
        resume = read_partial(partial, lm.name, weights) if partial else None
        meta = {"model": lm.name, "weights": weights, "seed": self.seed}

        def save_partial(result):  # after every trial: a rerun of the same command continues from here
            write_json(result.summary() | meta | {"complete": False}, partial)

        if executor is not None:
            result = run_retrieval_units(executor, self.task, self.lengths, self.trials, seed=self.seed,
                                         progress=progress, on_trial_done=save_partial if partial else None,
                                         resume=resume)
        else:
            result = run_retrieval(lambda: config.make_session(lm), lm.tokenizer, self.task, self.lengths,
                                   self.trials, seed=self.seed, progress=progress,
                                   on_trial_done=save_partial if partial else None, resume=resume)
        result.meta = meta
        summary = result.summary()
        return Result(summary=summary, stdout=accuracy_markdown(summary), data=result)

    def write(self, result: Result, outputs: Outputs):
        from .report import plot_accuracy

        if outputs.json:
            write_json(result.summary, outputs.json)
            atomic_write(Path(outputs.json).with_suffix(".md"), result.stdout)
            partial = Path(outputs.json).with_suffix(".partial.json")
            if partial.exists():
                partial.unlink()
        if outputs.plot:
            plot_accuracy([result.summary], outputs.plot)
