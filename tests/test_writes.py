"""The write path (dlkit.output, artifacts.write_artifact): locks, fresh work folders, renames that
never replace, one line for every disk error, and manifests validated before use."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from dlkit import artifacts, output
from dlkit.data import spec_for
from dlkit.errors import ArtifactError, OutputError, UsageError
from dlkit.models import create_model


def _model_and_manifest(hidden=16):
    spec = spec_for("digits")
    torch.manual_seed(0)
    model, cfg = create_model("mlp", spec, {"hidden": [hidden]})
    from dlkit.config import to_dict

    manifest = artifacts.new_manifest(model_name="mlp", family="mlp", config=to_dict(cfg), spec=spec,
                                      dataset="digits", data_state=None, seed=0)
    return model, manifest


def _write(path, hidden=16, **kw):
    """What every command does: check the destination first, then write (holding the lock)."""
    model, manifest = _model_and_manifest(hidden)
    with output.Destination(path):
        artifacts.check_destination(path)
        return artifacts.write_artifact(path, model, manifest, **kw)


def _nothing_left(tmp_path, name):
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((name, f".{name}")))


def test_a_write_leaves_the_artifact_only(tmp_path):
    out = _write(tmp_path / "a")
    assert out == tmp_path / "a"
    assert _nothing_left(tmp_path, "a") == ["a"]  # no work folder, no lock file
    assert artifacts.load_model(artifacts.read_artifact(out)) is not None


def test_a_stale_work_folder_is_not_reused(tmp_path):
    stale = tmp_path / "x.partial"
    stale.mkdir()
    (stale / "checkpoint.json").write_text("{}")
    with pytest.raises(OutputError, match="x.partial is in the way: it is left from an interrupted run"):
        _write(tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert sorted(p.name for p in stale.iterdir()) == ["checkpoint.json"]


def test_a_linked_work_folder_is_never_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "model.safetensors").write_text("precious")
    (tmp_path / "x.partial").symlink_to(victim)
    with pytest.raises(OutputError, match="symbolic link"):
        _write(tmp_path / "x")
    assert (victim / "model.safetensors").read_text() == "precious"
    assert sorted(p.name for p in victim.iterdir()) == ["model.safetensors"]
    assert not os.path.lexists(tmp_path / "x")


def test_a_destination_that_appears_meanwhile_is_kept_and_the_work_too(tmp_path, monkeypatch, caplog):
    final = tmp_path / "y"
    real = artifacts._write_contents

    def then_someone_creates_it(work, *a):
        real(work, *a)
        final.mkdir()  # `mkdir y` while the artifact is being finished
        (final / "theirs").write_text("keep me")

    monkeypatch.setattr(artifacts, "_write_contents", then_someone_creates_it)
    model, manifest = _model_and_manifest()
    landed = artifacts.write_artifact(final, model, manifest)
    assert landed == tmp_path / "y-2"
    assert (final / "theirs").read_text() == "keep me"  # never replaced
    assert artifacts.read_artifact(landed).model_name == "mlp"
    assert "kept at" in caplog.text and str(landed) in caplog.text


def test_a_second_writer_is_told_who_holds_the_destination(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from dlkit import output; output.acquire(sys.argv[1]); print('held', flush=True); "
        "time.sleep(30)"), str(tmp_path / "z")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputError, match=f"being written by process {holder.pid}"):
            _write(tmp_path / "z")
    finally:
        holder.kill()
        holder.wait()
    assert _write(tmp_path / "z") == tmp_path / "z"  # the lock died with its holder


def test_out_below_a_file_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(OutputError, match="Not a directory") as info:
        _write(tmp_path / "afile" / "sub")
    assert "afile" in str(info.value) and "\n" not in str(info.value)


@contextlib.contextmanager
def _mounted(tmp_path, options: str):
    """A small tmpfs (or a read-only one) when this process may mount, else None."""
    where = tmp_path / "mnt"
    where.mkdir()
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                            capture_output=True).returncode == 0
    except OSError:  # no mount program
        ok = False
    try:
        yield where if ok else None
    finally:
        if ok:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    with _mounted(tmp_path, "size=64k") as fs:
        if fs is None:  # no mount here: the same error from a mocked write
            fs = tmp_path

            def full(*a, **k):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            monkeypatch.setattr(artifacts, "sha256_file", full)
        with pytest.raises(OutputError, match="No space left on device"):
            _write(fs / "big", hidden=1024)  # 260 KiB of weights
        assert _nothing_left(fs, "big") == []
        monkeypatch.undo()
        if fs != tmp_path:  # room again: the next run is not blocked by anything left behind
            for p in fs.iterdir():
                p.unlink() if p.is_file() else None
        model, manifest = _model_and_manifest()
        small = artifacts.write_artifact(tmp_path / "again", model, manifest)
        assert small.is_dir()


def test_a_read_only_destination_is_one_line(tmp_path, monkeypatch):
    with _mounted(tmp_path, "ro,size=64k") as fs:
        if fs is None:
            fs = tmp_path
            real_mkdir = os.mkdir

            def read_only(path, *a, **k):
                if str(path).startswith(str(fs / "ro")):
                    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
                return real_mkdir(path, *a, **k)

            monkeypatch.setattr(os, "mkdir", read_only)
        with pytest.raises(OutputError, match="Read-only file system") as info:
            _write(fs / "ro")
        assert "choose another --out" in str(info.value)


def _corrupt(tmp_path, change):
    path = _write(tmp_path / "m")
    doc = json.loads((path / "manifest.json").read_text())
    change(doc)
    (path / "manifest.json").write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("change,message", [
    (lambda d: d.update(weights="model.safetensors"), "'weights' must be an object"),
    (lambda d: d.update(model={}), "'model.name' must be a model name"),
    (lambda d: d.update(format_version=0), "format_version 0 is not one"),
    (lambda d: d.update(format_version=-7), "format_version -7 is not one"),
    (lambda d: d.update(format_version=True), "format_version must be an integer from 1 to 1, not true"),
    (lambda d: d.update(format_version="1"), 'format_version must be an integer from 1 to 1, not "1"'),
    (lambda d: d["data"].update(spec={"modality": "image"}), "'data.spec' is not a data spec"),
    (lambda d: d.update(lineage="train"), "'lineage' must be a list"),
    (lambda d: d.update(seed="0", precision="fp8"), "'seed' must be an integer; 'precision' must be one of"),
])
def test_a_malformed_manifest_is_refused_whole(tmp_path, change, message):
    path = _corrupt(tmp_path, change)
    with pytest.raises(ArtifactError, match=message.replace("(", r"\(")):
        artifacts.read_artifact(path)


def test_a_malformed_manifest_is_one_line_in_every_command(tmp_path):
    from typer.testing import CliRunner

    from dlkit.cli import app

    path = _corrupt(tmp_path, lambda d: d.update(model={}))
    for args in (["evaluate", str(path)], ["profile", str(path)], ["prune", str(path), "--ratio", "0.5"],
                 ["quantize", str(path)], ["compare", str(path)]):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 1, (args, res.output)
        assert "Traceback" not in res.output and "is malformed" in res.output, args


def test_weights_of_the_wrong_shape_name_the_tensor(tmp_path):
    from safetensors.torch import save_file

    path = _write(tmp_path / "w")
    model, _ = _model_and_manifest()
    tensors = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    name = next(k for k in tensors if k.endswith("weight"))
    tensors[name] = torch.zeros(3, 3)
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ArtifactError, match=f"tensor '{name}' has shape \\[3, 3\\]"):
        artifacts.load_model(artifacts.read_artifact(path), verify=False)


def test_several_paths_on_stdin_are_an_error_naming_them():
    with pytest.raises(UsageError, match="held 2 lines: runs/a, runs/b"):
        artifacts.resolve_path("-", stdin=io.StringIO("runs/a\nruns/b\n"))
    assert str(artifacts.resolve_path("-", stdin=io.StringIO("\nruns/a\n\n"))) == "runs/a"


def test_a_lock_is_released_and_its_file_removed(tmp_path):
    final = tmp_path / "l"
    output.acquire(final)
    output.acquire(final)  # the same process may take it again
    output.release(final)
    assert (tmp_path / ".l.lock").exists()
    output.release(final)
    assert not (tmp_path / ".l.lock").exists()
    started = time.perf_counter()
    with output.Destination(final):
        pass
    assert time.perf_counter() - started < 1
