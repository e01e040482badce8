"""`mfr serve` end to end: a real Ray Serve application on loopback, real HTTP, real LFW faces.

One application for the module (API key on, enrolment key of its own): /verify gives the decision the
package's calibrated threshold predicts, with the score of the in-process `recognise.verify` (1e-4);
/identify after /enrol gives what the in-process `recognise.identify` gives on the same gallery; bad images
and hostile bodies get a 4xx JSON reason, never a 500; a request without the key is refused, and /enrol
refuses the identification key; the HTTP proxy listens on 127.0.0.1 only; after the application is deleted
and started again the enrolments are still there; a person removed with `mfr unenrol` while the service
runs is no longer returned once the poll interval has passed; decisions land in the audit file; and a
client over the rate gets 429 with Retry-After."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import secrets
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from mfr_ray.serve.app import APP_NAME, LimitsConfig, ServeConfig, start
from tests.services import descendants, free_port, listening_sockets

pytestmark = pytest.mark.slow  # two Serve starts, each loading MTCNN, dlib and the network: ~1-2 min

N_PAIRS = 8  # genuine and impostor pairs each, from LFW fold 1
FARS = (0.125, 0.25)  # resolvable with 8 impostor pairs
FAR = 0.125
FPIR = 0.2  # per search; 12 CelebA calibration people, bare and masked, resolve it
ENROLLED = ("Aaron_Peirsol", "Abdullah_Gul", "Adam_Sandler")  # 3+ images each
POLL_S = 1.0  # the gallery keeper's poll for changes made outside the service
RATE, BURST = 5.0, 40  # the tests' sequential requests stay under it; the rate test goes over


def lfw_image(lfw_dir: Path, name: str, number: int) -> Path:
    return lfw_dir / name / f"{name}_{number:04d}.jpg"


def lfw_pairs(shared: Path, lfw_dir: Path) -> list[tuple[Path, Path, bool]]:
    """The first N_PAIRS genuine and N_PAIRS impostor pairs of pairs.txt (fold 1)."""
    lines = (shared / "datasets" / "lfw" / "pairs.txt").read_text().splitlines()
    fold_size = int(lines[0].split()[1])
    genuine = [line.split() for line in lines[1 : 1 + N_PAIRS]]
    impostor = [line.split() for line in lines[1 + fold_size : 1 + fold_size + N_PAIRS]]
    pairs = [(lfw_image(lfw_dir, n, int(i)), lfw_image(lfw_dir, n, int(j)), True) for n, i, j in genuine]
    pairs += [
        (lfw_image(lfw_dir, a, int(i)), lfw_image(lfw_dir, b, int(j)), False) for a, i, b, j in impostor
    ]
    return pairs


@dataclasses.dataclass
class Service:
    url: str
    key: str
    enrol_key: str
    cfg: ServeConfig
    package: object  # the same package, loaded in this process
    pairs: list

    def post(self, route: str, key: str | None = "", **kwargs) -> requests.Response:
        headers = kwargs.pop("headers", {})
        key = self.key if key == "" else key
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        return requests.post(f"{self.url}{route}", headers=headers, timeout=120, **kwargs)


@pytest.fixture(scope="module")
def calibrated_package(tmp_path_factory, shared, lfw_dir, celeba_dir):
    """The CASIA checkpoint exported as a package, its thresholds calibrated as `mfr export` does
    (`calibrate` on pair scores of the package's own embedding path) on 8 + 8 LFW pairs."""
    from mfr_ray.config.common import TrackingConfig
    from mfr_ray.serve.calibration import calibrate
    from mfr_ray.serve.export import export_package
    from mfr_ray.serve.package import PACKAGE_JSON, load_package
    from mfr_ray.serve.search_calibration import add_search_calibration

    out = tmp_path_factory.mktemp("serve") / "package"
    export_package(
        str(shared / "weights" / "mobilefacenet_casia.ckpt"), out, tracking=TrackingConfig(enabled=False)
    )
    package = load_package(out)
    pairs = lfw_pairs(shared, lfw_dir)
    results = package.embed_images([p.read_bytes() for a, b, _ in pairs for p in (a, b)])
    assert all(r.ok for r in results), [r.reason for r in results if not r.ok]
    scores = np.array([package.score(results[2 * i], results[2 * i + 1]) for i in range(len(pairs))])
    same = np.array([s for _, _, s in pairs])
    points = calibrate(scores, same, FARS, f"LFW pairs.txt fold 1, first {N_PAIRS} + {N_PAIRS} pairs")
    spec = json.loads((out / PACKAGE_JSON).read_text())
    spec["calibration"] = {"operating_points": [dataclasses.asdict(p) for p in points], "n_pairs": len(pairs)}
    (out / PACKAGE_JSON).write_text(json.dumps(spec))
    add_search_calibration(out, celeba_dir, per_identity=1, max_identities=12)  # /identify?fpir=
    return out, load_package(out), pairs


@pytest.fixture(scope="module")
def service(ray_local, calibrated_package, tmp_path_factory):
    from ray import serve

    folder, package, pairs = calibrated_package
    key, enrol_key = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    key_file = tmp_path_factory.mktemp("serve-key") / "api_key"
    key_file.write_text(key + "\n")
    enrol_key_file = key_file.parent / "enrol_key"
    enrol_key_file.write_text(enrol_key)
    cfg = ServeConfig(
        package=str(folder),
        gallery=str(folder.parent / "gallery"),
        port=free_port(),
        api_key_file=str(key_file),
        enrol_key_file=str(enrol_key_file),
        far=FAR,
        embedder_num_cpus=0,
        gallery_poll_s=POLL_S,
        disclose_candidates=True,  # the tests compare candidate lists; the default hides them (test below)
        allowed_fpirs=[FPIR],
        limits=LimitsConfig(max_body_bytes=2 * 2**20, max_pixels=1_000_000, rate_per_s=RATE, burst=BURST),
    )
    start(cfg)
    yield Service(f"http://127.0.0.1:{cfg.port}", key, enrol_key, cfg, package, pairs)
    serve.shutdown()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_verify_gives_the_decision_the_threshold_predicts(service):
    from mfr_ray.serve.recognise import verify

    threshold = service.package.threshold(FAR)
    for a, b, same in service.pairs:
        answer = service.post("/verify", json={"a": b64(a.read_bytes()), "b": b64(b.read_bytes())})
        assert answer.status_code == 200, answer.text
        got = answer.json()
        local = verify(service.package, a.read_bytes(), b.read_bytes(), FAR)
        assert got["score"] == pytest.approx(local.score, abs=1e-4), (a.name, b.name)
        assert got["threshold"] == pytest.approx(threshold) and got["far"] == FAR
        assert got["decision"] == ("same" if got["score"] >= threshold else "different")
        if abs(local.score - threshold) > 1e-4:
            assert got["decision"] == local.decision
        assert [i["status"] for i in got["images"]] == ["ok", "ok"]
    # the other calibrated FAR is chosen per request; an uncalibrated one is refused with the known ones
    a, b, _ = service.pairs[0]
    other = service.post("/verify", json={"a": b64(a.read_bytes()), "b": b64(b.read_bytes()), "far": 0.25})
    assert other.json()["threshold"] == pytest.approx(service.package.threshold(0.25))
    unknown = service.post("/verify", json={"a": b64(a.read_bytes()), "b": b64(b.read_bytes()), "far": 0.01})
    assert unknown.status_code == 400 and "0.125" in unknown.json()["reason"]


def _jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG")
    return buf.getvalue()


def test_bad_inputs_get_4xx_with_a_reason(service, lfw_dir):
    face = lfw_image(lfw_dir, "Aaron_Peirsol", 1).read_bytes()
    rng = np.random.default_rng(0)
    big = Image.open(io.BytesIO(face)).resize((1200, 1200))  # 1.44 MP > the test's 1 MP limit
    buf = io.BytesIO()
    big.save(buf, format="JPEG", quality=60)
    cases = {
        "corrupt": (face[: len(face) // 3], 422, "decode_error"),
        "empty": (b"", 422, "decode_error"),
        "not an image": (b"GIF? no: plain text, not pixels\n" * 4, 422, "decode_error"),
        "huge": (buf.getvalue(), 413, "too_large"),
        "no face": (_jpeg(rng.integers(0, 255, (250, 250, 3), dtype=np.uint8)), 422, "no_face"),
    }
    for name, (data, status, error) in cases.items():
        answer = service.post("/identify", data=data, headers={"Content-Type": "image/jpeg"})
        assert answer.status_code == status, (name, answer.status_code, answer.text)
        body = answer.json()
        assert body["error"] == error and body["reason"], (name, body)
        pair = service.post("/verify", json={"a": b64(face), "b": b64(data)})
        assert pair.status_code == status and "image b" in pair.json()["reason"], (name, pair.text)
    too_big = service.post("/identify", data=b"\xff" * (3 * 2**20), headers={"Content-Type": "image/jpeg"})
    assert too_big.status_code == 413 and "exceeds" in too_big.json()["reason"]
    for body, error in (
        (b"{not json", "bad_json"),
        (b'{"a": "!!!", "b": "x"}', "bad_base64"),
        (b"{}", "missing_image"),
    ):
        answer = service.post("/verify", data=body, headers={"Content-Type": "application/json"})
        assert answer.status_code == 400 and answer.json()["error"] == error, answer.text
    bad_k = service.post("/identify?k=0", data=face, headers={"Content-Type": "image/jpeg"})
    assert bad_k.status_code == 400 and bad_k.json()["error"] == "bad_k"
    no_name = service.post("/enrol", key=service.enrol_key, data=face, headers={"Content-Type": "image/jpeg"})
    assert no_name.status_code == 400 and no_name.json()["error"] == "bad_identity"


def test_hostile_bodies_get_4xx_never_500(service, lfw_dir):
    face = b64(lfw_image(lfw_dir, "Aaron_Peirsol", 1).read_bytes())
    cases = [
        ("/verify", b"[" * 100_000, "bad_json"),
        ("/verify", b'{"a": 1' + b"0" * 5000 + b"}", "bad_json"),
        ("/verify", f'{{"a": "{face}", "b": "{face}", "far": {"1" * 310}}}'.encode(), "bad_json"),
        ("/verify", f'{{"a": "{face}", "b": "{face}", "far": 1e400}}'.encode(), "bad_far"),
        ("/verify", f'{{"a": "{face}", "b": "{face}", "far": NaN}}'.encode(), "bad_json"),
        ("/identify", f'{{"image": "{face}", "k": 1e400}}'.encode(), "bad_k"),
        ("/identify", f'{{"image": {{"nested": "{face}"}}}}'.encode(), "bad_json"),
    ]
    for route, body, error in cases:
        answer = service.post(route, data=body, headers={"Content-Type": "application/json"})
        assert answer.status_code == 400, (route, body[:40], answer.status_code, answer.text[:200])
        assert answer.json()["error"] == error and answer.json()["reason"], answer.text[:200]
    query = service.post("/identify?k=1e400&far=1e400", data=lfw_image(lfw_dir, "Aaron_Peirsol", 1).read_bytes(),
                         headers={"Content-Type": "image/jpeg"})
    assert query.status_code == 400 and query.json()["error"] == "bad_far"


def test_a_streamed_body_without_length_is_cut_at_the_limit(service):
    def chunks():  # chunked transfer encoding: no Content-Length to check up front; one chunk past 2 MiB
        for _ in range(33):
            yield b"\xff" * 2**16

    answer = service.post("/identify", data=chunks(), headers={"Content-Type": "image/jpeg"})
    assert answer.status_code == 413 and "exceeds" in answer.json()["reason"]


def test_enrolment_has_its_own_key(service, lfw_dir):
    face = lfw_image(lfw_dir, "Aaron_Peirsol", 1).read_bytes()
    body = {"identity": "Mallory", "image": b64(face)}
    assert service.post("/enrol", json=body).status_code == 401  # the identification key cannot enrol
    assert service.post("/identify", key=service.enrol_key, data=face,
                        headers={"Content-Type": "image/jpeg"}).status_code == 401
    query = service.post("/enrol?identity=Mallory", key=service.enrol_key, data=face,
                         headers={"Content-Type": "image/jpeg"})
    assert query.status_code == 400 and "query string" in query.json()["reason"]
    hidden = service.post("/enrol", key=service.enrol_key, json={"identity": "Mal\u200blory", "image": b64(face)})
    assert hidden.status_code == 400 and hidden.json()["error"] == "bad_identity"


def test_a_person_removed_while_serving_is_not_returned(service, lfw_dir):
    """`mfr unenrol` in another process: the service notices within POLL_S (the keeper polls gallery.json)."""
    from mfr_ray.serve.gallery import Gallery

    person = "Adrien_Brody"
    enrolled = service.post("/enrol", key=service.enrol_key, data=lfw_image(lfw_dir, person, 1).read_bytes(),
                            headers={"Content-Type": "image/jpeg", "X-Identity": person})
    assert enrolled.status_code == 200 and enrolled.json()["stored"], enrolled.text
    probe = lfw_image(lfw_dir, person, 2).read_bytes()

    def candidates() -> list[str]:
        got = service.post("/identify?k=5", data=probe, headers={"Content-Type": "image/jpeg"})
        assert got.status_code == 200, got.text
        return [c["identity"] for c in got.json()["candidates"]]

    assert candidates()[0] == person
    assert Gallery(service.cfg.gallery).remove(person) == 1
    time.sleep(POLL_S + 1.0)
    for _ in range(3):
        assert person not in candidates()


def test_decisions_land_in_the_audit_file(service):
    from mfr_ray.serve.audit import AUDIT_FILE, read_events
    from mfr_ray.serve.auth import _digest

    path = Path(service.cfg.gallery) / AUDIT_FILE
    events = read_events(str(path))
    actions = {e["action"] for e in events}
    assert {"enrol", "identify"} <= actions, actions
    key_id, enrol_id = _digest(service.key, "t").key_id, _digest(service.enrol_key, "t").key_id
    assert {e["key_id"] for e in events if e["action"] == "identify"} == {key_id}
    assert {e["key_id"] for e in events if e["action"] == "enrol"} == {enrol_id}
    text = path.read_text()
    assert service.key not in text and service.enrol_key not in text and "embedding" not in text




def test_requests_without_the_key_are_refused(service, lfw_dir):
    face = lfw_image(lfw_dir, "Aaron_Peirsol", 1).read_bytes()
    for key in (None, "wrong-" + service.key, service.key[:-1]):
        answer = service.post("/identify", key=key, data=face, headers={"Content-Type": "image/jpeg"})
        assert answer.status_code == 401 and answer.json()["error"] == "unauthorized", key
        assert service.key not in answer.text
    assert (
        service.post("/identify", key=None, data=face, headers={"X-API-Key": service.key}).status_code == 200
    )
    health = requests.get(f"{service.url}/healthz", timeout=30)
    assert health.status_code == 200 and health.json() == {"status": "ok"}  # probes see no details
    detailed = requests.get(
        f"{service.url}/healthz", headers={"Authorization": f"Bearer {service.key}"}, timeout=30
    )
    assert detailed.json()["package_id"] == service.package.package_id


def test_http_listens_on_loopback_only(service, ray_local):
    node = ray_local._private.worker._global_node
    pids = descendants([info.process.pid for infos in node.all_processes.values() for info in infos])
    sockets = listening_sockets(pids)
    assert any(port == service.cfg.port for *_, port in sockets), "the Serve proxy was not found"
    exposed = [s for s in sockets if s[2] not in {"127.0.0.1", "::1"}]
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_every_replica_runs_the_lean_request_path(service, ray_local):
    """Serve's lean settings reach each deployment's replica processes (their environment, read from /proc):
    gRPC between deployments, user code on the event loop, access lines in the log file only."""
    from mfr_ray.serve.app import LEAN_REQUEST_PATH

    node = ray_local._private.worker._global_node
    replicas = {}
    for pid in descendants([info.process.pid for infos in node.all_processes.values() for info in infos]):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:  # a process that ended meanwhile
            continue
        if title.startswith("ray::ServeReplica:mfr-recogniser:"):
            env = dict(item.decode().split("=", 1) for item in environ if b"=" in item)
            replicas[title.rsplit(":", 1)[-1]] = {k: env.get(k) for k in LEAN_REQUEST_PATH}
    assert set(replicas) >= {"Frontend", "Embedder", "GalleryKeeper"}, replicas
    assert all(env == LEAN_REQUEST_PATH for env in replicas.values()), replicas


def _enrol_and_identify(service, lfw_dir):
    from mfr_ray.serve.gallery import Gallery
    from mfr_ray.serve.recognise import identify

    for name in ENROLLED:
        for number in (1, 2):
            data = lfw_image(lfw_dir, name, number).read_bytes()
            answer = service.post("/enrol", key=service.enrol_key, json={"identity": name, "image": b64(data)})
            assert answer.status_code == 200 and answer.json()["status"] == "ok", answer.text
    again = service.post(
        "/enrol", key=service.enrol_key,
        json={"identity": ENROLLED[0], "image": b64(lfw_image(lfw_dir, ENROLLED[0], 1).read_bytes())},
    )
    assert again.json()["stored"] is False  # the same image is not stored twice
    gallery = Gallery(service.cfg.gallery)
    assert sorted(gallery.identities()) == sorted(ENROLLED) and gallery.templates().num_rows == 2 * len(
        ENROLLED
    )
    answers = {}
    for name in ENROLLED + ("Abel_Pacheco",):  # three enrolled people's third image, and a stranger
        probe = lfw_image(lfw_dir, name, 3 if name != "Abel_Pacheco" else 1).read_bytes()
        got = service.post("/identify?k=3", data=probe, headers={"Content-Type": "image/jpeg"}).json()
        local = identify(service.package, gallery, probe, FAR, k=3)
        assert got["decision"] == ("match" if got["score"] >= got["threshold"] else "unknown")
        assert [c["identity"] for c in got["candidates"]] == [c.identity for c in local.candidates]
        np.testing.assert_allclose(
            [c["score"] for c in got["candidates"]], [c.score for c in local.candidates], atol=1e-4
        )
        if abs(local.score - local.threshold) > 1e-4:
            assert (got["decision"], got["identity"]) == (local.decision, local.identity)
        answers[name] = got
    for name in ENROLLED:
        assert answers[name]["candidates"][0]["identity"] == name
    _identify_per_search(service, gallery, lfw_image(lfw_dir, ENROLLED[0], 3).read_bytes())
    return answers


def _identify_per_search(service, gallery, probe: bytes) -> None:
    """At a per-search rate the service decides with the threshold calibrated against its gallery as it is,
    the same one `mfr identify --fpir` computes; a rate outside the operator's list is refused."""
    from mfr_ray.serve.recognise import identify

    got = service.post(f"/identify?fpir={FPIR}&k=3", data=probe, headers={"Content-Type": "image/jpeg"})
    assert got.status_code == 200, got.text
    body, local = got.json(), identify(service.package, gallery, probe, None, k=3, fpir=FPIR)
    assert body["fpir"] == FPIR and body["far"] is None and body["gallery_identities"] == len(ENROLLED)
    assert body["threshold"] == pytest.approx(local.threshold, abs=1e-5) and body["comparison_kind"].startswith("search-")
    looser = service.post("/identify?fpir=0.5", data=probe, headers={"Content-Type": "image/jpeg"})
    assert looser.status_code == 400 and looser.json()["error"] == "fpir_not_allowed"
    both = service.post(f"/identify?fpir={FPIR}&far={FAR}", data=probe, headers={"Content-Type": "image/jpeg"})
    assert both.status_code == 400 and both.json()["error"] == "far_and_fpir"


def test_enrol_identify_and_a_restart_keeps_the_gallery(service, lfw_dir):
    from ray import serve

    from mfr_ray.serve.gallery import Gallery

    before = _enrol_and_identify(service, lfw_dir)
    failed = service.post("/enrol", key=service.enrol_key,
                          json={"identity": "Nobody", "image": b64(b"not an image at all")})
    assert failed.status_code == 422 and failed.json()["error"] == "decode_error"
    rows = Gallery(service.cfg.gallery).table.to_pylist()  # refused, and its row kept: every input is a row
    assert [(r["status"], r["embedding"]) for r in rows if r["identity"] == "Nobody"] == [
        ("decode_error", None)
    ]
    serve.delete(APP_NAME)
    down = None
    try:
        down = requests.get(f"{service.url}/healthz", timeout=10).status_code
    except requests.ConnectionError:
        pass
    assert down != 200
    start(service.cfg)
    probe = lfw_image(lfw_dir, ENROLLED[1], 3).read_bytes()
    after = service.post("/identify?k=3", data=probe, headers={"Content-Type": "image/jpeg"}).json()
    assert after["candidates"] == before[ENROLLED[1]]["candidates"]
    stats = requests.get(f"{service.url}/healthz", headers={"X-API-Key": service.key}, timeout=30).json()[
        "gallery"
    ]
    assert stats["templates"] == 2 * len(ENROLLED) and stats["identities"] == len(ENROLLED)


def _replica(name: str):
    """The live Serve replica actor of deployment `name` of this application."""
    import ray

    actors = [a for a in ray.util.list_named_actors(all_namespaces=True)
              if f"{APP_NAME}#{name}#" in a["name"]]
    assert len(actors) == 1, actors
    return ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"])


def _people(lfw_dir: Path, count: int, skip: tuple[str, ...]) -> list[str]:
    names = [d.name for d in sorted(lfw_dir.iterdir()) if d.name.startswith("B") and d.name not in skip]
    return [n for n in names if (lfw_dir / n / f"{n}_0002.jpg").is_file()][:count]


def test_faults_under_load_lose_no_enrolment(service, lfw_dir):
    """Clients identify while another enrols and a third removes people (`mfr unenrol`'s path); the
    Embedder replica is killed mid-run and the gallery keeper mid-enrolment. Only 503 with Retry-After may
    answer 5xx, every enrolment answered as stored is in the gallery, and the gallery stays readable."""
    import threading
    from collections import Counter

    import ray

    from mfr_ray.serve.gallery import Gallery

    people = _people(lfw_dir, 14, ENROLLED)
    victims, newcomers = people[:2], people[2:]
    for name in victims:
        got = service.post("/enrol", key=service.enrol_key, json={"identity": name,
                           "image": b64(lfw_image(lfw_dir, name, 1).read_bytes())})
        assert got.status_code == 200, got.text
    probes = [lfw_image(lfw_dir, n, 2).read_bytes() for n in people[:4]]
    codes, stored, lock, stop = Counter(), [], threading.Lock(), threading.Event()

    failures: list[str] = []

    def record(answer) -> None:
        code = answer.status_code
        if code == 503 and not answer.headers.get("Retry-After"):
            code = "503 without Retry-After"
        with lock:
            codes[code] += 1

    def guarded(work):
        def run(*args):
            try:
                work(*args)
            except Exception as exc:  # noqa: BLE001 - a thread's failure must fail the test
                failures.append(f"{work.__name__}: {type(exc).__name__}: {exc}")
        return run

    def identifier(i: int) -> None:
        while not stop.is_set():  # 3 clients of one key, 0.75 s apart: under the key's RATE, whatever the speed
            record(service.post("/identify", data=probes[i % len(probes)], headers={"Content-Type": "image/jpeg"}))
            time.sleep(0.75)

    def enroller() -> None:
        for name in newcomers:
            for _ in range(8):
                answer = service.post("/enrol", key=service.enrol_key, json={"identity": name,
                                      "image": b64(lfw_image(lfw_dir, name, 1).read_bytes())})
                record(answer)
                if answer.status_code == 200:
                    stored.append(answer.json()["template_id"])
                    break
                time.sleep(int(answer.headers.get("Retry-After", "1")))

    def unenroller() -> None:
        for name in victims:
            time.sleep(4)
            Gallery(service.cfg.gallery).remove(name)

    threads = [threading.Thread(target=guarded(identifier), args=(i,)) for i in range(3)]
    threads += [threading.Thread(target=guarded(enroller)), threading.Thread(target=guarded(unenroller))]
    started = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(3)
    ray.kill(_replica("Embedder"), no_restart=True)  # Serve starts another
    while len(stored) < len(newcomers) // 3 and time.monotonic() - started < 60:
        time.sleep(0.2)
    ray.kill(_replica("GalleryKeeper"), no_restart=True)  # mid-enrolment
    threads[3].join(timeout=100)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    print(f"\nfault+load: {sum(codes.values())} requests in {time.monotonic() - started:.0f} s, by code "
          f"{dict(sorted(codes.items()))}, enrolments answered stored {len(stored)}/{len(newcomers)}")
    assert not failures, failures
    gallery = Gallery(service.cfg.gallery)
    present = set(gallery.templates().column("template_id").to_pylist())
    assert set(stored) <= present, f"lost enrolments: {set(stored) - present}"  # goal: 0 lost
    assert len(stored) == len(newcomers) and not set(gallery.identities()) & set(victims)
    assert set(codes) <= {200, 503} and codes[200] > 0, codes
    rows = gallery.table.to_pylist()
    assert len({r["template_id"] for r in rows}) == len(rows)  # nothing stored twice by the retries
    assert all(len(r["embedding"]) == 128 for r in rows if r["status"] == "ok")


def test_over_the_rate_a_client_gets_429_with_retry_after(service):
    """Runs last: it empties this client's bucket, then waits for it to refill."""
    codes, retry = [], None
    for _ in range(2 * BURST):
        answer = requests.get(f"{service.url}/healthz", timeout=30)
        codes.append(answer.status_code)
        if answer.status_code == 429:
            retry = answer.headers.get("Retry-After")
            assert answer.json()["error"] == "rate_limited"
            break
    assert codes[-1] == 429 and set(codes[:-1]) == {200} and len(codes) >= BURST // 2, codes
    assert retry is not None and int(retry) >= 1
    keyed = requests.get(f"{service.url}/healthz", headers={"X-API-Key": service.key}, timeout=30)
    assert keyed.status_code == 200 and "package_id" in keyed.json()  # key holders have their own bucket
    time.sleep(BURST / RATE)
