"""The tensor pool (csrc/conv/block_pool.h): the ops' outputs, saved tensors and gradients come
from blocks kept between calls, so that training steps after the first fault in no fresh pages.

Each test runs in a fresh interpreter, where the pool's counters start from zero and nothing
else of the test run holds its blocks.
"""

from helpers import requires_jit, run_python

pytestmark = requires_jit

_NET = """
        import resource, torch, torch_directconv as tdc
        from torch import nn

        class Block(nn.Module):
            def __init__(self, c):
                super().__init__()
                self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
                self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
            def forward(self, x):
                y = torch.relu(self.bn1(self.conv1(x)))
                return torch.relu(self.bn2(self.conv2(y)) + x)

        def net():
            torch.manual_seed(0)
            return nn.Sequential(
                nn.Conv2d(3, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU(),
                Block(24), nn.MaxPool2d(2), nn.Conv2d(24, 40, 1), nn.BatchNorm2d(40), nn.ReLU(),
                Block(40), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(40, 10))

        def steps(model, opt, x, t, n):
            for _ in range(n):
                opt.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(model(x), t).backward()
                opt.step()

        def faults():
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

        torch.set_num_threads(1)
        x, t = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
"""


def test_training_steps_reuse_their_blocks_and_fault_less() -> None:
    run_python(
        _NET
        + """
        model = tdc.optimize(net()).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        steps(model, opt, x, t, 3)
        warm = tdc.pool_stats()
        assert warm["misses"] > 0 and warm["hits"] > 0, warm
        f0 = faults()
        steps(model, opt, x, t, 5)
        pooled = (faults() - f0) / 5
        after = tdc.pool_stats()
        assert after["misses"] == warm["misses"], f"new blocks after warm-up: {warm} -> {after}"
        served = after["hits"] - warm["hits"]
        assert served > 0, after
        # The same steps with nothing held: every block is mapped afresh and faulted in again.
        tdc._C.set_pool_mb(0)
        steps(model, opt, x, t, 1)
        f0 = faults()
        steps(model, opt, x, t, 5)
        unpooled = (faults() - f0) / 5
        assert tdc.pool_stats()["held_bytes"] == 0
        assert pooled < unpooled / 2, f"{pooled:.0f} faults a step with the pool, {unpooled:.0f} without"
        """
    )


def test_cap_is_honoured() -> None:
    run_python(
        """
        import torch, torch_directconv as tdc
        assert tdc.pool_stats()["cap_bytes"] == 2 << 20, tdc.pool_stats()
        xs = [torch.randn(1, 16 * (1 + i % 3), 32, 32 + i) for i in range(40)]
        outs = [tdc.to_blocked(x) for x in xs]  # about 6 MB in use at once
        assert tdc.pool_stats()["in_use_bytes"] > 4 << 20, tdc.pool_stats()
        del outs
        s = tdc.pool_stats()
        assert 0 < s["held_bytes"] <= 2 << 20, s
        assert s["released_blocks"] > 0, s
        tdc._C.set_pool_mb(0.5)
        assert tdc.pool_stats()["held_bytes"] <= 1 << 19, tdc.pool_stats()
        """,
        TORCH_DIRECTCONV_POOL_MB="2",
    )


def test_empty_cache_releases_and_tensors_outlive_model_and_pool() -> None:
    run_python(
        _NET
        + """
        def rss():
            return int(open("/proc/self/statm").read().split()[1]) * 4096

        model = tdc.optimize(net()).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        steps(model, opt, x, t, 2)
        xb = tdc.to_blocked(torch.randn(2, 32, 40, 40))
        kept = max(model.parameters(), key=lambda p: p.numel()).grad  # a gradient of the pool, kept past the model
        assert kept is not None
        want_kept, want_xb = kept.clone(), xb.clone()
        del model, opt
        held = tdc.pool_stats()["held_bytes"]
        assert held > 1 << 20, tdc.pool_stats()
        before = rss()
        tdc.empty_cache()
        s = tdc.pool_stats()
        assert s["held_bytes"] == 0 and s["held_blocks"] == 0, s
        assert s["in_use_bytes"] > 0, s
        assert before - rss() >= held * 0.9, f"empty_cache() returned {before - rss()} of {held} bytes"
        # Fresh tensors of other shapes now take fresh blocks; the kept ones are unchanged.
        junk = [tdc.to_blocked(torch.full((1, 16, 50 + i, 50), 7.0)) for i in range(8)]
        del junk
        assert torch.equal(kept, want_kept) and torch.equal(xb, want_xb)
        # Still alive at the interpreter's exit, after the extension's statics.
        import builtins
        builtins.kept_past_exit = (kept, xb)
        """
    )


