"""Where the dask workers come from: a LocalCluster, SLURM jobs (dask-jobqueue) or a
dask-gateway (daskhub), described by a small YAML file (``cluster_configs/*.yaml``).

``load_cluster_config`` finds and validates a file (by path or by name), applies
command-line overrides and fills defaults; ``open_cluster`` starts the cluster, prints
where its scheduler, dashboard and logs are, waits for a first worker and yields a
``distributed.Client``; the cluster is shut down on exit.
"""
from __future__ import annotations

import contextlib
import glob
import importlib.machinery
import logging
import os
import sys
from typing import Callable, Iterator

import yaml

from .errors import SpocoInputError

WORKER_SETUP = "spoco_vol.blockwise.worker"  # preloaded into the worker processes started here
SHIPPED_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cluster_configs")


def config_dirs() -> list[str]:
    """./cluster_configs (the user's, first), then the ones shipped with spoco-vol (beside
    the package in a checkout, under the environment's prefix when installed)."""
    return [os.path.join(os.getcwd(), "cluster_configs"), SHIPPED_CONFIGS,
            os.path.join(sys.prefix, "cluster_configs")]

# key -> (accepted types, default)
_SCHEMAS = {
    "local": {"workers": (int, os.cpu_count() or 1), "threads_per_worker": (int, 1),
              "memory_limit": ((str, int), "auto"), "gpu_workers": (int, 0)},
    "slurm": {"queue": ((str, type(None)), None), "cores": (int, 1), "memory": (str, "2GB"),
              "walltime": (str, "01:00:00"), "processes": (int, 1), "gpus_per_job": (int, 0),
              "job_extra_directives": (list, []), "jobs": (int, 1), "adaptive": ((dict, type(None)), None),
              "interface": ((str, type(None)), None), "log_directory": (str, "spoco-vol-slurm-logs"),
              "wait_timeout": ((int, float), 600)},
    "gateway": {"address": ((str, type(None)), None), "proxy_address": ((str, type(None)), None),
                "auth": ((str, type(None)), "jupyterhub"), "username": ((str, type(None)), None),
                "password": ((str, type(None)), None), "worker_options": (dict, {}), "workers": (int, 1),
                "adaptive": ((dict, type(None)), None), "threads_per_worker": (int, 1),
                "wait_timeout": ((int, float), 600)},
}


def find_cluster_config(name_or_path: str) -> str:
    """A YAML path, or the name of a file in ./cluster_configs or the shipped cluster_configs."""
    if os.path.isfile(name_or_path):
        return name_or_path
    for d in config_dirs():
        for candidate in (os.path.join(d, name_or_path), os.path.join(d, f"{name_or_path}.yaml")):
            if os.path.isfile(candidate):
                return candidate
    names = sorted({os.path.splitext(os.path.basename(p))[0] for p in _config_files()})
    raise SpocoInputError(f"cluster config {name_or_path!r} not found (a .yaml path, or one of: {', '.join(names)})")


def _config_files() -> list[str]:
    seen, files = set(), []
    for d in config_dirs():
        for path in sorted(glob.glob(os.path.join(d, "*.yaml"))):
            name = os.path.basename(path)
            if name not in seen:  # ./cluster_configs wins over the shipped ones
                seen.add(name)
                files.append(path)
    return files


def validate_cluster_config(config: dict, source: str = "cluster config") -> dict:
    """Checked copy of ``config`` with defaults filled in; one clear error otherwise."""
    if not isinstance(config, dict):
        raise SpocoInputError(f"{source}: expected a mapping of settings")
    kind = config.get("kind")
    if kind not in _SCHEMAS:
        raise SpocoInputError(f"{source}: kind must be one of {', '.join(_SCHEMAS)}, got {kind!r}")
    schema = _SCHEMAS[kind]
    unknown = sorted(set(config) - set(schema) - {"kind", "source"})
    if unknown:
        raise SpocoInputError(f"{source}: unknown setting(s) for kind {kind}: {', '.join(unknown)}")
    out = {"kind": kind, **({"source": config["source"]} if "source" in config else {})}
    for key, (types, default) in schema.items():
        value = config.get(key, default)
        if isinstance(value, bool) or not isinstance(value, types):
            raise SpocoInputError(f"{source}: {key} has the wrong type ({type(value).__name__})")
        out[key] = value
    for key in ("workers", "jobs", "cores", "processes", "threads_per_worker"):
        if key in out and out[key] < 1:
            raise SpocoInputError(f"{source}: {key} must be at least 1")
    if out.get("adaptive") is not None:
        a = out["adaptive"]
        if set(a) - {"minimum", "maximum"} or not all(isinstance(a.get(k, 0), int) for k in ("minimum", "maximum")) \
                or a.get("minimum", 0) > a.get("maximum", 1 << 30):
            raise SpocoInputError(f"{source}: adaptive takes {{minimum: N, maximum: M}} with N <= M")
    if kind == "gateway" and out["auth"] not in (None, "jupyterhub", "basic", "kerberos"):
        raise SpocoInputError(f"{source}: auth must be jupyterhub, basic, kerberos or null")
    return out


