"""Faults during a blockwise run, made for real where they can be made here: each run
ends with the labels of an undisturbed run, bit for bit, and nothing finished is lost.

With SPOCO_VOL_FAULT_TABLE=FILE every test appends its row (fault, what the user saw,
blocks redone, labels identical) to FILE: the table of benchmarks/RESULTS.md.
"""
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zarr

from spoco_vol import io
from spoco_vol.blockwise import segment_blockwise
from spoco_vol.pipeline import BUNDLED_MODEL

REQUIRE = os.environ.get("SPOCO_VOL_REQUIRE_SERVICES") == "1"
BLOCK = [1, 192, 192]


def _record(fault: str, seen: str, redone: str, identical: bool) -> None:
    table = os.environ.get("SPOCO_VOL_FAULT_TABLE")
    if table:
        with open(table, "a") as f:
            f.write(f"| {fault} | {seen} | {redone} | {'yes' if identical else 'NO'} |\n")


def _sample(tmp_path, sections=(2, 4), chunks=(1, 64, 64)) -> str:
    """Sections of the bundled real EM sample (512 x 512, 9 blocks each), as a zarr array."""
    d = np.load(os.path.join(os.path.dirname(BUNDLED_MODEL), "vnc_sample.npz"))
    path = str(tmp_path / "crop.zarr")
    io.create_array(path, d["raw"][sections[0]:sections[1]], chunks=chunks,
                    attrs={"voxel_size": [float(v) for v in d["voxel_size_nm"]]})
    return path


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """The labels of undisturbed in-process runs, per set of sections (made once)."""
    made = {}

    def reference(sections):
        if sections not in made:
            tmp = tmp_path_factory.mktemp("reference")
            ref = str(tmp / "ref.zarr")
            segment_blockwise(_sample(tmp, sections), ref, BUNDLED_MODEL, block_shape=BLOCK, workers=0, device="cpu")
            made[sections] = zarr.open_array(ref + "/0", mode="r")[...]
            assert int(made[sections].max()) > 5
        return made[sections]
    return reference


def _labels(out) -> np.ndarray:
    return zarr.open_array(out + "/0", mode="r")[...]


def _cli(inp, out, *more, workers=0, **popen):
    cmd = [sys.executable, "-c", "from spoco_vol.cli import main; main()", "segment", "--input", inp,
           "--output", out, "--block-shape", ",".join(map(str, BLOCK)), "--workers", str(workers),
           "--device", "cpu", "--quiet", *more]
    # A terminal's Ctrl-C reaches a process whose SIGINT is not ignored (as it is for a
    # background job of a non-interactive shell, which this test may run in).
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **popen)


def _finish(inp, out, ref, fault: str, seen: str, workers=0) -> dict:
    """The same command again: it must finish the run, with the reference's labels; the
    outcome becomes the fault's row. Returns the run's report."""
    p = _cli(inp, out, workers=workers)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-2000:]
    report = zarr.open_group(out, mode="r").attrs["spoco_vol"]
    identical = np.array_equal(_labels(out), ref)
    _record(fault, seen, f"{report['blocks'] - report['blocks_done_before']} of {report['blocks']}", identical)
    assert identical
    return report


def _wait_for_blocks(out, n, timeout=120):
    blocks = out + ".partial/blocks"
    t = time.time()
    while time.time() - t < timeout:
        if os.path.isdir(blocks) and sum(f.endswith(".npz") and ".tmp" not in f for f in os.listdir(blocks)) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {n} finished blocks within {timeout} s")


class FlakyStore(zarr.storage.WrapperStore):
    """A store whose listed chunks fail with OSError the first time each is read (a
    transient NFS or object-store error); they read fine afterwards."""

    def __init__(self, store, failing: set, failed: set):
        super().__init__(store)
        self.failing, self.failed = failing, failed

    def _with_store(self, store):
        return type(self)(store, self.failing, self.failed)

    async def get(self, key, prototype, byte_range=None):
        if key in self.failing and key not in self.failed:
            self.failed.add(key)
            raise OSError(f"transient read error: {key}")
        return await self._store.get(key, prototype, byte_range)


