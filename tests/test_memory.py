"""Kept memory: scratch is kept between calls only up to a process-wide cap, and returned
to the OS past it and when its thread exits (README, "Threads, forks and memory").

Resident memory is read in fresh children, where nothing else of the test run counts."""

from helpers import requires_jit, run_python

pytestmark = requires_jit

_RSS = """
        import threading, torch, torch_directconv as tdc
        def rss_mb():
            return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
"""


def test_resident_memory_returns_after_a_large_call():
    """A 1x3x2x2 input with padding=1000 has a 256 MB blocked output: it used to stay resident."""
    run_python(
        _RSS
        + """
        torch.set_num_threads(2)
        w = torch.randn(16, 3, 3, 3)
        tdc.conv2d(torch.randn(1, 3, 8, 8), w, padding=1)
        before = rss_mb()
        y = tdc.conv2d(torch.randn(1, 3, 2, 2), w, padding=1000)
        assert y.shape == (1, 16, 2000, 2000)
        del y
        grown = rss_mb() - before
        assert grown < 64, f"resident memory grew by {grown:.0f} MB after the call"
        """
    )


def test_scratch_kept_within_the_cap_and_freed_with_its_threads():
    run_python(
        _RSS
        + """
        cap = tdc.jit_stats()["scratch_cap_bytes"]
        assert cap == 16 * 2**20, cap
        x, w = torch.randn(8, 64, 28, 28), torch.randn(64, 64, 3, 3)
        kept = []
        def calls():
            torch.set_num_threads(1)
            for _ in range(2):
                tdc.conv2d(x, w, padding=1)
                kept.append(tdc.jit_stats()["scratch_kept_bytes"])
        threads = [threading.Thread(target=calls) for _ in range(6)]
        for t in threads: t.start()
        for t in threads: t.join()
        assert max(kept) <= cap, (max(kept), cap)
        assert max(kept) > 0, "nothing kept: repeated calls would fault in fresh pages"
        # join() returns before the OS thread has run its exit handlers: give them a moment.
        import time
        deadline = time.monotonic() + 10
        while tdc.jit_stats()["scratch_kept_bytes"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert tdc.jit_stats()["scratch_kept_bytes"] == 0, "a finished thread's scratch is still kept"
        """,
        TORCH_DIRECTCONV_SCRATCH_MB="16",
    )


def test_repeated_calls_reuse_their_scratch():
    run_python(
        _RSS
        + """
        torch.set_num_threads(2)
        x, w = torch.randn(2, 32, 28, 28), torch.randn(48, 32, 3, 3)
        tdc.conv2d(x, w, padding=1)
        first = tdc.jit_stats()["scratch_kept_bytes"]
        assert first > 0
        for _ in range(5):
            tdc.conv2d(x, w, padding=1)
        assert tdc.jit_stats()["scratch_kept_bytes"] == first
        """
    )


def test_no_scratch_kept_with_a_zero_cap():
    run_python(
        _RSS
        + """
        x, w = torch.randn(2, 32, 28, 28), torch.randn(48, 32, 3, 3)
        y = tdc.conv2d(x, w, padding=1)
        torch.testing.assert_close(y, torch.nn.functional.conv2d(x, w, padding=1), rtol=1e-4, atol=1e-4)
        assert tdc.jit_stats()["scratch_kept_bytes"] == 0
        """,
        TORCH_DIRECTCONV_SCRATCH_MB="0",
    )
