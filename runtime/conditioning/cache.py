"""The per-identity caches of the face-ID kinds (InstantID's face tokens, PuLID's ID tokens, PhotoMaker's ID
embeddings, faces read from photos): a small thread-safe LRU, so a second request with the same identity skips the
encoder. The value is computed outside the lock (two requests racing on a new identity may both compute it)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Hashable


class LruCache:
    def __init__(self, size: int):
        self.size, self.entries, self.lock = size, OrderedDict(), threading.Lock()
        self.misses = 0  # values computed

    def get(self, key: Hashable, compute: Callable[[], object]):
        with self.lock:
            if key in self.entries:
                self.entries.move_to_end(key)
                return self.entries[key]
        value = compute()
        with self.lock:
            self.misses += 1
            self.entries[key] = value
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)
        return value


def graph_key(parts, component: str) -> tuple[str, str]:
    """(engine directory, the component's file hashes): an encoder output stays valid while its graph does."""
    entry = (parts.dir.manifest or {}).get("components", {}).get(component, {})
    return str(parts.dir.path), str(entry.get("sha256"))
