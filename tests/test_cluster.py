"""Cluster configs (spoco_vol.cluster) and blockwise runs on real clusters: a dask
LocalCluster, SLURM jobs (real slurmctld/slurmd, started by tests/services/start_slurm.sh)
and a real dask-gateway-server on loopback."""
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
import zarr

from spoco_vol.blockwise import segment_blockwise
from spoco_vol.cli import cli
from spoco_vol.cluster import describe, list_cluster_configs, load_cluster_config, validate_cluster_config
from spoco_vol.errors import SpocoInputError
from spoco_vol.pipeline import BUNDLED_MODEL
from test_blockwise import _real_crop

# In CI (.ci/run) the services must be there: a missing SLURM or gateway fails, never skips.
REQUIRE = os.environ.get("SPOCO_VOL_REQUIRE_SERVICES") == "1"


def test_shipped_configs_are_valid_and_listed():
    rows = {name: status for name, _, status in list_cluster_configs()}
    assert {"local", "slurm", "gateway"} <= set(rows)
    assert all(status.startswith("ok") for status in rows.values()), rows
    slurm = load_cluster_config("slurm")
    assert slurm["kind"] == "slurm" and slurm["source"].endswith("cluster_configs/slurm.yaml")
    assert "SLURM partition debug" in describe(slurm)


def test_overrides_defaults_and_errors(tmp_path):
    c = load_cluster_config("slurm", {"jobs": 7, "queue": None})
    assert c["jobs"] == 7 and c["queue"] == "debug"  # None does not override
    assert validate_cluster_config({"kind": "local"})["threads_per_worker"] == 1
    for bad, msg in (({"kind": "pbs"}, "kind must be one of"), ({"kind": "local", "worker": 2}, "unknown setting"),
                     ({"kind": "slurm", "cores": "4"}, "wrong type"), ({"kind": "local", "workers": 0}, "at least 1"),
                     ({"kind": "slurm", "adaptive": {"minimum": 5, "maximum": 2}}, "adaptive"),
                     ({"kind": "gateway", "auth": "token"}, "auth must be"), ([1, 2], "mapping")):
        with pytest.raises(SpocoInputError, match=msg):
            validate_cluster_config(bad)
    with pytest.raises(SpocoInputError, match="not found.*local"):
        load_cluster_config("nonexistent")
    (tmp_path / "broken.yaml").write_text("kind: local\nworkers: [1,\n")
    with pytest.raises(SpocoInputError, match="cannot read"):
        load_cluster_config(str(tmp_path / "broken.yaml"))


def test_clusters_command_lists_and_validates(tmp_path, monkeypatch):
    from click.testing import CliRunner
    r = CliRunner().invoke(cli, ["clusters"])
    assert r.exit_code == 0 and "slurm" in r.output and "dask-gateway" in r.output
    monkeypatch.chdir(tmp_path)  # ./cluster_configs holds the user's own files
    os.makedirs("cluster_configs")
    (tmp_path / "cluster_configs" / "mine.yaml").write_text("kind: slurm\ncores: 0\n")
    r = CliRunner().invoke(cli, ["clusters"])
    assert r.exit_code == 2 and "mine" in r.output and "invalid" in r.output and "cores must be at least 1" in r.output


def _reference(tmp_path, inp):
    out = str(tmp_path / "ref.zarr")
    segment_blockwise(inp, out, BUNDLED_MODEL, block_shape=[1, 192, 192], workers=0, device="cpu")
    return zarr.open_array(out + "/0", mode="r")[...]


def _segment_on(tmp_path, inp, cluster, name):
    out = str(tmp_path / f"{name}.zarr")
    report = segment_blockwise(inp, out, BUNDLED_MODEL, block_shape=[1, 192, 192], device="cpu", cluster=cluster)
    return zarr.open_array(out + "/0", mode="r")[...], report


