"""gateway/auth.py without servers: the key file format, Bearer parsing, and the limits' clock."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.auth import ApiKeys, KeyLimits, authorization_from_metadata, bearer, parse_keys
from specsplit.serving.completion_loop import Delta
from specsplit.serving.errors import RateLimited, Unauthenticated, retry_after

SECRET = "sk-0123456789abcdef"


def test_key_file_formats() -> None:
    keys = parse_keys(f"""
        # comment
        {SECRET}
        alice:sk-alice   # trailing comment
        batch:sk-batch max_concurrent=2 tokens_per_minute=500
        """, KeyLimits(max_concurrent=4, tokens_per_minute=100))
    assert [k.name for k in keys] == [keys[0].name, "alice", "batch"]
    assert keys[0].name.startswith("key-") and SECRET not in keys[0].name
    assert keys[1].limits == KeyLimits(4, 100)  # the defaults
    assert keys[2].limits == KeyLimits(2, 500)
    assert SECRET not in repr(keys)  # neither the key nor its digest in reprs (logs, tracebacks)
    assert keys[0].digest.hex() not in repr(keys)


@pytest.mark.parametrize("text, word", [
    ("alice:", "line 1: empty key"),
    ("a:sk-1\na:sk-2", "line 2: duplicate name 'a'"),
    (f"a:{SECRET} rate=5", "line 1 (a): expected"),
    (f"a:{SECRET} max_concurrent=-1", "expected"),
])
def test_bad_key_files_name_the_line_not_the_key(text: str, word: str) -> None:
    with pytest.raises(ValueError, match=word.replace("(", r"\(").replace(")", r"\)")) as e:
        parse_keys(text, KeyLimits())
    assert SECRET not in str(e.value)


def test_bearer_and_metadata() -> None:
    assert bearer("Bearer abc") == "abc"
    assert bearer("bearer   abc  ") == "abc"
    assert bearer("Basic abc") is None and bearer("Bearer") is None and bearer("") is None and bearer(None) is None
    assert authorization_from_metadata([("x-other", "1"), ("authorization", "Bearer k")]) == "Bearer k"
    assert authorization_from_metadata([("authorization", b"Bearer k")]) == "Bearer k"
    assert authorization_from_metadata(None) is None


def test_a_missing_or_broken_file_at_start_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="No such file"):
        ApiKeys(str(tmp_path / "none"))
    (tmp_path / "bad").write_text(f"x:{SECRET} nope=1\n")
    with pytest.raises(ValueError, match="line 1") as e:
        ApiKeys(str(tmp_path / "bad"))
    assert SECRET not in str(e.value)


def test_an_empty_file_admits_nobody(tmp_path: Path) -> None:
    (tmp_path / "keys").write_text("# nobody yet\n")
    keys = ApiKeys(str(tmp_path / "keys"))
    with pytest.raises(Unauthenticated, match="invalid"):
        keys.authenticate("Bearer anything")
    with pytest.raises(Unauthenticated, match="missing"):
        keys.authenticate(None)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_tokens_per_minute_is_a_sliding_window(tmp_path: Path) -> None:
    (tmp_path / "keys").write_text("a:sk-a tokens_per_minute=100\n")
    clock = Clock()
    keys = ApiKeys(str(tmp_path / "keys"), clock=clock)
    a = keys.authenticate("Bearer sk-a")
    lease = keys.admit(a)
    lease.charge(60)
    lease.release()
    clock.t += 30
    lease = keys.admit(a)
    lease.charge(50)  # 110 in the last minute: over
    lease.release()
    with pytest.raises(RateLimited) as e:
        keys.admit(a)
    assert e.value.retry_after_s == pytest.approx(30.0)  # when the first 60 tokens leave the window
    assert retry_after(e.value) == 30
    clock.t += 30.5
    keys.admit(a).release()  # 50 left in the window: admitted again


def test_concurrency_and_metering(tmp_path: Path) -> None:
    (tmp_path / "keys").write_text("a:sk-a max_concurrent=1 tokens_per_minute=1000\n")
    keys = ApiKeys(str(tmp_path / "keys"))
    a = keys.authenticate("Bearer sk-a")

    async def events():  # noqa: ANN202 - a completion stream
        yield Delta(0, [1, 2, 3], "x")
        yield Delta(0, [4], "y")

    async def run() -> None:
        it = keys.metered(a, 10, events())
        assert (await it.__anext__()).token_ids == [1, 2, 3]
        with pytest.raises(RateLimited, match="1 requests running"):
            await keys.metered(a, 1, events()).__anext__()
        assert [d.token_ids async for d in it] == [[4]]
        await keys.metered(a, 0, events()).aclose()  # never started: nothing held
        assert [d.text async for d in keys.metered(a, 0, events())] == ["x", "y"]  # the slot is free again

    asyncio.run(run())
    assert keys._usage["a"].used(int(keys._clock())) == 10 + 4 + 4
    assert keys._usage["a"].running == 0
