"""The hardening probes as a table of requests: every bad or hostile request an attacker or a
load test sent the service, with the status and a phrase its answer must have. Used by
``tests/serve/test_hostile_inputs.py`` (each once) and ``bench/soak_serve.py`` (over and over,
beside slow clients and restarts)."""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Callable

import httpx

from surprise_monitor.monitor.table import CalibrationTable
from tests._models import mixed_inputs


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (the pixel data is a stub)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))
            + chunk(b"IEND", b""))  # fmt: skip


def image_ready_table(table: CalibrationTable) -> CalibrationTable:
    """``table`` recording an image preprocessing (so ``/predict/image`` decodes uploads)."""
    table.data_source = {"kind": "imagefolder", "root": "/nowhere", "resize": 0, "crop": 0,
                         "mean": [0.5] * 3, "std": [0.25] * 3, "grayscale": False}  # fmt: skip
    return table


def real_png() -> bytes:
    """An 8 x 8 photo-like PNG."""
    import numpy as np
    from PIL import Image

    out = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


X2 = mixed_inputs(2).tolist()


def predict(body: dict | str) -> Callable[[str], httpx.Response]:
    text = body if isinstance(body, str) else json.dumps(body)
    return lambda url: httpx.post(url + "/predict", content=text, timeout=30,
                                  headers={"content-type": "application/json"})  # fmt: skip


def image(data: bytes, query: str = "") -> Callable[[str], httpx.Response]:
    return lambda url: httpx.post(url + "/predict/image" + query, content=data, timeout=30,
                                  headers={"content-type": "image/png"})  # fmt: skip


def with_value(value: float | bool, row: int = 1) -> list:
    x = json.loads(json.dumps(X2))
    x[row][0][0][0] = value
    return x


CASES = {  # name: (request, status, a phrase of the answer)
    # what broke (a 500, or a 200 with a made-up answer)
    "label '²' (isdigit, not ASCII)": (predict({"inputs": X2, "labels": ["²", 1]}), 422,
                                       "is not a class of this model"),
    "label of 5,000 digits as a string": (predict({"inputs": X2, "labels": ["9" * 5000, 1]}),
                                          422, "is not a class"),
    "label of 5,000 digits as a number": (
        predict(f'{{"inputs": {json.dumps(X2)}, "labels": [{"9" * 5000}, 1]}}'), 400,
        "4300 digits"),
    "PNG claiming 60000x60000": (image(png_header(60000, 60000)), 413, "decompression bomb"),
    "PNG over Pillow's warning size": (image(png_header(10000, 10000)), 413,
                                       "decompression bomb"),
    "alarm id of 5,000 nines": (lambda u: httpx.get(f"{u}/alarms/{'9' * 5000}", timeout=30),
                                404, "no such alarm"),
    "alarm id of 5,000 nines, thumbnail": (
        lambda u: httpx.get(f"{u}/alarms/{'9' * 5000}/thumbnail.png", timeout=30), 404,
        "no such alarm"),
    "NaN input": (predict({"inputs": with_value(float("nan"), 0)[:1]}), 422, "NaN or Inf"),
    "Inf input": (predict({"inputs": with_value(float("inf"), 0)[:1]}), 422, "NaN or Inf"),
    "one NaN row of two": (predict({"inputs": with_value(float("nan"))}), 422,
                           "inputs 1 hold NaN or Inf values (1 of 2)"),
    "label 10 of 3 classes": (predict({"inputs": X2, "labels": [10, 1]}), 422, "[0, 3)"),
    "label -1": (predict({"inputs": X2, "labels": [-1, 1]}), 422, "[0, 3)"),
    "label 10^30": (predict({"inputs": X2, "labels": [10**30, 1]}), 422, "[0, 3)"),
    "label '10' as a string": (predict({"inputs": X2, "labels": ["10", 1]}), 422, "[0, 3)"),
    "labels list too long": (predict({"inputs": X2, "labels": [1, 1, 1]}), 422,
                             "3 entries for 2 inputs"),
    "labels list too short": (predict({"inputs": X2, "labels": [1]}), 422,
                              "1 entries for 2 inputs"),
    "label true": (predict({"inputs": X2, "labels": [True, 1]}), 422, "valid integer"),
    "boolean pixel": (predict({"inputs": with_value(True)}), 422, "true / false"),
    "image label '²'": (image(real_png(), "?label=%C2%B2"), 422, "is not a class"),
    "max_filters -1": (predict({"inputs": X2, "max_filters": -1}), 422, "greater than"),
    "surprise as a string": (predict({"inputs": X2, "surprise": "yes"}), 422, "valid boolean"),
    # what held, and stays held
    "body over the limit, declared": (
        lambda u: httpx.post(u + "/predict", content=b"x" * (17 << 20), timeout=60,
                             headers={"content-type": "application/json"}), 413, "--max-body-mb"),
    "path traversal on an alarm": (lambda u: httpx.get(u + "/alarms/..%2F..%2Fetc%2Fpasswd",
                                                       timeout=30), 404, ""),
    "not JSON": (predict("{not json"), 422, "JSON decode error"),
    "ragged inputs": (predict({"inputs": [[1.0, 2.0], [3.0]]}), 422, "rectangular"),
    "wrong input size": (predict({"inputs": mixed_inputs(1)[..., :6].tolist()}), 422,
                         "[3, 8, 8]"),
    "too many inputs": (predict({"inputs": [X2[0]] * 65}), 413, "--max-batch"),
    "not an image": (image(b"not an image"), 422, "not a readable"),
    "a GIF": (lambda u: httpx.post(u + "/predict/image", content=b"GIF89a" + b"\0" * 30,
                                   headers={"content-type": "image/png"}, timeout=30), 422,
              "not a readable"),
}  # fmt: skip