def test_transient_read_errors_are_retried(tmp_path, monkeypatch, references):
    """A seeded 5% of the input's chunk reads raise OSError on their first attempt. The
    block tasks that meet one fail, dask runs them again (on a real cluster, here with
    its workers as threads of this process so that they read through the wrapper), and
    the run completes as if nothing had happened."""
    from distributed import Client, LocalCluster
    inp = _sample(tmp_path)
    ref = references((2, 4))
    chunks = sorted(os.path.relpath(os.path.join(d, f), inp) for d, _, fs in os.walk(inp) for f in fs
                    if not f.startswith("zarr.json") and not f.startswith("."))
    rng = np.random.default_rng(0)
    failing = set(rng.choice(chunks, size=max(1, round(0.05 * len(chunks))), replace=False).tolist())
    failed: set = set()
    real_open = io.open_volume

    def flaky_open(path, what="input"):
        if os.path.abspath(path) != os.path.abspath(inp):
            return real_open(path, what)
        store = FlakyStore(zarr.storage.LocalStore(inp, read_only=True), failing, failed)
        return zarr.open_array(store, mode="r")
    monkeypatch.setattr(io, "open_volume", flaky_open)
    out = str(tmp_path / "out.zarr")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        report = segment_blockwise(inp, out, BUNDLED_MODEL, block_shape=BLOCK, device="cpu", client=client)
    assert failed == failing  # every one of them failed once, and was read again
    identical = np.array_equal(_labels(out), ref)
    _record(f"OSError on the first read of {len(failing)} of {len(chunks)} input chunks (5%, transient)",
            "nothing: the run completed", "the block tasks that met them, once more (dask retries)", identical)
    assert identical and report["blocks"] == 18 and not os.path.exists(out + ".partial")


def test_a_corrupt_chunk_stops_the_run_and_the_repaired_input_finishes_it(tmp_path, references):
    """A permanent fault: one input chunk corrupted on disk. The run stops with one line
    naming the block, its region, the cause and the file with the traceback; the blocks
    that do not read the chunk are kept; with the chunk restored, the same command
    finishes the run, redoing only the blocks that were not finished."""
    inp = _sample(tmp_path, chunks=(1, 192, 192))
    ref = references((2, 4))
    chunk = os.path.join(inp, "c", "1", "1", "0")  # zarr v3 chunk of section 1, y 192:384, x 0:192
    shutil.copy(chunk, str(tmp_path / "chunk.bak"))
    with open(chunk, "wb") as f:
        f.write(b"not a compressed chunk")
    out = str(tmp_path / "out.zarr")
    p = _cli(inp, out)
    _, err = p.communicate()
    assert p.returncode == 1, err[-2000:]
    lines = err.strip().splitlines()
    # whichever block of section 1 reads the chunk first (with its halo) is named, with its region
    m = re.fullmatch(r"Error: block \(1, \d, \d\) \(voxels 1:2,\d+:\d+,\d+:\d+\) failed 3 times: \w+: .+ "
                     r"\(traceback in (\S+)\); \S+ keeps every finished block: fix the cause and run the same "
                     r"command again to finish the run", lines[-1])
    assert m and len(lines) == 1, err
    assert os.path.isfile(m.group(1)) and "Traceback" in open(m.group(1)).read()
    assert not os.path.exists(out)
    kept = len(os.listdir(out + ".partial/blocks"))
    assert kept == 9  # in this process blocks run in order: all of section 0 finished first
    shutil.copy(str(tmp_path / "chunk.bak"), chunk)
    report = _finish(inp, out, ref, "one input chunk corrupted on disk (permanent), then restored",
                     "one line: the block, its voxels, the cause, the traceback file; exit 1")
    assert report["resumed"] and report["blocks_done_before"] == kept


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 400 kB (the tests run as root in CI): the run's output fills it."""
    path = tmp_path / "small"
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(path)],
                      capture_output=True).returncode != 0:
        if REQUIRE:
            pytest.fail("cannot mount a tmpfs (the tests need root)")
        pytest.skip("mounting a tmpfs needs root")
    yield str(path)
    subprocess.run(["umount", "-l", str(path)])


def test_a_full_disk_stops_the_run_and_freed_space_finishes_it(tmp_path, small_disk, references):
    """The output's file system fills up: one line, the partial run kept; space freed
    (the tmpfs grown), the same command finishes the run."""
    inp = _sample(tmp_path)
    ref = references((2, 4))
    out = os.path.join(small_disk, "out.zarr")
    p = _cli(inp, out)
    _, err = p.communicate()
    lines = err.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and "No space left on device" in lines[0], err[-2000:]
    assert lines[0].startswith("Error: ") and "run the same command again" in lines[0]
    kept = len([f for f in os.listdir(out + ".partial/blocks") if ".tmp" not in f])
    assert 0 < kept < 18
    subprocess.run(["mount", "-o", "remount,size=20m", small_disk], check=True)
    report = _finish(inp, out, ref, "the output's file system full (a 400 kB tmpfs), then grown",
                     "one line: the block, its voxels, 'No space left on device'; exit 1")
    assert report["blocks_done_before"] == kept


