"""The recogniser's trust seams without a running service: hostile request bodies become 4xx reasons, the
catch-all answer leaks nothing, S3 keys cannot write outside their folder, the key check is constant-time,
keys from the environment do not reach Ray workers, a dead writer's lock expires, a gallery changed by
another process is noticed from gallery.json alone, and the audit trail holds decisions, never biometrics."""

from __future__ import annotations

import asyncio
import json
import os
import time

import numpy as np
import pytest

from mfr_ray.serve.parsing import RequestError, parse_far, parse_identity, parse_json_object, parse_k


def refused(call, *args) -> RequestError:
    with pytest.raises(RequestError) as info:
        call(*args)
    assert 400 <= info.value.status < 500 and info.value.error and info.value.reason
    return info.value


@pytest.mark.parametrize("body", [
    b"[" * 100_000,                                  # RecursionError in json
    b'{"a": 1' + b"0" * 5000 + b"}",                 # ValueError: int string conversion limit
    b'{"far": ' + b"1" * 310 + b"}",                 # an integer float() overflows on
    b'{"far": NaN}', b'{"far": Infinity}',
    b'{"a": {"nested": 1}}', b'{"a": [1, 2]}',
    b"\xff\xfe not utf-8", b"[]", b'"a string"',
])
def test_hostile_json_bodies_are_4xx(body):
    assert refused(parse_json_object, body).error == "bad_json"


@pytest.mark.parametrize("value", [1e400, float("inf"), float("nan"), "1e400", "1" * 400, 0, 1, -0.1, True,
                                   None, "abc", [0.1]])
def test_bad_far_is_400(value):
    assert refused(parse_far, value).error == "bad_far"


@pytest.mark.parametrize("value", [1e400, float("inf"), "1e400", "9" * 5000, 0, 51, -1, 2.5, True, None, "3x"])
def test_bad_k_is_400(value):
    assert refused(parse_k, value, 50).error == "bad_k"


def test_good_numbers_pass():
    assert parse_far("0.001") == parse_far(1e-3) == 0.001
    assert parse_k("5", 50) == parse_k(5, 50) == parse_k(5.0, 50) == 5
    assert parse_json_object(b'{"far": 0.01, "k": 3, "identity": "x"}') == {"far": 0.01, "k": 3, "identity": "x"}


@pytest.mark.parametrize("name", ["", "  ", "a/b", "..", "Jane\x00Doe", "Jane\u200bDoe", "Jane\u202eeoD",
                                  "x" * 201, 5, None, "Jane\nDoe"])
def test_bad_identity_names_are_refused(name):
    assert refused(parse_identity, name).error == "bad_identity"


def test_identity_names_are_nfc():
    assert parse_identity("Jose\u0301 Mari\u0301a ") == "Jos\u00e9 Mar\u00eda"


def test_the_catch_all_answer_leaks_no_traceback_or_path():
    from ray.exceptions import ActorUnavailableError

    from mfr_ray.serve.app import answer

    async def boom():
        raise RuntimeError("secret detail in /srv/mfr/app/secret_module.py line 42")

    async def dead():
        raise ActorUnavailableError("replica gone", None)

    response = asyncio.run(answer(boom()))
    body = response.body.decode()
    assert response.status_code == 500 and json.loads(body)["error"] == "internal"
    assert "secret" not in body and "/srv" not in body and "Traceback" not in body and ".py" not in body
    unavailable = asyncio.run(answer(dead()))
    assert unavailable.status_code == 503 and int(unavailable.headers["retry-after"]) >= 1
    bad = asyncio.run(answer(_raise(RequestError(400, "bad_far", "far must be a number"))))
    assert bad.status_code == 400 and json.loads(bad.body) == {"error": "bad_far", "reason": "far must be a number"}


async def _raise(err):
    raise err


@pytest.mark.parametrize("key", ["../../x.py", "pkg/../../x.py", "/etc/x.py", "a/../../b", "..", "a\\..\\b",
                                 "./a", "a/./b", "", "a\x00b"])
