"""Run volume extraction for many indices: in-process, on a Dask LocalCluster, or on LSF/SLURM.

Why Dask: one code path for a laptop (``LocalCluster`` on 127.0.0.1, dashboard off) and a cluster
(dask-jobqueue ``LSFCluster``/``SLURMCluster`` with adaptive scaling, so jobs are released as soon
as the queue of volumes drains).  Every volume is an independent task that is

* skipped when its metadata exists and :func:`~dinocell.extract.volumes.store.quick_verify` passes
  (so reruns and preempted jobs resume where they stopped),
* isolated: an exception writes ``logs/volume_NNNNNN.err`` and the other volumes continue,
* complete only once its metadata JSON has been written (last, atomically).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from dinocell.errors import ConfigError, DataError
from dinocell.extract.volumes.config import ExtractionConfig, RandomInitWarning, require_volumes
from dinocell.extract.volumes.pipeline import extract_volume
from dinocell.extract.volumes.store import quick_verify, volume_paths, write_json_atomic
from dinocell.paths import write_text_atomic
from dinocell.provenance import provenance

log = logging.getLogger(__name__)

CLUSTERS = ("local", "lsf", "slurm", "serial")
RUN_RECORD = "extraction_run.json"


@dataclass
class ClusterOptions:
    """Where the volume tasks run and what each worker (job) asks the scheduler for."""

    cluster: str = "local"  # local | lsf | slurm | serial (no Dask: a plain loop, for debugging)
    num_processors: int | None = None  # cores per worker/job (torch threads); default: all local / 4 per job
    memory_gb: float = 16.0
    walltime: str = "04:00"  # HH:MM (LSF); SLURM gets HH:MM:00
    queue: str | None = None
    project: str | None = None
    gpu: bool | None = None  # None: use a GPU when one is visible (local); request none (clusters)
    max_jobs: int | None = None  # adaptive maximum of cluster jobs; default min(#volumes, 100)
    local_workers: int = 1  # concurrent volumes on the LocalCluster (>1 uses processes)
    interface: str | None = None  # network interface for scheduler + workers on a cluster (e.g. ib0)
    prologue: list[str] = field(default_factory=list)  # job-script lines (module load, venv activate)

    def validate(self) -> None:
        if self.cluster not in CLUSTERS:
            raise ConfigError(f"--cluster must be one of {', '.join(CLUSTERS)}; got '{self.cluster}'")
        if self.num_processors is not None and self.num_processors < 1:
            raise ConfigError("--num-processors must be >= 1")
        if self.memory_gb <= 0:
            raise ConfigError("--memory-gb must be > 0")
        if self.local_workers < 1:
            raise ConfigError("--local-workers must be >= 1")
        parts = self.walltime.split(":")
        if not 2 <= len(parts) <= 3 or not all(p.isdigit() for p in parts):
            raise ConfigError(f"--walltime must be HH:MM or HH:MM:SS; got '{self.walltime}'")


@dataclass
class RunSummary:
    """What one ``extract-volumes`` invocation did."""

    requested: list[int]
    completed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    elapsed_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["failed"] = {str(k): v for k, v in self.failed.items()}
        return d


def plan_indices(num_volumes: int | None = None, start_index: int = 0,
                 indices: Sequence[int] | None = None) -> list[int]:
    """Explicit ``--indices`` win; else ``range(start_index, start_index + num_volumes)``."""
    if indices:
        out = [int(i) for i in indices]
    else:
        if num_volumes is None or num_volumes < 1:
            raise ConfigError("give --num-volumes N (>= 1) or --indices")
        if start_index < 0:
            raise ConfigError("--start-index must be >= 0")
        out = list(range(start_index, start_index + num_volumes))
    if any(i < 0 for i in out):
        raise ConfigError("volume indices must be >= 0")
    seen: set[int] = set()
    return [i for i in out if not (i in seen or seen.add(i))]


# --------------------------------------------------------------------------------------------------
# One task
# --------------------------------------------------------------------------------------------------


def _write_error(output_dir: str, index: int, exc: BaseException | None, message: str) -> str:
    """Write ``logs/volume_NNNNNN.err`` (traceback, then the one-line summary last) and return it."""
    line = message.strip().splitlines()[0] if message.strip() else "unknown error"
    err = volume_paths(output_dir, index)["error"]
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)) if exc is not None else ""
    text = (f"volume {index} failed on {socket.gethostname()} at "
            f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}\n{tb}{line}\n")
    write_text_atomic(err, text)
    return line


def extract_task(cfg_dict: dict[str, Any], index: int) -> dict[str, Any]:
    """Extract one volume; never raises (a failure is logged to ``logs/`` and reported)."""
    cfg = ExtractionConfig.from_dict(cfg_dict)
    t0 = time.perf_counter()
    if not quick_verify(cfg.output_dir, index):
        return {"index": index, "status": "skipped"}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RandomInitWarning)  # the driver already warned once
            meta = extract_volume(cfg, index)
        return {"index": index, "status": "done", "seconds": meta["timing"]["total_seconds"]}
    except Exception as e:  # isolate the volume: the run goes on
        line = _write_error(cfg.output_dir, index, e, f"{type(e).__name__}: {e}")
        return {"index": index, "status": "failed", "error": line, "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------------------------------
# Clusters
# --------------------------------------------------------------------------------------------------


def _cores(opts: ClusterOptions) -> int:
    """Cores per worker: given, else all local cores (local) or 4 per job (clusters)."""
    if opts.num_processors:
        return int(opts.num_processors)
    return 4 if opts.cluster in ("lsf", "slurm") else int(os.cpu_count() or 1)


def _walltime(opts: ClusterOptions) -> str:
    parts = opts.walltime.split(":")
    if opts.cluster == "slurm":
        return ":".join((parts + ["00"])[:3])
    return ":".join(parts[:2])


def make_jobqueue_cluster(opts: ClusterOptions, output_dir: str | os.PathLike[str], dry_run: bool = False) -> Any:
    """An ``LSFCluster``/``SLURMCluster``: one Dask worker process per job, one volume at a time.

    The worker advertises a ``volume=1`` resource and tasks need one, so a job never runs two
    volumes at once; torch gets all the job's cores.  In a dry run the scheduler binds 127.0.0.1.
    """
    from dask_jobqueue import LSFCluster, SLURMCluster

    logging.getLogger("distributed").setLevel(logging.ERROR)  # scheduler chatter is not for users
    scheduler_options: dict[str, Any] = {"dashboard": False}
    if dry_run:
        scheduler_options["host"] = "127.0.0.1"
    elif opts.interface:
        scheduler_options["interface"] = opts.interface
    prologue = [f"export OMP_NUM_THREADS={_cores(opts)}", *opts.prologue]
    common: dict[str, Any] = {
        "cores": _cores(opts),
        "processes": 1,
        "memory": f"{opts.memory_gb:g}GB",
        "walltime": _walltime(opts),
        "queue": opts.queue,
        "job_name": "dinocell-extract",
        "log_directory": str(Path(output_dir).absolute() / "logs" / "dask"),
        "job_script_prologue": prologue,
        "worker_extra_args": ["--resources", "volume=1"],
        "scheduler_options": scheduler_options,
        "python": sys.executable,
    }
    if opts.interface and not dry_run:
        common["interface"] = opts.interface
    if opts.cluster == "lsf":
        extra = ['-gpu "num=1"'] if opts.gpu else []
        return LSFCluster(project=opts.project, job_extra_directives=extra, **common)
    if opts.cluster == "slurm":
        extra = ["--gres=gpu:1"] if opts.gpu else []
        return SLURMCluster(account=opts.project, job_extra_directives=extra, **common)
    raise ConfigError(f"no job script for --cluster {opts.cluster}")


def job_script(opts: ClusterOptions, output_dir: str | os.PathLike[str]) -> str:
    """The bsub/sbatch script a cluster run would submit (works without the scheduler binaries)."""
    log_dir = Path(output_dir).absolute() / "logs" / "dask"
    fresh = [p for p in (log_dir, *log_dir.parents) if not p.exists()]
    cluster = make_jobqueue_cluster(opts, output_dir, dry_run=True)
    try:
        return str(cluster.job_script())
    finally:
        cluster.close()
        for p in fresh:  # dask-jobqueue creates the log folder; a dry run leaves no trace
            try:
                p.rmdir()
            except OSError:
                pass


def make_local_cluster(opts: ClusterOptions) -> Any:
    """A LocalCluster bound to 127.0.0.1 with the dashboard off; threads in-process for one worker."""
    from distributed import LocalCluster

    processes = opts.local_workers > 1
    kwargs: dict[str, Any] = {"host": "127.0.0.1"} if processes else {}  # in-process: no socket at all
    return LocalCluster(n_workers=opts.local_workers, threads_per_worker=1, processes=processes,
                        dashboard_address=None, memory_limit=0, silence_logs=logging.ERROR, **kwargs)


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def _update_run_record(cfg: ExtractionConfig, indices: list[int], opts: ClusterOptions) -> None:
    """Remember which indices were ever requested (``check`` reports the missing ones)."""
    path = Path(cfg.output_dir) / RUN_RECORD
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        record = {"requested": [], "runs": []}
    record["requested"] = sorted(set(record.get("requested", [])) | set(indices))
    runs = record.get("runs", [])
    runs.append({"timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "host": socket.gethostname(), **provenance(), "cluster": opts.cluster, "n_indices": len(indices),
                 "first_index": min(indices), "last_index": max(indices), "config": cfg.to_dict()})
    record["runs"] = runs[-20:]
    write_json_atomic(path, record)


def _check_inputs(cfg: ExtractionConfig) -> None:
    """Fail in the driver, before any job is queued, on a bad manifest or model path."""
    from dinocell.extract.volumes.manifest import load_manifest

    load_manifest(cfg.manifest)  # type: ignore[arg-type]
    for what, p in (("--backbone", cfg.model.backbone), ("--weights", cfg.model.weights)):
        if p and not Path(p).exists():
            raise DataError(f"{what} not found: {p}")
    if cfg.model.weights and not cfg.model.model_name:
        raise ConfigError("--weights needs --model-name (the timm DINOv3 architecture of the .pth)")


def run_extraction(cfg: ExtractionConfig, indices: Sequence[int], opts: ClusterOptions | None = None,
                   dry_run: bool = False, progress: bool = True, out: TextIO | None = None) -> RunSummary:
    """Extract ``indices`` into ``cfg.output_dir`` on the chosen cluster and return a summary.

    ``dry_run`` writes nothing: it prints the plan (and, for LSF/SLURM, the job script) to ``out``.
    """
    opts = opts or ClusterOptions()
    opts.validate()
    cfg.validate()
    require_volumes(("tensorstore",) + (() if opts.cluster == "serial" else ("dask", "distributed"))
                    + (("dask_jobqueue",) if opts.cluster in ("lsf", "slurm") else ()), "extract-volumes")
    out = out or sys.stdout
    indices = list(indices)
    if not indices:
        raise ConfigError("no volume indices to extract")
    if cfg.gpu is None:
        cfg.gpu = opts.gpu
    cfg.num_threads = cfg.num_threads or max(1, _cores(opts) // max(1, opts.local_workers))
    # Workers may start in another directory (cluster jobs): make every path absolute.
    cfg.output_dir = str(Path(cfg.output_dir).absolute())
    for obj, attr in ((cfg, "manifest"), (cfg.model, "backbone"), (cfg.model, "weights")):
        if getattr(obj, attr) and "://" not in getattr(obj, attr):
            setattr(obj, attr, str(Path(getattr(obj, attr)).absolute()))
    done = [i for i in indices if not quick_verify(cfg.output_dir, i)]
    done_set = set(done)
    todo = [i for i in indices if i not in done_set]
    summary = RunSummary(requested=indices, skipped=done)

    if dry_run:
        print(f"# dinocell extract-volumes dry run: {len(todo)} volume(s) to extract, {len(done)} already "
              f"complete, output {Path(cfg.output_dir).absolute()}", file=sys.stderr if opts.cluster in (
                  "lsf", "slurm") else out)
        if opts.cluster in ("lsf", "slurm"):
            print(job_script(opts, cfg.output_dir), file=out)
        else:
            print(f"# {opts.cluster}: {opts.local_workers} worker(s) on 127.0.0.1, {cfg.num_threads} torch "
                  f"thread(s) each; indices {todo[:20]}{' ...' if len(todo) > 20 else ''}", file=out)
        return summary

    if cfg.manifest is None:
        from dinocell.extract.synthetic_volumes import ensure_default_synthetic

        cfg.manifest = str(ensure_default_synthetic(cfg.output_dir, cfg.output_image_dim))
        log.info("no --manifest: using the synthetic volumes in %s", cfg.manifest)
    _check_inputs(cfg)
    if not (cfg.model.backbone or cfg.model.weights):
        what = f"'{cfg.model.model_name}'" if cfg.model.model_name else "a tiny ViT"
        warnings.warn(f"no --backbone/--weights given: extracting with {what} with RANDOM weights "
                      "(pipeline test only; pass --backbone or --model-name + --weights for real features)",
                      RandomInitWarning, stacklevel=2)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    _update_run_record(cfg, indices, opts)

    t0 = time.perf_counter()
    from tqdm.auto import tqdm

    bar = tqdm(total=len(indices), desc="volumes", unit="vol", disable=not progress, file=sys.stderr)
    bar.update(len(done))

    def record(res: dict[str, Any]) -> None:
        i = int(res["index"])
        if res["status"] == "done":
            summary.completed.append(i)
        elif res["status"] == "skipped":
            summary.skipped.append(i)
        else:
            summary.failed[i] = str(res.get("error", "failed"))
        bar.set_postfix(done=len(summary.completed), failed=len(summary.failed), refresh=False)
        bar.update(1)

    cfg_dict = cfg.to_dict()
    try:
        if opts.cluster == "serial":
            for i in todo:
                record(extract_task(cfg_dict, i))
        else:
            _run_dask(cfg_dict, todo, opts, record)
    finally:
        bar.close()
    summary.completed.sort()
    summary.elapsed_seconds = time.perf_counter() - t0
    return summary


def _run_dask(cfg_dict: dict[str, Any], todo: list[int], opts: ClusterOptions, record: Any) -> None:
    if not todo:
        return
    from distributed import Client, as_completed

    logging.getLogger("distributed").setLevel(logging.ERROR)  # scheduler chatter is not for users
    if opts.cluster == "local":
        cluster = make_local_cluster(opts)
        resources = None
    else:
        cluster = make_jobqueue_cluster(opts, cfg_dict["output_dir"])
        cluster.adapt(minimum=0, maximum=int(opts.max_jobs or min(len(todo), 100)))
        resources = {"volume": 1}
    try:
        with Client(cluster) as client:
            futures = {client.submit(extract_task, cfg_dict, i, key=f"dinocell-volume-{i}", pure=False,
                                     resources=resources, retries=0): i for i in todo}
            for fut in as_completed(list(futures)):
                i = futures[fut]
                try:
                    res = fut.result()
                except Exception as e:  # worker died (OOM, walltime): log it like any failure
                    line = _write_error(cfg_dict["output_dir"], i, e, f"{type(e).__name__}: {e}")
                    res = {"index": i, "status": "failed", "error": line}
                record(res)
    finally:
        cluster.close()
