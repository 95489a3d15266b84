"""A vLLM LoRA resolver that reads the lora-pipeline registry, loaded by vLLM as a general plugin.

vLLM calls `resolve_lora(base_model_name, lora_name)` the first time a request names a model it does not know
(only with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True) and caches the answer under that name for the server's life.
Our middleware (serve/middleware.py) rewrites moving references (`NAME`, `NAME@prod`) to the pinned `NAME@V`
before vLLM sees them, so that cache only ever holds immutable versions and an alias move is not frozen by it.

Errors: returning None would give the client a bare "model does not exist" 404. Instead the resolver raises
vLLM's own exception types, which vLLM's exception handlers turn into a status and our message:
unknown adapter -> 404 (the message lists the adapters that exist), invalid name -> 400, adapter trained on a
different base (the message names both fingerprints), of a rank above the server's max_lora_rank, whose files
do not match its manifest or whose tensors do not fit the base -> 422 (not 409, which OpenAI clients retry).
The engine is handed the version's verified read-only copy (serve/verified.py), never the registry folder.

The plugin is loaded in EVERY vLLM process (the training rollout engine too), so `register()` does nothing
unless PIPELINE_SERVE_REGISTRY is set, and never touches the registry until the first request.
"""

from __future__ import annotations

import logging
import os
from http import HTTPStatus

log = logging.getLogger(__name__)

RESOLVER_NAME = "lora-pipeline-registry"


def to_vllm_error(exc: Exception) -> Exception:
    """Our registry errors -> the vLLM exception that carries the right HTTP status to the client."""
    from vllm.exceptions import GracefulHTTPError, VLLMNotFoundError, VLLMValidationError

    from ground.errors import NotFoundError

    if isinstance(exc, NotFoundError):
        return VLLMNotFoundError(str(exc))
    if error_status(exc) in (HTTPStatus.UNPROCESSABLE_ENTITY, HTTPStatus.SERVICE_UNAVAILABLE):
        return GracefulHTTPError(str(exc), error_status(exc))
    return VLLMValidationError(str(exc), parameter="model")


def error_status(exc: Exception) -> HTTPStatus:
    """The HTTP status for a registry error: 404 unknown, 422 known but not servable here, 503 the registry did
    not answer, 400 malformed."""
    from ground.errors import NotFoundError
    from serve.catalog import BaseMismatchError, RankTooLargeError, RegistryUnavailableError
    from serve.verified import AdapterMismatchError, CorruptVersionError

    if isinstance(exc, NotFoundError):
        return HTTPStatus.NOT_FOUND
    if isinstance(exc, (BaseMismatchError, RankTooLargeError, CorruptVersionError, AdapterMismatchError)):
        return HTTPStatus.UNPROCESSABLE_ENTITY
    if isinstance(exc, RegistryUnavailableError):
        return HTTPStatus.SERVICE_UNAVAILABLE
    return HTTPStatus.BAD_REQUEST


def _make_resolver_class():
    # vLLM is imported only here: the plugin module must stay cheap to import in processes that don't serve
    import asyncio

    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver

    from ground.errors import RegistryError
    from ground.vllm_lora import stable_lora_id
    from serve.catalog import get_catalog

    class RegistryLoRAResolver(LoRAResolver):
        """Maps `NAME@V` (or `NAME`, `NAME@alias`) to the registry version's adapter folder."""

        async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
            catalog = get_catalog()
            if catalog is None:
                return None
            try:  # the middleware pinned lora_name already, so this is a cache hit; still never on the event loop
                found = await asyncio.to_thread(catalog.lookup, lora_name)
                # hashing + copying is blocking file work: keep it off the event loop that serves other requests
                path = await asyncio.to_thread(catalog.engine_path, found)
            except RegistryError as exc:
                raise to_vllm_error(exc) from None
            log.info("resolved %s -> %s", lora_name, found.ref)
            # lora_name is the pinned NAME@V, so two versions are always two adapters to vLLM. vLLM 0.32
            # replaces lora_int_id with its own per-process counter after we return; the stable id below is
            # what it would keep if it did not. vLLM keeps `path` for the server's life and reloads from it after
            # an eviction: it is the verified read-only copy, never the registry folder.
            return LoRARequest(lora_name=found.ref, lora_int_id=stable_lora_id(found.ref), lora_path=path,
                               base_model_name=catalog.base_name or base_model_name)

    return RegistryLoRAResolver


def register() -> None:
    """vLLM general-plugin entry point: register the registry resolver when inside `pipeline serve`."""
    from serve.server import ENV_REGISTRY

    if not os.environ.get(ENV_REGISTRY):
        return
    from vllm.lora.resolver import LoRAResolverRegistry

    if RESOLVER_NAME not in LoRAResolverRegistry.get_supported_resolvers():
        LoRAResolverRegistry.register_resolver(RESOLVER_NAME, _make_resolver_class()())