def test_object_keys_cannot_leave_the_folder(tmp_path, key):
    from mfr_ray.storage import StorageError, local_target

    with pytest.raises(StorageError, match="refused"):
        local_target(tmp_path / "pkg", key)


def test_plain_object_keys_land_inside(tmp_path):
    from mfr_ray.storage import local_target

    assert local_target(tmp_path, "a/b/weights.pt") == (tmp_path / "a" / "b" / "weights.pt").resolve()
    (tmp_path / "link").symlink_to("/etc")
    from mfr_ray.storage import StorageError

    with pytest.raises(StorageError, match="outside"):
        local_target(tmp_path, "link/passwd")


def test_key_check_is_constant_time(monkeypatch):
    """The digest comparison goes through hmac.compare_digest (an `==` would leak the match length)."""
    import hmac

    from mfr_ray.serve import auth

    calls, real = [], hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    digest = auth._digest("k" * 20, "test")
    assert digest.matches("k" * 20) and not digest.matches("x" * 20)
    assert len(calls) == 2 and all(len(a) == len(b) == 64 for a, b in calls)


def test_a_key_from_the_environment_leaves_it(monkeypatch):
    from mfr_ray.serve.auth import API_KEY_ENV, ENROL_KEY_ENV, load_enrol_digest, load_key_digest

    monkeypatch.setenv(API_KEY_ENV, "i" * 24)
    monkeypatch.setenv(ENROL_KEY_ENV, "e" * 24)
    identify = load_key_digest()
    assert identify is not None and API_KEY_ENV not in os.environ  # Ray workers started later inherit nothing
    enrol = load_enrol_digest(None, identify)
    assert enrol is not None and enrol != identify and ENROL_KEY_ENV not in os.environ
    monkeypatch.setenv(ENROL_KEY_ENV, "i" * 24)
    from mfr_ray.config.base import ConfigError

    with pytest.raises(ConfigError, match="key of its own"):
        load_enrol_digest(None, identify)


def test_plain_http_beyond_loopback_is_refused():
    from mfr_ray.config.base import ConfigError
    from mfr_ray.serve.app import ServeConfig

    cfg = ServeConfig(package="p", gallery="g", host="0.0.0.0")
    with pytest.raises(ConfigError, match="plain HTTP"):
        cfg.check_transport("0.0.0.0", tls=False)
    cfg.check_transport("127.0.0.1", tls=False)
    cfg.check_transport("0.0.0.0", tls=True)  # the proxy itself serves HTTPS
    ServeConfig(package="p", gallery="g", behind_tls_proxy=True).check_transport("10.0.0.5", tls=False)


def test_app_builder_without_a_host_requires_a_key(monkeypatch):
    from mfr_ray.config.base import ConfigError
    from mfr_ray.serve.app import app_builder
    from mfr_ray.serve.auth import API_KEY_ENV, API_KEY_FILE_ENV

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    monkeypatch.delenv(API_KEY_FILE_ENV, raising=False)
    with pytest.raises(ConfigError, match="needs an API key"):
        app_builder({"package": "p", "gallery": "g", "behind_tls_proxy": True})


def test_client_address_trusts_only_configured_proxies():
    from mfr_ray.serve.auth import client_address

    assert client_address("10.0.0.9", "1.2.3.4", []) == "10.0.0.9"  # anyone can send the header
    assert client_address("10.0.0.9", "6.6.6.6, 1.2.3.4", ["10.0.0.9"]) == "1.2.3.4"


