"""Feed every CLI generated bad values and count what happens.

    python tests/fuzz_cli.py                  # every case (a few hundred; minutes on 2 cores)
    python tests/fuzz_cli.py --sample 12 --seed 0   # a seeded sample (CI runs one: test_fuzz_sample)

Each case changes one thing of a working command line: one config key of train.py, sample.py or
eval.py set to a value of the wrong type, out of range or naming a strange path; a flag of convert,
bench, race or plot; or a file damaged at random (ckpt.pt truncated, meta.json or config.json
edited, metrics.jsonl given junk). It runs in-process through the CLI's main(argv) and ends as one of:
  ok           exit 0
  error        one line "error: ..." (or argparse's usage line) and exit 1 or 2
  last-resort  the "internal error" line: an exception no check foresaw (a bug, if rare)
  traceback    a traceback reached the terminal, or an exception escaped main
  hang         still running after --timeout seconds
  loss         the good ckpt.pt beside the case no longer loads
Prints the counts, and each case that was not ok or error. Exit code 1 if any traceback, hang or loss.
"""

import argparse
import contextlib
import io
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import convert  # noqa: E402
import eval as eval_cli  # noqa: E402
import plot  # noqa: E402
import race  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
from checkpoint import CKPT_NAME, load_checkpoint  # noqa: E402
from train_config import TrainConfig  # noqa: E402

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=2", "--eval_iters=1"]
TINY += ["--max_iters=2", "--eval_interval=1", "--log_interval=1", "--eval_full=False", "--dtype=float32"]
TINY += ["--gradient_accumulation_steps=1", "--warmup_iters=1"]
BAD_INTS = ["-1", "0", "abc", "", "1.5", "nan", "99999999999999999999", "None", "[1]", "2**70"]
BAD_FLOATS = ["-1.0", "nan", "inf", "-inf", "abc", "", "1e309", "1e-320", "None", "{}"]
BAD_STRINGS = ["", "/", "..", "/dev/null", "x" * 300, "None", "a b", "-", "\t"]
BAD_BOOLS = ["maybe", "2", "", "None", "yes please"]
# Valid values of these keys may ask for hours of work (max_new_tokens=1e20): not bad values.
KEYS_THAT_TRAIN_LONG = {"max_iters", "lr_decay_iters", "eval_iters", "eval_interval", "n_layer", "n_embd"}
KEYS_THAT_TRAIN_LONG |= {"max_new_tokens"}


@dataclass
class Case:
    name: str
    main: Callable[[list[str]], None]
    argv: Callable[[Path], list[str]]  # built in the case's own folder


def values_for(field_type: object) -> list[str]:
    text = str(field_type)
    if "bool" in text:
        return BAD_BOOLS
    if "int" in text:
        return BAD_INTS
    if "float" in text:
        return BAD_FLOATS
    return BAD_STRINGS


def config_cases(cli: str, main: Callable, config: type, base: Callable[[Path], list[str]]) -> list[Case]:
    """One case per (key of config, bad value): the working command line base, with key=value last."""
    cases = []
    for field in fields(config):
        for value in values_for(field.type):
            if field.name in KEYS_THAT_TRAIN_LONG and value in ("99999999999999999999", "2**70", "1e309"):
                continue  # valid, and would train for ever: not a bad value
            flag = f"--{field.name}={value}"
            cases.append(Case(f"{cli} {flag[:60]!r}", main, lambda d, f=flag: [*base(d), f]))
    return cases


