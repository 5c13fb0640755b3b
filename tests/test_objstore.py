"""Data on object storage (data/objstore.py), read through network faults: against a real
S3-compatible store (SeaweedFS) behind a proxy that cuts responses, answers errors, stalls, and goes
away (tests/object_store.py). The reference is always the same read or the same run on local files."""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

import pytest

from data import objstore
from data.objstore import Counters, ObjectStoreError, Retries
from data.local_store import LocalStore, Unavailable
from tests.object_store import FaultProxy

pytestmark = pytest.mark.xdist_group("objstore")

BUCKET = "glm-test"
QUICK = Retries(timeout_s=1.0, tries=30, give_up_s=60.0, backoff_s=0.05, max_backoff_s=0.5)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    try:
        s = LocalStore(tmp_path_factory.mktemp("weed")).start()
    except Unavailable as e:
        if os.environ.get("CI", "").lower() == "true":  # CI must run them: a skip there hides a broken fixture
            pytest.fail(f"no local object store under CI=true: {e}")
        pytest.skip(f"no local object store: {e}")
    proxy = FaultProxy(s.ports[3])
    saved = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = s.endpoint
    objstore.client().create_bucket(Bucket=BUCKET)
    try:
        yield s, proxy
    finally:
        if saved is None:
            os.environ.pop("AWS_ENDPOINT_URL", None)
        else:
            os.environ["AWS_ENDPOINT_URL"] = saved
        proxy.close()
        s.stop(grace=1.0)  # its data is the test's: no need to wait for a clean exit


@pytest.fixture
def through_proxy(store, monkeypatch):
    """Reads in this process go through the fault proxy; its rules start empty."""
    _, proxy = store
    proxy.clear()
    proxy.up()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    yield proxy
    proxy.clear()


def _upload_tree(root: Path, prefix: str) -> None:
    for directory, _, files in os.walk(root):
        for f in files:
            path = Path(directory) / f
            objstore.upload(path, f"{prefix}/{path.relative_to(root).as_posix()}")


def _url(name: str) -> str:
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}/{name}"


# ---- one object ------------------------------------------------------------------------------------

def test_a_read_through_cuts_errors_stalls_and_an_outage_delivers_every_byte_once(store, through_proxy):
    proxy = through_proxy
    data = os.urandom(3_000_000)
    url = _url("blob.bin")
    objstore.put_bytes(data, url)
    proxy.add("cut", "blob.bin", after=100_000)  # the body ends midway, the connection closes
    proxy.add("status", "blob.bin", nth=2)  # 503 SlowDown
    proxy.add("stall", "blob.bin", nth=3, after=50_000, seconds=3)  # no byte for longer than the read timeout
    proxy.add("status", "blob.bin", nth=4, status=500, code="InternalError")
    counters = Counters()
    assert objstore.read_bytes(url, QUICK, counters) == data
    assert counters.retries == 4 and counters.bytes == len(data) and len(proxy.fired()) == 4
    gets = [what for method, path, what in proxy.log if method == "GET"]
    assert gets == ["cut", "status", "stall", "status", "ok"]

    # the store goes away in the middle of a read (connections refused) and comes back 2 s later
    proxy.add("cut", "blob.bin", after=1_500_000, down_s=2.0)
    started = time.monotonic()
    assert objstore.read_bytes(url, QUICK, counters := Counters()) == data
    assert counters.retries >= 2 and time.monotonic() - started >= 2.0


def test_what_cannot_succeed_stops_at_once_and_a_store_away_too_long_stops_at_the_bound(store, through_proxy):
    proxy = through_proxy
    url = _url("there.bin")
    objstore.put_bytes(b"x" * 1000, url)
    for missing, code in ((url.replace("there", "not-there"), "HTTP 404 NoSuchKey"),
                          (f"s3://no-such-bucket-{uuid.uuid4().hex[:6]}/k", "HTTP 404 NoSuchBucket")):
        started = time.monotonic()
        with pytest.raises(ObjectStoreError, match=code) as e:
            objstore.read_bytes(missing, QUICK)
        assert missing in str(e.value) and "gave up" not in str(e.value) and time.monotonic() - started < 5
    proxy.add("status", "there.bin", status=403, code="AccessDenied")
    with pytest.raises(ObjectStoreError, match=r"s3://\S+there.bin: HTTP 403 AccessDenied"):
        objstore.read_bytes(url, QUICK)
    proxy.down()
    with pytest.raises(ObjectStoreError, match=r"there.bin: EndpointConnectionError: .*gave up after 3 tries in \d+ s "
                                               r"\(data.read_tries=3"):
        objstore.read_bytes(url, Retries(timeout_s=1.0, tries=3, backoff_s=0.05))
    proxy.up()


