"""Which GPU a job uses.

Snakemake only counts the ``gpu`` resource (``--resources gpu=4`` lets at most 4 GPU jobs run at once); it never
tells a job which device to take. So a job leases one: it takes an exclusive ``flock`` on one slot file per device
and makes only that device visible (``CUDA_VISIBLE_DEVICES``) before torch initialises CUDA. The kernel releases the
lock when the process ends, however it ends (SIGKILL included), so a dead job never holds a device.

- A device list the job inherited is respected: SLURM sets ``CUDA_VISIBLE_DEVICES`` to the job's allocation, and a
  user may set it to keep ifcl off some devices. One inherited device is used as it is; of several (a cluster job
  that runs several jobs at once, ``--group-components``), the job leases one (lock files of the SLURM job's own).
- The devices to lease are ``IFCL_GPUS`` (comma-separated ids) if set, else every NVIDIA GPU of the machine
  (``/proc/driver/nvidia/gpus``: counted without initialising CUDA).
- No GPU at all: the job runs on the CPU and says so in its log.

Slot files live in ``IFCL_GPU_LOCK_DIR`` (default: a per-user folder in the system's temporary directory), shared by
every workflow run on the machine, so two runs started separately never share a device either.
"""
from __future__ import annotations

import fcntl
import os
import random
import tempfile
import time
from pathlib import Path

NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")
_held: dict[str, int] = {}  # device id -> open lock file descriptor, kept for the life of the process


def lock_dir() -> Path:
    """The slot files' folder; in a SLURM job one of its own (device ids there are the job's, numbered from 0)."""
    if os.environ.get("IFCL_GPU_LOCK_DIR"):
        return Path(os.environ["IFCL_GPU_LOCK_DIR"])
    base = Path(tempfile.gettempdir()) / f"ifcl-gpu-locks-{os.getuid()}"
    return base / f"slurm-{os.environ['SLURM_JOB_ID']}" if os.environ.get("SLURM_JOB_ID") else base


def machine_gpus() -> list[str]:
    """Ids of the devices jobs may lease: ``IFCL_GPUS``, else one per NVIDIA GPU of the machine."""
    given = os.environ.get("IFCL_GPUS")
    if given is not None:
        return [d.strip() for d in given.split(",") if d.strip()]
    return [str(i) for i in range(len(list(NVIDIA_GPUS.iterdir())))] if NVIDIA_GPUS.is_dir() else []


def _try_lock(device: str) -> int | None:
    folder = lock_dir()
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / f"gpu{device}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for a curious user
    return fd


def lease(devices: list[str], timeout: float = 24 * 3600, log=print) -> str:
    """Lock one of ``devices`` (trying them from a random start) and return its id. If all are held (another
    workflow run on this machine uses them), wait, saying so, until one is free or ``timeout`` seconds passed."""
    if not devices:
        raise ValueError("no device to lease")
    start, waited_since = random.randrange(len(devices)), None
    while True:
        for device in devices[start:] + devices[:start]:
            fd = _try_lock(device)
            if fd is not None:
                _held[device] = fd
                return device
        now = time.monotonic()
        if waited_since is None:
            waited_since = now
            log(f"all GPUs {devices} are leased by other jobs (lock files in {lock_dir()}); waiting for one")
        if now - waited_since > timeout:
            raise TimeoutError(f"no GPU of {devices} became free in {timeout:.0f} s (lock files in {lock_dir()})")
        time.sleep(0.5 + random.random())


def release(device: str) -> None:
    fd = _held.pop(device, None)
    if fd is not None:
        os.close(fd)


def claim_device(log=print) -> str:
    """Call once per job before CUDA is initialised. Returns "cuda" (one device made visible: inherited, or leased
    here) or "cpu" (no GPU on this machine)."""
    if _held:
        return "cuda"
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    if inherited is not None:
        devices = [d.strip() for d in inherited.split(",") if d.strip()]
        if len(devices) > 1 and "-1" not in devices:  # several given (a cluster job running several jobs at once)
            device = lease(devices, log=log)
            os.environ["CUDA_VISIBLE_DEVICES"] = device
            log(f"GPU: leased device {device} of the inherited CUDA_VISIBLE_DEVICES={inherited!r}")
            return "cuda"
        log(f"GPU: using the inherited CUDA_VISIBLE_DEVICES={inherited!r} (nothing leased)")
        return "cuda" if devices and devices != ["-1"] else "cpu"
    devices = machine_gpus()
    if not devices:
        log("no GPU on this machine: running on CPU")
        return "cpu"
    device = lease(devices, log=log)
    os.environ["CUDA_VISIBLE_DEVICES"] = device
    log(f"GPU: leased device {device} of {devices} (CUDA_VISIBLE_DEVICES={device})")
    return "cuda"
