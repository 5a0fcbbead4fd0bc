"""What a blockwise run reports: seconds of work per stage, objects, memory."""
from __future__ import annotations

import resource

import numpy as np

STAGES = ("read", "predict", "affinities", "watershed", "stitch", "relabel", "write", "pyramid")


def peak_rss_mib() -> float:
    """This process's peak resident memory. On Linux the high-water mark of its own
    memory (VmHWM): ru_maxrss would also hold the peak of the process it was started
    from, since a spawned worker inherits its parent's across fork and exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Tally:
    """Per-stage seconds of work and the largest worker peak, summed as results arrive
    (the client keeps these few numbers, not a record per block)."""

    def __init__(self):
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.worker_peak = 0.0

    def add(self, timings: dict | None = None, peak: float | None = None, **stage_seconds) -> None:
        for k, v in {**(timings or {}), **stage_seconds}.items():
            self.seconds[k] = self.seconds.get(k, 0.0) + float(v)
        if peak is not None:
            self.worker_peak = max(self.worker_peak, float(peak))


def format_report(report: dict) -> str:
    """The end-of-run table: per stage seconds of work, share and Mvox/s; objects; memory."""
    if report.get("already_complete"):
        return (f"{report['output']} is already complete, made with the same settings "
                f"({report['objects']} objects); nothing to do")
    lines = [f"wrote {report['output']}: {report['objects']} objects, shape {tuple(report['shape'])}"]
    if "blocks" in report:
        lines.append(f"{report['blocks']} blocks of {tuple(report['block_shape'])}, halo {tuple(report['halo'])}, "
                     f"{report['merges']} merges across faces, {report.get('workers', 1)} worker(s)"
                     + (", test-time augmentation (8 views)" if report.get("tta") else ""))
    total = sum(report["seconds"].values()) or 1.0
    mvox = float(report.get("voxels") or np.prod(report["shape"])) / 1e6
    lines.append(f"{'stage':<10}{'seconds':>9}{'share':>8}{'Mvox/s':>9}")
    for stage, s in report["seconds"].items():
        rate = f"{mvox / s:>9.2f}" if s > 0 else f"{'-':>9}"
        lines.append(f"{stage:<10}{s:>9.2f}{100 * s / total:>7.0f}%{rate}")
    peak = report.get("peak_rss_mib", {})
    lines.append(f"total {report['total_seconds']:.1f} s wall; peak RSS {peak.get('worker', float('nan')):.0f} MiB "
                 f"per worker, {peak_rss_mib():.0f} MiB in this process")
    return "\n".join(lines)
