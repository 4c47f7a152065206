"""Hostile and careless use (issue 28), the companion of test_chaos.py: crafted cache and checkpoint
files, colliding outputs, unbounded sizes, NaN labels, unreadable checkpoints, leftovers of failed
runs and user files, one-line errors, and the Python API's argument checks. Each test failed before
its fix. Tiny BERT, a few dozen rows, one thread: seconds in all."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fastmft.cli import main
from fastmft.pipelines.typicality import ScoreConfig, ScoreError, score_files
from fastmft.runtime import faults
from tests.helpers import current_checkpoint, flip_tensor_bit, tiny_bert_corpus

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    bert, data, rows = tiny_bert_corpus(root, 16, seed=5)
    return root, bert, data, rows


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    faults.HOOK = None


class Crash(Exception):
    pass


def _config(setup, out: Path, **kw) -> ScoreConfig:
    _, bert, data, _ = setup
    kw.setdefault("inputs", [str(data)])
    return ScoreConfig(
        output=str(out), backbone=str(bert), max_length=32, batch_size=8, chunk_rows=16, progress=False, **kw
    )


def _crash_at(point: str):
    def hook(name):
        if name == point:
            raise Crash(name)

    faults.HOOK = hook


def _cli(args, capsys) -> tuple[int, str]:
    """``fastmft ARGS`` in process: the exit status and stderr."""
    try:
        status = main(args)
    except SystemExit as exit:  # argparse's own checks
        status = exit.code
    return status, capsys.readouterr().err


def _one_line_error(status, err, command, message):
    assert status == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"fastmft {command}: error: ") and message in last, err
    assert "Traceback" not in err


# -- 1. a crafted cache or checkpoint file deletes nothing ---------------------------------------


def test_a_crafted_merge_record_deletes_only_fastmfts_own_temporaries(setup, tmp_path):
    out = tmp_path / "out" / "scores.parquet"
    out.parent.mkdir()
    cfg = _config(setup, out)
    _crash_at("score")  # a killed run: its cache is kept for the rerun
    with pytest.raises(Crash):
        score_files(cfg)
    faults.HOOK = None
    victims = [tmp_path / "victim.txt", out.parent / "notes.txt", out.parent / ".scores.parquet.x.tmp"]
    for v in victims:
        v.write_text("not fastmft's")
    own = out.parent / ".scores.parquet.0123456789abcdef.tmp"  # a name merge generates
    own.write_text("left by a kill")
    listed = [str(v) for v in victims] + [str(out.parent / ".." / "victim.txt"), str(own), "/"]
    (cfg.cache_path() / "merge-temps.json").write_text(json.dumps(listed))
    assert score_files(cfg).scored == len(setup[3])
    assert all(v.read_text() == "not fastmft's" for v in victims)
    assert not own.exists()


def test_a_checkpoint_pointer_outside_its_folder_is_ignored(tmp_path, capsys):
    from fastmft.runtime.files import CheckpointDir

    root, outside = tmp_path / "run", tmp_path / "outside"
    outside.mkdir()
    (outside / "state.json").write_text('{"n": "outside"}')
    ckpt = CheckpointDir(root)
    first = ckpt.save(lambda f: (f / "state.json").write_text('{"n": 1}'))
    for pointer in ({"folder": "../outside"}, {"folder": "/etc"}, ["x"], "{not json"):
        ckpt.pointer.write_text(pointer if isinstance(pointer, str) else json.dumps(pointer))
        with pytest.warns(RuntimeWarning, match="does not name a checkpoint folder"):
            assert ckpt.load(lambda f: json.loads((f / "state.json").read_text())) == {"n": 1}
    ckpt.pointer.write_text(json.dumps({"folder": "../outside"}))
    second = ckpt.save(lambda f: (f / "state.json").write_text('{"n": 2}'))
    assert (outside / "state.json").read_text() == '{"n": "outside"}' and first.exists()  # the previous one, kept
    assert json.loads(ckpt.pointer.read_text()) == {"folder": second.name}


# -- 2. outputs that name the same file ----------------------------------------------------------


@pytest.mark.parametrize(
    "kw,message",
    [
        ({"rejects": "{out}"}, "`rejects` {out} is the same file as `output`"),
        ({"report": "{out}"}, "`report` {out} is the same file as `output`"),
        ({"report": "{tmp}/r.jsonl", "rejects": "{tmp}/./r.jsonl"}, "is the same file as `rejects`"),
        ({"cache_dir": "{tmp}", "report": "{tmp}/manifest.json"}, "is inside the cache folder"),
        ({"cache_dir": "{tmp}/c", "rejects": "{tmp}/c/r.jsonl"}, "is inside the cache folder"),
    ],
)
def test_outputs_that_collide_are_refused_before_any_work(setup, tmp_path, kw, message):
    out = tmp_path / "o.parquet"
    kw = {k: v.format(out=out, tmp=tmp_path) for k, v in kw.items()}
    before = sorted(tmp_path.iterdir())
    with pytest.raises(ScoreError, match=message.format(out=out).replace(".", r"\.")):
        score_files(_config(setup, out, **kw))
    assert sorted(tmp_path.iterdir()) == before  # no cache, no output


def test_output_inside_the_cache_folder_is_refused(setup, tmp_path):
    cache = tmp_path / "C"
    with pytest.raises(ScoreError, match="is inside the cache folder"):
        score_files(_config(setup, cache / "manifest.json", cache_dir=str(cache)))
    assert not cache.exists()


@pytest.mark.parametrize("plot", ["{out}", "{tmp}", "{tmp}/x.unknownformat"])
def test_a_bad_plot_path_is_refused_before_scoring(setup, tmp_path, capsys, plot):
    pytest.importorskip("matplotlib")
    _, bert, data, _ = setup
    out = tmp_path / "o.parquet"
    args = ["score", str(data), "-o", str(out), "--backbone", str(bert), "--max-length", "32", "--no-progress"]
    status, err = _cli([*args, "--plot", plot.format(out=out, tmp=tmp_path)], capsys)
    _one_line_error(status, err, "score", "--plot")
    assert not out.exists() and not Path(str(out) + ".score-cache").exists()


# -- 3. unbounded sizes --------------------------------------------------------------------------


def test_threads_above_the_cpu_count_are_refused(setup, tmp_path, capsys):
    _, bert, data, _ = setup
    n = str((os.cpu_count() or 1) + 1)
    status, err = _cli(["score", str(data), "-o", str(tmp_path / "o.parquet"), "--threads", n], capsys)
    assert status == 2 and "--threads: must be at most" in err
    status, err = _cli(["train", "--data", str(data), "--threads", "100000"], capsys)
    assert status == 2 and "--threads: must be at most" in err
    with pytest.raises(ScoreError, match="`threads` must be at most"):
        score_files(_config(setup, tmp_path / "o.parquet", threads=100000))


def test_scoring_batches_that_would_not_fit_in_memory_are_refused():
    from fastmft.pipelines.selection.selector import check_scoring_memory
    from fastmft.pipelines.selection.tasks import ClassificationTask

    task = ClassificationTask("cls:a", [[2, 7, 3]] * 4, [0, 1, 0, 1], 2, batch_size=4)
    check_scoring_memory([task], [task], m=2)  # a few hundred bytes
    with pytest.raises(ValueError, match=r"`m`=.*`batch_size`="):
        check_scoring_memory([task], [task], m=10**12)


def _select_args(setup, out, *extra):
    _, bert, data, _ = setup
    return [
        "select",
        "--data",
        str(data),
        "--backbone",
        str(bert),
        "--episodes",
        "1",
        "--m",
        "1",
        "--n",
        "1",
        "--max-length",
        "16",
        "--no-progress",
        "--output-dir",
        str(out),
        *extra,
    ]


def test_select_caps_a_batch_larger_than_its_tasks_and_refuses_max_length_1(setup, tmp_path, capsys):
    status = main(_select_args(setup, tmp_path / "big", "--batch-size", "100000000"))
    out = capsys.readouterr().out
    assert status == 0 and "--batch-size 100000000: task" in out
    [line] = (tmp_path / "big" / "episodes.jsonl").read_text().splitlines()
    assert all(math.isfinite(v) for v in json.loads(line)["utilities"].values())
    status, err = _cli([*_select_args(setup, tmp_path / "one"), "--max-length", "1"], capsys)
    _one_line_error(status, err, "select", "--max-length: must be an integer >= 2")


# -- 4. NaN labels -------------------------------------------------------------------------------


def test_nan_labels_are_rejects_in_parquet_and_json(setup, tmp_path):
    _, _, _, rows = setup
    labels = [float(i % 2) for i in range(len(rows))]
    labels[3] = float("nan")
    table = pa.table({"text": [r["text"] for r in rows], "label": labels, "domain": [r["domain"] for r in rows]})
    pq.write_table(table, tmp_path / "rows.parquet")
    lines = [json.dumps(dict(r, label=labels[i] if i != 3 else "@")) for i, r in enumerate(rows)]
    (tmp_path / "rows.jsonl").write_text("\n".join(lines).replace('"@"', "NaN") + "\n")
    for name in ("rows.parquet", "rows.jsonl"):
        s = score_files(_config(setup, tmp_path / f"{name}.out", inputs=[str(tmp_path / name)]))
        assert (s.scored, s.rejected, len(s.labels)) == (len(rows) - 1, 1, 2), name
        assert list(s.reasons) == ["label ('label') is not a finite number (nan)"]
        [reject] = [json.loads(x) for x in Path(s.rejects).read_text().splitlines()]
        assert reject["line"] in (3, 4)  # parquet rows from 0, JSON lines from 1


# -- 6. leftovers of failed runs, user files -----------------------------------------------------


def test_a_failed_run_leaves_nothing_that_blocks_the_corrected_one(setup, tmp_path, capsys):
    _, bert, data, _ = setup
    out = tmp_path / "o.parquet"
    args = ["score", str(data), "-o", str(out), "--max-length", "32", "--no-progress", "--backbone"]
    status, err = _cli([*args, str(tmp_path / "no-such-model")], capsys)
    assert status == 2 and "Traceback" not in err
    assert not Path(str(out) + ".score-cache").exists()
    status, err = _cli([*args, str(bert), "--label-values", "x,y"], capsys)  # no row accepted
    assert status == 2 and "no row was accepted" in err
    assert not Path(str(out) + ".score-cache").exists()
    assert main([*args, str(bert)]) == 0 and out.exists()


def test_a_killed_run_that_encoded_nothing_does_not_block_another_command(setup, tmp_path):
    out = tmp_path / "o.parquet"
    _crash_at("batch")  # killed before its first chunk was written
    with pytest.raises(Crash):
        score_files(_config(setup, out, alpha=0.3))
    faults.HOOK = None
    assert score_files(_config(setup, out)).scored == len(setup[3])


def test_an_old_rejects_file_does_not_survive_a_clean_rerun(setup, tmp_path):
    out = tmp_path / "o.parquet"
    rejects = Path(str(out) + ".rejects.jsonl")
    rejects.write_text('{"file": "old", "line": 1, "reason": "stale"}\n')
    assert score_files(_config(setup, out)).rejected == 0
    assert not rejects.exists()


def test_an_empty_user_folder_as_cache_is_kept(setup, tmp_path):
    mine = tmp_path / "my-cache"
    mine.mkdir()
    assert score_files(_config(setup, tmp_path / "o.parquet", cache_dir=str(mine))).scored
    assert mine.is_dir() and not list(mine.iterdir())
    ours = tmp_path / "new-cache"
    assert score_files(_config(setup, tmp_path / "p.parquet", cache_dir=str(ours))).scored
    assert not ours.exists()


def _train_args(setup, out, *extra):
    _, bert, data, _ = setup
    return [
        "train",
        "--data",
        str(data),
        "--backbone",
        str(bert),
        "--method",
        "s",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--max-length",
        "16",
        "--no-progress",
        "--output-dir",
        str(out),
        *extra,
    ]


@pytest.mark.parametrize("command", ["train", "select"])
def test_a_user_folder_as_output_dir_is_refused_and_kept(setup, tmp_path, capsys, command):
    out = tmp_path / "mine"
    out.mkdir()
    log = "episodes.jsonl" if command == "select" else "metrics.jsonl"
    (out / log).write_text("my own notes\n")
    args = _train_args(setup, out) if command == "train" else _select_args(setup, out)
    status, err = _cli(args, capsys)
    _one_line_error(status, err, command, "is a non-empty folder that fastmft did not create")
    assert (out / log).read_text() == "my own notes\n" and sorted(p.name for p in out.iterdir()) == [log]


# -- 5. checkpoints that cannot be read ----------------------------------------------------------


def _metrics(folder: Path) -> list[dict]:
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in lines]


@pytest.mark.parametrize("damage", ["truncate", "garble", "flip"])
def test_an_unreadable_optimizer_file_is_reported_and_the_run_restarts(setup, tmp_path, capsys, damage):
    """Both kept checkpoints damaged: the current one falls back to the previous, which is damaged
    too, so the run starts over, one warning line each, to the uninterrupted result."""
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main(_train_args(setup, ref, "--log-every", "1")) == 0
    assert main(_train_args(setup, out, "--log-every", "1", "--checkpoint-every", "1", "--stop-after-steps", "1")) == 0
    current = current_checkpoint(out)
    [previous] = [p for p in out.glob("checkpoint-*") if p != current]
    damaged = set()  # a checkpoint of progress only hard-links the model and optimizer of the one before
    for optimizer in (current / "optimizer.pt", previous / "optimizer.pt"):
        if optimizer.stat().st_ino in damaged:
            continue
        damaged.add(optimizer.stat().st_ino)
        data = optimizer.read_bytes()
        os.chmod(optimizer, 0o644)
        if damage == "flip":  # one bit inside tensor data: the archive still reads, only the checksum tells
            flip_tensor_bit(optimizer)
        else:
            optimizer.write_bytes(
                data[: len(data) // 2] if damage == "truncate" else data[:100] + b"\0" * (len(data) - 100)
            )
    capsys.readouterr()
    assert main(_train_args(setup, out, "--log-every", "1")) == 0
    err = capsys.readouterr().err
    first, second = [
        x for x in err.splitlines() if "is unreadable" in x
    ]  # one line each, as the command shows warnings
    assert first.startswith(f"fastmft train: warning: checkpoint {current} is unreadable")
    assert first.endswith(f"falling back to the previous complete checkpoint {previous.name}")
    assert second.startswith(f"fastmft train: warning: checkpoint {previous} is unreadable")
    assert second.endswith("there is no earlier checkpoint: starting from the beginning") and "Traceback" not in err
    assert _metrics(out) == _metrics(ref)


def test_a_checkpoint_without_checksums_is_used_with_a_warning(setup, tmp_path, capsys):
    """A checkpoint an earlier fastmft wrote (no checksums.json) still resumes, with one warning."""
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main(_train_args(setup, ref, "--log-every", "1")) == 0
    assert main(_train_args(setup, out, "--log-every", "1", "--checkpoint-every", "1", "--stop-after-steps", "1")) == 0
    sums = current_checkpoint(out) / "checksums.json"
    sums.unlink()
    capsys.readouterr()
    assert main(_train_args(setup, out, "--log-every", "1")) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "Traceback" not in err
    [line] = [x for x in err.splitlines() if "checksums.json" in x]
    assert line == (
        f"fastmft train: warning: checkpoint {sums.parent} has no checksums.json (written by an earlier fastmft): "
        "its files are checked for structure only"
    )
    assert _metrics(out) == _metrics(ref)


def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    from fastmft.runtime.files import CheckpointDir

    ckpt = CheckpointDir(tmp_path)
    first = ckpt.save(lambda f: (f / "state.json").write_text('{"n": 1}'))
    second = ckpt.save(lambda f: (f / "state.json").write_text("{broken"))
    assert first.is_dir()  # each save keeps the previous checkpoint
    with pytest.warns(
        RuntimeWarning, match=f"checkpoint {second} is unreadable .*previous complete checkpoint {first.name}"
    ):
        assert ckpt.load(lambda f: json.loads((f / "state.json").read_text())) == {"n": 1}


# -- 7. one-line errors --------------------------------------------------------------------------


@pytest.fixture
def immutable(tmp_path):
    """A folder nothing can be written into, even by root (chattr +i); skipped where that is not possible."""
    folder = tmp_path / "immutable"
    folder.mkdir()
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not possible here (needs root and a file system that supports it)")
    yield folder
    subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.mark.parametrize("command", ["train", "select", "score"])
def test_an_unwritable_output_dir_is_a_one_line_error_before_loading(setup, tmp_path, capsys, immutable, command):
    out = immutable / "run"
    if command == "score":
        args = ["score", str(setup[2]), "-o", str(out / "o.parquet"), "--backbone", str(tmp_path / "no-such-model")]
    else:
        args = _train_args(setup, out) if command == "train" else _select_args(setup, out)
        args[args.index("--data") + 1] = str(tmp_path / "no-such-data.jsonl")  # the check comes before the data
    status, err = _cli(args, capsys)
    _one_line_error(status, err, command, "is not writable")
    assert not list(immutable.iterdir())


@pytest.mark.parametrize("command", ["train", "select", "score"])
@pytest.mark.parametrize(
    "backend,message", [("triton", "FASTMFT_BACKEND=triton needs CUDA"), ("fast", "FASTMFT_BACKEND")]
)
def test_a_backend_that_cannot_run_is_a_one_line_error_before_loading(
    setup, tmp_path, capsys, monkeypatch, command, backend, message
):
    if torch.cuda.is_available():
        pytest.skip("triton runs on this machine")
    monkeypatch.setenv("FASTMFT_BACKEND", backend)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    missing = str(tmp_path / "no-such-data.jsonl")
    args = {
        "train": _train_args(setup, tmp_path / "run"),
        "select": _select_args(setup, tmp_path / "run"),
        "score": ["score", missing, "-o", str(tmp_path / "o.parquet")],
    }[command]
    if "--data" in args:
        args[args.index("--data") + 1] = missing
    status, err = _cli(args, capsys)
    _one_line_error(status, err, command, message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["train", "select"])
def test_a_second_run_on_the_same_folder_stops_with_a_message(setup, tmp_path, capsys, command):
    from fastmft.runtime.files import claim_run_folder

    out = tmp_path / "run"
    lock = claim_run_folder(out, "--output-dir", legacy="checkpoint.json")  # as a running command holds it
    args = _train_args(setup, out) if command == "train" else _select_args(setup, out)
    try:
        status, err = _cli(args, capsys)
    finally:
        lock.close()
    _one_line_error(status, err, command, "another fastmft run is using --output-dir")
    assert main(args) == 0  # the folder the first run marked is adopted


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))


def _foreground_signals():
    """The child gets Ctrl-C as a terminal's foreground job does. When pytest itself runs in the
    background (``cmd &``, nohup, some CI runners), bash started it with SIGINT ignored, an ignored
    signal stays ignored across exec, and the child would then rightly finish instead of stopping."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_and_sigterm_print_one_line_and_the_rerun_resumes(setup, tmp_path):
    _, bert, data, rows = setup
    big = tmp_path / "big.jsonl"
    big.write_text("".join(json.dumps(dict(rows[i % len(rows)], id=f"r{i}")) + "\n" for i in range(1000)))
    out = tmp_path / "o.parquet"
    args = [str(big), "--backbone", str(bert), "--max-length", "32", "--chunk-rows", "64", "--no-progress"]
    main(["score", *args, "-o", str(tmp_path / "ref.parquet"), "--threads", "1"])
    cmd = [sys.executable, "-m", "fastmft", "score", *args, "-o", str(out), "--threads", "1"]
    cache = Path(str(out) + ".score-cache")
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        done_before = len(list(cache.glob("chunk-*.meta.npz")))
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_foreground_signals,
        )
        t0 = time.monotonic()  # signalled once this run has written a chunk: mid-encoding
        while len(list(cache.glob("chunk-*.meta.npz"))) == done_before and proc.poll() is None:
            assert time.monotonic() - t0 < 120
            time.sleep(0.02)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == code, err[-3000:]
        assert err.strip().splitlines()[-1] == "fastmft score: interrupted; run the same command again to resume"
        assert "Traceback" not in err and not out.exists()
    done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.read_bytes() == (tmp_path / "ref.parquet").read_bytes()


