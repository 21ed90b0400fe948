"""litefocus-export against a hostile --out: the lock, scratch folders, leftovers, --out inside --model,
and a language model with fewer positions than the text engine needs (issue 31, defect 4 and item 10b).

Every refusal is one line before anything is written, and nothing litefocus did not write is deleted."""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import signal

import pytest

from litefocus.engine import manifest as mf
from litefocus.export import cli
from litefocus.export.build import export_engines
from litefocus.export.plan import ExportOptions


def _opts(out, **kw) -> ExportOptions:
    """No buckets, random tiny weights: an export that writes the manifest only (milliseconds)."""
    return ExportOptions(seconds=(), out=out, model=None, random_preset="tiny", quiet=True, **kw)


def _tree(root) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        st = os.lstat(p)
        out[str(p.relative_to(root))] = (
            os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else st.st_mode
        )
    return out


@contextlib.contextmanager
def _deadline(seconds: int):
    """Fail (TimeoutError) instead of hanging: a blocking open() is interrupted by the alarm."""

    def expired(signum, frame):
        raise TimeoutError(f"still blocked after {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "fifo", "directory"])
def test_a_lock_that_is_not_a_regular_file_is_refused_and_left_alone(tmp_path, kind):
    victim = tmp_path / "victim.txt"
    secret = secrets.token_bytes(64)
    victim.write_bytes(secret)
    out = tmp_path / "engines"
    out.mkdir()
    lock = out / ".lock"
    if kind == "symlink":
        lock.symlink_to(victim)
    elif kind == "hardlink":
        os.link(victim, lock)
    elif kind == "fifo":
        os.mkfifo(lock)
    else:
        lock.mkdir()
    before = _tree(out)
    with _deadline(20), pytest.raises(ValueError, match=r"\.lock is not a regular file") as e:
        export_engines(_opts(out))
    assert "\n" not in str(e.value)
    assert victim.read_bytes() == secret  # never truncated through the link
    assert _tree(out) == before  # nothing written


def test_the_cli_refuses_a_fifo_lock_in_one_line(tmp_path, capsys):
    out = tmp_path / "engines"
    out.mkdir()
    os.mkfifo(out / ".lock")
    with _deadline(20):
        code = cli.main(["--seconds", "0.3", "--random-weights", "--preset", "tiny", "--out", str(out), "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and ".lock is not a regular file" in err


def test_a_users_tmp_folder_is_never_deleted_nor_taken_for_litefocus_own(tmp_path):
    name = f".tmp-{random.choice(['photos', '0p32s-fp32', 'text', 'old-x'])}-{secrets.token_hex(8)}"
    out = tmp_path / "engines"
    (out / name).mkdir(parents=True)
    (out / name / "cat.jpg").write_bytes(secrets.token_bytes(32))
    before = _tree(out)
    # a new --out holding only it is a user's folder, not an interrupted export
    with pytest.raises(ValueError, match="is not an engine directory"):
        export_engines(_opts(out))
    assert _tree(out) == before
    # in an engine directory it survives every export (stale scratch cleanup included)
    engines = tmp_path / "real"
    export_engines(_opts(engines))
    shutil.copytree(out / name, engines / name, symlinks=True)
    export_engines(_opts(engines))
    export_engines(_opts(engines, force=True))
    assert (engines / name / "cat.jpg").read_bytes() == (out / name / "cat.jpg").read_bytes()


def test_a_killed_runs_temporary_manifest_is_litefocus_own_and_cleaned(tmp_path):
    out = tmp_path / "engines"
    out.mkdir()
    (out / ".lock").write_bytes(b"")
    suffix = "".join(random.choices("abcdefghijklmnopqrstuvwxyz0123456789_", k=8))
    leftover = out / f".{mf.MANIFEST}.{suffix}.tmp"  # engine/fileio.atomic_path's name, killed mid-write
    leftover.write_text('{"kind": "litef')
    manifest, _ = export_engines(_opts(out))
    assert manifest["kind"] == mf.KIND and not leftover.exists()
    assert mf.read_manifest(out)["entries"] == {}


def test_a_look_alike_leftover_that_is_a_link_stays_foreign(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("mine")
    out = tmp_path / "engines"
    out.mkdir()
    (out / f".{mf.MANIFEST}.abcd1234.tmp").symlink_to(target)
    with pytest.raises(ValueError, match="is not an engine directory"):
        export_engines(_opts(out))
    assert target.read_text() == "mine"


def test_scratch_folders_are_recorded_and_cleaned_without_following_links(tmp_path):
    from litefocus.engine import writer

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "data.bin").write_bytes(b"precious")
    out = tmp_path / "engines"
    export_engines(_opts(out))
    with writer.locked(out) as lock:  # a run killed after making two scratch folders
        kept = lock.make_dir("0p32s-fp32")
        (kept / "unet.onnx").write_bytes(b"half")
        (kept / "link").symlink_to(outside)
        swapped = lock.make_dir("text")
    assert kept.name in writer.recorded_names(out) and len(kept.name.rsplit("-", 1)[1]) == 16
    swapped.rmdir()
    swapped.symlink_to(outside)  # a recorded name that is now a link: left alone
    export_engines(_opts(out))
    assert not kept.exists() and swapped.is_symlink()
    assert (outside / "data.bin").read_bytes() == b"precious"
    assert writer.recorded_names(out) == []


def test_an_unlisted_folder_with_an_entry_name_is_never_replaced(tmp_path, capsys):
    out = tmp_path / "engines"
    export_engines(_opts(out))
    user = out / "0p32s-fp32"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    args = ["--seconds", "0.3", "--random-weights", "--preset", "tiny", "--out", str(out), "-q"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "0p32s-fp32 that its manifest does not list" in err and len(err.splitlines()) == 1
    assert (user / "notes.txt").read_text() == "mine"


def test_out_inside_the_model_directory_is_refused(model_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    before = _tree(model)
    for inside in (model / "unet" / "engines", model / "engines", model):
        args = ["--seconds", "0.3", "--model", str(model), "--out", str(inside), "-q"]
        assert cli.main(args) == 2
        err = capsys.readouterr().err.strip()
        assert "is inside --model" in err and len(err.splitlines()) == 1
    link = tmp_path / "sneaky"
    link.symlink_to(model / "vae")  # through a symbolic link too
    assert cli.main(["--seconds", "0.3", "--model", str(model), "--out", str(link / "e"), "-q"]) == 2
    assert "is inside --model" in capsys.readouterr().err
    assert _tree(model) == before


def test_a_language_model_with_few_positions_is_refused_in_one_line(tmp_path, capsys):
    from tiny_models import save_tiny_pipeline

    positions = random.randint(14, 24)  # the tiny T5 tokenizer takes 16 tokens: diffusers runs it
    model = tmp_path / "model"
    save_tiny_pipeline(model, gpt2_positions=positions)
    capsys.readouterr()
    out = tmp_path / "engines"
    too_long = positions - 11
    args = ["--seconds", "0.3", "--model", str(model), "--out", str(out), "-q"]
    assert cli.main([*args, "--text-len", str(too_long)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"--text-len {too_long}" in err and f"{positions} positions" in err
    assert f"pass --text-len {positions - 12} or less" in err
    assert not out.exists()  # refused before anything was written
    # the length it names exports and validates (the text engine only: no buckets)
    opts = ExportOptions(seconds=(), out=out, model=str(model), text_len=positions - 12, quiet=True)
    manifest, _ = export_engines(opts)
    assert manifest["text"]["contract"]["text_len"] == positions - 12
    assert not mf.verify_text(out, manifest)


def test_a_directory_swapped_or_a_manifest_linked_during_the_export_is_refused(tmp_path):
    from litefocus.engine import writer

    out = tmp_path / "engines"
    manifest, _ = export_engines(_opts(out))
    victim = tmp_path / "victim.json"
    victim.write_text("mine")
    with writer.locked(out) as lock:
        (out / mf.MANIFEST).unlink()
        (out / mf.MANIFEST).symlink_to(victim)  # engine/fileio would replace the link's target
        with pytest.raises(RuntimeError, match="was replaced during the export"):
            lock.write_manifest(manifest)
        (out / mf.MANIFEST).unlink()
        out.rename(tmp_path / "moved")
        out.mkdir()
        (out / ".lock").write_text("")
        with pytest.raises(RuntimeError, match="was replaced during the export"):
            lock.make_dir("0p32s-fp32")
    assert victim.read_text() == "mine" and os.listdir(out) == [".lock"]


INTERRUPT = """
import os, signal, sys, time
from litefocus.export import cli, stages

def interrupted(*args, **kwargs):
    if sys.argv[1] == "INT":
        raise KeyboardInterrupt
    os.kill(os.getpid(), getattr(signal, "SIG" + sys.argv[1]))
    time.sleep(60)

stages.export_module = interrupted
sys.exit(cli.main(["--seconds", "0.3", "--random-weights", "--preset", "tiny", "--out", sys.argv[2], "-q"]))
"""


@pytest.mark.parametrize("sig, code", [("INT", 130), ("TERM", 143), ("HUP", 129)])
def test_an_interrupted_export_exits_in_one_line_and_discards_its_scratch(tmp_path, sig, code):
    """Audit: Ctrl-C during an export was a KeyboardInterrupt traceback, and SIGTERM killed it with its
    scratch folder left behind; both exit in one line (130 / 143) with the scratch removed."""
    import subprocess
    import sys

    out = tmp_path / f"out-{secrets.token_hex(4)}"
    run = subprocess.run(
        [sys.executable, "-c", INTERRUPT, sig, str(out)], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == code, run.stderr[-2000:]
    lines = [x for x in run.stderr.splitlines() if x.startswith("litefocus-export")]
    assert "Traceback" not in run.stderr and len(lines) == 1 and "discarded" in lines[0], run.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == [".lock", mf.MANIFEST]
    assert (out / ".lock").read_bytes() == b""


def test_a_closed_stdout_after_the_export_is_no_traceback(tmp_path):
    """Audit: with stdout closed early (``litefocus-export ... | head -c0``), printing the table was a
    BrokenPipeError traceback and exit 1 although the engines were written; it exits 0 quietly."""
    import subprocess
    import sys

    out = tmp_path / f"out-{secrets.token_hex(4)}"
    args = ["--seconds", "0.3", "--random-weights", "--preset", "tiny", "--out", str(out), "-q"]
    child = subprocess.Popen(
        [sys.executable, "-m", "litefocus.export.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    child.stdout.close()  # the reader is gone before the table is printed
    err = child.stderr.read().decode()
    assert child.wait(300) == 0, err[-2000:]
    assert "Traceback" not in err and "BrokenPipe" not in err, err[-2000:]
    assert mf.read_manifest(out)["entries"]
