"""What the ``aclora vram`` tests of every family check the same way: a tiny step's count against the CPU profiler."""

from __future__ import annotations

MiB = 1024**2


def profiled_peak(run) -> int:
    """The most bytes a step of ``run`` (a TrainingStep on the CPU) holds live beyond what it started with, by
    torch.profiler's allocation events: after a first step (which makes what persists, e.g. the optimizer's state),
    so that the profiled step is like the counted one. ``run`` is closed after."""
    from torch.profiler import ProfilerActivity, profile

    try:
        run.warm_optimizer()
        run.step()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            run.step()
    finally:
        run.close()
    live = measured = 0
    events = (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        measured = max(measured, live)
    return measured


def assert_the_profiler_agrees(counted: int, run) -> None:
    """``counted`` (the estimate's peak less what was there before the step) is within 5% of the profiled step."""
    measured = profiled_peak(run)
    assert measured > 1 * MiB, measured
    assert abs(counted - measured) <= 0.05 * measured, (counted, measured)
