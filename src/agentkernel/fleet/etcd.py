"""A small etcd v3 client over etcd's JSON gateway (`/v3/...`, etcd 3.4 and later), with httpx.

Only what the fleet needs: ranges, puts, deletes, transactions and leases. Keys and values are bytes,
base64 on the wire; int64 fields arrive as strings and fields at their default value are left out
(proto3 JSON), so every read says what it expects. A request goes to the member that answered last,
then to the others in turn; when none answers, one `EtcdUnavailable` names every URL tried.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from agentkernel.errors import EtcdUnavailable, InvalidRequestError
from agentkernel.fleet import ETCD_ENV

TIMEOUT = 3.0
"""Seconds one member has to answer one request (a lease of a few seconds must be renewed in time)."""
MAX_RESPONSE = 16 << 20
"""Bytes of one answer read at most: a range is also bounded by its `limit`."""
WATCH_IDLE = 30.0
"""Seconds a watch may stay silent before it is opened again (on another member if need be): a member
cut off from the others keeps the stream open but sends nothing."""

Json = dict[str, Any]


def parse_urls(text: str) -> list[str]:
    """`URL[,URL...]` of etcd members (http or https): a one-line error for anything else."""
    urls = [u.strip().rstrip("/") for u in text.split(",") if u.strip()]
    if not urls:
        raise InvalidRequestError("--etcd", f"expected URL[,URL...] of etcd members (or set {ETCD_ENV})")
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path:
            raise InvalidRequestError("--etcd", f"{url!r} is not an etcd client URL like http://host:2379")
    return urls


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def prefix_end(prefix: bytes) -> bytes:
    """The end of the range of keys that start with `prefix` (etcd's range_end convention)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


@dataclass(frozen=True)
class KV:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int

    @classmethod
    def of(cls, data: Json) -> KV:
        return cls(
            _unb64(data["key"]),
            _unb64(data.get("value", "")),
            int(data.get("create_revision", 0)),
            int(data.get("mod_revision", 0)),
            int(data.get("lease", 0)),
        )


@dataclass(frozen=True)
class Event:
    """One change seen by a watch: `kv` was put, or (deleted) its key was removed, at `kv.mod_revision`."""

    kv: KV
    deleted: bool


@dataclass(frozen=True)
class Compare:
    """One condition of a transaction: the key's `target` (MOD, CREATE, VERSION) equals `revision`.
    CREATE equal to 0 means the key does not exist."""

    key: bytes
    target: str
    revision: int

    def json(self) -> Json:
        field = {"MOD": "mod_revision", "CREATE": "create_revision", "VERSION": "version"}[self.target]
        return {"key": _b64(self.key), "target": self.target, "result": "EQUAL", field: str(self.revision)}


def absent(key: bytes) -> Compare:
    return Compare(key, "CREATE", 0)


def unchanged(key: bytes, kv: KV | None) -> Compare:
    """The key is as it was read: the same modification, or still absent."""
    return Compare(key, "MOD", kv.mod_revision) if kv else absent(key)


def put(key: bytes, value: bytes, lease: int = 0) -> Json:
    body: Json = {"key": _b64(key), "value": _b64(value)}
    if lease:
        body["lease"] = str(lease)
    return {"request_put": body}


def delete(key: bytes) -> Json:
    return {"request_delete_range": {"key": _b64(key)}}


class Etcd:
    """An etcd cluster reached by its client URLs; use as an async context manager or `close()`."""

    def __init__(self, urls: Sequence[str], *, timeout: float = TIMEOUT) -> None:
        self.urls = list(urls)
        self._first = 0
        self._http = httpx.AsyncClient(timeout=timeout, trust_env=False)

    async def __aenter__(self) -> Etcd:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def call(self, path: str, body: Json) -> Json:
        """POST `body` to `/v3/<path>` on the first member that answers; a member that fails (no
        connection, a timeout, a 5xx such as "no leader") passes the request to the next."""
        errors = []
        for i in range(len(self.urls)):
            index = (self._first + i) % len(self.urls)
            url = self.urls[index]
            try:
                async with self._http.stream("POST", f"{url}/v3/{path}", json=body) as response:
                    data = await self._read(response)
            except (httpx.TransportError, ValueError) as exc:
                errors.append(f"{url}: {_describe(exc)}")
                continue
            if response.status_code >= 500:
                errors.append(f"{url}: HTTP {response.status_code} {data.get('error', '')}".rstrip())
                continue
            if response.status_code != 200:
                raise EtcdUnavailable(f"etcd at {url} refused /v3/{path}: {data.get('error', data)}")
            self._first = index
            return data
        raise EtcdUnavailable(f"etcd is unreachable (tried {', '.join(errors)})")

    @staticmethod
    async def _read(response: httpx.Response) -> Json:
        chunks, size = [], 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > MAX_RESPONSE:
                raise ValueError(f"answer larger than {MAX_RESPONSE} bytes")
            chunks.append(chunk)
        data = json.loads(b"".join(chunks) or b"{}")
        if not isinstance(data, dict):
            raise ValueError("answer is not a JSON object")
        return data

    async def watch(
        self, key: bytes, *, prefix: bool = False, start_revision: int
    ) -> AsyncIterator[list[Event]]:
        """The changes to `key` (or every key under it) from `start_revision` on, a batch at a time
        (an empty batch when the watch is set up), from one member's stream. Ends with
        `EtcdUnavailable` when no member serves the watch, or the one serving it falls silent for
        WATCH_IDLE seconds or cancels it (a compacted revision): the caller reads afresh and watches again."""
        create: Json = {"key": _b64(key), "start_revision": str(start_revision), "progress_notify": True}
        if prefix:
            create["range_end"] = _b64(prefix_end(key))
        errors = []
        for i in range(len(self.urls)):
            url = self.urls[(self._first + i) % len(self.urls)]
            timeout = httpx.Timeout(self._http.timeout.connect, read=WATCH_IDLE)
            try:
                async with self._http.stream(
                    "POST", f"{url}/v3/watch", json={"create_request": create}, timeout=timeout
                ) as response:
                    if response.status_code != 200:
                        errors.append(f"{url}: HTTP {response.status_code}")
                        continue
                    async for message in _messages(response):
                        result = message.get("result", {})
                        if not isinstance(result, dict):
                            raise ValueError("a watch message whose result is not an object")
                        if "error" in message or result.get("canceled"):
                            reason = message.get("error") or result.get("cancel_reason", "canceled")
                            raise EtcdUnavailable(f"etcd at {url} ended the watch: {reason}")
                        yield _events(result)
            except (httpx.TransportError, ValueError) as exc:
                errors.append(f"{url}: {_describe(exc)}")
                continue
            errors.append(f"{url}: the watch ended")
        raise EtcdUnavailable(f"etcd is unreachable for a watch (tried {', '.join(errors)})")

    async def get(self, key: bytes) -> KV | None:
        kvs, _ = await self.range(key)
        return kvs[0] if kvs else None

    async def range(self, key: bytes, *, prefix: bool = False, limit: int = 0) -> tuple[list[KV], int]:
        """The keys (one, or all under `prefix`, at most `limit` of them if given) and the store's
        revision they were read at."""
        body: Json = {"key": _b64(key)}
        if prefix:
            body["range_end"] = _b64(prefix_end(key))
        if limit:
            body["limit"] = str(limit)
        data = await self.call("kv/range", body)
        return [KV.of(kv) for kv in data.get("kvs", [])], int(data.get("header", {}).get("revision", 0))

    async def put(self, key: bytes, value: bytes, *, lease: int = 0) -> None:
        await self.call("kv/put", put(key, value, lease)["request_put"])

    async def delete(self, key: bytes) -> None:
        await self.call("kv/deleterange", delete(key)["request_delete_range"])

    async def txn(self, compare: Sequence[Compare], success: Sequence[Json]) -> bool:
        """Apply `success` if every comparison holds, atomically; whether it did."""
        body = {"compare": [c.json() for c in compare], "success": list(success)}
        return bool((await self.call("kv/txn", body)).get("succeeded", False))

    async def grant(self, ttl: int) -> int:
        return int((await self.call("lease/grant", {"TTL": str(ttl)}))["ID"])

    async def keepalive(self, lease: int) -> int:
        """Renew the lease; the seconds it has left, 0 when it has expired (or was revoked)."""
        data = await self.call("lease/keepalive", {"ID": str(lease)})
        return int(data.get("result", {}).get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        """End the lease now, deleting its keys."""
        await self.call("lease/revoke", {"ID": str(lease)})


def _events(result: Json) -> list[Event]:
    """The events of one watch message's `result`; a ValueError for anything not shaped as etcd's."""
    try:
        return [Event(KV.of(e["kv"]), e.get("type") == "DELETE") for e in result.get("events", [])]
    except (AttributeError, TypeError, KeyError) as exc:
        raise ValueError(f"a malformed watch message ({type(exc).__name__}: {exc})") from None


async def _messages(response: httpx.Response) -> AsyncIterator[Json]:
    """The JSON objects of a streamed answer, one a line, none longer than MAX_RESPONSE bytes."""
    buffer = b""
    async for chunk in response.aiter_bytes():
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        if len(buffer) > MAX_RESPONSE:
            raise ValueError(f"a watch message larger than {MAX_RESPONSE} bytes")
        for line in lines:
            if line.strip():
                data = json.loads(line)
                if not isinstance(data, dict):
                    raise ValueError("a watch message is not a JSON object")
                yield data


def _describe(exc: Exception) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    if isinstance(exc, httpx.ConnectError):
        return "cannot connect"
    return str(exc) or type(exc).__name__
