"""A small HTTP inference service watched by the surprise monitor (FastAPI + uvicorn).

Run (a torch model, or an ONNX file with ``--onnx model.onnx`` instead of --model/--weights):

    python examples/serve.py --model resnet50 --weights resnet50.pt \
        --table resnet50.safetensors --host 127.0.0.1 --port 8000

Endpoints:

- ``POST /predict`` with JSON ``{"inputs": B x C x H x W floats (preprocessed as for
  calibration), "labels": [B ints] (optional), "surprise": true (optional)}`` answers
  ``{"predictions": [B], "logits": [B x K], "surprise": [B summaries] or null}``; a summary is
  ``MonitorReport.sample()`` (beta, low_beta, the most surprising and expected filters), or
  ``null`` for an input that was not judged on the request path (sampled out, async mode, or a
  monitoring failure: those are counted in the metrics).
- ``GET /metrics``: Prometheus metrics (the monitor's, plus the process's).
- ``GET /healthz``: ``{"status": "ok", "monitor": "sync" | "async" | "off"}``.

``--mode async`` answers from the plain model and judges a copy of the inputs on a worker
thread; ``--sample-every K`` judges one input in K; ``--no-monitor`` serves the bare model (for
comparison). The monitor never turns a prediction into an error: an input the model itself
cannot run is answered with HTTP 400 naming the problem.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, HTTPException
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from pydantic import BaseModel
from starlette.responses import Response
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from calibrate import CalibrationTable  # noqa: E402
from monitor import MonitorReport, SurpriseMonitor, load_onnx  # noqa: E402
from monitor.loading import build_model, load_weights  # noqa: E402

log = logging.getLogger("serve")


class PredictRequest(BaseModel):
    inputs: list
    labels: list[int] | None = None
    surprise: bool = False
    max_filters: int = 5


def build_app(
    model: nn.Module, monitor: SurpriseMonitor | None, registry: CollectorRegistry = REGISTRY
) -> FastAPI:
    """The service: ``model`` answers, ``monitor`` (if any) watches; ``close()`` on shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if monitor is not None:
            monitor.close()

    app = FastAPI(title="surprise-monitor example service", lifespan=lifespan)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok", "monitor": monitor.mode if monitor is not None else "off"}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/predict")
    def predict(req: PredictRequest) -> dict[str, Any]:  # a thread-pool worker per request
        try:
            x = torch.tensor(req.inputs, dtype=torch.float32)
        except (ValueError, TypeError) as exc:
            raise HTTPException(
                422, f"inputs must be a rectangular array of numbers: {exc}"
            ) from exc
        if x.ndim != 4 or x.shape[0] == 0:
            raise HTTPException(422, f"inputs must be a non-empty B x C x H x W array, got "
                                     f"shape {list(x.shape)}")  # fmt: skip
        try:
            if monitor is not None:
                result = monitor.run(x, req.labels)
                output, report, rows = result.output, result.report, result.rows.tolist()
            else:
                with torch.no_grad():
                    output, report, rows = model(x), None, []
        except Exception as exc:  # the model itself cannot run this input
            raise HTTPException(400, f"the model cannot run this input: {exc}") from exc
        logits = output.float()
        body: dict[str, Any] = {
            "predictions": logits.argmax(dim=1).tolist(),
            "logits": [[v if math.isfinite(v) else None for v in row] for row in logits.tolist()],
            "surprise": None,
        }
        if req.surprise:
            body["surprise"] = _summaries(report, rows, len(x), req.max_filters)
        return body

    return app


def _summaries(
    report: MonitorReport | None, rows: list[int], n: int, max_filters: int
) -> list[dict[str, Any] | None]:
    out: list[dict[str, Any] | None] = [None] * n
    if report is not None:
        for j, row in enumerate(rows):
            out[row] = report.sample(j, max_filters=max_filters)
    return out


def load_model(args: argparse.Namespace) -> nn.Module:
    if args.onnx:
        return load_onnx(args.onnx)
    if not args.model:
        raise SystemExit("serve.py: give --model (and --weights) or --onnx")
    model = build_model(args.model, None, json.loads(args.model_kwargs))
    if args.weights:
        load_weights(model, args.weights)
    return model.eval()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="torchvision architecture name or module:factory")
    p.add_argument("--model-kwargs", default="{}", help="JSON keyword arguments for the factory")
    p.add_argument("--weights", help="state_dict file (loaded with weights_only=True)")
    p.add_argument("--onnx", help="an ONNX model instead of --model/--weights")
    p.add_argument("--table", help="calibration table (.safetensors); required with the monitor")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--mode", choices=["sync", "async"], default="sync")
    p.add_argument("--sample-every", type=int, default=1, help="judge one input in K")
    p.add_argument("--queue-size", type=int, default=64, help="async mode: batches queued")
    p.add_argument("--no-monitor", action="store_true", help="serve the bare model")
    p.add_argument("--log-flags", action="store_true", help="log each flagged input")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    import uvicorn

    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args)
    monitor = None
    if not args.no_monitor:
        if not args.table:
            raise SystemExit("serve.py: --table is required unless --no-monitor")

        def on_flag(report: MonitorReport) -> None:
            log.info("flagged input: %s", report.to_json(max_filters=3))

        monitor = SurpriseMonitor(
            model, CalibrationTable.load(args.table, exemplars=False), metrics=True,
            mode=args.mode, sample_every=args.sample_every, queue_size=args.queue_size,
            on_flag=on_flag if args.log_flags else None,
        )  # fmt: skip
    uvicorn.run(build_app(model, monitor), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
