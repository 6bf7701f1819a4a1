"""Signed tables (HMAC-SHA256 under a secret key): what the checksum cannot stop, the signature
does. An attacker who can write the table file but has no key edits it (silencing every alarm)
and recomputes the checksum: without a key the table loads, with the key it is refused."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import stat
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from surprise_monitor import CalibrationTable, SurpriseMonitor
from surprise_monitor.monitor.table_file import (
    SIGNATURE_FIELD,
    TableError,
    TableSignatureError,
    read_table_file,
)
from surprise_monitor.monitor.table_key import TableKeyError, generate_key, load_key
from tests._models import TinyCNN

DATA = Path(__file__).resolve().parents[1] / "data"
KEY = b"SECRET-table-key-0123456789abcdef"
OTHER_KEY = b"the-attackers-own-key-0123456789"
NULLS = ("alarm.null_predicted", "alarm.null_labelled")


@pytest.fixture(scope="module")
def old():
    """A real table with a held-out null (tests/data), its model and inputs, some of which
    alarm when judged against their labels."""
    table = CalibrationTable.load(DATA / "old_table.safetensors")
    model = TinyCNN(num_classes=3)
    model.load_state_dict(load_file(DATA / "old_model.safetensors"))
    inputs = json.loads((DATA / "old_results.json").read_text())["inputs"]
    return table, model.eval(), torch.tensor(inputs["images"]), torch.tensor(inputs["labels"])


@pytest.fixture()
def signed(old, tmp_path) -> Path:
    return old[0].save(tmp_path / "signed.safetensors", key=KEY)


def forge(path: Path, *, tensors=(), strip: bool = False, sign_with: bytes | None = None) -> None:
    """Rewrite a table file as an attacker who knows the format but not the key: set the named
    float32 tensors to 1e30, recompute the SHA-256 the way the loader checks it (metadata JSON,
    sorted tensor entries, data), and keep the old signature, strip it, or sign with another
    key."""
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    entries = json.loads(raw[8 : 8 + size])
    header = entries.pop("__metadata__")
    data = bytearray(raw[8 + size :])
    for name in tensors:
        start, stop = entries[name]["data_offsets"]
        assert entries[name]["dtype"] == "F32"
        data[start:stop] = np.full((stop - start) // 4, 1e30, np.float32).tobytes()
    covered = header["meta"].encode() + json.dumps(entries, sort_keys=True).encode() + data
    header["sha256"] = hashlib.sha256(covered).hexdigest()
    if strip:
        del header[SIGNATURE_FIELD]
    if sign_with is not None:
        header[SIGNATURE_FIELD] = hmac.new(sign_with, covered, hashlib.sha256).hexdigest()
    text = json.dumps({**entries, "__metadata__": header}).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(data))


def judged(model, table, x, y, **kwargs):
    """The labelled report's score, p-value and alarm."""
    with SurpriseMonitor(model, table, **kwargs) as monitor:
        r = monitor.inspect(x, y)
    return r.score, r.p_value, r.alarm


def test_the_resigning_attack_silences_alarms_without_a_key_and_is_refused_with_it(old, signed):
    table, model, x, y = old
    assert bool(judged(model, table, x, y)[2].any())  # some inputs alarm
    forge(signed, tensors=NULLS)  # the null's scores to 1e30; the checksum recomputed
    accepted = CalibrationTable.load(signed)  # the checksum cannot tell: the threat
    assert float(accepted.alarm.null_labelled.scores.min()) == pytest.approx(1e30, rel=1e-6)
    assert not bool(judged(model, accepted, x, y)[2].any())  # every alarm silenced
    with pytest.raises(TableSignatureError, match="signature mismatch: the table was changed"):
        CalibrationTable.load(signed, key=KEY)
    with pytest.raises(TableError, match=f"{signed.name}: signature mismatch"):
        SurpriseMonitor(model, signed, table_key=KEY)


def test_an_edit_of_the_metadata_with_the_checksum_recomputed_is_refused(signed):
    raw = signed.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    entries = json.loads(raw[8 : 8 + size])
    meta = json.loads(entries["__metadata__"]["meta"])
    meta["class_names"] = ["a", "b", "c"]
    entries["__metadata__"]["meta"] = json.dumps(meta, sort_keys=True)
    text = json.dumps(entries).encode()
    signed.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + size :])
    forge(signed)  # the checksum of the edited metadata; the old signature kept
    assert CalibrationTable.load(signed).class_names == ["a", "b", "c"]
    with pytest.raises(TableSignatureError, match="signature mismatch"):
        CalibrationTable.load(signed, key=KEY)


def test_resigning_with_another_key_or_stripping_the_signature_is_refused(signed):
    forge(signed, tensors=NULLS, sign_with=OTHER_KEY)
    assert CalibrationTable.load(signed, key=OTHER_KEY).signature_verified  # the attacker's key
    with pytest.raises(TableSignatureError, match="signed with another key"):
        CalibrationTable.load(signed, key=KEY)
    forge(signed, strip=True)
    with pytest.raises(
        TableSignatureError, match=r"is not signed; sign it with surprise-calibrate"
    ):
        CalibrationTable.load(signed, key=KEY)


