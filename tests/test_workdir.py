"""The run directory: one run per workdir (lock), every workdir file through one path layer
(a local path and a non-local scheme), and a full or read-only disk as one message that
leaves the earlier checkpoints intact."""

import errno
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxfer import workdir as workdir_lib
from jaxfer.errors import WorkdirError
from jaxfer.train.checkpoint import Checkpointer
from jaxfer.train.loop import fit

import _resume_script as task  # tests/ is on sys.path under pytest
import memfs


def short_fit(workdir, steps=4, every=2, **kw):
    state, train_step, eval_step, train_iter, eval_batches = task.make_task()
    return fit(state, train_step, train_iter, steps=steps, eval_step=eval_step,
               eval_batches=eval_batches, eval_every=every, label_names=task.LABEL_NAMES,
               workdir=workdir, checkpoint_every=every, log_every=1, progress=False, **kw)


def write_lock(workdir, **owner):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, workdir_lib.LOCK_FILE), "w") as f:
        json.dump({"host": socket.gethostname(), "heartbeat": time.time(), **owner}, f)


# --------------------------------------------------------------------- lock
def test_second_run_on_a_workdir_is_refused_naming_the_first(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        write_lock(tmp_path, pid=other.pid, start=workdir_lib._process_start(other.pid))
        with pytest.raises(WorkdirError, match=rf"in use by another run .*pid {other.pid}"):
            short_fit(tmp_path)
        assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
    finally:
        other.kill()
        other.wait()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(tmp_path, pid=dead.pid, start="1")
    with caplog.at_level("WARNING"):
        state, _ = short_fit(tmp_path)
    assert int(state.step) == 4 and "stale lock" in caplog.text and str(dead.pid) in caplog.text
    assert not (tmp_path / workdir_lib.LOCK_FILE).exists()  # released at the end


def test_lock_of_another_host_is_stale_only_without_a_recent_heartbeat(tmp_path):
    write_lock(tmp_path, host="elsewhere", pid=1, heartbeat=time.time() - 60)
    with pytest.raises(WorkdirError, match="host elsewhere"):
        workdir_lib.Lock(tmp_path).acquire()
    write_lock(tmp_path, host="elsewhere", pid=1, heartbeat=time.time() - 7200)
    lock = workdir_lib.Lock(tmp_path).acquire()
    owner = json.load(open(tmp_path / workdir_lib.LOCK_FILE))
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    lock.release()


def test_lock_is_released_when_the_run_fails(tmp_path):
    state, train_step, _, _, _ = task.make_task()
    with pytest.raises(Exception, match="yielded no batch"):
        fit(state, train_step, iter([]), steps=3, workdir=tmp_path, progress=False)
    assert not (tmp_path / workdir_lib.LOCK_FILE).exists()
    workdir_lib.Lock(tmp_path).acquire().release()


# --------------------------------------------------------------- path layer
def test_every_workdir_file_goes_through_the_path_layer_on_another_scheme(tmp_path, monkeypatch):
    memfs.reset()
    monkeypatch.chdir(tmp_path)  # a local folder named "memtest:" would appear here
    st, train_step, eval_step, train_iter, eval_batches = task.make_task()
    st, history = fit(st, train_step, train_iter, steps=4, eval_step=eval_step,
                      eval_batches=eval_batches, eval_every=2, label_names=task.LABEL_NAMES,
                      workdir="memtest://bucket/run", log_every=1, progress=False,
                      config={"lr": 0.03})
    files = {k[len("memtest://bucket/run/"):]: v for k, v in memfs.FILES.items()}
    assert json.loads(files["config.json"]) == {"lr": 0.03}
    assert [json.loads(line) for line in files["metrics.jsonl"].decode().splitlines()] == history
    assert files["curves.png"][:8] == b"\x89PNG\r\n\x1a\n"
    assert any(k.startswith("tb/events.out.tfevents") for k in files)
    assert workdir_lib.LOCK_FILE not in files  # taken and released there too
    assert os.listdir(tmp_path) == []


def test_path_layer_writes_whole_files_locally(tmp_path):
    target = tmp_path / "sub" / "x.json"
    workdir_lib.write_json(target, {"a": 1})
    workdir_lib.write_json(target, {"a": 2})
    assert workdir_lib.read_json(target) == {"a": 2}
    assert os.listdir(tmp_path / "sub") == ["x.json"]  # no temporary file left
    lines = workdir_lib.JsonLines(tmp_path / "m.jsonl", [{"step": 1}])
    lines.append({"step": 2})
    lines.close()
    assert workdir_lib.JsonLines.read(tmp_path / "m.jsonl") == [{"step": 1}, {"step": 2}]


# --------------------------------------------------------------- full disks
def test_full_disk_while_saving_is_one_message_and_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    state, train_step, eval_step, train_iter, eval_batches = task.make_task()
    short_fit(tmp_path, steps=2)
    real_save = ocp.CheckpointManager.save

    def full(self, step, *args, **kwargs):
        if step > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    with pytest.raises(WorkdirError, match=r"checkpoints/4: the disk is full.*intact \(steps \[2\]\)"):
        short_fit(tmp_path, steps=6)
    restored, _, _ = Checkpointer(tmp_path).restore(task.make_task()[0])
    assert int(restored.step) == 2


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs (root with mount rights only: skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs",
                                            str(mount)], capture_output=True).returncode:
        pytest.skip("needs root and mount to make a real small disk")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def _fill(folder):
    try:
        with open(os.path.join(folder, "filler"), "wb") as f:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
    except OSError as e:
        assert e.errno == errno.ENOSPC


@pytest.mark.parametrize("fault", ["full", "read_only"])
def test_real_full_or_read_only_disk(small_disk, fault):
    run = small_disk / "run"
    short_fit(run, steps=2)
    if fault == "full":
        _fill(small_disk)
        problem = "the disk is full"
    else:
        subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
        problem = "read-only"
    try:
        with pytest.raises(WorkdirError, match=problem) as err:
            short_fit(run, steps=6)
        assert str(run) in str(err.value)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
        if os.path.exists(small_disk / "filler"):
            os.remove(small_disk / "filler")
    restored, _, _ = Checkpointer(run).restore(task.make_task()[0])
    assert int(restored.step) == 2
    np.testing.assert_array_equal(np.asarray(restored.step), 2)
