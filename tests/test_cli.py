"""The CLI contract: outputs other tools rely on, and one-line errors (exit 2, nothing written) on bad input."""

import json
import subprocess
import sys

import pytest
from conftest import SAMPLE

from infinictx.fronts.cli import main


@pytest.fixture
def book(tmp_path):
    p = tmp_path / "book.txt"
    p.write_text(SAMPLE * 6)
    return p


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "infinictx", *map(str, args)], capture_output=True, text=True)


def test_ppl_writes_json_report_and_plot(tiny_model_dir, book, tmp_path, capsys):
    out = tmp_path / "res.json"
    plot = tmp_path / "res.png"
    rc = main(["ppl", str(book), "--model", str(tiny_model_dir), "--method", "temp-lora", "-W", "64", "-D", "32",
               "--compare-base", "--bucket-size", "100", "--json", str(out), "--plot", str(plot), "--no-progress",
               "--lr", "1e-3"])
    assert rc == 0
    res = json.loads(out.read_text())
    for key in ("method", "tokens", "ppl", "base_ppl", "buckets", "wall_s", "flops"):
        assert key in res
    assert res["method"] == "temp-lora" and res["base_weights_unchanged"] is True
    assert {"start", "end", "ppl", "base_ppl"} <= set(res["buckets"][0])
    assert sum(b["tokens"] for b in res["buckets"]) == res["tokens"] - 1
    assert res["wall_s_by_phase"]["training"] > 0 and res["flops_by_kind"]["backward"] > 0
    assert plot.stat().st_size > 1000 and out.with_suffix(".md").read_text().startswith("## Streaming perplexity")
    assert "| **all** |" in capsys.readouterr().out