@pytest.fixture
def small_fs(tmp_path):
    """A 2 MiB tmpfs (root only; skipped with the reason where it cannot be mounted)."""
    folder = tmp_path / "fs"
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_is_a_one_line_error_and_the_rerun_resumes(setup, tmp_path, capsys, small_fs):
    _, bert, data, _ = setup
    args = ["score", str(data), "--backbone", str(bert), "--max-length", "32", "--no-progress", "--chunk-rows", "8"]
    assert main([*args, "-o", str(tmp_path / "ref.parquet")]) == 0
    filler = small_fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:  # full
        pass
    os.close(fd)
    os.truncate(filler, filler.stat().st_size - 8 * 4096)  # 8 pages left: the cache fits, not all of the run
    out = small_fs / "o.parquet"
    status, err = _cli([*args, "-o", str(out)], capsys)
    assert status == 1 and "No space left on device" in err.strip().splitlines()[-1] and "Traceback" not in err
    assert not out.exists()
    filler.unlink()
    assert main([*args, "-o", str(out)]) == 0
    assert out.read_bytes() == (tmp_path / "ref.parquet").read_bytes()


# -- 8. the Python API names a bad argument ------------------------------------------------------


@pytest.mark.parametrize(
    "kw,error,message",
    [
        ({"lam": float("nan")}, ValueError, "lam must be a finite number >= 0.0"),
        ({"lam": -1}, ValueError, "lam must be a finite number >= 0.0"),
        ({"lam": "0.1"}, TypeError, "lam must be a real number"),
        ({"layers": (1.7,)}, ValueError, "layers must be a non-empty sequence of 1-based layer indices"),
        ({"layers": (1, 2, 1)}, ValueError, "layers must not repeat a layer"),
    ],
)
def test_mft_loss_refuses_bad_arguments(kw, error, message):
    from fastmft import MFTLoss

    with pytest.raises(error, match=message):
        MFTLoss(8, 2, 2, **{"layers": (1, 2), **kw})