def test_no_workers_on_a_cluster_is_one_error_before_anything_is_written(tmp_path):
    """--workers 0 means this process; with --cluster it would start a cluster of no
    workers and wait for one until its timeout."""
    inp = _real_crop(tmp_path)
    out = str(tmp_path / "none.zarr")
    for cluster in ({"kind": "local", "workers": 2}, "local"):
        with pytest.raises(SpocoInputError, match="--workers 0 runs in this process"):
            segment_blockwise(inp, out, BUNDLED_MODEL, device="cpu", cluster=cluster, workers=0)
    assert not os.path.exists(out) and not os.path.exists(out + ".partial")


def test_local_cluster_from_a_config(tmp_path):
    inp = _real_crop(tmp_path)
    labels, report = _segment_on(tmp_path, inp, {"kind": "local", "workers": 2}, "local")
    assert report["workers"] == 2
    assert np.array_equal(labels, _reference(tmp_path, inp))


# ------------------------------------------------------------------------ SLURM

@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running SLURM: the one tests/run.sh started, or one started here (as root) and
    stopped again after the module's tests."""
    services = os.path.join(os.path.dirname(__file__), "services")
    started = str(tmp_path_factory.mktemp("slurm") / "started")
    ok = shutil.which("sinfo") and subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0
    if not ok and os.geteuid() == 0:
        ok = subprocess.run(["bash", os.path.join(services, "start_slurm.sh")], capture_output=True,
                            env={**os.environ, "SPOCO_VOL_STARTED": started}).returncode == 0
    if not ok:
        if REQUIRE:
            pytest.fail("SLURM is not running and tests/services/start_slurm.sh could not start it")
        pytest.skip("no SLURM here (run tests/services/start_slurm.sh as root)")
    yield subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True).stdout.split()[0].rstrip("*")
    subprocess.run(["bash", os.path.join(services, "stop_daemons.sh"), started])


def test_segment_with_slurm_job_workers(tmp_path, slurm):
    """Workers are real SLURM jobs (dask-jobqueue); the labels equal the in-process run's."""
    inp = _real_crop(tmp_path)
    logs = tmp_path / "slurm-logs"
    config = {"kind": "slurm", "queue": slurm, "cores": 1, "memory": "2GB", "walltime": "00:20:00", "jobs": 2,
              "interface": "lo", "log_directory": str(logs), "wait_timeout": 180}
    labels, report = _segment_on(tmp_path, inp, config, "slurm")
    assert report["workers"] == 2
    assert np.array_equal(labels, _reference(tmp_path, inp))
    job_logs = [f for f in os.listdir(logs) if f.endswith(".err")]
    assert job_logs, "no SLURM job wrote a log: the workers were not SLURM jobs"
    assert any("Starting worker" in open(logs / f).read() or "Start worker" in open(logs / f).read()
               for f in job_logs)


# ------------------------------------------------------------------------ dask-gateway

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    exe = os.path.join(os.path.dirname(sys.executable), "dask-gateway-server")
    if not os.path.exists(exe):
        if REQUIRE:
            pytest.fail("dask-gateway-server is not installed")
        pytest.skip("dask-gateway-server is not installed")
    d = tmp_path_factory.mktemp("gateway")
    api, proxy, tcp = _free_port(), _free_port(), _free_port()
    bindir = os.path.dirname(sys.executable)
    (d / "config.py").write_text(f"""
c.DaskGateway.address = "127.0.0.1:{api}"
c.Proxy.address = "127.0.0.1:{proxy}"
c.Proxy.tcp_address = "127.0.0.1:{tcp}"
c.DaskGateway.backend_class = "dask_gateway_server.backends.local.UnsafeLocalBackend"
c.DaskGateway.authenticator_class = "dask_gateway_server.auth.SimpleAuthenticator"
c.SimpleAuthenticator.password = "spoco-test"
c.ClusterConfig.scheduler_cmd = ["{bindir}/dask", "scheduler"]
c.ClusterConfig.worker_cmd = ["{bindir}/dask", "worker"]
""")
    log = open(d / "server.log", "w")
    server = subprocess.Popen([exe, "-f", str(d / "config.py")], cwd=d, stdout=log, stderr=subprocess.STDOUT)
    try:
        import urllib.request
        for _ in range(150):  # ready when the API answers through the proxy
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{proxy}/api/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail("dask-gateway-server did not start: " + (d / "server.log").read_text()[-2000:])
        yaml_path = d / "gateway.yaml"
        yaml_path.write_text(yaml.safe_dump({
            "kind": "gateway", "address": f"http://127.0.0.1:{proxy}", "proxy_address": f"gateway://127.0.0.1:{tcp}",
            "auth": "basic", "username": "tester", "password": "spoco-test", "workers": 2, "wait_timeout": 180}))
        yield str(yaml_path)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_segment_through_dask_gateway(tmp_path, gateway):
    """A real dask-gateway-server (local backend) starts the scheduler and workers; the run
    goes through a gateway YAML like cluster_configs/gateway.yaml."""
    inp = _real_crop(tmp_path)
    labels, report = _segment_on(tmp_path, inp, gateway, "gateway")
    assert report["workers"] == 2
    assert np.array_equal(labels, _reference(tmp_path, inp))


