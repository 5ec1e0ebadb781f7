"""Units of work on Ray (issue 19): a passkey run spread over local Ray workers gives the rows of a single-process
run; a worker killed mid-run is replaced and its unit redone; a rerun skips finished units; bad options are one
line."""

import json
import os
import signal
import threading
import time

import pytest

from infinictx.core.errors import InfinictxError
from infinictx.executors import InProcess, RayExecutor, RayOptions
from infinictx.fronts.cli import main
from infinictx.runs import make_spec
from infinictx.tasks.retrieval import run_retrieval, run_retrieval_units

ray = pytest.importorskip("ray")


def rows(summary: dict) -> list:
    """What must be equal between runs: every trial's row, per length (timings left out)."""
    return [(r["length"], r["accuracy"], r["per_trial"]) for r in summary["results"]]


def spec(tiny_model_dir, method="streaming", **ray_options):
    settings = {"window": 64, **({"rank": 4, "lr": 1e-2} if method == "temp-lora" else {})}
    # float32 as the `tiny` fixture: "auto" is bf16 on a CPU with AMX, and Ray workers load the model themselves
    return make_spec("passkey", method, settings, task_settings={"lengths": "200,300", "trials": 3},
                     model=str(tiny_model_dir), dtype="float32", progress=False, ray=ray_options or None)


# streaming forks a shared prefix in one process; temp-lora reads it once and goes back to a snapshot of it
@pytest.mark.parametrize("method", ["window", "streaming", "temp-lora"])
def test_units_in_process_equal_the_single_process_run(tiny, tiny_model_dir, method):
    s = spec(tiny_model_dir, method)
    config, task = s.method, s.task
    single = run_retrieval(lambda: config.make_session(tiny), tiny.tokenizer, task.task, task.lengths, task.trials,
                           progress=False)
    split = run_retrieval_units(InProcess(s, tiny), task.task, task.lengths, task.trials, progress=False)
    assert rows(split.summary()) == rows(single.summary())


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_cli_run_equals_single_process_and_resumes(tiny_model_dir, tmp_path, local_ray):
    base = ["passkey", "--method", "streaming", "-W", "64", "--lengths", "200,300", "--trials", "3",
            "--model", str(tiny_model_dir), "--no-progress"]
    assert main(base + ["--json", str(tmp_path / "single.json")]) == 0
    assert main(base + ["--json", str(tmp_path / "ray.json"), "--ray", "--workers", "2"]) == 0
    single, spread = (json.loads((tmp_path / f).read_text()) for f in ("single.json", "ray.json"))
    assert rows(spread) == rows(single)
    # a partial run (its first length done) continues on Ray with only the missing trials
    partial = dict(single, results=[single["results"][0], {**single["results"][1], "per_trial": [None] * 3}],
                   complete=False)
    (tmp_path / "resumed.partial.json").write_text(json.dumps(partial))
    assert main(base + ["--json", str(tmp_path / "resumed.json"), "--ray", "--workers", "2"]) == 0
    assert rows(json.loads((tmp_path / "resumed.json").read_text())) == rows(single)


def test_a_killed_worker_is_replaced_and_its_unit_redone(tiny, tiny_model_dir, local_ray):
    s = spec(tiny_model_dir, "streaming")
    task = s.task
    single = run_retrieval(lambda: s.method.make_session(tiny), tiny.tokenizer, task.task, task.lengths,
                           task.trials, progress=False)
    executor = RayExecutor(s, RayOptions(workers=2))
    pids = [ray.get(a.pid.remote()) for a in executor.actors]
    out = {}
    job = threading.Thread(target=lambda: out.update(r=run_retrieval_units(
        executor, task.task, task.lengths, task.trials, progress=False, on_trial_done=lambda r: time.sleep(0.2))))
    job.start()
    time.sleep(1.0)
    os.kill(pids[0], signal.SIGKILL)
    job.join(timeout=300)
    executor.close()
    assert rows(out["r"].summary()) == rows(single.summary())


