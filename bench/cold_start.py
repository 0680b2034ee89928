"""The cold-start part of `make bench`: each front door started fresh N times, the first correct answer
broken into its phases (issue 24).

Runs first, before the benchmark starts any other server. `load_tests.cold_start` does the measuring
(process start to the first correct embedding, polled from outside; the phases from the start-up log
of the process that loads the models); this part adds the goal and the table of bench.report.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from bench import vllm_peer
from load_tests.cold_start import PHASE_NAMES, measure, phase_table, reference_vector

COLD_START_GOAL_S = 5.0  # median first answer, each front door, this project's 2-core CPU machine
FRONT_DOORS = {"service": "`bentoml serve`", "runpod": "RunPod worker (`/runsync`)"}


def cold_start_part(args: argparse.Namespace) -> dict[str, Any]:
    """Medians and phases of `args.cold_start_runs` fresh starts of each front door."""
    reference = reference_vector()
    min_cosine = 0.99 if args.device.startswith("cuda") else 0.999  # fp16 on a GPU
    part: dict[str, Any] = {"runs": args.cold_start_runs, "model": os.environ.get("MODEL_NAMES") or "the embedded default",
                            "load_average_at_start": [round(x, 2) for x in os.getloadavg()], "phases": list(PHASE_NAMES)}
    for kind in FRONT_DOORS:
        print(f"cold start: {args.cold_start_runs} fresh starts of the {kind} …", flush=True)
        part[kind] = measure(kind, args.cold_start_runs, reference, args.logs, timeout=180.0, min_cosine=min_cosine)
    if getattr(args, "vllm_python", None):
        from bench.baselines import served_model

        print(f"cold start: vLLM, one start with an empty compile cache, then {args.cold_start_runs} …", flush=True)
        part["vllm"] = vllm_peer.cold_start(args.vllm_python, served_model()[0], args.cold_start_runs, reference,
                                            args.logs, min_cosine)
    part["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    part["goals"] = {f"cold start {kind}: median first answer s (goal <= {COLD_START_GOAL_S})":
                     part[kind]["first_answer_s"]["median"] for kind in FRONT_DOORS}
    return part


def cold_start_table(part: dict[str, Any]) -> list[str]:
    """bench.report's lines for the part."""
    if not any(kind in part for kind in FRONT_DOORS):
        return []
    load = part.get("load_average_at_start", [None])[0]
    lines = ["", f"Cold start: process start to the first correct embedding, median of {part['runs']} "
                 f"({part['model']}; load average {load} at the start)", "", phase_table(part)]
    if "vllm" in part:
        v = part["vllm"]
        lines.append(f"| vLLM `api_server --runner pooling`: compile cache filled / empty (first start) | "
                     f"{v['first_answer_s']['median']:.2f} / {v['first_start_s']:.2f} | – | – | – | – | – |")
    return lines
