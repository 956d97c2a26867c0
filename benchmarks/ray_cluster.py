"""Join an existing Ray cluster: start one on the loopback address, run the smoke experiment
against it (`simulation.ray_address`), check the run, stop the cluster.

    python benchmarks/ray_cluster.py --json results/ray_cluster.json

The cluster is started with `ray start --head` as a user would on a head node (with --block, in
its own process group, so that stopping it stops only this cluster, not other Ray instances on
the machine); the simulation's Ray driver then connects to it instead of starting a private Ray
instance. The cluster is stopped whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedexits.errors import exits_2_on_bad_input
from fedexits.report.files import atomic_write_json


def ray_command() -> str:
    found = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    if not Path(found).exists():
        raise SystemExit("error: the `ray` command is not installed next to this Python")
    return found


def wait_for_port(port: int, process: subprocess.Popen, timeout_s: float) -> None:
    """Until the cluster's GCS accepts connections (or the head process died)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"error: `ray start --head` exited with code {process.returncode}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                time.sleep(2)  # the GCS listens before the raylet is ready
                return
        time.sleep(0.5)
    raise SystemExit(f"error: the Ray head did not listen on port {port} within {timeout_s:.0f} s")


@exits_2_on_bad_input
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=6391)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = parser.parse_intermixed_args()  # options anywhere among the Hydra overrides
    ray = ray_command()
    address = f"127.0.0.1:{args.port}"
    out = Path(tempfile.mkdtemp(prefix="fedexits-ray-cluster-"))
    result: dict = {"address": address, "run_dir": str(out)}
    started = time.perf_counter()
    head = subprocess.Popen(
        [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={args.port}",
         "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_for_port(args.port, head, timeout_s=120)
        result["ray_start_s"] = time.perf_counter() - started
        started = time.perf_counter()
        run = subprocess.run(
            [sys.executable, "-m", "fedexits.simulate", "+experiment=smoke",
             f"simulation.ray_address={address}", f"hydra.run.dir={out}", *args.overrides],
            capture_output=True,
            text=True,
            env={**os.environ, "RAY_ADDRESS": address},
        )  # fmt: skip
        result["simulate_s"] = time.perf_counter() - started
        result["exit_code"] = run.returncode
        summary_path = out / "summary.json"
        if summary_path.exists():
            summary = json.loads(summary_path.read_text())
            result["status"] = summary.get("status")
            result["users_ok"] = summary["users"]["ok"]
        if run.returncode != 0:
            result["stderr_tail"] = run.stderr[-2000:]
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
        forget_cluster(args.port)
    atomic_write_json(result, args.json)
    print(json.dumps(result, indent=2))
    sys.exit(0 if result.get("exit_code") == 0 and result.get("status") == "ok" else 1)


def forget_cluster(port: int) -> None:
    """Remove the address file `ray start` wrote (`ray stop` would; a killed head does not): a
    stale one makes every later `ray.init()` without an address, such as Flower's deployment
    runtime under `flwr run`, wait forever for this dead cluster."""
    path = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
    if path.is_file() and path.read_text().strip().endswith(f":{port}"):
        path.unlink()


if __name__ == "__main__":
    sys.exit(main())
