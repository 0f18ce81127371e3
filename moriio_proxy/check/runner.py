"""One run of ``check``: the calls in order, each answer handed to its verdict.

The order is the order a person fixes things in: the proxy, what registered, whether the
instances agree, whether each one answers, then one completion end to end and /ready.
"""

from __future__ import annotations

import asyncio
import ssl
import time

import aiohttp

from ..views import InstanceView
from . import verdicts
from .answers import Answer, registration_rejections
from .probes import Prober, instance_url, normalize_url
from .report import CheckResult, Report

DEFAULT_TIMEOUT = 10.0
# Instances are probed with a shorter bound: a dead or firewalled one should not hold the
# whole check for the full --timeout, and a healthy vLLM answers /health in milliseconds.
INSTANCE_TIMEOUT = 3.0
DEFAULT_PROMPT = "The capital of France is"
DEFAULT_MAX_TOKENS = 8


async def run_check(
    url: str,
    *,
    model: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    prompt: str = DEFAULT_PROMPT,
    api_key: str | None = None,
    admin_token: str | None = None,
    cafile: str | None = None,
) -> Report:
    """Check the deployment behind the proxy at ``url``; never raises for network trouble.

    ``url`` may be ``host:port``; it is normalised as on the command line (ValueError when
    it cannot be a URL). Every call is bounded by ``timeout`` (instances by at most
    ``INSTANCE_TIMEOUT``), so the whole check ends in a few timeouts at worst.
    ``api_key``/``admin_token``: what a proxy started with --api-key/--admin-token needs;
    ``cafile``: the CA an https:// proxy's certificate, and https instances', chain to
    (else the system's).
    """
    base = normalize_url(url)
    started = time.monotonic()
    results: list[CheckResult] = []
    ssl_context = ssl.create_default_context(cafile=cafile) if cafile else True
    connector = aiohttp.TCPConnector(ssl=ssl_context)
    async with aiohttp.ClientSession(raise_for_status=False, connector=connector) as session:
        prober = Prober(
            session,
            base,
            timeout,
            min(timeout, INSTANCE_TIMEOUT),
            api_key=api_key,
            admin_token=admin_token,
        )
        reached = await _run(prober, results, model, max_tokens, prompt)
    return Report(base, results, time.monotonic() - started, aborted=not reached)


async def _run(
    prober: Prober,
    results: list[CheckResult],
    model: str | None,
    max_tokens: int,
    prompt: str,
) -> bool:
    """All checks, appended to ``results``; False when the proxy is unreachable."""
    results.append(verdicts.proxy(prober.url, await prober.get("/health")))
    if results[-1].status != "OK":
        return False
    admin, metrics, models, ready = await asyncio.gather(
        prober.get("/admin/instances"),
        prober.get("/metrics"),
        prober.get("/v1/models"),
        prober.get("/ready"),
    )
    verdict, listing = verdicts.instances(admin)
    results.append(verdict)
    listed = listing.instances if listing is not None else ()
    if listing is not None:
        results.extend(verdicts.roles(listed))
        rejections = registration_rejections(metrics)
        results.append(verdicts.transfer_mode(listing.transfer_mode, listed, rejections))
        results.append(verdicts.parallelism(listed))
        results.append(verdicts.states(listed))
        results.append(verdicts.pairing(listed))
    probed = await asyncio.gather(*(_probe(prober, view) for view in listed))
    results.extend(verdict for verdict, _ in probed)
    own_models = [(view, answer) for view, (_, answer) in zip(listed, probed, strict=True)]
    verdict, chosen = verdicts.models(models, own_models, model)
    results.append(verdict)
    if chosen is None:
        results.append(verdicts.completion_not_attempted())
    else:
        payload = {
            "model": chosen,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": False,
        }
        answer = await prober.post("/v1/completions", payload)
        results.append(verdicts.completion(chosen, answer))
    results.append(verdicts.ready(ready))
    return True


async def _probe(prober: Prober, view: InstanceView) -> tuple[CheckResult, Answer | None]:
    """GET the instance's /health and /v1/models directly; its verdict and the model list."""
    base = instance_url(view.http_address, view.scheme)
    if base is None:
        return verdicts.unaddressable(view), None
    health, models = await asyncio.gather(
        prober.get_instance(base, "/health"), prober.get_instance(base, "/v1/models")
    )
    return verdicts.reach(view, base, health, models), models
