"""The server's Prometheus figures over the measured window, and whether they are this run's."""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass

from loadtest.config import LoadConfig, now
from loadtest.probe import Probe

HISTOGRAMS = {"cnnserve_batch_size", "cnnserve_queue_duration_seconds", "cnnserve_inference_duration_seconds"}
# Beyond what boundaries can shift (requests in flight at either scrape), the server's request counter
# must have grown by at least LOW and at most HIGH times what this run sent for its figures to be ours.
LOW, HIGH = 0.5, 2.0


@dataclass
class Sample:
    """One scrape: counter values by name, and the (model, version) pairs the server has loaded."""

    values: dict[str, float]
    models: set[tuple[str, str]]


def parse_metrics(text: str, model: str | None = None) -> Sample:
    """_sum/_count of the batch size, queue wait and compute histograms and images computed (of
    ``model`` only, when given); requests answered per protocol (``requests:grpc``,
    ``requests:http``); and the models of ``cnnserve_model_info``."""
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = {}
    models: set[tuple[str, str]] = set()
    for family in text_string_to_metric_families(text):
        if family.name in HISTOGRAMS or family.name == "cnnserve_images":
            for s in family.samples:
                if model and s.labels.get("model") not in (None, model):
                    continue
                if s.name.endswith(("_sum", "_count")) or s.name == "cnnserve_images_total":
                    values[s.name] = values.get(s.name, 0.0) + s.value
        elif family.name == "cnnserve_requests":
            for s in family.samples:
                if s.name == "cnnserve_requests_total":
                    key = f"requests:{s.labels.get('protocol')}"
                    values[key] = values.get(key, 0.0) + s.value
        elif family.name == "cnnserve_model_info":
            models.update((s.labels["model"], s.labels["version"]) for s in family.samples if s.value)
    return Sample(values, models)


def scrape_metrics(url: str, model: str | None = None, timeout: float = 5.0, security=None) -> Sample:
    """``security``: a service.security.client.ClientSecurity (TLS context, access key) or None."""
    import urllib.request

    request = urllib.request.Request(url, headers=security.headers() if security else {})
    context = security.ssl_context() if security and url.startswith("https:") else None
    with urllib.request.urlopen(request, timeout=timeout, context=context) as r:
        return parse_metrics(r.read().decode(), model)


def server_delta(before: dict | None, after: dict | None) -> dict | None:
    if not before or not after:
        return None

    def d(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    batches = d("cnnserve_batch_size_count")
    queued = d("cnnserve_queue_duration_seconds_count")
    return {
        "batches": int(batches),
        "images": int(d("cnnserve_batch_size_sum")),
        "batch_size_mean": d("cnnserve_batch_size_sum") / batches if batches else None,
        "queue_ms_mean": 1000 * d("cnnserve_queue_duration_seconds_sum") / queued if queued else None,
        "compute_ms_mean": 1000 * d("cnnserve_inference_duration_seconds_sum") / batches if batches else None,
    }


class Monitor(threading.Thread):
    """Progress line once a second; metrics scraped at the window's start and end."""

    def __init__(self, cfg: LoadConfig, counters: list, start: float, model: str | None = None) -> None:
        super().__init__(name="loadtest-monitor", daemon=True)
        self.cfg, self.counters, self.start_at = cfg, counters, start
        self.t0 = start + cfg.warmup
        self.t1 = None if cfg.requests is not None and cfg.duration is None else self.t0 + (cfg.duration or 10.0)
        self.url = cfg.resolved_metrics_url()
        self.model = model  # the model that answered the probe: only its histograms are read
        self.done = threading.Event()
        self.before: Sample | None = None
        self.after: Sample | None = None
        self.scrape_error: str | None = None if self.url else cfg.metrics_skip_reason()

    def _scrape(self) -> Sample | None:
        if self.url is None:
            return None
        try:
            return scrape_metrics(self.url, self.model, security=self.cfg.security())
        except Exception as e:
            self.scrape_error = f"{self.url}: {type(e).__name__}: {e}"
            return None

    def _totals(self) -> tuple[float, float, float]:
        return (sum(c[0] for c in self.counters), sum(c[1] for c in self.counters), sum(c[2] for c in self.counters))

    def run(self) -> None:
        k = self.cfg.images_per_request
        last = self._totals()
        tick = self.start_at + 1.0
        took_before = took_after = False  # a failed scrape is not retried until the end
        while True:
            events = [tick]
            if not took_before:
                events.append(self.t0)
            if self.t1 is not None and not took_after:
                events.append(self.t1)
            wait = min(events) - now()
            if self.done.wait(max(0.0, wait)):
                break
            t = now()
            if not took_before and t >= self.t0:
                self.before = self._scrape()
                took_before = True
            if self.t1 is not None and not took_after and t >= self.t1:
                self.after = self._scrape()
                took_after = True
            if t >= tick:
                cur = self._totals()
                ok, err, lat = (cur[i] - last[i] for i in range(3))
                last = cur
                phase = "warm-up" if t < self.t0 else ("run" if self.t1 is None or t < self.t1 else "finishing")
                if self.cfg.progress:
                    mean = f"{1000 * lat / ok:8.2f} ms" if ok else "      -   "
                    print(
                        f"[{t - self.start_at:6.1f}s] {phase:9s} {ok:8.0f} req/s {ok * k:9.0f} img/s  "
                        f"mean {mean}  errors {err:.0f}  (total {cur[0]:.0f} ok, {cur[1]:.0f} errors)",
                        file=sys.stderr,
                        flush=True,
                    )
                tick += 1.0
        if not took_before:
            self.before = self._scrape()
        if not took_after:
            self.after = self._scrape()

    def finish(self) -> None:
        self.done.set()
        self.join()

    def delta(self) -> dict | None:
        """The server's batching figures over the window (None without both scrapes)."""
        if self.before is None or self.after is None:
            return None
        return server_delta(self.before.values, self.after.values)

    def warnings(self, cfg: LoadConfig, probe: Probe, sent: int) -> list[str]:
        """Why the scraped figures may not be this run's (empty when they look right)."""
        if self.before is None or self.after is None:
            return []
        out = []
        where = f"the metrics at {self.url}"
        fix = "set --metrics-address to the target server's HTTP address"
        served = sorted(self.after.models)
        if (probe.model, probe.version) not in self.after.models:
            listed = ", ".join(f"{m}/{v}" for m, v in served) or "no cnnserve_model_info"
            out.append(
                f"{where} are of another model or server ({listed}) while the requests were answered by "
                f"model {probe.model}/{probe.version}: {fix}"
            )
        key = f"requests:{cfg.protocol}"
        grown = self.after.values.get(key, 0.0) - self.before.values.get(key, 0.0)
        slack = 10 + (0 if cfg.open_loop else cfg.concurrency)  # requests in flight at either scrape
        if sent and grown < LOW * sent - slack:
            out.append(
                f"{where} counted {grown:.0f} {cfg.protocol} requests during the window while this run sent "
                f"{sent}: they are another server's; {fix}"
            )
        elif sent and grown > HIGH * sent + slack:
            out.append(
                f"{where} counted {grown:.0f} {cfg.protocol} requests during the window while this run sent "
                f"{sent}: other clients were loading the server too, and its figures include their requests"
            )
        return out