def test_threads_allocate_and_free_each_others_tensors() -> None:
    run_python(
        """
        import queue, threading, torch, torch.nn.functional as F, torch_directconv as tdc
        torch.set_num_threads(1)
        base = tdc.pool_stats()["in_use_bytes"]
        handoff, errors = queue.Queue(), []
        def make(seed):
            try:
                torch.set_num_threads(1)
                g = torch.Generator().manual_seed(seed)
                for i in range(40):
                    c = 8 + (seed + i) % 3 * 8
                    x = torch.randn(2, c, 24, 20 + i % 5, generator=g)
                    w = torch.randn(16, c, 3, 3, generator=g)
                    xb = tdc.to_blocked(x)
                    yb = tdc.conv2d_blocked(xb, tdc.to_blocked_weight(w), padding=1)
                    y = tdc.from_blocked(yb, 16)
                    ref = F.conv2d(x, w, padding=1)
                    if not torch.allclose(y, ref, rtol=1e-4, atol=1e-3):
                        errors.append(f"thread {seed} call {i}: wrong result")
                    handoff.put((xb, yb, y))  # freed by another thread
            except Exception as e:
                errors.append(repr(e))
        def drop():
            while handoff.get() is not None:
                pass
        droppers = [threading.Thread(target=drop) for _ in range(2)]
        makers = [threading.Thread(target=make, args=(s,)) for s in range(4)]
        for th in droppers + makers:
            th.start()
        for th in makers:
            th.join()
        for _ in droppers:
            handoff.put(None)
        for th in droppers:
            th.join()
        assert not errors, errors
        s = tdc.pool_stats()
        assert s["in_use_bytes"] == base, s
        assert s["hits"] > 0, s
        """
    )


def test_fork_while_another_thread_allocates() -> None:
    run_python(
        """
        import os, signal, threading, time, torch, torch.nn.functional as F, torch_directconv as tdc
        torch.set_num_threads(1)
        x, w = torch.randn(1, 16, 20, 20), torch.randn(16, 16, 3, 3)
        parent_yb = tdc.conv2d_blocked(tdc.to_blocked(x), tdc.to_blocked_weight(w), padding=1)
        stop = threading.Event()
        def churn():
            torch.set_num_threads(1)
            i = 0
            while not stop.is_set():
                tdc.to_blocked(torch.zeros(1, 16, 32, 32 + i % 17))
                i += 1
        th = threading.Thread(target=churn, daemon=True)
        th.start()
        try:
            for f in range(60):
                pid = os.fork()
                if pid == 0:
                    ok = False
                    try:
                        yb = tdc.conv2d_blocked(tdc.to_blocked(x), tdc.to_blocked_weight(w), padding=1)
                        ok = torch.allclose(tdc.from_blocked(yb, 16), F.conv2d(x, w, padding=1), rtol=1e-4,
                                            atol=1e-3) and torch.equal(yb, parent_yb)
                        del yb
                        tdc.empty_cache()
                    finally:
                        os._exit(0 if ok else 1)
                deadline = time.monotonic() + 10
                while True:
                    done, status = os.waitpid(pid, os.WNOHANG)
                    if done:
                        assert os.waitstatus_to_exitcode(status) == 0, f"child {f} computed a wrong result"
                        break
                    if time.monotonic() > deadline:
                        os.kill(pid, signal.SIGKILL)
                        os.waitpid(pid, 0)
                        raise AssertionError(f"child {f} hung")
                    time.sleep(0.002)
        finally:
            stop.set()
            th.join()
        """
    )