def test_an_expired_lease_is_taken_over_and_a_live_one_is_not(tmp_path):
    from mfr_ray.config.common import StorageConfig
    from mfr_ray.data.layout import LOCK_JSON, DatasetLayout, OutputLocked, output_lock

    layout = DatasetLayout(str(tmp_path), StorageConfig())
    dead = {"host": "another-host", "pid": 1, "run_id": "dead", "since": time.time() - 400,
            "since_utc": "then", "expires": time.time() - 100}
    (tmp_path / LOCK_JSON).write_text(json.dumps(dead))
    with output_lock(layout, lease_s=60) as owner:  # a writer that died elsewhere: its lease ran out
        assert json.loads((tmp_path / LOCK_JSON).read_text())["run_id"] == owner["run_id"]
    live = dict(dead, expires=time.time() + 100)
    (tmp_path / LOCK_JSON).write_text(json.dumps(live))
    with pytest.raises(OutputLocked, match="lease ends") as info, output_lock(layout, lease_s=60):
        pass
    assert 0 < info.value.retry_after_s <= 101


def _fake_package(size: int = 4):
    class Package:
        package_id, embedding_size, folder = "p" * 16, size, "pkg"

    return Package()


def _row(identity: str, key: str, vector):
    from mfr_ray.serve.gallery import _utc_now, result_row

    return result_row(identity, key, "ok", "", "mtcnn", np.asarray(vector, np.float32), _utc_now())


def test_a_change_by_another_process_is_noticed_from_gallery_json(tmp_path):
    from mfr_ray.serve.gallery import Gallery

    package = _fake_package()
    served = Gallery.create_or_open(str(tmp_path / "g"), package)
    served.add_rows([_row("X", "X/1.jpg", [1, 0, 0, 0]), _row("Y", "Y/1.jpg", [0, 1, 0, 0])])
    assert served.search_identities(np.array([1, 0, 0, 0], np.float32), 1)[0].identity == "X"
    assert not served.refresh_if_changed()  # nothing changed: no part is read
    Gallery(str(tmp_path / "g")).remove("X")  # `mfr unenrol` elsewhere
    assert "X" in {m.identity for m in served.search_identities(np.array([1, 0, 0, 0], np.float32), 2)}
    assert served.refresh_if_changed()
    assert {m.identity for m in served.search_identities(np.array([1, 0, 0, 0], np.float32), 2)} == {"Y"}


def test_enrolment_appends_one_part_and_compaction_keeps_every_row(tmp_path):
    from mfr_ray.serve.gallery import TEMPLATES_DIR, Gallery

    gallery = Gallery.create_or_open(str(tmp_path / "g"), _fake_package())
    for i in range(5):
        gallery.add_rows([_row(f"P{i}", f"P{i}/1.jpg", np.eye(4)[i % 4])])
    assert len(gallery.manifest["parts"]) == 5 and gallery.manifest["version"] == 5
    before = Gallery(str(tmp_path / "g")).table.to_pylist()
    assert gallery.compact(max_parts=3) and not gallery.compact(max_parts=3)
    assert len(list((tmp_path / "g" / TEMPLATES_DIR).iterdir())) == 1
    assert Gallery(str(tmp_path / "g")).table.to_pylist() == before


def test_audit_lines_hold_decisions_and_no_biometrics(tmp_path):
    from mfr_ray.serve.audit import AuditLog, read_events

    log = AuditLog(str(tmp_path / "audit.jsonl"))
    log.record("enrol", key_id="abc", identity="Jane", decision="ok")
    log.record("identify", key_id="abc", identity=None, decision="unknown", score=0.1)
    events = read_events(str(tmp_path / "audit.jsonl"))
    assert [e["action"] for e in events] == ["enrol", "identify"] and all("time" in e for e in events)
    assert oct(os.stat(tmp_path / "audit.jsonl").st_mode & 0o777) == "0o600"