def damaged_files(rng: random.Random) -> list[Case]:
    """Real files damaged at random: a truncated ckpt.pt, edited meta.json and config.json, junk metrics."""
    cases = []
    for _ in range(20):
        fraction = rng.random()

        def truncated(d: Path, fraction=fraction) -> list[str]:
            ckpt = d / "cut" / CKPT_NAME
            shutil.copytree(d / "run", ckpt.parent)
            ckpt.write_bytes(ckpt.read_bytes()[: int(ckpt.stat().st_size * fraction)])
            return [f"--out_dir={ckpt.parent}", "--max_new_tokens=2"]

        cases.append(Case(f"sample: ckpt.pt cut at {fraction:.0%}", sample.main, truncated))
    for _ in range(20):
        key, value = (
            rng.choice(["vocab_size", "dtype", "train_tokens", "val_tokens", "tokenizer", "chars"]),
            rng.choice([None, -1, 0, "x", [], {}, 1e30, True, 2**64]),
        )

        def meta_edited(d: Path, key=key, value=value) -> list[str]:
            data = d / "data2"
            shutil.copytree(d / "data", data)
            meta = json.loads((data / "meta.json").read_text())
            meta[key] = value
            (data / "meta.json").write_text(json.dumps(meta))
            return [f"--out_dir={d / 'out'}", f"--data_dir={data}", *TINY]

        cases.append(Case(f"train: meta.json {key}={value!r}", train.main, meta_edited))
    hf_keys = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"]
    hf_keys += [
        "head_dim",
        "rope_theta",
        "rope_scaling",
        "rms_norm_eps",
        "tie_word_embeddings",
        "layer_types",
    ]
    hf_keys += [
        "architectures",
        "model_type",
        "sliding_window",
        "use_sliding_window",
        "max_position_embeddings",
    ]
    for key in hf_keys:
        for value in rng.sample([None, -1, 0, "x", [], {}, 1e30, True, [1], {"rope_type": 3}, 2**40], 4):

            def hf_edited(d: Path, key=key, value=value) -> list[str]:
                hf = d / "hf2"
                shutil.copytree(d / "hf", hf)
                config = json.loads((hf / "config.json").read_text())
                config[key] = value
                (hf / "config.json").write_text(json.dumps(config))
                return ["import", str(hf), str(d / "imported")]

            cases.append(Case(f"convert: config.json {key}={value!r}", convert.main, hf_edited))
    for junk in ["42", "[1]", "{}", '{"iter": null}', '{"iter": 1, "loss": "x"}', "\udcff", "nul\0l"]:

        def metrics_junk(d: Path, junk=junk) -> list[str]:
            run = d / "junk"
            shutil.copytree(d / "run", run)
            with open(run / "metrics.jsonl", "a", encoding="utf-8", errors="surrogateescape") as f:
                f.write(junk + "\n")
            return [str(run), f"--out={d / 'p.png'}"]

        cases.append(Case(f"plot: metrics line {junk!r}", plot.main, metrics_junk))
    return cases


def flag_cases() -> list[Case]:
    cases = []
    for value in BAD_STRINGS + BAD_INTS:
        cases.append(Case(f"race --repeats {value!r}", race.main, lambda d, v=value: ["a", "--repeats", v]))
        cases.append(
            Case(f"race --names {value!r}", race.main, lambda d, v=value: ["a", "--names", v, f"--out={d}/r"])
        )
        cases.append(Case(f"plot --x {value!r}", plot.main, lambda d, v=value: [str(d / "run"), "--x", v]))
        cases.append(
            Case(f"plot --out {value!r}", plot.main, lambda d, v=value: [str(d / "run"), f"--out={d}/{v}"])
        )
        cases.append(
            Case(f"convert export {value!r}", convert.main, lambda d, v=value: ["export", str(d / "run"), v])
        )
        cases.append(
            Case(
                f"convert import --block_size {value!r}",
                convert.main,
                lambda d, v=value: ["import", str(d / "hf"), str(d / "o"), "--block_size", v],
            )  # fmt: skip
        )
    return cases