def test_bad_ray_options_are_one_line(tiny_model_dir, capsys):
    ray.shutdown()   # not the module's local Ray: the job must try to join the address it is given
    with pytest.raises(InfinictxError, match="--workers"):
        RayOptions(workers=0)
    assert main(["passkey", "--model", str(tiny_model_dir), "--ray", "--address", "127.0.0.1:1",
                 "--lengths", "200", "--trials", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("infinictx: error: cannot reach the Ray cluster at 127.0.0.1:1")
    with pytest.raises(InfinictxError, match="does not split"):
        make_spec("generate", "window", task_settings={"prompt": "Of Mans"}, ray={"workers": 1})


@pytest.fixture
def books(tmp_path):
    from conftest import SAMPLE

    folder = tmp_path / "books"
    folder.mkdir()
    words = SAMPLE.split()
    for i in range(3):   # three different books, of different lengths
        (folder / f"book{i}.txt").write_text(" ".join(words[i:] + words[:i]) * (3 + i))
    return folder


def ppl_args(tiny_model_dir, books, *extra):
    return ["ppl", str(books), "--books", "all", "--method", "window", "-W", "64", "-D", "32", "--bucket-size", "100",
            "--model", str(tiny_model_dir), "--no-progress", *extra]


def test_ppl_over_books_rows_equal_single_book_runs(tiny_model_dir, books, tmp_path):
    assert main(ppl_args(tiny_model_dir, books, "--json", str(tmp_path / "all.json"))) == 0
    s = json.loads((tmp_path / "all.json").read_text())
    assert [b["name"] for b in s["books"]] == ["book0.txt", "book1.txt", "book2.txt"]
    for i, b in enumerate(s["books"]):
        one = tmp_path / f"one{i}.json"
        assert main(["ppl", str(books / f"book{i}.txt"), "--method", "window", "-W", "64", "-D", "32",
                     "--model", str(tiny_model_dir), "--no-progress", "--json", str(one)]) == 0
        assert b["ppl"] == pytest.approx(json.loads(one.read_text())["ppl"], rel=1e-6)
    assert sum(b["tokens"] for b in s["buckets"]) == s["scored_tokens"] == s["tokens"] - len(s["books"])


def test_ppl_books_on_ray_equal_and_a_rerun_skips_finished_books(tiny_model_dir, books, tmp_path, local_ray,
                                                                monkeypatch):
    from infinictx.tasks.perplexity import PerplexityTask

    assert main(ppl_args(tiny_model_dir, books, "--json", str(tmp_path / "single.json"))) == 0
    assert main(ppl_args(tiny_model_dir, books, "--json", str(tmp_path / "ray.json"), "--ray", "--workers", "2")) == 0
    single, spread = (json.loads((tmp_path / f).read_text()) for f in ("single.json", "ray.json"))
    assert [b["ppl"] for b in spread["books"]] == pytest.approx([b["ppl"] for b in single["books"]], rel=1e-6)
    assert [b["ppl"] for b in spread["buckets"]] == pytest.approx([b["ppl"] for b in single["buckets"]], rel=1e-6)

    ran = []
    original = PerplexityTask.run_unit

    def stop_at_second(self, lm, config, unit):
        ran.append(unit)
        if len(ran) == 2:
            raise KeyboardInterrupt
        return original(self, lm, config, unit)

    monkeypatch.setattr(PerplexityTask, "run_unit", stop_at_second)
    parts = tmp_path / "parts"
    args = ppl_args(tiny_model_dir, books, "--json", str(tmp_path / "resumed.json"), "--checkpoint", str(parts))
    assert main(args) == 130 and (parts / "book-0.npz").exists()
    ran.clear()
    monkeypatch.setattr(PerplexityTask, "run_unit", lambda self, lm, config, unit: (ran.append(unit),
                                                                                  original(self, lm, config, unit))[1])
    assert main(args) == 0 and ran == [1, 2] and not parts.exists()
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert [b["ppl"] for b in resumed["books"]] == pytest.approx([b["ppl"] for b in single["books"]], rel=1e-6)
