"""`sfam explain` end to end, as a user runs it."""

from __future__ import annotations

import io
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import _score_text, main
from pipeline.errors import Terminated
from pipeline.stopping import _release_logging_lock_held_by_fork, stop_signals

SFAM = [sys.executable, "-m", "pipeline.cli"]


def smooth_picture(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    small = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BILINEAR)


def test_explain_writes_a_readable_png(tmp_path: Path, rng) -> None:
    smooth_picture(rng, 320, 240).save(tmp_path / "query.jpg", quality=90)
    smooth_picture(rng, 160, 224).save(tmp_path / "réf erence.png")
    out = tmp_path / "pair.png"
    done = subprocess.run(  # a file URI, percent-escaped (as the result table's are): read as the job reads it
        [*SFAM, "explain", str(tmp_path / "query.jpg"), (tmp_path / "réf erence.png").as_uri(),
         "--model", "{arch: resnet18, embedding_dim: 32, input_size: 128}", "-o", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "cosine similarity:" in done.stdout and "top channels by CIS" in done.stdout
    assert "target layer: layer4 (cis map)" in done.stdout  # the default layer and the weighting, said
    assert "warning: model resnet18+fc32 has no weights: explaining its random initialisation" in done.stderr
    picture = np.asarray(Image.open(io.BytesIO(out.read_bytes())).convert("RGB"))
    height, width, _ = picture.shape
    assert height > 256 and width > 256 * (320 / 240 + 160 / 224) * 0.9  # both panels at their aspect ratios
    assert picture.std() > 20  # not blank


def test_explain_reports_bad_input_clearly(tmp_path: Path, rng) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "picture.png")
    # the images are read first: a wrong one is named before the model loads
    for picture, expected in (("empty.png", "empty.png: empty file (0 bytes)"), ("picture.png", "'layer5'")):
        done = subprocess.run([*SFAM, "explain", str(tmp_path / picture), str(tmp_path / picture), "--model", "resnet18",
                               "--target-layer", "layer5", "-o", str(tmp_path / "x.png")],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert expected in done.stderr
    assert "layer4" in done.stderr  # a close name to the unknown layer


def test_explain_draws_the_matches_of_the_matched_map(tmp_path: Path, rng) -> None:
    picture = smooth_picture(rng, 160, 160).convert("L").convert("RGB")  # grey, so only the lines are magenta
    picture.save(tmp_path / "query.png")
    picture.transpose(Image.FLIP_LEFT_RIGHT).save(tmp_path / "reference.png")
    common = [*SFAM, "explain", str(tmp_path / "query.png"), str(tmp_path / "reference.png"),
              "--model", "{arch: resnet18, embedding_dim: 32, input_size: 128}"]
    pictures = {}
    for weighting in ("cis", "matched"):
        out = tmp_path / f"{weighting}.png"
        done = subprocess.run([*common, "--weighting", weighting, "-o", str(out)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        pictures[weighting] = np.asarray(Image.open(out).convert("RGB")).astype(int)
    magenta = [(p[..., 0] > 200) & (p[..., 1] < 80) & (p[..., 2] > 200) for p in pictures.values()]
    assert magenta[0].sum() == 0 and magenta[1].sum() > 200  # the matched overlay draws its correspondences


def test_explain_reads_the_model_of_a_nightly_config(tmp_path: Path, rng) -> None:
    """A nightly config leaves its manifest to --set: explain reads only its model and storage options."""
    smooth_picture(rng, 160, 160).save(tmp_path / "query.png")
    smooth_picture(rng, 160, 160).save(tmp_path / "reference.png")
    (tmp_path / "nightly.yaml").write_text("output: audits\nrender_png: all\n"
                                           "model: {arch: resnet18, embedding_dim: 32, input_size: 96}\n")
    done = subprocess.run([*SFAM, "explain", str(tmp_path / "query.png"), str(tmp_path / "reference.png"), "--config",
                           str(tmp_path / "nightly.yaml"), "--set", "model.metric=dot", "-o", str(tmp_path / "pair.png")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "dot similarity:" in done.stdout and (tmp_path / "pair.png").stat().st_size > 0
    assert "the maps are 1 x 1" not in done.stderr
    pooled = subprocess.run([*SFAM, "explain", str(tmp_path / "query.png"), str(tmp_path / "reference.png"), "--config",
                             str(tmp_path / "nightly.yaml"), "--target-layer", "avgpool", "-o", str(tmp_path / "pair.png")],
                            capture_output=True, text=True, timeout=300)
    assert pooled.returncode == 0 and "warning: the maps are 1 x 1 (the target layer's output is already pooled)" in pooled.stderr


@pytest.mark.parametrize(("argv", "named"), [
    (["explain", "q.png", "r.png", "--model", "{arch: resnet18", "-o", "x.png"], "--model '{arch: resnet18': not YAML"),
    (["explain", "q.png", "r.png", "--model", "{arch: resnet18, embeding_dim: 8}", "-o", "x.png"],
     "embeding_dim: Extra inputs are not permitted; did you mean: embedding_dim?"),
    (["explain", "q.png", "r.png", "--model", "resnet18", "--prefix-tokens", "-1", "-o", "x.png"], "prefix_tokens"),
    (["explain", "q.png", "r.png", "--model", "resnet18", "--set", "model.metric=dot", "-o", "x.png"], "--set"),
    (["explain", "q.png", "r.png", "--config", "a.yaml", "--endpoint-url", "http://h", "-o", "x.png"], "--endpoint-url"),
    (["report", "out", "--run-id", "r", "--set", "run_id=x"], "--set"),
    (["compare", "--config", "a.yaml", "--endpoint-url", "http://h", "a", "b"], "--endpoint-url"),
    (["render", "--config", "a.yaml", "--set", "model.metric=dot", "--run-id", "r", "--pair-id", "p", "-o", "p.png"],
     "--set 'model.metric=dot': sfam render reads a finished run as it was written"),
    (["report", "--config", "a.yaml", "--set", "gates.max_false_match_rate=0.1", "--run-id", "r"], "only output, "),
    (["demo", "--top-k", "81"], "--top-k 81: from 1 to 80"),
    (["demo", "--queries", "0"], "--queries 0"),
    (["explain", "q.png", "r.png", "--model", "resnet18", "-o", "."], "-o .: is a folder"),
    (["render", "out", "--run-id", "r", "--pair-id", "p", "-o", "."], "-o .: is a folder"),
    (["explain", "q.png", "r.png", "--model", "resnet18", "-o", "-"], "-o -: this command writes a .png file"),
    (["explain", "q.png", "r.png", "--model", "resnet18", "-o", "e9.jpg"], "-o e9.jpg: the file written is a .png file"),
    (["render", "out", "--run-id", "r", "--pair-id", "p", "-o", "p.jpg"], "-o p.jpg: the file written is a .png file"),
    (["report", "out", "--run-id", "r", "-o", "-"], "-o -: this command writes a .html file"),
    (["report", "out", "--run-id", "r", "-o", "r.png"], "-o r.png: the file written is a .html file"),
    # checked as the config's endpoint is: a traceback that printed the password (pydantic's input_value)
    (["report", "out", "--run-id", "r", "--endpoint-url", "127.0.0.1:9000"],
     "--endpoint-url: endpoint_url: '127.0.0.1:9000' is not an http:// or https:// URL"),
    (["compare", "out", "a", "b", "--endpoint-url", "http://u:SECRET2@127.0.0.1:9000"],
     "--endpoint-url: endpoint_url: http://***@127.0.0.1:9000 holds credentials"),
    # an output root with credentials: sent to the server as basic auth, and "no run record" said
    (["report", "http://u:SECRET2@127.0.0.1:9/audits", "--run-id", "r"],
     "sfam report: output: http://***@127.0.0.1:9/audits holds credentials (user:password@)"),
    (["compare", "https://h/audits?sig=SECRET2", "a", "b"], "sfam compare: output: https://h/audits?sig=*** holds a secret"),
])
def test_argument_mistakes_are_one_line(argv: list[str], named: str, capsys) -> None:
    """Found before anything is read or built: one line naming the argument, exit 2."""
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0] and "SECRET2" not in lines[0], lines


@pytest.mark.parametrize(("text", "named"), [
    ("manfest: /x\noutput: audits\n", "invalid config: manfest: not a key of a job config; did you mean: manifest?"),
    ("output: http://u:SECRET2@127.0.0.1:9/audits\n", "invalid config: output: http://***@127.0.0.1:9/audits holds credentials"),
])
def test_a_config_read_in_part_is_checked_as_a_whole_one(tmp_path: Path, text: str, named: str, capsys) -> None:
    """report, render, compare and explain read some keys of a config: a typo among the others, or
    credentials in its output, were passed over."""
    (tmp_path / "nightly.yaml").write_text(text + "model: resnet18\n")
    for argv in (["report", "--config", str(tmp_path / "nightly.yaml"), "--run-id", "r"],
                 ["explain", "q.png", "r.png", "--config", str(tmp_path / "nightly.yaml"), "-o", "x.png"]):
        assert main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and named in lines[0] and "SECRET2" not in lines[0], (argv, lines)


@pytest.mark.parametrize(("argv", "named"), [
    ([], "error: sfam: the following arguments are required: command (usage: sfam --help)"),
    (["explain", "q.png", "r.png", "-o", "x.png"], "error: sfam explain: one of the arguments --model --config is required"),
    (["audit", "--config"], "error: sfam audit: argument --config: expected one argument"),
    (["explain", "q.png", "r.png", "--model", "m", "-o", "x.png", "--metric", "l1"], "argument --metric: invalid choice"),
    # argparse gives RUN_A the folder when RUN_B is missing, or an option comes between the folder and the run ids
    (["compare", "d2/audits", "week-1"], "argument RUN_A: 'd2/audits' is a folder, not a run id"),
    (["compare", "d2/audits", "--config", "audit.yaml", "week-1", "week-2"], "sfam compare takes [OUTPUT] RUN_A RUN_B"),
])
def test_command_line_syntax_mistakes_are_one_line(argv: list[str], named: str, capsys) -> None:
    """argparse's own errors too: no usage block before them."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(lines) == 1 and named in lines[0], lines


@pytest.mark.parametrize("value", ["nan", "inf", "0.8x"])
def test_compare_threshold_must_be_a_finite_number(value: str, capsys) -> None:
    """nan compares false with every similarity: it counted no false match at all, silently."""
    with pytest.raises(SystemExit) as stopped:
        main(["compare", "out", "a", "b", "--threshold", value])
    assert stopped.value.code == 2
    assert f"argument --threshold: '{value}' is not a finite number" in capsys.readouterr().err


def test_the_command_line_leaves_torch_until_its_stop_handling_is_on() -> None:
    """Ctrl-C while a module loads before main() runs is a traceback: importing the command line
    must not load torch (seconds), which its commands load inside main()."""
    code = "import sys, pipeline.cli; print(sorted({'torch', 'ray'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_explain_names_a_missing_image_before_torch_loads(tmp_path: Path) -> None:
    """A mistyped path is the commonest mistake: told in about a second, not after torch and timm load (4 s)."""
    argv = ["explain", str(tmp_path / "nowhere.png"), str(tmp_path / "nowhere.png"), "--model", "resnet18",
            "-o", str(tmp_path / "x.png")]
    code = f"import sys; from pipeline.cli import main; print(main({argv!r}), 'torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "2 False" and "nowhere.png: not found" in done.stderr, done.stderr


def test_a_run_compared_with_itself_is_refused(tmp_path, capsys) -> None:
    assert main(["compare", str(tmp_path / "out"), "week-1", "week-1"]) == 2
    assert capsys.readouterr().err.strip() == "error: compare: run 'week-1' with itself; name an earlier and a later run"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [["report", "out", "--run-id", "../x"], ["render", "out", "--run-id", "a/../../b", "--pair-id", "p"],
                                  ["compare", "out", "a", "../b"]])
def test_run_ids_that_are_paths_are_refused(argv: list[str], capsys) -> None:
    """A run id names folders (runs/ID, reports/ID.html): one that is a path would reach outside them."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2 and "run_id may hold letters, digits" in capsys.readouterr().err


@pytest.mark.parametrize(("signum", "raised"), [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)])
def test_a_stop_signal_that_lands_in_a_finalizer_still_stops(signum: int, raised: type) -> None:
    """A signal handled while a `__del__` runs raises there, where Python only prints "Exception
    ignored"; with every later stop signal ignored, the command then ran to the end."""
    class SignalledWhileFinalised:
        def __del__(self) -> None:
            os.kill(os.getpid(), signum)
            sum(range(1000))  # Python runs the handler here, inside the finalizer

    before = signal.getsignal(signal.SIGINT)  # Python's own, or what an earlier test's library left
    started = time.monotonic()
    with pytest.raises(raised), stop_signals():
        finalised = SignalledWhileFinalised()
        del finalised
        time.sleep(10)  # the stop arrives again, and wakes the sleep
    assert time.monotonic() - started < 5
    assert signal.getsignal(signal.SIGINT) is before  # restored after the block


def test_a_sigterm_that_rays_handler_raised_in_a_fork_hook_still_stops() -> None:
    """While ray.init runs, Ray's driver handler turns SIGTERM into sys.exit(15); when the signal
    arrives as ray.init forks, Python runs it in logging's at-fork hook, prints "Exception ignored"
    and goes on: the job then ran to the end and exited 0 (seen once in CI)."""
    def like_rays_driver(signum: int, frame: object) -> None:
        sys.exit(signum)

    class SignalledWhileFinalised:  # as the at-fork hook: a call whose exception Python only reports
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGTERM)
            sum(range(1000))

    started = time.monotonic()
    with pytest.raises(Terminated), stop_signals():
        signal.signal(signal.SIGTERM, like_rays_driver)  # what ray.init does, until cluster._init restores the handler
        finalised = SignalledWhileFinalised()
        del finalised
        time.sleep(10)
    assert time.monotonic() - started < 5


def test_a_stop_in_loggings_fork_hook_leaves_its_lock_free() -> None:
    """Before a fork logging takes its module lock, and its at-fork hook releases it; a stop raised
    as the hook began would leave it held, and other threads that log would wait for ever."""
    logging._acquireLock()  # as logging does before a fork
    _release_logging_lock_held_by_fork(SimpleNamespace(object=logging._releaseLock))
    taken = threading.Thread(target=lambda: logging.getLogger("a logger made in another thread"), daemon=True)
    taken.start()
    taken.join(timeout=5)
    assert not taken.is_alive()
    logging._acquireLock()
    _release_logging_lock_held_by_fork(SimpleNamespace(object=test_a_stop_in_loggings_fork_hook_leaves_its_lock_free))
    assert logging._lock._is_owned()  # another function's exception: the lock is not this hook's to release
    logging._releaseLock()


def test_a_lost_stop_is_not_delivered_after_the_block() -> None:
    """A command that ends just after its stop was lost returns its status; the stop never reaches
    the caller later, under the caller's own handlers."""
    class SignalledWhileFinalised:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGINT)
            sum(range(1000))

    with stop_signals():
        finalised = SignalledWhileFinalised()
        del finalised
    time.sleep(0.5)  # past the redelivery's delay: nothing arrives


def test_scores_too_small_for_four_decimals_are_not_shown_as_zero() -> None:
    """A new user's random DINOv2 printed every top channel as +0.0000 +0.0000: no ranking to read."""
    assert [_score_text(v) for v in (0.093, -0.00005, 0.0, 1.234e-6, -2e-9)] == [
        "+0.0930", "-0.0001", "+0.0000", "+1.23e-06", "-2.00e-09"]
    # the similarity too (a euclidean one of -4.6e-05 printed as -0.0000), signed only when negative
    assert [_score_text(v, sign="-") for v in (0.98, -4.6e-05)] == ["0.9800", "-4.60e-05"]
