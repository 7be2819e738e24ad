"""Launchers: train a list of runs one after another, on N local worker processes, or as cluster jobs.

A launcher takes :class:`Job` s (a name, a picklable task, the run folder) and a *work* function
(module level, so that it pickles by reference: `work(task) -> dict`, which catches the errors the
user can fix itself and reports them in the dict it returns) and calls ``on_done(name, record)`` in
this process as each job ends, in the order they end. `record` is what the job wrote into
``<folder>/launch.json``: where and with how many threads it ran, and `result`, what `work` returned
(None when the process died: `error` then says why).

- :class:`LocalLauncher` with jobs = 1 calls `work` in this process, one job after another, with this
  process's threads as they are. With jobs = N > 1 it keeps N worker processes busy
  (``python -c ... worker_main``, a fresh interpreter each), each with a thread share
  k = max(1, cores // N) set explicitly: OMP_NUM_THREADS = MKL_NUM_THREADS = k in its environment
  before torch is imported, and torch.set_num_threads(k). N trainings then use the cores once, not
  N times over. A worker's standard output and error go to ``<folder>/launch.log``.
- :class:`SubmititLauncher` submits every job at once through submitit's AutoExecutor (SLURM, or its
  local executor) with the partition, time limit, GPUs and CPUs given; a job sets its thread share to
  its CPUs (`cpus`, else the CPUs it may run on). submitit is optional: ``pip install vkd-pyro[cluster]``.

Options are checked before anything runs (:func:`make_launcher`): one the chosen launcher would ignore
is refused in one line naming it. `--launcher local` reads `--jobs` and ignores every `--slurm-*` and
`--submitit-cluster`; `--launcher submitit` ignores `--jobs` (the cluster runs its jobs side by side).
On a machine without SLURM (no `srun` on PATH, so submitit's AutoExecutor picks its local executor)
submitit is refused unless `--submitit-cluster local` asks for the local executor, which runs every
job at once on this machine; that executor reads `--slurm-time` (its timeout), `--slurm-gpus`
(CUDA_VISIBLE_DEVICES) and `--slurm-cpus` (the thread share) and ignores `--slurm-partition`, which
is refused there. `--submitit-cluster slurm` without `sbatch` on PATH is refused.

Stopping: SIGHUP, SIGINT or SIGTERM to this process while workers run sends SIGTERM to every worker
(SLURM: cancels the jobs, which sends them SIGTERM), whose training writes its resume state last.pt
and marks its run interrupted; when all have ended, :class:`~vkd_pyro.errors.Interrupted` is raised
(exit status 128 + signal) with one line saying how to go on: the same command again, which resumes
the stopped runs and starts the others. A signal that arrives while the launcher starts a worker or
records a finished one is acted on right after, so no worker goes untracked. On Linux a local worker
also gets SIGTERM when the launcher dies outright (SIGKILL; prctl PR_SET_PDEATHSIG), so that no
training outlives its sweep.
"""

from __future__ import annotations

import ctypes
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from vkd_pyro.errors import Interrupted, UserError
from vkd_pyro.files import write_bytes, write_json

RECORD = "launch.json"  # what a job writes into its run folder
WORKER_LOG = "launch.log"  # a local worker's stdout and stderr
TASK_FILE = "launch_task.pkl"  # (work, job, threads) for a local worker; removed when it ends
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
POLL_SECONDS = 0.2
STOP_GRACE_SECONDS = 300  # how long stopped workers may take to write their resume state
STOP_SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGTERM)  # what stops a launcher and its workers
PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when its parent ends


@dataclass
class Job:
    """One run for a launcher: `name` (unique), `task` (picklable: the argument of `work`), `folder`
    (the run folder: its launch.json, launch.log) and `label`, the status line said as it starts."""

    name: str
    task: Any
    folder: Path
    label: str = ""


