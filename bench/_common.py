"""The results files of the benchmarks: the machine description saved with them, where they go, and
writing them. (The harness, harness.py, uses these; ``python -m fastmtl bench`` recognises a bench/
folder by this file.)"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess

import fastmtl
import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def cpu_model() -> str:
    """lscpu's model name where there is one; platform.processor() is often empty on Linux."""
    try:
        output = subprocess.run(["lscpu"], check=False, capture_output=True, text=True, timeout=5).stdout
        for line in output.splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def machine_description(device: str) -> dict:
    info = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "fastmtl_build_info": fastmtl.build_info(),
        "device": device,
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def default_output_path(bench: str, device: str, small: bool, suffix: str = "") -> str:
    name = f"{bench}-" + (socket.gethostname() or "cpu")
    if torch.device(device).type != "cpu":
        name += f"-{torch.device(device).type}"
    if small:
        name += "-small"  # so a smoke run never overwrites real results
    return os.path.join(RESULTS_DIR, name + suffix + ".json")


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")
