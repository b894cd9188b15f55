"""bench.py, bench_features.py and plot.py run end to end at tiny sizes. Nothing here is timed: speed
is the benchmarks' job."""

import json

import pytest
import torch

import bench
import bench_features
import plot
import timing


@pytest.fixture
def one_thread():
    """Tiny ops on a busy 2-core machine crawl when several OpenMP threads contend for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_bench_tiny_preset_writes_every_figure_to_json(tmp_path, capsys, one_thread):
    pytest.importorskip("transformers")
    out = tmp_path / "bench.json"
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--preset", "tiny", "--device", "cpu", "--json", str(out)])
    assert exit_info.value.code == 0
    results = json.loads(out.read_text())
    for key in ("train_tokens_per_s", "mfu", "first_token_ms_batch1", "first_token_ms_batch8"):
        assert set(results[key]) == {"ours", "peer"} and all(v > 0 for v in results[key].values())
    for batch in (1, 8):
        decode = results[f"decode_tokens_per_s_batch{batch}"]
        assert set(decode) == {"ours", "ours_eager", "peer"} and all(v > 0 for v in decode.values())
        for key in ("bandwidth_bound_tokens_per_s", "model_matrices_read_bytes_per_s", "compile_s"):
            assert results[f"{key}_batch{batch}"] > 0
        kv_cache = results[f"kv_cache_tokens_per_s_batch{batch}"]
        assert set(kv_cache) == {"compiled", "eager", "no_cache"} and all(v > 0 for v in kv_cache.values())
    for key in ("choice_examples_per_s", "choice_examples_per_s_shakespeare"):
        assert results[key]["batched"] > 0 and results[key]["one_at_a_time"] > 0
    assert results["peak_flops"] > 0
    assert results["greedy_tokens_identical_batch1"] and results["greedy_tokens_identical_batch8"]
    assert "transformers" in capsys.readouterr().out  # the table was printed


def test_plot_writes_png_from_metrics(tmp_path):
    pytest.importorskip("matplotlib")
    records = [
        {"iter": i, "loss": 4.0 - i / 100, "lr": 1e-3, "ms_per_iter": 10.0, "tokens_per_s": 1e4, "mfu": 0.1}
        for i in range(0, 100, 10)
    ]
    records += [{"iter": i, "train_loss": 3.9 - i / 100, "val_loss": 4.0 - i / 100} for i in (0, 50, 99)]
    records.append({"iter": 99, "val_loss_full": 3.0})
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    plot.plot([str(tmp_path), "--out", str(tmp_path / "curves.png")])
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_plot_without_metrics_exits_with_a_message(tmp_path, capsys):
    with pytest.raises(SystemExit, match="1"):
        plot.main([str(tmp_path)])
    assert "error: no " in capsys.readouterr().err


def test_bench_options_times_each_model_option_against_all_off(tmp_path, one_thread):
    out = tmp_path / "options.json"
    with pytest.raises(SystemExit) as exit_info:
        bench_features.main(["--preset", "tiny", "--device", "cpu", "--options", "--json", str(out)])
    assert exit_info.value.code == 0
    results = json.loads(out.read_text())["option_tokens_per_s"]
    assert set(results) == set(bench_features.OPTIONS) and all(
        v["on"] > 0 and v["off"] > 0 for v in results.values()
    )


def test_plot_overlays_several_runs_against_wall_time(tmp_path):
    pytest.importorskip("matplotlib")
    for name, speed in (("a", 1.0), ("b", 2.0)):
        records = [{"iter": i, "loss": 4 - i / 50, "elapsed_s": i / speed} for i in range(0, 100, 10)]
        records += [{"iter": i, "val_loss": 4 - i / 60, "elapsed_s": i / speed} for i in (0, 50, 90)]
        records.append({"iter": 90, "val_loss_full": 2.5, "elapsed_s": 95 / speed})
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    out = tmp_path / "both.png"
    plot.plot([str(tmp_path / "a"), str(tmp_path / "b"), "--x", "time", "--out", str(out)])
    assert out.read_bytes().startswith(b"\x89PNG")


def test_peak_is_measured_with_a_matmul_large_enough_for_a_datacenter_gpu():
    small = timing.PRESETS["small"]
    assert timing.peak_matmul_size(small, torch.device("cuda", 0)) >= 8192
    assert timing.peak_matmul_size(small, torch.device("cpu")) == small.matmul_size  # a CPU: a minute's work


def test_bench_lora_measures_memory_of_lora_against_full_fine_tuning(tmp_path, one_thread):
    out = tmp_path / "lora.json"
    with pytest.raises(SystemExit) as exit_info:
        bench_features.main(["--preset", "tiny", "--device", "cpu", "--lora", "--json", str(out)])
    assert exit_info.value.code == 0
    lora, full = (json.loads(out.read_text())["lora_memory"][k] for k in ("lora", "full"))
    for key in ("trained_params", "gradient_bytes", "optimizer_state_bytes"):
        assert 0 < lora[key] < full[key]
    assert lora["optimizer_state_bytes"] == 2 * lora["gradient_bytes"]  # AdamW's two moments, float32
    assert lora["weight_bytes"] > full["weight_bytes"]  # float32 on a CPU: the adapters come on top