# ---- the loader ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(store, tmp_path_factory):
    """The tiny experiment's corpus, on local disk and under s3://glm-test/<id>/ (GLM_DATA_ROOT either)."""
    from tests.data_helpers import tiny_corpus

    local = tiny_corpus(tmp_path_factory.mktemp("data"))
    remote = f"s3://{BUCKET}/corpus-{uuid.uuid4().hex[:8]}"
    _upload_tree(local, remote)
    return local, remote


def test_a_shard_that_keeps_failing_goes_the_on_error_way(store, corpus, through_proxy):
    """Past the bound, `fail` stops naming the URL, the error and the tries; `skip` skips the shard
    whole and counts it, as for a damaged shard."""
    from data import format as fmt
    from data.stream import ErrorPolicy, SlotStream, open_dataset, read_shard

    proxy = through_proxy
    _, remote = corpus
    few = Retries(timeout_s=1.0, tries=2, give_up_s=30.0, backoff_s=0.05)
    ds = open_dataset("general", f"{remote}/tiny/general", retries=few)
    for n in (1, 2):
        proxy.add("status", "general/shard-000001", nth=n)
    with pytest.raises(fmt.DataError, match=r"s3://\S+/tiny/general/shard-000001.tar: HTTP 503 SlowDown.*gave up "
                                            r"after 2 tries .*before its first sample; listed in s3://"):
        list(read_shard(ds, 1))

    for n in (1, 2):
        proxy.add("status", "general/shard-000002", nth=n)
    policy = ErrorPolicy("skip", max_fraction=1.0)
    stream = SlotStream(ds, 0, 1, seed=0, window=4, vocab_size=512, policy=policy)
    drawn = [next(stream) for _ in range(sum(ds.samples) - ds.samples[2])]  # one pass, shard 2 left out
    assert drawn and policy.counts["general"]["shards"] == 1
    assert policy.counts["general"]["samples"] == ds.samples[2]
    assert "shard-000002" in next(iter(policy.bad.values()))


# ---- training runs ---------------------------------------------------------------------------------

RUN = ["train.max_steps=14"]  # both stages, a validation at step 10


@pytest.fixture(scope="module")
def local_runs(corpus, tmp_path_factory):
    """The reference: the same run on the local files, per number of loader workers (which decides
    what each reader reads)."""
    from tests.test_train import _run

    local, _ = corpus
    done = {}

    def run(workers: int) -> Path:
        if workers not in done:
            done[workers] = tmp_path_factory.mktemp("local") / "run"
            _run(local, done[workers], *RUN, f"data.num_workers={workers}")
        return done[workers]
    return run


def _s3_env(remote: str, endpoint: str) -> dict:
    from tests.test_train import _env

    return {**_env(Path("/nonexistent")), "GLM_DATA_ROOT": remote, "AWS_ENDPOINT_URL": endpoint}