def test_a_command_line_audit_with_a_file_keeps_its_lines_off_the_console(tmp_path):
    """`mfr enrol` of thousands of people must not print an audit line per person: with a file, echo=False
    writes only the file; without one (an S3 gallery) and in a replica (echo on) the log line stays."""
    import logging

    from mfr_ray.serve.audit import AuditLog, read_events

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    AuditLog(None)  # the logger and its own handler exist before ours is added
    logging.getLogger("mfr_ray.audit").addHandler(handler)
    try:
        AuditLog(str(tmp_path / "a.jsonl"), echo=False).record("enrol", key_id="cli", identity="Quiet", decision="ok")
        AuditLog(None, echo=False).record("enrol", key_id="cli", identity="OnS3", decision="ok")
        AuditLog(str(tmp_path / "b.jsonl")).record("enrol", key_id="k", identity="Replica", decision="ok")
    finally:
        logging.getLogger("mfr_ray.audit").removeHandler(handler)
    assert [json.loads(line)["identity"] for line in seen] == ["OnS3", "Replica"]
    assert read_events(str(tmp_path / "a.jsonl"))[0]["identity"] == "Quiet"


def test_a_held_lease_is_renewed_and_a_writer_that_lost_its_lock_commits_nothing(tmp_path):
    """A long write keeps its lock (the lease is renewed while held); a writer whose lock was taken over
    (forced here) fails its fencing check and its commit changes nothing; a lock file left unreadable by a
    creator that died is taken over once a minute old, not before."""
    from mfr_ray.config.common import StorageConfig
    from mfr_ray.data.layout import LOCK_JSON, DatasetLayout, OutputLocked, holds_lock, output_lock
    from mfr_ray.serve.gallery import Gallery

    layout = DatasetLayout(str(tmp_path / "g"), StorageConfig())
    with output_lock(layout, lease_s=0.6) as owner:
        time.sleep(1.5)  # more than twice the lease: only renewal keeps it
        with pytest.raises(OutputLocked), output_lock(layout, lease_s=0.6):
            pass
        assert holds_lock(layout, owner)
    gallery = Gallery.create_or_open(str(tmp_path / "g"), _fake_package())
    with gallery._lock() as owner, output_lock(gallery.layout, force=True):  # another writer takes over
        assert not holds_lock(gallery.layout, owner)
        with pytest.raises(OutputLocked, match="lost its lock"):
            gallery._commit(gallery.manifest, ["part-x.parquet"], owner)
    assert Gallery(str(tmp_path / "g")).manifest["parts"] == []
    (tmp_path / "g" / LOCK_JSON).write_text('{"host": "half')
    with pytest.raises(OutputLocked), output_lock(layout, lease_s=5):
        pass
    os.utime(tmp_path / "g" / LOCK_JSON, (time.time() - 120, time.time() - 120))
    with output_lock(layout, lease_s=5) as owner:
        assert holds_lock(layout, owner)


def test_identify_answers_disclose_no_other_enrolled_people_by_default():
    from mfr_ray.serve.app import disclosed
    from mfr_ray.serve.recognise import Candidate, IdentifyResult, ImageReport

    image = ImageReport("ok", "", "mtcnn", 0.1)
    others = [Candidate("Alice", 0.31, "t1", "Alice/1.jpg"), Candidate("Bob", 0.2, "t2", "Bob/1.jpg")]
    unknown = IdentifyResult("unknown", None, 0.31, 0.4, 1e-3, True, image, others, "best score 0.31 < 0.40")
    hidden = disclosed(unknown, candidates=False)
    assert hidden["candidates"] == [] and hidden["score"] is None and "Alice" not in json.dumps(hidden)
    match = IdentifyResult("match", "Alice", 0.61, 0.4, 1e-3, True, image, others[:1] + others[1:])
    shown = disclosed(match, candidates=False)
    assert shown["identity"] == "Alice" and shown["score"] == 0.61 and "Bob" not in json.dumps(shown)
    assert disclosed(unknown, candidates=True)["candidates"][0]["identity"] == "Alice"  # the operator's choice


def test_the_rate_table_stays_bounded():
    from mfr_ray.serve.auth import RateLimiter

    limiter = RateLimiter(1.0, 1)
    limiter.MAX_CLIENTS = 100
    for i in range(1000):
        limiter.allow(f"10.0.{i // 256}.{i % 256}")
    assert len(limiter._buckets) <= 100
