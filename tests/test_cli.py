"""The command-line entry points on tiny runs: sweep.py, compare.py, evaluate.py, analyze.py, train.py."""

import json
from pathlib import Path

import analyze
import compare
import evaluate
import sweep
import train
from comoe_jax.commands import compare as compare_command

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config", str(ROOT / "configs" / "tiny.py")]
FAST = ["train.steps=3", "train.save_every=3", "train.batch_size=4", "mesh.num_devices=1", "eval.max_per_task=2",
        "eval.max_new_tokens=4", "data.train=builtin:add+antonym", "eval.sources=builtin:add+antonym",
        "adapter.rank=4", "eval.before_training=false"]


def test_sweep_evaluate_and_analyze_on_tiny_runs(tmp_path, capsys):
    out = tmp_path / "sweep"
    args = TINY + ["--grid", "loss.contrastive_weight=0,0.01", "--grid", "train.seed=0,1", "--out", str(out)] + FAST
    assert sweep.main(args) == 0
    table = (out / "sweep.md").read_text()
    assert "| loss.contrastive_weight | add | antonym | Avg | MI bits | seeds |" in table
    assert "| 0 |" in table and "| 0.01 |" in table and "| 2 |" in table  # median over two seeds
    cells = json.loads((out / "sweep.json").read_text())["cells"]
    assert len(cells) == 4 and all((Path(c["run"]) / "report.md").exists() for c in cells)
    assert sweep.main(args) == 0  # finished cells are reused, not retrained
    assert "=== cell 4/4" in capsys.readouterr().out

    run = Path(cells[1]["run"])
    assert evaluate.main(["--run", str(run), "eval.mode=generate", "eval.max_per_task=3"]) == 0
    result = json.loads((run / "eval_test_generate.json").read_text())
    assert sum(r["total"] for r in result["per_task"].values()) == 6

    compare = tmp_path / "compare"
    assert analyze.main([cells[0]["run"], cells[2]["run"], "--out", str(compare)]) == 0
    for name in ("compare.md", "compare.json", "representations.png", "mi_gap.png"):
        assert (compare / name).exists(), name
    rows = json.loads((compare / "compare.json").read_text())
    assert [r["lambda"] for r in rows] == [0.0, 0.01]