def test_an_unsigned_table_is_refused_with_a_key_and_loads_without(old, tmp_path, caplog):
    path = old[0].save(tmp_path / "plain.safetensors")
    message = (
        f"{path} is not signed; sign it with surprise-calibrate --sign-key or "
        "table.save(..., key=...)"
    )
    with pytest.raises(TableSignatureError) as info:
        CalibrationTable.load(path, key=KEY)
    assert str(info.value) == message
    with caplog.at_level(logging.INFO, logger="surprise_monitor.monitor.table"):
        table = CalibrationTable.load(path)
    assert (table.signed, table.signature_verified) == (False, False)
    lines = [r for r in caplog.records if "authenticity not checked" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    assert "not signed" in lines[0].getMessage()


def test_a_signed_table_loads_with_its_key_and_judges_as_the_unsigned_one(old, signed, caplog):
    table, model, x, y = old
    with caplog.at_level(logging.INFO, logger="surprise_monitor.monitor.table"):
        verified = CalibrationTable.load(signed, key=KEY)
    assert not [r for r in caplog.records if "authenticity" in r.getMessage()]
    assert (verified.signed, verified.signature_verified) == (True, True)
    assert verified.sha256 == table.fingerprint()  # the checksum is the unsigned file's
    want = judged(model, table, x, y)
    for got in (judged(model, verified, x, y), judged(model, signed, x, y, table_key=KEY)):
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="surprise_monitor.monitor.table"):
        unchecked = CalibrationTable.load(signed)  # no key: loads, the signature unchecked
    assert (unchecked.signed, unchecked.signature_verified) == (True, False)
    lines = [r.getMessage() for r in caplog.records if "authenticity" in r.getMessage()]
    assert len(lines) == 1 and "the table is signed" in lines[0]
    file = read_table_file(signed, key=KEY)
    assert (file.signed, file.signature_verified) == (True, True)


def test_exemplars_are_read_again_with_the_same_key(old, signed):
    lean = CalibrationTable.load(signed, exemplars=False, key=KEY)
    assert lean.top_k == old[0].top_k  # read from the signed file, verified
    lean = CalibrationTable.load(signed, exemplars=False, key=KEY)
    old[0].save(signed)  # the same table unsigned: the same checksum, no signature
    with pytest.raises(TableSignatureError, match="is not signed"):
        lean.ensure_exemplars()


def test_the_key_is_never_shown(old, signed, caplog):
    table, model, _, _ = old
    with caplog.at_level(logging.DEBUG):
        verified = CalibrationTable.load(signed, key=KEY)
        texts = [repr(verified), str(verified), json.dumps(verified._metadata())]
        forge(signed, tensors=NULLS)
        for attempt in (
            lambda: CalibrationTable.load(signed, key=KEY),
            lambda: load_key(KEY[:15]),
            lambda: table.save(signed, key=KEY[:15]),
            lambda: SurpriseMonitor(model, table, table_key=KEY),
        ):
            with pytest.raises(ValueError) as info:
                attempt()
            texts.append(str(info.value))
    texts += [r.getMessage() for r in caplog.records]
    for text in texts:
        assert KEY.decode() not in text and KEY[:15].decode() not in text
    assert KEY not in signed.read_bytes()


def test_keys_from_bytes_and_files(tmp_path):
    (tmp_path / "nl.key").write_bytes(KEY + b"\n")
    (tmp_path / "ws.key").write_bytes(b"  " + KEY + b" \r\n")
    for source in (KEY, bytearray(KEY), tmp_path / "nl.key", str(tmp_path / "ws.key")):
        assert load_key(source) == KEY
    with pytest.raises(TableKeyError, match="at least 16 bytes") as info:
        load_key(b"x" * 15)
    assert isinstance(info.value, ValueError)
    (tmp_path / "short.key").write_text("tooshort\n")
    with pytest.raises(TableKeyError, match=r"short\.key is too short"):
        load_key(tmp_path / "short.key")
    with pytest.raises(TableKeyError, match=r"missing\.key: no such file"):
        load_key(tmp_path / "missing.key")
    with pytest.raises(TypeError, match="bytes or a key file's path"):
        load_key(12345)  # type: ignore[arg-type]


def test_generate_key_writes_a_private_random_key_once(old, tmp_path):
    path = generate_key(tmp_path / "table.key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert text.endswith("\n") and len(bytes.fromhex(text.strip())) == 32
    assert load_key(path) == text.strip().encode()
    assert load_key(generate_key(tmp_path / "second.key")) != load_key(path)
    with pytest.raises(TableKeyError, match="already exists"):
        generate_key(path)
    assert path.read_text() == text
    saved = old[0].save(tmp_path / "t.safetensors", key=path)  # a key file works as the key
    assert CalibrationTable.load(saved, key=load_key(path)).signature_verified


def test_the_monitor_takes_the_key_with_a_path_or_a_table_loaded_with_it(old, signed, tmp_path):
    table, model, x, _ = old
    with SurpriseMonitor(model, signed, table_key=KEY) as monitor:
        assert monitor.table.signature_verified
        monitor.inspect(x)
    key_file = tmp_path / "k"
    key_file.write_bytes(KEY + b"\n")
    loaded = CalibrationTable.load(signed, exemplars=False, key=key_file)
    SurpriseMonitor(model, loaded, table_key=KEY).close()  # the same key, given as bytes
    for unverified in (table, CalibrationTable.load(signed)):
        with pytest.raises(TableError, match=r"pass the path, or load the table with key=\.\.\."):
            SurpriseMonitor(model, unverified, table_key=KEY)
    with pytest.raises(TableError, match="pass the path"):
        SurpriseMonitor(model, loaded, table_key=OTHER_KEY)
    plain = table.save(tmp_path / "plain.safetensors")
    with pytest.raises(TableError, match="is not signed"):
        SurpriseMonitor(model, plain, table_key=key_file)
    SurpriseMonitor(model, signed).close()  # no key: not authenticated, still accepted
