"""Errors: Ray's failures read as our typed errors."""

import ray

from llava_serve.errors import Overloaded, Unavailable


def test_ray_failures_that_lose_a_request_read_as_unavailable():
    """Ray's errors are recognised by name (the library imports no Ray); these are the real ones."""
    from ray.exceptions import ActorDiedError, OwnerDiedError, RayTaskError

    from llava_serve.errors import unwrap

    lost = OwnerDiedError(ray.ObjectRef.from_random().hex(), "owner", "call site")
    wrapped = RayTaskError("generate", "traceback", lost)
    assert isinstance(unwrap(wrapped), Unavailable)
    assert isinstance(unwrap(ActorDiedError()), Unavailable)


def test_a_full_object_store_reads_as_overloaded_not_as_a_server_error():
    from ray.exceptions import ObjectStoreFullError, OutOfDiskError, RayTaskError

    from llava_serve.errors import unwrap

    for full in (ObjectStoreFullError("no room for 8 MiB"), OutOfDiskError("spill failed")):
        error = unwrap(RayTaskError("__call__", "traceback", full))
        assert isinstance(error, Overloaded) and not isinstance(error, Unavailable)
        assert error.status_code == 503 and "object store is full" in error.message
