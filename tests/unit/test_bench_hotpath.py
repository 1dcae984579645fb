"""bench.hotpath, the in-process measurement of the hot path, keeps measuring real answers."""

from __future__ import annotations

from bench.hotpath import measure


async def test_every_row_is_answered_as_the_gateway_answers_it() -> None:
    results = await measure(200)
    assert [label for label, _, _ in results] == [
        "public route",
        "hot PAT",
        "hot PAT, a different path each time",
        "hot PAT, a different cached token each time",
        "bad checksum (401)",
    ]
    for label, micros, answer in results:
        assert micros > 0
        status = b"401" if label.startswith("bad") else b"200"
        assert answer.startswith(b"HTTP/1.1 " + status)
        assert b"\r\nX-Request-Id: " in answer
