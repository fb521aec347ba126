"""Run several `lowbitdm` commands in one torchrun job (one process start, one process group).

Usage: ``torchrun --nproc_per_node N tests/distributed/worker.py JOBS.json`` where JOBS.json is a
list of argument lists. The group is joined once here; each stage finds it and uses it.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from lowbitdm_cli.cli import app

if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    for args in json.loads(open(sys.argv[1]).read()):
        try:
            code = app(args, standalone_mode=False)  # a one-line error returns its exit code
        except SystemExit as e:
            code = e.code
        if code:
            sys.exit(code)  # stop the job with it
        dist.barrier()
    dist.destroy_process_group()