def available_cores() -> int:
    """The CPUs this process may run on (its affinity mask: taskset, cgroups, SLURM), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def thread_share(jobs: int, cores: Optional[int] = None) -> int:
    """k = max(1, cores // jobs): the threads each of `jobs` concurrent workers gets."""
    return max(1, (cores or available_cores()) // jobs)


def thread_environment(threads: int) -> dict:
    """The environment variables that fix OpenMP's and MKL's thread counts to `threads`."""
    return {name: str(threads) for name in THREAD_VARIABLES}


def execute(work: Callable[[Any], dict], job: Job, threads: Optional[int], launcher: str) -> dict:
    """Run `work(job.task)` with `threads` torch threads (None: as they are) and write
    ``<job.folder>/launch.json``: the launcher, host, pid, torch.get_num_threads(), the thread
    variables, start and end (Unix time), wall seconds and `result`, what `work` returned. Returns
    that record."""
    if threads is not None:
        os.environ.update(thread_environment(threads))
        torch.set_num_threads(threads)
    record = {"launcher": launcher, "host": socket.gethostname(), "pid": os.getpid(),
              "threads": torch.get_num_threads(), **{v: os.environ.get(v) for v in THREAD_VARIABLES},
              "started_at": time.time()}
    started = time.perf_counter()
    result = work(job.task)
    record.update(ended_at=time.time(), wall_seconds=time.perf_counter() - started, result=result, error=None)
    Path(job.folder).mkdir(parents=True, exist_ok=True)
    write_json(Path(job.folder) / RECORD, record)
    return record


def _end_with_launcher(launcher_pid: int) -> bool:
    """Ask the kernel (Linux: prctl PR_SET_PDEATHSIG) to send this worker SIGTERM when the launcher
    ends, even by SIGKILL, so that its training writes last.pt and stops rather than outlive the
    sweep. False when the launcher `launcher_pid` has already gone."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    return os.getppid() == launcher_pid


def worker_main(task_file: str, launcher_pid: int) -> int:
    """The entry point of a local worker process: load (work, job, threads) from `task_file`, run
    :func:`execute`. Exit status 0, 128 + signal when training was interrupted (resume state
    written) or the launcher `launcher_pid` had gone before it began, 1 on any other error (its
    traceback is in launch.log)."""
    if not _end_with_launcher(launcher_pid):
        return 128 + signal.SIGTERM
    with open(task_file, "rb") as f:
        work, job, threads = pickle.load(f)
    try:
        execute(work, job, threads, "local")
    except Interrupted as exc:
        print(exc, file=sys.stderr)
        return exc.exit_code
    return 0


class _StopSignals:
    """While active, the first SIGHUP, SIGINT or SIGTERM is noted in `signum` (later ones are
    ignored: the stop is under way); the launcher's loop acts on it between its steps. Outside the
    main thread, signals stay as they are."""

    def __init__(self):
        self.signum: Optional[int] = None
        self.previous: dict = {}

    def __enter__(self) -> "_StopSignals":
        try:
            for sig in STOP_SIGNALS:
                self.previous[sig] = signal.signal(sig, self._note)
        except ValueError:  # not the main thread
            pass
        return self

    def _note(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def stopped(self, what: str, pending: int) -> Interrupted:
        """The exception that ends the launcher (exit status 128 + signal, one line saying how to go on):
        `what` the stopped jobs did, `pending` jobs not started."""
        rest = f"; {pending} not started" if pending else ""
        return Interrupted(f"sweep stopped by {signal.Signals(self.signum).name}: {what}{rest}; to go on, run the "
                           "same command again (it resumes the stopped runs from last.pt and trains the rest)",
                           self.signum)


def _failed_record(message: str) -> dict:
    return {"result": None, "error": message}


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


class LocalLauncher:
    """`jobs` concurrent trainings on this machine, each with k = max(1, cores // jobs) threads
    (see the module docstring)."""

    def __init__(self, jobs: int = 1):
        if jobs < 1:
            raise UserError(f"--jobs: must be >= 1, got {jobs}")
        self.jobs = jobs
        self.threads = thread_share(jobs)

    def describe(self) -> str:
        if self.jobs == 1:
            return f"1 job in this process ({torch.get_num_threads()} threads)"
        return f"{self.jobs} local workers, {self.threads} thread(s) each ({available_cores()} cores)"

    def run(self, jobs: Sequence[Job], work: Callable[[Any], dict], on_done: Callable[[str, dict], None],
            say: Callable[[str], None] = print) -> None:
        if self.jobs == 1:
            for job in jobs:
                say(job.label or job.name)
                on_done(job.name, execute(work, job, None, "local"))
            return
        pending, running = deque(jobs), {}
        with _StopSignals() as stop:
            while (pending or running) and stop.signum is None:
                while pending and len(running) < self.jobs and stop.signum is None:
                    job = pending.popleft()
                    process = self._start(work, job)
                    running[process] = job
                    say(f"{job.label or job.name} (worker pid {process.pid}, {self.threads} thread(s))")
                for process in [p for p in running if p.poll() is not None]:
                    job = running.pop(process)
                    on_done(job.name, self._collect(process, job))
                time.sleep(POLL_SECONDS)
            if stop.signum is None:
                return
            say(f"stopping {len(running)} worker(s) on {signal.Signals(stop.signum).name}; "
                "each writes its resume state (last.pt)")
            saved, cut = self._stop(running, on_done)
            what = f"{saved} run(s) stopped and wrote their resume state last.pt"
            raise stop.stopped(what + (f", {cut} stopped before they could" if cut else ""), len(pending))

    def _stop(self, running: dict, on_done: Callable[[str, dict], None]) -> tuple[int, int]:
        """SIGTERM to each worker, then wait for them (STOP_GRACE_SECONDS, then SIGKILL). A worker that
        ended otherwise than by the stop (finished, failed) goes to `on_done`. Returns how many wrote
        their resume state (exit status 128 + signal: training was interrupted) and how many the
        signal ended before they could (still starting, or killed)."""
        for process in running:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline, saved, cut = time.monotonic() + STOP_GRACE_SECONDS, 0, 0
        for process, job in running.items():
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            record = self._collect(process, job)
            if process.returncode > 128:
                saved += 1
            elif process.returncode < 0:
                cut += 1
            else:  # it ended before the signal reached it
                on_done(job.name, record)
        return saved, cut

    def _start(self, work, job: Job) -> subprocess.Popen:
        folder = Path(job.folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / RECORD).unlink(missing_ok=True)  # a record left by an earlier attempt
        write_bytes(folder / TASK_FILE, pickle.dumps((work, job, self.threads)))
        env = {**os.environ, **thread_environment(self.threads)}
        code = ("import sys; from vkd_pyro.analysis.launch import worker_main; "
                "sys.exit(worker_main(sys.argv[1], int(sys.argv[2])))")
        with open(folder / WORKER_LOG, "ab") as log:
            # A session of its own: a Ctrl-C or a hangup at the terminal reaches a worker through the
            # launcher only, as one SIGTERM (a second SIGINT would end training without its resume state).
            return subprocess.Popen([sys.executable, "-c", code, str(folder / TASK_FILE), str(os.getpid())], env=env,
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)

    @staticmethod
    def _collect(process: subprocess.Popen, job: Job) -> dict:
        folder = Path(job.folder)
        (folder / TASK_FILE).unlink(missing_ok=True)
        code = process.returncode
        if code == 0 and (folder / RECORD).is_file():
            return json.loads((folder / RECORD).read_text())
        log = (folder / WORKER_LOG).read_text(errors="replace") if (folder / WORKER_LOG).is_file() else ""
        if code is not None and (code > 128 or code < 0):
            why = f"worker stopped by signal {abs(code) - 128 if code > 128 else -code}"
        else:
            why = f"worker exited with status {code}"
        return _failed_record(f"{why} ({_last_line(log) or 'no output'}; see {folder / WORKER_LOG})")


def parse_minutes(text: str) -> int:
    """A SLURM time limit as minutes: `MINUTES`, `HH:MM:SS` or `D-HH:MM[:SS]` (seconds round up)."""
    original = text = str(text).strip()
    try:
        days = 0
        if "-" in text:
            day_text, text = text.split("-", 1)
            days = int(day_text)
        parts = [int(p) for p in text.split(":")]
        if len(parts) == 1:
            hours, minutes, seconds = 0, parts[0], 0
        elif len(parts) == 2:
            hours, minutes, seconds = (parts[0], parts[1], 0) if days else (0, parts[0], parts[1])
        elif len(parts) == 3:
            hours, minutes, seconds = parts
        else:
            raise ValueError
    except ValueError:
        raise UserError(f"--slurm-time {original}: write MINUTES, HH:MM:SS or D-HH:MM[:SS]") from None
    total = days * 1440 + hours * 60 + minutes + (1 if seconds else 0)
    if min(days, hours, minutes, seconds) < 0 or total < 1:
        raise UserError(f"--slurm-time {original}: at least one minute")
    return total


class SubmititLauncher:
    """Every job at once as a cluster job through submitit (see the module docstring).

    `folder`: submitit's own files (pickled jobs, logs per job id); `cluster`: "slurm", "local" or
    None (SLURM where `srun` is found; without SLURM refused, since the runs would go to the local
    executor unasked); `partition` (SLURM only), `time_minutes`, `gpus` (per job), `cpus` (per job;
    also its thread share), `poll`: seconds between looks at the jobs' states (default 1 for the local
    executor, 10 for SLURM). Options the executor would ignore are refused in one line.
    """

    def __init__(self, folder, cluster: Optional[str] = None, partition: Optional[str] = None,
                 time_minutes: int = 240, gpus: int = 0, cpus: Optional[int] = None,
                 poll: Optional[float] = None):
        try:
            import submitit  # optional dependency (the `cluster` extra)
        except ImportError:
            raise UserError("--launcher submitit: submitit is not installed (pip install vkd-pyro[cluster])") from None
        if gpus < 0 or (cpus is not None and cpus < 1):
            raise UserError(f"--slurm-gpus >= 0 and --slurm-cpus >= 1, got {gpus} and {cpus}")
        self.submitit, self.folder = submitit, Path(folder)
        self.cluster = self._check_cluster(cluster, partition)
        self.parameters = {"name": "vkd-pyro", "timeout_min": time_minutes, "gpus_per_node": gpus,
                           "tasks_per_node": 1, "nodes": 1}
        if cpus is not None:
            self.parameters["cpus_per_task"] = cpus
        if partition:
            self.parameters["slurm_partition"] = partition
        self.cpus, self.poll = cpus, poll or (1.0 if self.cluster == "local" else 10.0)

    def _check_cluster(self, cluster: Optional[str], partition: Optional[str]) -> str:
        """The executor the jobs go to, or a one-line UserError: SLURM without sbatch; the local executor
        unasked (no SLURM here), or with --slurm-partition, which it ignores."""
        asked = cluster is not None
        if not asked:
            try:
                cluster = self.submitit.AutoExecutor.which()  # slurm where srun is found, else local
            except RuntimeError as exc:
                raise UserError(f"--launcher submitit: {exc}") from None
        if cluster == "slurm" and shutil.which("sbatch") is None:
            raise UserError("--launcher submitit: no SLURM on this machine to submit to (sbatch is not on PATH)")
        if cluster != "local":
            return cluster
        ignored = ", which ignores --slurm-partition" if partition else ""
        if not asked:
            raise UserError("--launcher submitit: no SLURM on this machine (srun is not on PATH), so the runs would go "
                            f"to submitit's local executor, all at once on this machine{ignored}; add --submitit-cluster "
                            "local for that, or use --launcher local --jobs N")
        if partition:
            raise UserError("--submitit-cluster local ignores --slurm-partition (a SLURM partition): leave it out")
        return cluster

    def _executor(self):
        """submitit's AutoExecutor with the parameters (made when jobs are submitted: it creates its folder)."""
        try:
            executor = self.submitit.AutoExecutor(folder=str(self.folder / "%j"), cluster=self.cluster)
        except (ValueError, RuntimeError) as exc:
            raise UserError(f"--launcher submitit: {exc}") from None
        executor.update_parameters(**self.parameters)
        return executor

    def describe(self) -> str:
        threads = f"{self.cpus} thread(s) each" if self.cpus else "threads = the CPUs each may run on"
        limit = f"at most {self.parameters['timeout_min']} min each"
        if self.cluster == "local":
            return (f"submitit's local executor (--submitit-cluster local): every run at once on this machine, "
                    f"{threads}, {limit}")
        return f"submitit ({self.cluster}), one job per run, {threads}, {limit}"

    def run(self, jobs: Sequence[Job], work: Callable[[Any], dict], on_done: Callable[[str, dict], None],
            say: Callable[[str], None] = print) -> None:
        if not jobs:
            return
        for job in jobs:
            (Path(job.folder) / RECORD).unlink(missing_ok=True)
        executor = self._executor()
        with executor.batch():
            submitted = [executor.submit(_cluster_job, work, job, self.cpus) for job in jobs]
        by_id = {id(s): job for s, job in zip(submitted, jobs)}
        for s, job in zip(submitted, jobs):
            say(f"{job.label or job.name} (submitted as job {s.job_id})")
        pending, next_look = list(submitted), 0.0
        with _StopSignals() as stop:
            while pending and stop.signum is None:
                if time.monotonic() >= next_look:
                    for done in [s for s in pending if s.done()]:
                        pending.remove(done)
                        on_done(by_id[id(done)].name, self._collect(done, by_id[id(done)]))
                    next_look = time.monotonic() + self.poll
                time.sleep(POLL_SECONDS)
            if stop.signum is None:
                return
            say(f"stopping {len(pending)} job(s) on {signal.Signals(stop.signum).name}; "
                "each writes its resume state (last.pt)")
            self._stop(pending)
            raise stop.stopped(f"{len(pending)} job(s) stopped (training writes its resume state last.pt)", 0)

    def _stop(self, pending: list) -> None:
        """SIGTERM to the jobs (the local executor's controller forwards it to its job; SLURM: scancel,
        which sends it), then wait for them to end, STOP_GRACE_SECONDS at most."""
        for s in pending:
            if self.cluster == "local":
                os.kill(int(s.job_id), signal.SIGTERM)  # a local job's id is its controller's pid
            else:
                s.cancel(check=False)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while time.monotonic() < deadline and not all(s.done() for s in pending):
            time.sleep(min(self.poll, 1.0))

    def _collect(self, done, job: Job) -> dict:
        try:
            return done.result()
        except self.submitit.core.utils.UncompletedJobError as exc:
            return _failed_record(f"job {done.job_id} failed ({_last_line(str(exc)) or exc.__class__.__name__}; "
                                  f"see {done.paths.stderr})")


def _cluster_job(work: Callable[[Any], dict], job: Job, cpus: Optional[int]) -> dict:
    """What a cluster job runs: `work` with its CPUs' threads (`cpus`, else those it may run on)."""
    return execute(work, job, cpus or available_cores(), "submitit")


SUBMITIT_OPTIONS = {"cluster": "--submitit-cluster", "partition": "--slurm-partition",
                    "time_minutes": "--slurm-time", "gpus": "--slurm-gpus", "cpus": "--slurm-cpus"}


def make_launcher(launcher: str = "local", jobs: Optional[int] = None, folder=None,
                  **options) -> "LocalLauncher | SubmititLauncher":
    """`local` (with `jobs` workers, default 1) or `submitit` (its files in `folder`; `options`: the
    keyword arguments of :class:`SubmititLauncher`, None where not given, :data:`SUBMITIT_OPTIONS`).
    An option the launcher would ignore is refused in one line naming it (the module docstring)."""
    given = [SUBMITIT_OPTIONS[key] for key, value in options.items() if value is not None]
    if launcher == "local":
        if given:
            raise UserError(f"--launcher local ignores {', '.join(given)}: {'they are' if len(given) > 1 else 'it is'} "
                            "for --launcher submitit")
        return LocalLauncher(1 if jobs is None else jobs)
    if launcher == "submitit":
        if jobs is not None:
            raise UserError("--launcher submitit ignores --jobs: the cluster runs its jobs side by side "
                            "(--jobs is for --launcher local)")
        return SubmititLauncher(folder, **{key: value for key, value in options.items() if value is not None})
    raise UserError(f"--launcher: local or submitit, got {launcher}")
