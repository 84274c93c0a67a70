"""What the HTTP plugins share: a network client made on first use, once, and never pickled.

Ray ships plugins to worker processes by pickling them, and OEQ calls one judge from several
threads. So the client (sockets, connection pools) is left out of the pickle, each process makes
its own on first use, and a lock makes sure two threads never both make one (a discarded
second client would close connections under the thread still using it).
"""

from __future__ import annotations

import threading
from typing import Any

_CLIENT_LOCK = threading.Lock()  # making a client is rare and quick: one lock for all plugins


class LazyClient:
    """Mix-in: ``client()`` returns the one client :meth:`_new_client` makes."""

    _client: Any = None

    def _new_client(self) -> Any:
        raise NotImplementedError

    def client(self) -> Any:
        with _CLIENT_LOCK:
            if self._client is None:
                self._client = self._new_client()
            return self._client

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None  # sockets and pools do not pickle
        return state