def test_mft_loss_with_no_token_names_the_problem():
    from fastmft import MFTLoss

    loss = MFTLoss(8, 2, 2, layers=(1, 2))
    hidden = tuple(torch.randn(3, 0, 8) for _ in range(3))
    with pytest.raises(ValueError, match=r"T = 0"):
        loss(hidden, torch.ones(3, 0), torch.tensor([0, 1, 0]), torch.tensor([0, 1, 1]))


@pytest.mark.parametrize(
    "lr,error", [("0.1", TypeError), (float("nan"), ValueError), (float("inf"), ValueError), (True, TypeError)]
)
def test_inner_step_refuses_a_bad_lr(lr, error):
    from fastmft import inner_step

    p = torch.randn(4)
    with pytest.raises(error, match="lr must be"):
        inner_step([p], [torch.ones(4)], lr)
    assert torch.equal(inner_step([p], [torch.ones(4)], torch.tensor(0.5))[0], p - 0.5)


@pytest.mark.parametrize("counts", [torch.zeros(1, 2, dtype=torch.long), torch.zeros(2, dtype=torch.long)])
def test_prototypes_with_counts_of_the_wrong_shape_are_refused(counts):
    from fastmft.ops.prototypes import MultiPrototypes, Prototypes

    with pytest.raises(ValueError, match=r"prototypes.counts has shape"):
        Prototypes(torch.zeros(2, 2, 8), counts)
    with pytest.raises(ValueError, match=r"prototypes.counts has shape"):
        MultiPrototypes(torch.zeros(2, 2, 3, 8), counts)


def test_labels_of_mixed_types_name_the_field_in_python_and_the_flag_in_the_command(setup, tmp_path, capsys):
    from fastmft.pipelines.typicality import ScoreConfig, ScoreError, score_files

    _, bert, _, rows = setup
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(dict(r, label=1 if i % 2 else "pos")) + "\n" for i, r in enumerate(rows[:8])))
    cfg = ScoreConfig([str(data)], str(tmp_path / "api.parquet"), backbone=str(bert), progress=False)
    with pytest.raises(ScoreError, match=r"label values mix types .*; pass `label_values`$"):
        score_files(cfg)
    capsys.readouterr()
    assert main(["score", str(data), "--backbone", str(bert), "-o", str(tmp_path / "o.parquet"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastmft score: error: label values mix types") and err.endswith("; pass --label-values")
