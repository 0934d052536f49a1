"""Fault injection for resilience tests (off unless the environment asks for it).

``KEEL_FAULT=<when>:<step>:<signal>[:<rank>]`` makes a rank send itself ``<signal>``
(KILL, TERM, INT or STOP) at one point of step ``<step>``:

* ``after``: after finishing the step (before its checkpoint);
* ``in-step``: in the middle of the step, at the forward pass of its first micro-batch;
* ``in-save``: in the checkpoint of that step, after the shards are written and before
  the checkpoint is committed;
* ``saved``: right after the first checkpoint of that step is committed (PPO saves the critic,
  then the policy: a kill between the two);
* ``in-sample``: in the sampling phase of an iterative recipe (iterative DPO, SteerLM 2.0),
  right after the ``<step>``-th chunk this process generated is on disk (counted from 1 in
  each process, so a resumed run that finds chunks on disk counts only the new ones);
* ``generated``: in ``keel generate``, right after the ``<step>``-th batch this process made is
  written (counted from 1 in each process).

Without ``<rank>`` every rank does it; with it only that global rank. Under torchrun the
fault fires in the first attempt only (``TORCHELASTIC_RESTART_COUNT`` 0 or unset), so a
job restarted by ``--max-restarts`` runs through. Tests use it to prove that a killed run
resumes exactly, that an interrupted save leaves the previous checkpoint loadable, and
that the other ranks stop when one of them dies.
"""

from __future__ import annotations

import os
import signal

WHEN = ("after", "in-step", "in-save", "saved", "in-sample", "generated")


def _this_rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def maybe_fail(when: str, step: int) -> None:
    spec = os.environ.get("KEEL_FAULT")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    fault_when, fault_step, sig, *rank = spec.split(":")
    if fault_when not in WHEN:
        raise ValueError(f"KEEL_FAULT={spec}: <when> must be one of {', '.join(WHEN)}")
    if fault_when == when and int(fault_step) == step and (not rank or int(rank[0]) == _this_rank()):
        os.kill(os.getpid(), getattr(signal, f"SIG{sig.upper()}"))