def test_scancel_of_a_worker_job_mid_run(tmp_path, slurm):
    """`scancel` one of the two worker jobs once a block is done: its blocks are retried on
    the other, the run completes with the undisturbed labels."""
    from test_blockwise import _kill_when_first_block_is_done
    inp = _real_crop(tmp_path)
    cancelled = []

    def cancel_one():
        jobs = subprocess.run(["squeue", "-h", "-o", "%i %j %T"], capture_output=True, text=True).stdout.split("\n")
        running = [j.split()[0] for j in jobs if j.strip() and "RUNNING" in j]
        if running:
            subprocess.run(["scancel", running[0]], check=True)
            cancelled.append(running[0])
    out = str(tmp_path / "slurm.zarr")
    watcher = _kill_when_first_block_is_done(out, cancel_one)
    config = {"kind": "slurm", "queue": slurm, "cores": 1, "memory": "2GB", "walltime": "00:20:00", "jobs": 2,
              "interface": "lo", "log_directory": str(tmp_path / "logs"), "wait_timeout": 180}
    segment_blockwise(inp, out, BUNDLED_MODEL, block_shape=[1, 192, 192], device="cpu", cluster=config)
    watcher.join(timeout=5)
    assert cancelled, "no running worker job to cancel"
    assert np.array_equal(zarr.open_array(out + "/0", mode="r")[...], _reference(tmp_path, inp))


def test_gpu_pool_predicts_and_cpu_pool_finishes(tmp_path):
    """Two worker pools, one declaring a GPU resource: every block's prediction runs there
    and its CPU half on the other pool (as the workers that ran them say); the labels
    equal the fused tasks' bit for bit."""
    inp = _real_crop(tmp_path)
    labels, report = _segment_on(tmp_path, inp, {"kind": "local", "workers": 1, "gpu_workers": 1}, "split")
    assert report["blocks"] > 1 and report["blocks_predicted_on_gpu_workers"] == report["blocks"]
    assert report["blocks_finished_on_gpu_workers"] == 0
    assert np.array_equal(labels, _reference(tmp_path, inp))
    _, fused = _segment_on(tmp_path, inp, {"kind": "local", "workers": 2}, "fused")
    assert fused["blocks_predicted_on_gpu_workers"] == fused["blocks_finished_on_gpu_workers"] == 0


def test_command_line_overrides_cluster_file_values():
    c = load_cluster_config("slurm", {"walltime": "12:00:00", "cores": "4", "job_extra_directives": "[--qos=high]",
                                      "queue": "gpu"})
    assert c["walltime"] == "12:00:00" and c["cores"] == 4 and c["job_extra_directives"] == ["--qos=high"]
    assert c["queue"] == "gpu" and validate_cluster_config(c)["source"] == c["source"]
    from click.testing import CliRunner
    r = CliRunner().invoke(cli, ["segment", "--input", "x.zarr", "--cluster-set", "cores=4"])
    assert r.exit_code == 2 and "--cluster-set needs --cluster" in r.output
    r = CliRunner().invoke(cli, ["segment", "--input", "x.zarr", "--cluster", "slurm", "--cluster-set", "cores=zero"])
    assert r.exit_code == 2 and "cores has the wrong type" in r.output