def load_cluster_config(name_or_path: str, overrides: dict | None = None) -> dict:
    """Read, override (command-line values that are not None win) and validate."""
    path = find_cluster_config(name_or_path)
    try:
        with open(path) as f:
            config = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SpocoInputError(f"cannot read cluster config {path}: {exc}".splitlines()[0]) from None
    if isinstance(config, dict):
        schema = _SCHEMAS.get(config.get("kind"), {})
        config = {**config, **{k: _coerce(v, schema.get(k, ((str,), None))[0])
                               for k, v in (overrides or {}).items() if v is not None}}
    config = validate_cluster_config(config, path)
    config["source"] = path
    return config


def _coerce(value, types):
    """A command-line string to the type a setting takes ("12:00:00" stays a string)."""
    if not isinstance(value, str):
        return value
    types = types if isinstance(types, tuple) else (types,)
    if str in types:
        return None if value == "null" and type(None) in types else value
    parsed = yaml.safe_load(value)
    if isinstance(parsed, float) and int in types and float not in types and parsed.is_integer():
        return int(parsed)
    return parsed


def list_cluster_configs() -> list[tuple[str, str, str]]:
    """(name, path, "ok: <summary>" or the validation error) for every config found."""
    rows = []
    for path in _config_files():
        name = os.path.splitext(os.path.basename(path))[0]
        try:
            c = load_cluster_config(path)
            rows.append((name, path, "ok: " + describe(c)))
        except SpocoInputError as exc:
            rows.append((name, path, f"invalid: {exc}"))
    return rows


def describe(config: dict) -> str:
    kind = config["kind"]
    if kind == "local":
        gpu = f" + {config['gpu_workers']} GPU worker(s)" if config.get("gpu_workers") else ""
        return f"LocalCluster, {config['workers']} worker(s) x {config['threads_per_worker']} thread(s){gpu}"
    scale = (f"adaptive {config['adaptive'].get('minimum', 0)}-{config['adaptive'].get('maximum', '?')}"
             if config.get("adaptive") else f"{config.get('jobs', config.get('workers'))} fixed")
    if kind == "slurm":
        gpus = f", {config['gpus_per_job']} GPU(s)" if config["gpus_per_job"] else ""
        return (f"SLURM partition {config['queue'] or '(default)'}, jobs of {config['cores']} core(s), "
                f"{config['memory']}{gpus}, walltime {config['walltime']}, {scale}")
    return f"dask-gateway at {config['address'] or '$DASK_GATEWAY__ADDRESS'}, {scale} worker(s)"


