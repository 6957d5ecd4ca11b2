"""AsyncEngine without HTTP: streaming, cancellation, failures, the queue bound and shutdown."""

from __future__ import annotations

import asyncio

import pytest

from inlaid.server.async_engine import AsyncEngine
from inlaid.server.errors import EngineFailedError, QueueFullError, UnavailableError

from .conftest import PROMPTS, greedy, make_engine, slow_steps


@pytest.fixture(scope="module")
def engine(served):
    async_engine = AsyncEngine(make_engine(served), max_queue=64)
    yield async_engine
    async_engine.close()


async def idle_state(engine: AsyncEngine) -> tuple[bool, int, int]:
    """(has unfinished requests, free blocks, total blocks), read on the engine thread."""
    return await engine.call(lambda e: (e.has_unfinished_requests(), e.block_manager.num_free_blocks,
                                        e.block_manager.num_blocks))


def test_stream_matches_offline_and_deltas_add_up(engine, offline):
    async def go():
        stream = await engine.generate(PROMPTS[1], greedy(10), "sql")
        return [out async for out in stream]

    outs = asyncio.run(go())
    expect = offline.generate(PROMPTS[1], greedy(10), "sql")[0]
    assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
    assert outs[-1].output_token_ids == expect.output_token_ids
    assert "".join(o.delta_text for o in outs) == outs[-1].text == expect.text


def test_cancelled_consumer_aborts_and_frees_blocks(engine):
    async def go():
        stream = await engine.generate(PROMPTS[0], greedy(200))
        seen = []

        async def consume():
            async for out in stream:
                seen.append(out)

        task = asyncio.create_task(consume())
        while not seen:
            await asyncio.sleep(0.002)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return seen, await idle_state(engine)

    with slow_steps(engine.engine):
        seen, (busy, free, total) = asyncio.run(go())
    assert not seen[-1].finished
    assert not busy and free == total and engine.num_in_flight == 0


def test_leaving_async_with_early_aborts(engine):
    async def go():
        async with await engine.generate(PROMPTS[2], greedy(200), "math") as stream:
            await stream.__anext__()
        return await idle_state(engine)

    with slow_steps(engine.engine):
        busy, free, total = asyncio.run(go())
    assert not busy and free == total


def test_queue_bound_refuses_then_recovers(engine):
    async def go():
        engine.max_queue = 2
        try:
            held = [await engine.generate(p, greedy(200)) for p in PROMPTS[:2]]
            with pytest.raises(QueueFullError):
                await engine.generate(PROMPTS[2], greedy(4))
            for stream in held:
                stream.abort()
            stream = await engine.generate(PROMPTS[2], greedy(4))  # room again
            return [out async for out in stream][-1]
        finally:
            engine.max_queue = 64

    with slow_steps(engine.engine, 0.01):
        assert asyncio.run(go()).finished


def test_step_failure_fails_in_flight_requests_and_engine_recovers(engine, offline):
    def boom(_plan):
        raise RuntimeError("device fell over")

    async def go():
        await engine.call(lambda e: setattr(e.runner, "launch", boom))
        streams = [await engine.generate(p, greedy(8), "sql") for p in PROMPTS[:3]]
        errors = []
        for stream in streams:
            with pytest.raises(EngineFailedError) as info:
                async for _ in stream:
                    pass
            errors.append(str(info.value))
        await engine.call(lambda e: delattr(e.runner, "launch"))
        stream = await engine.generate(PROMPTS[0], greedy(8), "sql")
        return errors, [out async for out in stream][-1], await idle_state(engine)

    errors, out, (busy, free, total) = asyncio.run(go())
    assert all("device fell over" in e for e in errors)
    assert engine.dead is None and out.text == offline.generate(PROMPTS[0], greedy(8), "sql")[0].text
    assert not busy and free == total


def test_bad_input_raises_before_any_output(engine):
    from inlaid.errors import RequestError
    from inlaid.server.errors import NotFoundError

    async def go():
        with pytest.raises(NotFoundError):
            await engine.generate(PROMPTS[0], greedy(4), "nope")
        with pytest.raises(RequestError):
            await engine.generate([], greedy(4))
        return await idle_state(engine)

    busy, free, total = asyncio.run(go())
    assert not busy and free == total and engine.num_in_flight == 0


def test_shutdown_drains_in_flight_then_refuses(served):
    engine = AsyncEngine(make_engine(served))

    async def go():
        stream = await engine.generate(PROMPTS[1], greedy(30))
        outs = []

        async def consume():
            async for out in stream:
                outs.append(out)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0)
        await engine.shutdown(timeout=30)
        await task
        with pytest.raises(UnavailableError):
            await engine.generate(PROMPTS[0], greedy(4))
        return outs

    outs = asyncio.run(go())
    assert outs[-1].finished and len(outs[-1].output_token_ids) == 30
    assert not engine._thread.is_alive()


def test_shutdown_timeout_aborts_stragglers(served):
    engine = AsyncEngine(make_engine(served))

    async def go():
        stream = await engine.generate(PROMPTS[1], greedy(200))
        await engine.shutdown(timeout=0)
        with pytest.raises(UnavailableError, match="shut down"):
            async for _ in stream:
                pass

    asyncio.run(go())
    bm = engine.engine.block_manager
    assert not engine.engine.has_unfinished_requests() and bm.num_free_blocks == bm.num_blocks


def test_engine_thread_crash_fails_waiters_instead_of_hanging(served):
    engine = AsyncEngine(make_engine(served))

    def broken():
        raise RuntimeError("bug in the loop")

    async def go():
        stream = await engine.generate(PROMPTS[1], greedy(200))
        await engine.call(lambda e: setattr(e, "has_unfinished_requests", broken))
        with pytest.raises(UnavailableError, match="bug in the loop"):
            async for _ in stream:
                pass
        with pytest.raises(UnavailableError):
            await engine.generate(PROMPTS[0], greedy(4))

    asyncio.run(asyncio.wait_for(go(), timeout=30))
    assert engine.dead and not engine.is_accepting
    engine.close()