@pytest.mark.parametrize("workers", [0, 2], ids=["in_process", "two_workers"])
def test_a_run_reading_from_the_store_through_faults_equals_the_run_on_local_files(store, corpus, local_runs,
                                                                                  tmp_path, workers):
    """Every source read from the store through the proxy: a response cut midway, 503, a stall, and
    (with the reads in the training process) the store away when the run starts and back 10 s later,
    then restarted for real in the middle of the run. Every step's loss is the local run's, exactly;
    the retries are in TensorBoard."""
    import subprocess

    from tests.test_train import ROOT, _command, scalars

    s, proxy = store
    local, remote = corpus
    proxy.clear()
    proxy.add("status", "tiny/code/manifest.json", status=500, code="InternalError")
    proxy.add("cut", "tiny/general/shard-", after=7000)  # the first general shard read
    proxy.add("status", "tiny/code/shard-")  # the first code shard read (stage 2), 503
    proxy.add("stall", "tiny/general/shard-000004", after=3000, seconds=4)  # validation at step 10
    run_dir = tmp_path / "run"
    overrides = [*RUN, "data.read_timeout_s=2", "data.read_retry_s=60", f"data.num_workers={workers}"]
    restarted = threading.Event()
    if workers == 0:
        proxy.down()
        threading.Timer(10.0, proxy.up).start()

        def restart_midway():  # once the run has read a few shards: the store goes and comes back
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                if sum(1 for m, path, what in list(proxy.log) if m == "GET" and "shard-" in path) >= 4:
                    s.restart()
                    restarted.set()
                    return
                time.sleep(0.2)
        threading.Thread(target=restart_midway, daemon=True).start()
    p = subprocess.run(_command(run_dir, *overrides), env=_s3_env(remote, proxy.endpoint), cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert len(proxy.fired()) == 4, proxy.log
    want, got = scalars(local_runs(workers)), scalars(run_dir)
    for name in ("lm loss", "mtp_1 loss", "grad-norm", "lm loss validation"):
        assert got[name] == want[name], name
    retries = got["data-read-retries"]
    assert retries[14] >= 2 and retries[1] <= retries[14], retries  # the cut and the 503, in the training readers
    assert got["data-read-seconds"][14] > 0
    assert want["data-read-retries"][14] == 0
    if workers == 0:
        assert restarted.wait(timeout=60), "the store was not restarted during the run"


def test_a_run_killed_while_reading_from_the_store_resumes_exactly(store, corpus, local_runs, tmp_path):
    """SIGKILL to the whole run at the start of step 9 (its loader in the middle of the store's shards),
    then the same command again: from the checkpoint of step 8, every step's loss is the uninterrupted
    local run's."""
    import signal

    from tests.test_train import _interrupt, _run, scalars

    _, remote = corpus
    run_dir = tmp_path / "run"
    code, _ = _interrupt(remote, run_dir, 9, signal.SIGKILL, "train.save_every=4", *RUN)
    assert code == -signal.SIGKILL and (run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000008"
    out = _run(remote, run_dir, "train.save_every=4", *RUN)
    assert f"resumed from {run_dir / 'checkpoints' / 'step-00000008'}" in out
    want, got = scalars(local_runs(0)), scalars(run_dir)
    assert got["lm loss"] == want["lm loss"] and got["params-norm"] == want["params-norm"]


# ---- preparing onto the store --------------------------------------------------------------------

def _jsonl_inputs(directory: Path) -> Path:
    import gzip
    import json

    import zstandard

    directory.mkdir(parents=True)
    for k in range(5):
        lines = "".join(json.dumps({"text": f"crawl {k} document {d}: " + "lorem ipsum dolor " * (d + 1)}) + "\n"
                        for d in range(3 + 9 * k))
        name = directory / f"crawl-{k}.jsonl"
        if k == 3:
            (directory / f"crawl-{k}.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
        elif k == 4:
            (directory / f"crawl-{k}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
        else:
            name.write_text(lines)
    return directory


PREPARE = ["--vocab-size", "512", "--sample-tokens", "128", "--shard-tokens", "512", "--name", "web", "-q",
           "--workers", "1"]


@pytest.fixture(scope="module")
def prepare(tmp_path_factory) -> list[str]:
    """PREPARE with the tokenizer trained once (`--vocab-size` alone trains it at every prepare)."""
    from tests.data_helpers import bpe_tokenizer

    return [*PREPARE, "--tokenizer", str(bpe_tokenizer(tmp_path_factory.mktemp("tokenizer")))]


def _objects(prefix: str) -> dict[str, bytes]:
    return {url[len(prefix) + 1:]: objstore.read_bytes(url) for url in objstore.list_keys(f"{prefix}/")}


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_prepare_onto_the_store_writes_what_a_local_prepare_writes_parts_and_merge_included(store, prepare, tmp_path,
                                                                                           capsys):
    from data import cli

    inputs = _jsonl_inputs(tmp_path / "in")
    assert cli.main(["prepare", str(inputs), *prepare, "-o", str(tmp_path / "local")]) == 0
    local = _files(tmp_path / "local")
    assert len([n for n in local if n.startswith("shard-")]) > 3

    out = _url("web")
    assert cli.main(["prepare", str(inputs), *prepare, "-o", out]) == 0
    assert _objects(out) == local
    assert cli.main(["inspect", "--verify", out]) == 0 and ", 0 bad" in capsys.readouterr().out

    # an existing dataset: refused without --overwrite; replaced with it, nothing stale left behind
    assert cli.main(["prepare", str(inputs), *prepare, "-o", out]) == 2
    assert "already holds a prepared dataset" in capsys.readouterr().err
    more = [*prepare[:5], "256", *prepare[6:]]  # smaller shards: more of them
    assert cli.main(["prepare", str(inputs), *more, "-o", out, "--overwrite"]) == 0
    assert len(_objects(out)) > len(local)
    assert cli.main(["prepare", str(inputs), *prepare, "-o", out, "--overwrite"]) == 0
    assert _objects(out) == local

    # parts on the store, merged from there
    merged = _url("web")
    for i in range(3):
        assert cli.main(["prepare", str(inputs), *prepare, "-o", merged, "--part", f"{i}/3"]) == 0
    assert len(objstore.list_keys(f"{merged}.parts/")) == 3 * 3  # samples, index, record per part
    assert cli.main(["prepare", str(inputs), *prepare, "-o", merged, "--merge", "3"]) == 0
    assert _objects(merged) == local and not objstore.list_keys(f"{merged}.parts/")


def test_an_interrupted_upload_leaves_no_manifest_and_no_staged_files(store, prepare, through_proxy, tmp_path,
                                                                      monkeypatch, capsys):
    import tempfile

    from data import cli

    proxy = through_proxy
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "staging"))
    (tmp_path / "staging").mkdir()
    inputs = _jsonl_inputs(tmp_path / "in")
    out = _url("web")
    proxy.add("status", "web/shard-000002.tar", status=403, code="AccessDenied")
    assert cli.main(["prepare", str(inputs), *prepare, "-o", out]) == 2
    err = capsys.readouterr().err
    assert f"{out}/shard-000002.tar: HTTP 403 AccessDenied" in err, err
    keys = objstore.list_keys(f"{out}/")
    assert f"{out}/shard-000001.tar" in keys and f"{out}/manifest.json" not in keys  # visibly incomplete
    assert not list((tmp_path / "staging").iterdir())

    # an upload that meets a 503 and a cut connection is retried
    proxy.add("status", "web/shard-000001.tar")
    proxy.add("cut", "web/manifest.json", after=0)
    assert cli.main(["prepare", str(inputs), *prepare, "-o", out, "--overwrite"]) == 0
    assert len(proxy.fired()) == 3 and f"{out}/manifest.json" in objstore.list_keys(f"{out}/")


def test_inputs_listed_on_the_store_give_the_documents_of_the_same_files_read_locally(store, prepare, tmp_path):
    from data import cli
    from data.stream import decoded_shard, open_dataset

    inputs = _jsonl_inputs(tmp_path / "in")
    raw = _url("raw")
    _upload_tree(inputs, raw)
    objstore.put_bytes(b"not an input", f"{raw}/.hidden/x.jsonl")
    assert cli.main(["prepare", str(inputs), *prepare, "-o", str(tmp_path / "local")]) == 0
    assert cli.main(["prepare", f"{raw}/crawl-*", *prepare, "-o", str(tmp_path / "remote")]) == 0

    def documents(directory: Path, prefix: str) -> list[tuple]:
        ds = open_dataset("web", str(directory))
        return [(tuple(t.tolist()), tuple(d[len(prefix):] for d in meta["docs"]))
                for i in range(len(ds.urls)) for _, t, meta in decoded_shard(ds, i)]
    want = documents(tmp_path / "local", str(inputs))
    assert len(want) > 5 and documents(tmp_path / "remote", raw) == want