def test_three_workers_killed_at_random_moments(tmp_path, references):
    """SIGKILL to a worker process, three times at seeded random moments of one run (the
    nanny starts a new worker each time), each while the run is still going: the run
    completes, its lost tasks redone, with the labels of an undisturbed run."""
    from distributed import Client, LocalCluster
    inp = _sample(tmp_path, sections=(0, 7))
    ref = references((0, 7))
    out = str(tmp_path / "out.zarr")
    rng = np.random.default_rng(0)
    kills, running = [], threading.Event()  # kills: whether the run was still going at each
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        def worker_pids():
            for _ in range(100):  # asked while a worker is dying, the scheduler may fail to reach it
                try:
                    return sorted(client.run(os.getpid).values())
                except Exception:
                    time.sleep(0.1)
            return []

        def killer():
            _wait_for_blocks(out, 1)
            for _ in range(3):
                time.sleep(float(rng.uniform(0.2, 2.0)))
                pids = worker_pids()
                victim = int(rng.choice(pids))
                os.kill(victim, signal.SIGKILL)
                kills.append(running.is_set())
                for _ in range(200):  # until the nanny has started a new worker
                    now = worker_pids()
                    if victim not in now and len(now) == len(pids):
                        break
                    time.sleep(0.05)
        t = threading.Thread(target=killer, daemon=True)
        running.set()
        t.start()
        report = segment_blockwise(inp, out, BUNDLED_MODEL, block_shape=BLOCK, device="cpu", client=client,
                                   workers=2)
        running.clear()
        t.join(timeout=60)
    identical = np.array_equal(_labels(out), ref)
    _record("3 worker processes SIGKILLed at random moments of one run", "nothing: the run completed",
            "the killed workers' tasks (dask reschedules them)", identical)
    assert kills == [True] * 3, "a kill came after the run had finished"
    assert report["blocks"] == 63 and identical


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_stopped_client_says_how_to_resume_and_resumes(tmp_path, signame, references):
    """SIGTERM (a SLURM walltime, pre-emption) to the client, or Ctrl-C (SIGINT to the
    whole process group, workers included): one line that says the same command
    resumes, exit 143 / 130, no traceback; the same command finishes the run."""
    inp = _sample(tmp_path, sections=(0, 7))
    ref = references((0, 7))
    out = str(tmp_path / "out.zarr")
    p = _cli(inp, out, workers=2, start_new_session=True)
    _wait_for_blocks(out, 4)
    if signame == "SIGTERM":
        p.send_signal(signal.SIGTERM)
    else:
        os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=60)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    code = {"SIGTERM": 143, "SIGINT": 130}[signame]
    assert p.returncode == code, err[-3000:]
    assert "Traceback" not in err and len(lines) <= 3, err[-3000:]  # the cluster's address lines, and ours
    assert re.fullmatch(rf"Error: \w+ \({signame}\); \S+ keeps the \d+ of 63 blocks segmented so far: run the "
                        r"same command again to resume", lines[-1]), lines[-1]
    done = len([f for f in os.listdir(out + ".partial/blocks") if ".tmp" not in f])
    what = {"SIGTERM": "SIGTERM to the client (walltime, pre-emption)",
            "SIGINT": "Ctrl-C (SIGINT to the client and its workers)"}[signame]
    report = _finish(inp, out, ref, f"{what} mid-run, then the same command",
                     f"one line: interrupted, the same command resumes; exit {code}", workers=2)
    assert report["blocks_done_before"] >= done


def test_the_api_from_a_script_without_a_main_guard(tmp_path, references):
    """spoco_vol.segment with worker processes, called at the top of a plain script: the
    workers do not run the script again (which would start clusters within clusters)."""
    inp = _sample(tmp_path)
    ref = references((2, 4))
    out = str(tmp_path / "api.zarr")
    script = tmp_path / "plain.py"
    script.write_text("import spoco_vol\n"
                      f"r = spoco_vol.segment({inp!r}, {out!r}, block_shape={BLOCK}, workers=2, device='cpu')\n"
                      "print(r['objects'])\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr[-2000:]
    assert np.array_equal(_labels(out), ref)


def test_a_closing_worker_drops_its_heartbeat_error_and_only_that():
    """The heartbeat error a worker logs when its connections close under a heartbeat in
    flight is dropped while it closes (the flake of the test above), and kept while it runs."""
    import inspect
    from distributed import LocalCluster, Worker
    from spoco_vol.blockwise.worker import HEARTBEAT_FAILURE, dask_setup
    log = logging.getLogger("distributed.worker")
    assert HEARTBEAT_FAILURE in inspect.getsource(Worker.heartbeat)  # distributed's wording, as filtered

    def record(message):
        return log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    with LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as cluster:
        worker = next(iter(cluster.workers.values()))
        before, sigint = list(log.filters), signal.getsignal(signal.SIGINT)
        state_machine = logging.getLogger("distributed.worker.state_machine")
        level = state_machine.level
        dask_setup(worker)  # the preload the worker processes run
        signal.signal(signal.SIGINT, sigint)
        state_machine.setLevel(level)
        found, = [f for f in log.filters if f not in before]
        try:
            assert found.filter(record(HEARTBEAT_FAILURE + "."))
            cluster.close()
            assert worker.status.name == "closed"
            assert not found.filter(record(HEARTBEAT_FAILURE + "."))
            assert found.filter(record("Unexpected exception during heartbeat. Closing worker."))
        finally:
            log.removeFilter(found)
