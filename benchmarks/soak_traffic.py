"""The soak run's clients and operator: mixed requests (streams, unary calls, cancellations, deadlines, bad
requests) checked against offline answers, and hot-load churn (load, reload, unload) recorded on a timeline."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc

from deltaserve.v1 import adapters_pb2 as apb
from deltaserve.v1 import adapters_pb2_grpc as apb_grpc
from deltaserve.v1 import generation_pb2 as pb
from deltaserve.v1 import generation_pb2_grpc as pb_grpc

NEW_TOKENS = 12
# (kind of request, weight). Kinds other than "stream"/"unary"/"base" are meant to fail or be cut short.
MIX = (("stream", 40), ("unary", 25), ("base", 8), ("cancel", 8), ("deadline", 6), ("bad_sampling", 4),
       ("unknown_adapter", 3), ("huge_adapter_id", 3), ("garbage", 3))
EXPECTED = {  # request kind -> status codes that are its intended outcome
    "deadline": {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.OK},
    "bad_sampling": {grpc.StatusCode.INVALID_ARGUMENT},
    "unknown_adapter": {grpc.StatusCode.NOT_FOUND},
    "huge_adapter_id": {grpc.StatusCode.INVALID_ARGUMENT},
    "garbage": {grpc.StatusCode.INVALID_ARGUMENT},
}


@dataclass
class Timeline:
    """What the operator did: the variant behind each (name, version), and when each name was not served."""

    variant_of: dict[tuple[str, int], str] = field(default_factory=dict)
    gaps: dict[str, list[list[float | None]]] = field(default_factory=dict)
    operations: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def variant(self, name: str, version: int) -> str:
        """The variant loaded as (name, version); waits a moment when the operator has yet to record the load
        that a request already saw."""
        for _ in range(500):
            with self.lock:
                if (name, version) in self.variant_of:
                    return self.variant_of[name, version]
            time.sleep(0.01)
        raise KeyError(f"{name} version {version} was never loaded by the operator")

    def unserved_during(self, name: str, start: float, end: float) -> bool:
        with self.lock:
            return any(s <= end and (e is None or e >= start) for s, e in self.gaps.get(name, []))


@dataclass
class Tally:
    """Outcomes by cause, answers checked, wrong answers (with what was expected)."""

    outcomes: Counter = field(default_factory=Counter)
    checked: int = 0
    tokens: int = 0
    wrong: list[dict] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, outcome: str, detail: str = "") -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            if outcome.startswith("unexpected") and len(self.unexpected) < 20:
                self.unexpected.append(f"{outcome}: {detail[:200]}")


def operator(admin: apb_grpc.AdaptersStub, token: str, names: list[str], variants: dict[str, list[str]],
             timeline: Timeline, stop: threading.Event, rng: random.Random, period: float) -> None:
    """Loads every name, then every `period` seconds reloads one (another variant) or unloads it for a while."""
    auth = [("authorization", f"Bearer {token}")]

    def load(name: str) -> None:
        variant = rng.choice(variants[name])
        info = admin.LoadAdapter(apb.LoadAdapterRequest(name=name, path=variant), metadata=auth).adapter
        with timeline.lock:
            timeline.variant_of[(name, info.version)] = variant
            if timeline.gaps.get(name) and timeline.gaps[name][-1][1] is None:
                timeline.gaps[name][-1][1] = time.monotonic()
        timeline.operations["load"] += 1

    for name in names:
        load(name)
    while not stop.wait(rng.uniform(0.5, 1.5) * period):
        name = rng.choice(names)
        if rng.random() < 0.3:
            with timeline.lock:
                timeline.gaps.setdefault(name, []).append([time.monotonic(), None])
            admin.UnloadAdapter(apb.UnloadAdapterRequest(name=name), metadata=auth)
            timeline.operations["unload"] += 1
            stop.wait(rng.uniform(0.2, 1.0) * period)
        load(name)


@dataclass
class Client:
    """One client thread's loop: draws a request kind from MIX and checks what comes back."""

    channel: grpc.Channel
    names: list[str]
    prompts: list[str]
    expected: dict[str, list[list[int]]]   # variant (or "" for the base model) -> tokens per prompt
    timeline: Timeline
    tally: Tally
    rng: random.Random

    def run(self, deadline: float) -> None:
        stub = pb_grpc.GenerationStub(self.channel)
        kinds, weights = zip(*MIX, strict=True)
        while time.monotonic() < deadline:
            kind = self.rng.choices(kinds, weights)[0]
            try:
                self.one(stub, kind)
            except grpc.RpcError as error:
                self.tally.add(f"unexpected {kind} {error.code().name}", error.details() or "")

    def one(self, stub: pb_grpc.GenerationStub, kind: str) -> None:
        name = "" if kind == "base" else self.rng.choice(self.names)
        p = self.rng.randrange(len(self.prompts))
        request = pb.GenerateRequest(text=self.prompts[p], adapter_id=name, stopping=pb.StoppingCriteria(
            max_new_tokens=NEW_TOKENS, ignore_eos=True))
        if kind in EXPECTED:
            self.failing(stub, kind, request)
        elif kind == "cancel":
            call = stub.GenerateStream(request)
            try:
                next(call)
                self.tally.add("cancelled by the client (meant)")
            except grpc.RpcError as error:
                self.judge_error(name, error, time.monotonic(), "cancel")
            call.cancel()
        else:
            self.served(stub, kind, name, p, request)

    def served(self, stub: pb_grpc.GenerationStub, kind: str, name: str, p: int, request: pb.GenerateRequest) -> None:
        start = time.monotonic()
        try:
            if kind == "stream":
                events = list(stub.GenerateStream(request))
                final = events[-1].final
                streamed = [t for e in events if e.HasField("token") for t in e.token.token_ids]
                if streamed != list(final.token_ids):
                    self.tally.add("unexpected stream/final mismatch", name)
            else:
                final = stub.Generate(request)
        except grpc.RpcError as error:
            self.judge_error(name, error, start, kind)
            return
        variant = self.timeline.variant(name, final.adapter_version) if name else ""
        want = self.expected[variant][p]
        with self.tally.lock:
            self.tally.checked += 1
            self.tally.tokens += len(final.token_ids)
            if list(final.token_ids) != want:
                self.tally.wrong.append({"adapter": name, "version": final.adapter_version, "variant": variant,
                                         "prompt": p, "got": list(final.token_ids), "want": want})
        self.tally.add(f"answered ({'base' if not name else 'adapter'})")

    def judge_error(self, name: str, error: grpc.RpcError, start: float, kind: str) -> None:
        if error.code() == grpc.StatusCode.NOT_FOUND and name and \
                self.timeline.unserved_during(name, start, time.monotonic()):
            self.tally.add("NOT_FOUND while unloaded (meant)")
        else:
            self.tally.add(f"unexpected {kind} {error.code().name}", error.details() or "")

    def failing(self, stub: pb_grpc.GenerationStub, kind: str, request: pb.GenerateRequest) -> None:
        timeout = None
        if kind == "deadline":
            timeout = 0.02
        elif kind == "bad_sampling":
            request.sampling.temperature = -1.0
        elif kind == "unknown_adapter":
            request.adapter_id = f"no-such-{self.rng.randrange(10**6)}"
        elif kind == "huge_adapter_id":
            request.adapter_id = "x" * 65536
        start = time.monotonic()
        try:
            if kind == "garbage":
                raw = self.channel.unary_unary("/deltaserve.v1.Generation/Generate")
                raw(b"\xff\xfe garbage \x00" * 8, timeout=30)
            else:
                stub.Generate(request, timeout=timeout)
            code = grpc.StatusCode.OK
        except grpc.RpcError as error:
            code = error.code()
            if len(error.details() or "") > 1024:
                self.tally.add(f"unexpected {kind} long message", (error.details() or "")[:100])
        if code == grpc.StatusCode.NOT_FOUND and kind == "deadline" and \
                self.timeline.unserved_during(request.adapter_id, start, time.monotonic()):
            self.tally.add("NOT_FOUND while unloaded (meant)")
        elif code in EXPECTED[kind]:
            self.tally.add(f"{kind} -> {code.name} (meant)")
        else:
            self.tally.add(f"unexpected {kind} -> {code.name}")