def all_cases(rng: random.Random) -> list[Case]:
    def train_base(d: Path) -> list[str]:
        return [f"--out_dir={d / 'run'}", "--init_from=resume", f"--data_dir={d / 'data'}", *TINY[5:]]

    cases = config_cases("train", train.main, TrainConfig, train_base)
    cases += config_cases(
        "sample", sample.main, sample.SampleConfig, lambda d: [f"--out_dir={d / 'run'}", "--max_new_tokens=2"]
    )
    cases += config_cases(
        "eval",
        eval_cli.main,
        eval_cli.EvalConfig,
        lambda d: [f"--out_dir={d / 'run'}", f"--data_dir={d / 'data'}", "--batch_size=64"],
    )
    return cases + damaged_files(rng) + flag_cases()


class Hang(BaseException):
    """Raised by the alarm: not an Exception, so no CLI handler swallows it."""


def run_case(case: Case, shared: Path, timeout: int) -> tuple[str, str]:
    """(outcome, stderr's last line) of one case, in a fresh copy of the shared files."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in ("run", "data", "hf"):
            shutil.copytree(shared / name, folder / name)
        err, out = io.StringIO(), io.StringIO()
        signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(Hang()))
        signal.alarm(timeout)
        code: object = None
        try:
            # in the case's own folder: a fuzzed relative --out_dir lands there, not in the checkout
            with contextlib.chdir(folder), contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                case.main(case.argv(folder))
        except SystemExit as e:
            code = e.code
        except Hang:
            code = "hang"
        except BaseException as e:  # escaped main: a traceback for the user
            err.write(f"Traceback (escaped main): {type(e).__name__}: {e}\n")
        finally:
            signal.alarm(0)
        text = err.getvalue()
        last = text.strip().splitlines()[-1] if text.strip() else ""
        try:
            load_checkpoint(folder / "run" / CKPT_NAME)
        except Exception:
            return "loss", last
    if code == "hang":
        return "hang", last
    if "Traceback" in text or code not in (0, 1, 2, None):
        return "traceback", last
    if "internal error" in last:
        return "last-resort", last
    if code in (0, None):
        return "ok", last
    return (
        ("error", last) if last.startswith(("error:", "usage:")) or "error:" in last else ("traceback", last)
    )


def prepare(shared: Path) -> None:
    """A prepared character-level data set, a finished tiny run on it, and its Hugging Face export."""
    data, run = shared / "data", shared / "run"
    source = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "data/shakespeare_char/prepare.py"),
            "--input",
            source,
            "--out_dir",
            data,
        ],
        check=True,
        capture_output=True,
    )
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            train.main([f"--out_dir={run}", f"--data_dir={data}", *TINY, "--always_save_checkpoint=True"])
        except SystemExit as e:
            assert e.code == 0, e.code
        convert.export_hf(run, shared / "hf")


def fuzz(sample_size: int | None, seed: int, timeout: int) -> Counter:
    import torch

    torch.set_num_threads(1)
    rng = random.Random(seed)
    cases = all_cases(rng)
    if sample_size is not None:
        cases = rng.sample(cases, min(sample_size, len(cases)))
    counts: Counter = Counter()
    with tempfile.TemporaryDirectory() as tmp:
        shared = Path(tmp)
        prepare(shared)
        for i, case in enumerate(cases, 1):
            outcome, last = run_case(case, shared, timeout)
            counts[outcome] += 1
            if outcome not in ("ok", "error"):
                print(f"{outcome}: {case.name}: {last[:200]}", flush=True)
            if i % 50 == 0:  # a run cut short still says how far it got
                print(f"after {i} of {len(cases)}: {dict(sorted(counts.items()))}", flush=True)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sample", type=int, default=None, help="run only N cases, drawn with --seed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=int, default=120, help="seconds after which a case is a hang")
    args = parser.parse_args()
    counts = fuzz(args.sample, args.seed, args.timeout)
    print(f"{sum(counts.values())} cases: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    sys.exit(1 if counts["traceback"] or counts["hang"] or counts["loss"] else 0)


if __name__ == "__main__":
    main()
