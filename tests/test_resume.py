"""Bit-exact resume in a fresh process.

Run A trains 20 steps without stopping.  Run B trains 10 steps, saves at step
10 and exits; run C, a new process, restores and trains steps 11..20.  The
losses of B then C must equal A's exactly, and the final parameters must be
bit-identical.  The loop draws from python ``random``, numpy and torch
(input noise, Dropout), steps a LR scheduler, and reads a shuffling
StatefulDataLoader of 8 batches an epoch, so 20 steps cross two epoch ends
and the save falls in the middle of an epoch.
"""

from __future__ import annotations

import subprocess
import textwrap

import torch

from helpers.procs import finish, spawn

TRAIN = textwrap.dedent('''
    import random
    import sys
    import warnings

    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import TensorDataset
    from torchdata.stateful_dataloader import StatefulDataLoader

    from asyncckpt import CheckpointManager, TrainState

    warnings.filterwarnings("ignore")
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)

    root, out, stop_step, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)

    g = torch.Generator().manual_seed(1234)
    data = TensorDataset(torch.randn(32, 6, generator=g), torch.randn(32, 1, generator=g))
    loader = StatefulDataLoader(data, batch_size=4, shuffle=True, num_workers=0)   # 8 batches
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.02)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
    extra = {"epoch": 0}
    state = TrainState(model=model, optimizer=opt, scheduler=sched, dataloader=loader, extra=extra)

    losses = {}
    with CheckpointManager(root) as mgr:
        step = mgr.restore(state) if mode == "resume" else 0
        restored_from = step
        it = iter(loader)
        while step < stop_step:
            try:
                x, y = next(it)
            except StopIteration:
                extra["epoch"] += 1
                it = iter(loader)
                continue
            x = x + 0.05 * torch.randn_like(x) * random.random()
            x = x + float(np.random.normal(0.0, 0.01))
            model.train()
            loss = F.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            losses[step] = loss.item().hex()
            if mode == "save" and step == stop_step:
                mgr.save(step, state, metrics={"loss": loss.item()}, epoch=extra["epoch"])

    torch.save({"losses": losses, "params": model.state_dict(), "epoch": extra["epoch"],
                "restored_from": restored_from}, out)
''')


def _run(script, *args: object) -> subprocess.Popen:
    return spawn(script, *args)


def test_resume_in_a_fresh_process_is_bit_exact(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    out_a, out_b, out_c = (tmp_path / f"{n}.pt" for n in "abc")

    run_a = _run(script, tmp_path / "ckpt-a", out_a, 20, "plain")   # independent: runs alongside B
    finish(_run(script, tmp_path / "ckpt", out_b, 10, "save"), "B")
    finish(_run(script, tmp_path / "ckpt", out_c, 20, "resume"), "C")
    finish(run_a, "A")

    a, b, c = (torch.load(p, weights_only=True) for p in (out_a, out_b, out_c))
    assert c["restored_from"] == 10
    assert sorted(b["losses"]) == list(range(1, 11))
    assert sorted(c["losses"]) == list(range(11, 21))
    assert {**b["losses"], **c["losses"]} == a["losses"]
    assert a["epoch"] == c["epoch"] == 2
    assert a["params"].keys() == c["params"].keys()
    for k, v in a["params"].items():
        assert torch.equal(v, c["params"][k]), k
    assert not torch.equal(a["params"]["0.weight"], b["params"]["0.weight"])
