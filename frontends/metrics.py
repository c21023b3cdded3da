"""Prometheus metrics for ``/metrics``: the cluster's, read from the scheduler at every scrape,
and the HTTP server's own requests.

The cluster's figures live in the scheduler (queue, jobs, model loads, step times) and on the
nodes (staged and resident bytes, as the scheduler last heard them), so a scrape asks for a
``ClusterStatus`` and turns it into metric families: nothing here can drift from the source.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from actors.messages import ClusterStatus

CONTENT_TYPE = CONTENT_TYPE_LATEST


class _Cluster:
    """A collector over one ClusterStatus (prometheus_client calls ``collect`` once, at render)."""

    def __init__(self, status: ClusterStatus):
        self.status = status

    def collect(self) -> Iterator[Metric]:
        status, stats = self.status, self.status.stats
        yield GaugeMetricFamily("atelier_queue_depth", "Jobs waiting to start.", value=status.queued_total)
        jobs = GaugeMetricFamily("atelier_jobs", "Jobs the scheduler remembers, by state.", labels=["state"])
        for state, count in sorted(status.counts.items()):
            jobs.add_metric([state], count)
        yield jobs
        finished = CounterMetricFamily("atelier_jobs_finished", "Jobs that ended, by final state.", labels=["state"])
        for state, count in sorted(stats.finished.items()):
            finished.add_metric([state], count)
        yield finished
        if stats.job_seconds_counts:
            bounds = [*(repr(float(b)) for b in stats.job_seconds_buckets), "+Inf"]
            yield HistogramMetricFamily("atelier_job_seconds", "Jobs from submit to end.",
                                        buckets=list(zip(bounds, stats.job_seconds_counts, strict=True)),
                                        sum_value=stats.job_seconds_sum)
        yield CounterMetricFamily("atelier_store_errors", "Artifact store writes that failed.",
                                  value=stats.store_errors)
        yield GaugeMetricFamily("atelier_store_failing", "1 while the artifact store's last write failed.",
                                value=int(stats.store_failing))
        yield CounterMetricFamily("atelier_store_swept", "Job outputs deleted by the store's retention.",
                                  value=stats.store_swept)
        for name, value, text in (("sent", stats.webhook_sent, "Cluster events a webhook took."),
                                  ("failed", stats.webhook_failed, "Cluster events no webhook retry got through."),
                                  ("dropped", stats.webhook_dropped, "Cluster events dropped unsent from a slow or "
                                                                     "dead webhook's full queue.")):
            yield CounterMetricFamily(f"atelier_webhook_{name}", text, value=value)
        yield from self._models()
        yield from self._memory()

    def _models(self) -> Iterator[Metric]:
        loads = CounterMetricFamily("atelier_model_loads", "Models loaded onto a device, by where from.",
                                    labels=["model", "source"])
        load_seconds = CounterMetricFamily("atelier_model_load_seconds", "Time spent loading models.", labels=["model"])
        steps = CounterMetricFamily("atelier_steps", "Denoising steps run (one per batch step).", labels=["model"])
        step_seconds = CounterMetricFamily("atelier_step_seconds", "Time spent in denoising steps.", labels=["model"])
        images = CounterMetricFamily("atelier_images", "Images generated.", labels=["model"])
        batches = CounterMetricFamily("atelier_batches", "Pipeline calls.", labels=["model"])
        for model, counters in sorted(self.status.stats.models.items()):
            for source, count in sorted(counters.loads.items()):
                loads.add_metric([model, source], count)
            load_seconds.add_metric([model], counters.load_seconds)
            steps.add_metric([model], counters.steps)
            step_seconds.add_metric([model], counters.step_seconds)
            images.add_metric([model], counters.images)
            batches.add_metric([model], counters.batches)
        yield from (loads, load_seconds, steps, step_seconds, images, batches)

    def _memory(self) -> Iterator[Metric]:
        staged = GaugeMetricFamily("atelier_staged_bytes", "Weights staged in a node's shared memory.",
                                   labels=["node", "model"])
        budget = GaugeMetricFamily("atelier_stage_budget_bytes", "A node's staging budget.", labels=["node"])
        for loader in self.status.loaders:
            budget.add_metric([loader.node], loader.budget_bytes)
            for model, size in sorted(loader.staged.items()):
                staged.add_metric([loader.node, model], size)
        resident = GaugeMetricFamily("atelier_resident_bytes", "Models resident on a runner's device.",
                                     labels=["runner", "model"])
        busy = GaugeMetricFamily("atelier_runner_busy", "1 while a runner has a batch.", labels=["runner"])
        for runner in self.status.runners:
            busy.add_metric([runner.name], 1 if runner.job else 0)
            for model, size in sorted(runner.capabilities.resident.items()):
                resident.add_metric([runner.name, model], size)
        yield from (staged, budget, resident, busy)


class HttpMetrics:
    """The HTTP server's own counters, and the rendering of everything for a scrape."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("atelier_http_requests", "HTTP requests, by route and status.",
                                ["method", "route", "status"], registry=self.registry)
        self.seconds = Histogram("atelier_http_request_seconds", "HTTP request handling time.", ["route"],
                                 registry=self.registry)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.seconds.labels(route).observe(seconds)

    def render(self, status: ClusterStatus) -> bytes:
        cluster = CollectorRegistry()
        cluster.register(_Cluster(status))
        return generate_latest(cluster) + generate_latest(self.registry)
