"""How fast models score examples, and on what: the figure behind distill's inference speedup.

A teachers run times its ensemble once (train-teachers, import-teachers) and records the figure
with the machine it was measured on (`speed_record`); a distill run on the same machine, device,
thread count and batch size reuses it (`recorded_speed`) and times only its student. A figure
from elsewhere, or none (runs made before the record existed), is measured again.
"""

from __future__ import annotations

import math
import platform
import socket
import time
from typing import Any

import torch

from distillrun.core.train import predict

# Examples timed: a rate needs one full batch (of the default 1,024; passes are repeated to at
# least 50 ms), and timing 5 CNNs over MNIST's 10,000 test images three times took a minute.
TIMED_EXAMPLES = 1024
ROUNDS = 3  # best of 3: another process taking the cores for a moment does not count


def machine(device: torch.device, batch_size: int, examples: int) -> dict[str, Any]:
    """What an examples/s figure depends on besides the models: host, CPU, device, torch and its
    threads, batch size and how many examples were timed. Equal records: comparable figures."""
    record: dict[str, Any] = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "device": device.type,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "eval_batch_size": batch_size,
        "examples": examples,
    }
    if device.type == "cuda":
        record["device"] = f"cuda ({torch.cuda.get_device_name(device)})"
    return record


def seconds_per_pass(
    models: list[torch.nn.Module], x: torch.Tensor, batch_size: int, device: torch.device
) -> float:
    """Seconds for all of `models` to score `x` once (passes repeated to at least 50 ms)."""
    passes, start = 0, time.perf_counter()
    while passes == 0 or time.perf_counter() - start < 0.05:  # small test sets: repeat
        for model in models:
            predict(model, x, batch_size)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        passes += 1
    return (time.perf_counter() - start) / passes


def best_seconds(
    groups: dict[str, list[torch.nn.Module]],
    x: torch.Tensor,
    batch_size: int,
    device: torch.device,
) -> dict[str, float]:
    """The best of `ROUNDS` passes of each group of models over `x`, the groups in alternation
    (so a busy moment of the machine hits them alike)."""
    best = dict.fromkeys(groups, math.inf)
    for _ in range(ROUNDS):
        for name, models in groups.items():
            best[name] = min(best[name], seconds_per_pass(models, x, batch_size, device))
    return best


def timed_inputs(x: torch.Tensor) -> torch.Tensor:
    return x[:TIMED_EXAMPLES]


def speed_record(
    models: list[torch.nn.Module], x: torch.Tensor, batch_size: int, device: torch.device
) -> dict[str, Any]:
    """A teachers run's record of its ensemble: examples/s of all `models` together on the
    first `TIMED_EXAMPLES` of `x`, and the machine it was measured on."""
    x = timed_inputs(x)
    seconds = best_seconds({"ensemble": models}, x, batch_size, device)["ensemble"]
    return {
        "examples_per_s": len(x) / seconds,
        "members": len(models),
        "machine": machine(device, batch_size, len(x)),
    }


def recorded_speed(records: list[Any], here: dict[str, Any]) -> float | None:
    """The examples/s of the ensemble of several runs' ensembles from their records (their
    times per example add up), or None when any run has none or measured it elsewhere than
    `here` (a `machine` record)."""
    if not records or any(not isinstance(r, dict) or r.get("machine") != here for r in records):
        return None
    try:
        rates = [float(r["examples_per_s"]) for r in records]
        return rates[0] if len(rates) == 1 else 1 / sum(1 / rate for rate in rates)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