def threads_per_worker(config: dict) -> int:
    """Torch threads a block task may use on one worker of this cluster."""
    if config["kind"] == "slurm":
        return max(1, config["cores"] // config["processes"])
    return config["threads_per_worker"]


def _gateway_auth(config: dict):
    from dask_gateway.auth import BasicAuth, JupyterHubAuth, KerberosAuth
    if config["auth"] == "basic":
        return BasicAuth(username=config["username"], password=config["password"])
    if config["auth"] == "jupyterhub":
        return JupyterHubAuth()
    if config["auth"] == "kerberos":
        return KerberosAuth()
    return None


@contextlib.contextmanager
def _workers_skip_the_main_script() -> Iterator:
    """Local worker processes start with multiprocessing's spawn, which runs the
    caller's main script again in each of them (as ``__mp_main__``): a script that calls
    ``spoco_vol.segment`` without an ``if __name__ == "__main__":`` guard would start
    clusters within clusters ("Nanny failed to start", hundreds of lines). The workers
    need nothing from that script, and spawn leaves a main module whose spec is named
    ``__main__`` alone (as it does for a package's __main__.py): so it is named that
    while our workers may start, restarts after a lost worker included."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    had, previous = hasattr(main, "__spec__"), getattr(main, "__spec__", None)
    main.__spec__ = importlib.machinery.ModuleSpec("__main__", None)
    try:
        yield
    finally:
        if had:
            main.__spec__ = previous
        else:
            del main.__spec__


@contextlib.contextmanager
def open_cluster(config: dict, log: Callable[[str], None] = print) -> Iterator:
    """Start the cluster of ``config``, wait for a first worker, yield a Client."""
    if config["kind"] == "local":
        with _workers_skip_the_main_script():
            with _open_cluster(config, log) as client:
                yield client
    else:
        with _open_cluster(config, log) as client:
            yield client


@contextlib.contextmanager
def _open_cluster(config: dict, log: Callable[[str], None]) -> Iterator:
    from distributed import Client
    kind = config["kind"]
    if kind == "local" and config["gpu_workers"]:
        # Two pools: workers that declare a GPU (prediction) and CPU workers (the rest).
        from distributed import Nanny, Scheduler, SpecCluster
        spec = {f"gpu-{i}": {"cls": Nanny, "options": {"nthreads": 1, "resources": {"GPU": 1},
                                                       "memory_limit": config["memory_limit"],
                                                       "preload": [WORKER_SETUP]}}
                for i in range(config["gpu_workers"])}
        spec.update({f"cpu-{i}": {"cls": Nanny, "options": {"nthreads": 1, "resources": {"CPU": 1},
                                                            "memory_limit": config["memory_limit"],
                                                            "preload": [WORKER_SETUP]}}
                     for i in range(config["workers"])})
        cluster = SpecCluster(workers=spec, scheduler={"cls": Scheduler, "options": {
            "dashboard_address": ":0", "host": "127.0.0.1"}}, silence_logs=logging.WARNING)
        logs = "this terminal (worker output is forwarded)"
    elif kind == "local":
        from distributed import LocalCluster
        cluster = LocalCluster(n_workers=config["workers"], threads_per_worker=1, processes=True,
                               memory_limit=config["memory_limit"], dashboard_address=":0", host="127.0.0.1",
                               preload=[WORKER_SETUP])
        logs = "this terminal (worker output is forwarded)"
    elif kind == "slurm":
        from dask_jobqueue import SLURMCluster
        extra = list(config["job_extra_directives"])
        worker_args = []
        if config["gpus_per_job"]:
            extra.append(f"--gres=gpu:{config['gpus_per_job']}")
            worker_args += ["--resources", f"GPU={config['gpus_per_job']}"]
        os.makedirs(config["log_directory"], exist_ok=True)
        cluster = SLURMCluster(queue=config["queue"], cores=config["cores"], memory=config["memory"],
                               walltime=config["walltime"], processes=config["processes"],
                               job_extra_directives=extra, worker_extra_args=worker_args,
                               interface=config["interface"], log_directory=config["log_directory"],
                               scheduler_options={"dashboard_address": ":0"})
        logs = os.path.abspath(config["log_directory"]) + " (one file per SLURM job)"
    else:
        from dask_gateway import GatewayCluster
        try:
            cluster = GatewayCluster(address=config["address"], proxy_address=config["proxy_address"],
                                     auth=_gateway_auth(config), shutdown_on_close=True, **config["worker_options"])
        except Exception as exc:
            raise SpocoInputError(f"cannot start a cluster on the dask-gateway at {config['address']}: "
                                  f"{type(exc).__name__}: {exc}".splitlines()[0]) from None
        logs = "the gateway's cluster logs (gateway.get_cluster(...).get_logs())"
    try:
        if kind == "local" and config["gpu_workers"]:
            pass  # the pools are fixed by the spec
        elif config.get("adaptive"):
            cluster.adapt(minimum=config["adaptive"].get("minimum", 0), maximum=config["adaptive"].get("maximum"))
        else:
            cluster.scale(config.get("jobs", config.get("workers")) * config.get("processes", 1)
                          if kind == "slurm" else config["workers"])
        client = Client(cluster)
        log(f"cluster: {describe(config)} ({config.get('source', 'from the command line')})")
        log(f"scheduler {client.scheduler.address}; dashboard {client.dashboard_link}; logs: {logs}")
        try:
            client.wait_for_workers(1, timeout=config.get("wait_timeout", 600))
        except Exception:
            client.close()
            raise SpocoInputError(f"no dask worker joined within {config.get('wait_timeout', 600)} s "
                                  f"({describe(config)}); see {logs}") from None
        try:
            yield client
        finally:
            client.close()
    finally:
        cluster.close()
        gateway = getattr(cluster, "gateway", None)
        if gateway is not None and hasattr(gateway, "_loop_runner"):
            # dask-gateway 2026.3 with distributed 2026.8: Gateway.__del__ closes the client a
            # second time, after its loop stopped, and raises. It is closed: skip that.
            del gateway._loop_runner