def test_compare_runs_every_method_in_st_and_mt_and_writes_table_1(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = TINY + ["--methods", "lora,mixlora", "--tasks", "add", "--out", str(out)] + FAST
    assert compare.main(args) == 0
    table = (out / "table.md").read_text()
    assert "| Method | Params | add | Avg | ST Avg | MT - ST | MI bits | seeds |" in table
    assert "| Method | add | Avg | seeds |" in table
    assert "| Base model (no fine-tuning) | 0 |" in table
    rows = {r["method"]: r for r in json.loads((out / "table.json").read_text())["table"]}
    assert rows["lora"]["params"] < rows["mixlora"]["params"]  # routers counted
    lora = rows["lora"]
    assert abs(lora["mt_minus_st"] - (lora["mt"]["add"] - lora["st"]["add"])) < 1e-9
    st_eval = json.loads((out / "lora" / "st-add" / "seed0" / "eval_after.json").read_text())
    assert list(st_eval["per_task"]) == ["add"]  # single-task runs are evaluated on their task only
    assert compare.main(TINY + ["--methods", "lora,adalora"]) == 2
    assert "'adalora' is not a method" in capsys.readouterr().err


def test_entry_points_refuse_bad_input_with_a_message(tmp_path, capsys):
    assert train.main(TINY + ["adapter.top_k=9"]) == 2
    assert evaluate.main(["--run", str(tmp_path / "missing")]) == 2
    assert sweep.main(TINY + ["--grid", "adapter.rank"]) == 2
    assert sweep.main(TINY + ["--grid", "adapter.rank=4,0"]) == 2  # every cell is checked before any training
    err = capsys.readouterr().err
    assert "adapter.top_k=9 is not allowed" in err and "is not a comoe-jax run folder" in err
    assert "expected section.key=v1,v2" in err and "adapter.rank=0 is not allowed" in err


def test_compare_table_takes_the_median_over_seeds_per_cell_and_marks_settings_not_run():
    def row(method, setting, seed, acc):
        return {"cell": {"method": method, "setting": setting, "seed": seed}, "accuracy": {"a": acc, "b": 1 - acc},
                "mi_bits": 0.1 * seed, "params": 1000}

    rows = [row("lora", "mt", s, acc) for s, acc in [(0, 0.2), (1, 0.9), (2, 0.4)]]
    rows += [row("lora", "st-a", 0, 0.6), row("lora", "st-b", 0, 0.3)]
    rows += [row("mixlora", "mt", s, acc) for s, acc in [(0, 0.5), (1, 0.7)]]
    markdown, out = compare_command.table(rows, ["lora", "mixlora"], ["a", "b"], base_params=10_000)
    lora, mixlora = out
    assert lora["mt"] == {"a": 0.4, "b": 0.6} and lora["seeds"] == 3 and abs(lora["mi_bits"] - 0.1) < 1e-12
    assert lora["st"] == {"a": 0.6, "b": 0.7} and lora["st_seeds"] == 1
    assert abs(lora["mt_minus_st"] - (0.5 - 0.65)) < 1e-12
    assert abs(mixlora["mt"]["a"] - 0.6) < 1e-12 and mixlora["st_average"] != mixlora["st_average"]  # NaN: not run
    assert "| LoRA | 0.00M (10.00%) | 40.0 | 60.0 | **50.0** | 65.0 | -15.0 | 0.100 | 3 |" in markdown
    assert "| MixLoRA | 0.00M (10.00%) | 60.0 | 40.0 | **50.0** | - | - | 0.050 | 2 |" in markdown
    assert "| MixLoRA | - | - | **-** | 0 |" in markdown


def test_compare_refuses_bad_seeds_and_settings(capsys):
    assert compare.main(TINY + ["--seeds", "0,x"]) == 2
    assert compare.main(TINY + ["--settings", "mt,both"]) == 2
    err = capsys.readouterr().err
    assert "--seeds='0,x': expected comma-separated non-negative integers" in err
    assert "--settings='mt,both': choose one or both of mt, st" in err


def test_out_of_memory_is_one_line_with_what_to_change(capsys):
    import jax
    import pytest

    from comoe_jax.cli import command

    @command
    def oom(argv=None):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 5448819524376 bytes.\nmore")

    @command
    def cpu_oom(argv=None):  # XLA:CPU's form of the same failure
        raise jax.errors.JaxRuntimeError("INTERNAL: Error dispatching computation: Out of memory allocating 41773 "
                                         "bytes.")

    @command
    def other(argv=None):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    assert oom([]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("out of memory: RESOURCE_EXHAUSTED: Out of memory allocating 5448819524376 bytes; this run "
                          "does not fit the device: lower train.batch_size") and "\n" not in err
    assert cpu_oom([]) == 2
    assert capsys.readouterr().err.startswith("out of memory: INTERNAL: Error dispatching computation: Out of memory")
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):  # not a user error: keeps its traceback
        other([])


def test_analyze_names_runs_by_their_shortest_distinct_path(tmp_path):
    import pytest

    from comoe_jax.commands.analyze import run_names
    from comoe_jax.config import ConfigError

    a, b, c = tmp_path / "x" / "run", tmp_path / "y" / "run", tmp_path / "y" / "other"
    for folder in (a, b, c):
        folder.mkdir(parents=True)
    assert run_names([str(a), str(c)]) == ["run", "other"]
    assert run_names([str(a), str(b), str(c)]) == ["x/run", "y/run", "y/other"]
    (tmp_path / "link").symlink_to(a)
    with pytest.raises(ConfigError, match=r"run .*link is given twice"):
        run_names([str(a), str(tmp_path / "link")])


def test_damaged_metrics_lines_are_named_when_a_history_is_read(tmp_path):
    from comoe_jax.report import load_history

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\ngarbage\n{"step": 3}\n')
    warnings = []
    rows = load_history(tmp_path, warn=warnings.append)
    assert [r["step"] for r in rows] == [1, 3]
    assert warnings == [f"warning: {tmp_path / 'metrics.jsonl'}: 2 damaged line(s) skipped (line 2, 3); 2 rows kept"]


def test_an_existing_folder_that_cannot_be_written_is_refused_at_once(tmp_path, monkeypatch):
    """mkdir(exist_ok=True) passes on a read-only folder (root passes permission checks too, so the probe
    write is made to fail here as a read-only filesystem makes it fail)."""
    import errno

    import pytest
    from etils import epath

    from comoe_jax.errors import RunFolderError
    from comoe_jax.paths import output_folder

    def read_only(self, data):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(epath.Path, "write_bytes", read_only)
    with pytest.raises(RunFolderError, match=r"--out=.* cannot be written \(Read-only file system\)"):
        output_folder(tmp_path, "--out")
    assert list(tmp_path.iterdir()) == []