def test_window_method_and_max_tokens(tiny_model_dir, book, tmp_path):
    out = tmp_path / "w.json"
    assert main(["ppl", str(book), "--model", str(tiny_model_dir), "--method", "window", "-W", "64", "-D", "16",
                 "--max-tokens", "150", "--json", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert res["tokens"] == 150 and res["method"] == "window" and "base_ppl" not in res


def test_generate_cli(tiny_model_dir, tmp_path):
    out, js = tmp_path / "gen.txt", tmp_path / "gen.json"
    assert main(["generate", "--prompt", SAMPLE, "--model", str(tiny_model_dir), "-W", "64", "-D", "16",
                 "--tokens", "40", "--out", str(out), "--json", str(js), "--no-progress"]) == 0
    res = json.loads(js.read_text())
    assert res["generated_tokens"] == 40 and res["tokens_per_s"] > 0 and out.read_text()


@pytest.mark.parametrize("content, args, message", [
    (b"", [], "is empty"),
    (b"\x00\x01\x02binary", [], "looks binary"),
    (b"\xff\xfe not utf8 \xe9", [], "not valid UTF-8"),
    (b"short text", [], "longer than the window"),
    (None, ["-W", "64", "-D", "64"], "smaller than the window"),
    (None, ["-W", "64", "-D", "128"], "smaller than the window"),
    (None, ["-W", "64", "-D", "32", "--train-context", "40"], "must not exceed the window"),
    (None, ["--model", "/no/such/model"], "does not exist"),
    (None, ["--max-tokens", "10"], "must be larger than the window"),
])
def test_bad_input_one_line_error_nonzero_exit_nothing_written(tiny_model_dir, tmp_path, content, args, message):
    src = tmp_path / "in.txt"
    src.write_bytes(SAMPLE.encode() * 6 if content is None else content)
    out = tmp_path / "out.json"
    argv = ["ppl", src, "--json", out, "--plot", tmp_path / "p.png", "-W", "64", "-D", "32", "--no-progress"]
    if "--model" not in args:
        argv += ["--model", tiny_model_dir]
    proc = run_cli(*argv, *args)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("infinictx:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.glob("out*")) == [] and not (tmp_path / "p.png").exists()


POLICY_ARGS = {"memory": ["--mem-layers", "1", "--lookup", "topk", "--topk", "8"],
               "longcache": ["--global-tokens", "4", "--span", "4", "--recall-clip", "4", "-D", "8"],
               "streaming": ["-D", "16"], "razor": ["--min-window", "16", "--induction-ratio", "0.25", "-D", "32"],
               "full": ["-D", "64"]}


@pytest.mark.parametrize("method, task", [("window", "passkey"), ("memory", "kv"), ("full", "passkey"),
                                          ("streaming", "passkey"), ("longcache", "kv"), ("razor", "passkey")])
def test_passkey_cli_json_and_plot(tiny_model_dir, tmp_path, method, task):
    out, plot = tmp_path / "pk.json", tmp_path / "pk.png"
    assert main(["passkey", "--model", str(tiny_model_dir), "--method", method, "--task", task, "-W", "64",
                 "--lengths", "200,300", "--trials", "2", "--json", str(out), "--plot", str(plot),
                 "--no-progress"] + POLICY_ARGS.get(method, [])) == 0
    res = json.loads(out.read_text())
    assert res["method"] == method and res["task"] == task and res["base_weights_unchanged"] is True
    assert [(r["length"], r["trials"]) for r in res["results"]] == [(200, 2), (300, 2)]
    assert all(0 <= r["accuracy"] <= 1 and r["kv_bytes_full"] > 0 for r in res["results"])
    assert ("kv_bytes" in res["results"][0]) == (method != "window")
    if method in ("full", "longcache"):      # both hold the whole cache
        assert all(r["kv_bytes"] == r["kv_bytes_full"] for r in res["results"])
    if method in ("streaming", "razor"):     # both hold less
        assert all(r["kv_bytes"] < r["kv_bytes_full"] for r in res["results"])
    assert plot.stat().st_size > 1000 and out.with_suffix(".md").exists()
    assert not out.with_suffix(".partial.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--lengths", "1k,x"], "bad length"),
    (["--trials", "0"], "--trials must be"),
    (["--lengths", "20"], "too short for the passkey prompt"),
    (["--method", "memory", "--mem-layers", "7"], "out of range"),
    (["--method", "memory", "--mem-layers", "auto:9"], "auto:N"),
    (["--method", "memory", "--mem-layers", "8,x"], "comma-separated integers"),
    (["--method", "memory", "--grouping", "4"], "two numbers"),
    (["--method", "razor", "--keep-ratio", "1.5"], "must be in (0, 1)"),
    (["--method", "razor", "--keep-ratio", "0"], "must be in (0, 1)"),
    (["--method", "streaming", "-W", "0"], "must be > 0"),
    (["--method", "longcache", "--recall-clip", "8", "--span", "32"], "budgets exceed the scope"),
    (["--method", "longcache", "--select-dtype", "int8"], "unknown selection dtype"),
    (["--method", "window", "--lookup", "topk"], "--lookup is not a setting of --method window"),
    (["--method", "razor", "--mst"], "--mst applies to Temp-Lora training"),
    (["--method", "window", "--mst-save-attention"], "--mst-save-attention applies to Temp-Lora training"),
    (["--method", "window", "--lr", "1e-3"], "--lr applies to Temp-Lora training"),
])
def test_passkey_bad_input(tiny_model_dir, tmp_path, args, message):
    out = tmp_path / "out.json"
    proc = run_cli("passkey", "--model", tiny_model_dir, "-W", "64", "--trials", "1", "--json", out,
                   "--no-progress", *args)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("infinictx:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not out.exists()


def test_memory_method_ppl_and_generate(tiny_model_dir, book, tmp_path):
    out = tmp_path / "m.json"
    assert main(["ppl", str(book), "--model", str(tiny_model_dir), "--method", "memory", "-W", "64", "-D", "16",
                 "--mem-layers", "1", "--lookup", "topk", "--topk", "8", "--compare-base", "--json", str(out),
                 "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert res["method"] == "memory" and res["config"]["mem_layers"] == [1] and res["base_ppl"] > 0
    assert res["ppl"] != res["base_ppl"]
    gen = tmp_path / "g.json"
    assert main(["generate", "--prompt", SAMPLE, "--model", str(tiny_model_dir), "--method", "memory", "-W", "64",
                 "--tokens", "30", "--json", str(gen), "--no-progress"]) == 0
    assert json.loads(gen.read_text())["generated_tokens"] == 30


def test_policy_with_temp_lora_on_top_ppl(tiny_model_dir, book, tmp_path):
    out = tmp_path / "r.json"
    assert main(["ppl", str(book), "--model", str(tiny_model_dir), "--method", "razor", "--temp-lora", "-D", "32",
                 "--min-window", "16", "--lr", "1e-3", "--rank", "4", "--json", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert res["method"] == "razor+temp-lora" and res["base_weights_unchanged"] is True
    assert res["config"]["temp_lora"]["rank"] == 4 and res["wall_s_by_phase"]["training"] > 0


def test_temp_lora_with_mst_ppl(tiny_model_dir, book, tmp_path):
    """--mst and --mst-save-attention give the same numbers as without them (the same training steps, the
    Mini-Sequence way)."""
    ppl = []
    for i, extra in enumerate(([], ["--mst"], ["--mst-save-attention"])):
        out = tmp_path / f"t{i}.json"
        assert main(["ppl", str(book), "--model", str(tiny_model_dir), "-W", "64", "-D", "32", "--lr", "1e-3",
                     "--rank", "4", "--json", str(out), "--no-progress", *extra]) == 0
        res = json.loads(out.read_text())
        assert res["config"]["mst"] == bool(extra) and res["base_weights_unchanged"] is True
        assert res["config"]["mst_save_attention"] == (extra == ["--mst-save-attention"])
        ppl.append(res["ppl"])
    assert ppl[1] == pytest.approx(ppl[0], rel=1e-5) and ppl[2] == pytest.approx(ppl[0], rel=1e-5)


def _without_timings(summary: dict) -> dict:
    """A retrieval summary without its wall-clock fields (they differ between any two runs)."""
    timing = {"wall_s", "s_per_trial"}
    out = {k: v for k, v in summary.items() if k not in timing}
    out["results"] = [{k: v for k, v in r.items() if k not in timing} for r in summary["results"]]
    return out


def test_passkey_run_stopped_after_k_trials_resumes_to_the_same_json(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import infinictx.tasks.retrieval as retrieval

    argv = ["passkey", "--model", str(tiny_model_dir), "--method", "memory", "-W", "64", "--lookup", "topk",
            "--topk", "4", "--lengths", "200,300", "--trials", "3", "--no-progress"]
    whole, part = tmp_path / "whole.json", tmp_path / "part.json"
    assert main(argv + ["--json", str(whole)]) == 0

    real_ask, calls = retrieval.ask, {"n": 0}

    def ask_then_stop(*args, **kwargs):  # Ctrl-C during the 5th trial (the 2nd of length 300)
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_ask(*args, **kwargs)

    monkeypatch.setattr(retrieval, "ask", ask_then_stop)
    assert main(argv + ["--json", str(part)]) == 130
    partial = json.loads(part.with_suffix(".partial.json").read_text())
    assert [(r["length"], r["trials"], r["complete"]) for r in partial["results"]] == [(200, 3, True), (300, 1, False)]
    assert not part.exists()

    calls["n"] = 0

    def counted_ask(*args, **kwargs):
        calls["n"] += 1
        return real_ask(*args, **kwargs)

    monkeypatch.setattr(retrieval, "ask", counted_ask)
    assert main(argv + ["--json", str(part)]) == 0
    assert calls["n"] == 2          # only the two trials not run before
    assert _without_timings(json.loads(part.read_text())) == _without_timings(json.loads(whole.read_text()))
    assert not part.with_suffix(".partial.json").exists()
    assert "95% interval" in part.with_suffix(".md").read_text()

    # a partial file from another run is refused, with one line
    partial["config"]["topk"] = 99
    part.with_suffix(".partial.json").write_text(json.dumps(partial))
    capsys.readouterr()
    assert main(argv + ["--json", str(part)]) == 2
    assert "different run" in capsys.readouterr().err
    # so is one measured with other weights saved under the same name (a retrained checkpoint)
    partial["config"]["topk"] = 4
    assert partial["weights"] == json.loads(whole.read_text())["weights"]
    partial["weights"] = "0" * 16
    part.with_suffix(".partial.json").write_text(json.dumps(partial))
    assert main(argv + ["--json", str(part)]) == 2
    assert "other weights" in capsys.readouterr().err


def test_wilson_interval_on_known_counts():
    from infinictx.tasks.report import wilson_interval

    for (correct, n), (lo, hi) in {(0, 10): (0.0, 0.2775), (10, 10): (0.7225, 1.0), (5, 10): (0.2366, 0.7634),
                                   (19, 20): (0.7639, 0.9911)}.items():
        got = wilson_interval(correct, n)
        assert abs(got[0] - lo) < 1e-4 and abs(got[1] - hi) < 1e-4, (correct, n, got)
