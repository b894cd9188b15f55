import pytest

import race

TINY = "--n_layer=1 --n_head=2 --n_embd=16 --block_size=64 --batch_size=64 --gradient_accumulation_steps=1"
TINY += " --eval_iters=1 --eval_interval=1000 --warmup_iters=1 --max_iters=2"


def run_race(*argv: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        race.main(list(argv))
    return exit_info.value.code


def test_race_alternates_the_recipes_and_reports_median_time_and_whole_val_loss(char_data, tmp_path, capsys):
    adamw = f"--data_dir={char_data} {TINY}"
    muon = f"{adamw} --optimizer=muon"
    assert run_race(adamw, muon, "--names", "a", "m", "--repeats", "2", "--out", str(tmp_path / "r")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines[:4]] == ["a-0", "m-0", "a-1", "m-1"]  # A B A B
    summary = {line.split()[0]: line.split() for line in lines if line.startswith(("a ", "m "))}
    for name in ("a", "m"):
        runs = sorted((tmp_path / "r").glob(f"{name}-*/metrics.jsonl"))
        assert len(runs) == 2 and float(summary[name][2]) > 0  # median whole-val loss
    assert summary["a"][2] != summary["m"][2]  # two recipes, two results


@pytest.mark.parametrize(
    "argv, message",
    [
        (["x", "--names", "a", "b"], "2 names for 1 recipes"),
        (["x", "--repeats", "0"], "--repeats must be at least 1"),
        (["x", "--out", "."], "exists"),
    ],
)
def test_bad_race_requests_are_one_line_errors_with_exit_code_2(argv, message, capsys):
    assert run_race(*argv) == 2
    assert message in capsys.readouterr().err


def test_a_failing_recipe_names_its_log(tmp_path, capsys):
    assert run_race("no_such_config.py", "--out", str(tmp_path / "r")) == 1
    assert "train.py exited with code 2: see" in capsys.readouterr().err
