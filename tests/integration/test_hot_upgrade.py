"""The hot upgrade on two real vLLM servers: an old tiny Llama (ChatML tokenizer) serving two
teacher adapters, and a new tiny Gemma 3 (another architecture and tokenizer, no chat template)
started with ``--migrate-from`` the old one.

A client hammers the new server with chat requests for both adapters from the moment it is up
until the end: through the migration, the switch, a rollback, a resumed migration and a
refused one. Not one request may fail. The teachers are real LoRAs trained here on a known
mapping (digit strings -> "number" / letter strings -> "word"; and -> "yes" / "no"), so the gate's
verdicts are about real answers.

The migrations use ``data="seeds_only"``: the old tiny base is random and writes nothing
parseable, so synthesis has nothing to keep (synthesis and the discriminator are tested on
scripted generators in tests/unit/migrate, and seeded HTTP sampling on a real server).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from tiny_model import build_tiny_gemma3, tiny_serve_args

from vllm_lora_ext.adapters.lora_weights import load_lora
from vllm_lora_ext.jobs import migration as migration_job
from vllm_lora_ext.jobs.folder import JobFolder
from vllm_lora_ext.jobs.ray_runner import RayRunner
from vllm_lora_ext.jobs.runners import SubprocessRunner, run_to_end
from vllm_lora_ext.migrate.distill import distil
from vllm_lora_ext.migrate.migrator import STEPS
from vllm_lora_ext.migrate.spec import MigrationOptions, MigrationSpec, Seed
from vllm_lora_ext.server.migrations.forwarding import ROUTED_HEADER
from vllm_lora_ext.server_process import Server, start_server
from vllm_lora_ext.training import LoraHyperparameters

DIGITS, LETTERS = "0123456789", "abcdefghij"
TEACHERS = {"hu-kind": ("number", "word"), "hu-flag": ("yes", "no")}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
N_SEEDS = 96
"""Seeds (inputs with known answers) per adapter. The gate holds a quarter of the real inputs,
here ~26 seeds, and decides by exact match on them. With 24 seeds it held 9, too few to
decide: replayed offline, a student scoring 0.885 on 200 fresh inputs (the teacher 0.925) got
6 of those 9 against the teacher's 8 and was refused. On 26 (offline, transformers teacher,
spec seeds 0-15, soup and single students of both adapters) every student passed, at most one
miss behind the teacher: three misses inside the tolerance."""
OPTIONS = {
    "data": "seeds_only",
    "gate_fraction": 0.25,
    "gate_tolerance": 0.15,  # three misses more than the teacher on the ~26 held-out seeds
    "student": {"targets": list(TARGETS), "steps": 80, "batch": 16, "lr": 1e-2},
    "student_epochs": None,  # the steps above, which the tests below change
    # Trained until it answers every training row as labelled (or 80 steps), not stopped at
    # 90%: stopped early, whether a student generalised hung on which row it still missed.
    "student_fit": 1.0,
    # The teacher's voted labels reproducible: sampled unseeded, the votes that decide a
    # reservoir input's label differed run to run, and with them the student.
    "sampling": "seeded",
    "answer_max_tokens": 6,
}


def strings(rng: random.Random, alphabet: str, n: int) -> list[str]:
    return [" ".join(rng.choice(alphabet) for _ in range(rng.randint(2, 4))) for _ in range(n)]


def label(name: str, text: str) -> str:
    yes, no = TEACHERS[name]
    return yes if text[0] in DIGITS else no


def mixed(rng: random.Random, n: int) -> list[str]:
    return strings(rng, DIGITS, n // 2) + strings(rng, LETTERS, n - n // 2)


class Hammer(threading.Thread):
    """Chat requests for both adapters, back to back, recording status and route of each."""

    def __init__(self, server: Server, inputs: list[str]) -> None:
        super().__init__(daemon=True)
        self.server, self.inputs = server, inputs
        self.records: list[tuple[str, int | None, str | None, str, str]] = []
        """(adapter, HTTP status or None, routed-to header, answer or error, input)"""
        self.halt = threading.Event()

    def run(self) -> None:
        names = list(TEACHERS)
        with self.server.client() as client:
            i = 0
            while not self.halt.is_set():
                name, text = names[i % 2], self.inputs[i % len(self.inputs)]
                body = {"model": name, "messages": [{"role": "user", "content": text}],
                        "max_tokens": 6, "temperature": 0}  # fmt: skip
                try:
                    r = client.post("/v1/chat/completions", json=body)
                    answer = (
                        r.json()["choices"][0]["message"]["content"] if r.is_success else r.text
                    )
                    routed = r.headers.get(ROUTED_HEADER)
                    self.records.append((name, r.status_code, routed, answer, text))
                except (httpx.HTTPError, ValueError, KeyError) as e:
                    self.records.append((name, None, None, repr(e), text))
                i += 1

    def since(self, start: int) -> list[tuple[str, int | None, str | None, str, str]]:
        return self.records[start:]


@pytest.fixture(scope="module")
def old(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Server:
    """The session's tiny Llama server with two teacher adapters and a captured reservoir."""
    work = tmp_path_factory.mktemp("teachers")
    rng = random.Random(3)
    train = mixed(rng, 64)
    hp = LoraHyperparameters(rank=8, alpha=16, targets=TARGETS, steps=80, batch=16, lr=1e-2)
    with server.client() as c:
        for name in TEACHERS:
            pairs = [(x, label(name, x)) for x in train]
            distil(server.model_dir, pairs, hp, work / name)
            r = c.post("/v1/adapters", json={"name": name, "path": str(work / name)})
            assert r.status_code == 201, r.text
            assert c.post(f"/v1/stats/{name}/start", json={}).status_code == 200
            for text in mixed(random.Random(name), 12):  # observed traffic fills the reservoir
                body = {"model": name, "messages": [{"role": "user", "content": text}],
                        "max_tokens": 6, "temperature": 0}  # fmt: skip
                assert c.post("/v1/chat/completions", json=body).status_code == 200
            assert c.post(f"/v1/stats/{name}/stop").status_code == 200
        # A third adapter nobody captured: no reservoir.
        r = c.post("/v1/adapters", json={"name": "hu-bare", "path": str(work / "hu-kind")})
        assert r.status_code == 201, r.text
    return server


def seeds(name: str, n: int = N_SEEDS) -> list[dict]:
    return [{"input": x, "output": label(name, x)} for x in mixed(random.Random(f"s{name}"), n)]


def request_body(old: Server, **overrides) -> dict:
    body = {
        "source_url": old.url,
        "source_model_path": str(old.model_dir),
        "adapters": list(TEACHERS),
        "tasks": {n: {"task_description": "short strings", "seeds": seeds(n)} for n in TEACHERS},
        "options": OPTIONS,
    }
    return {**body, **overrides}


@pytest.fixture(scope="module")
def upgrade(old: Server, tmp_path_factory: pytest.TempPathFactory):
    """The new server, started with --migrate-from the old one, and the hammering client."""
    work = tmp_path_factory.mktemp("new-server")
    gemma = build_tiny_gemma3(work / "tiny-gemma3")
    body = request_body(old)
    body.pop("source_url")
    body.pop("source_model_path")  # given on the command line
    (work / "migration.json").write_text(json.dumps(body))
    args = [*tiny_serve_args(gemma), "--migrate-from", old.url,
            "--migrate-source-model", str(old.model_dir),
            "--migrate-request", str(work / "migration.json")]  # fmt: skip
    # vLLM's CPU worker binds to core 0 by default; two servers on one machine get a core each
    # (on the 2-core CI machine both on core 0 stalled engine calls for minutes).
    new = start_server(
        work, base="tiny-gemma3", serve_args=args, env={"VLLM_CPU_OMP_THREADS_BIND": "1"}
    )
    hammer = Hammer(new, mixed(random.Random(9), 20))
    hammer.start()
    yield new, hammer
    hammer.halt.set()
    hammer.join(timeout=120)
    new.stop()


def more_records(
    hammer: Hammer, mark: int, n: int, enough=lambda new: True, timeout: float = 300
) -> int:
    """Wait until the hammer has answered ``n`` more requests after ``mark`` and the records
    since ``mark`` are ``enough``; the new count."""
    deadline = time.monotonic() + timeout
    while len(hammer.records) < mark + n or not enough(hammer.since(mark)):
        assert time.monotonic() < deadline, f"the hammer stalled at {len(hammer.records)}"
        time.sleep(0.1)
    return len(hammer.records)


def wait_until_training(c: httpx.Client, job_id: str, timeout: float = 300) -> None:
    """Until the job's adapter is in its student's training steps (a cancel then has work to
    stop)."""
    deadline = time.monotonic() + timeout
    while True:
        (a,) = c.get(f"/v1/migrations/{job_id}").json()["adapters"]
        if a["state"] == "running" and (a["progress"] or {}).get("train_step", 0) > 0:
            return
        assert a["state"] in ("pending", "running") and time.monotonic() < deadline, a
        time.sleep(0.2)


def wait_job(c: httpx.Client, job_id: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(f"/v1/migrations/{job_id}").json()
        if job["state"] != "running":
            return job
        time.sleep(0.5)
    raise AssertionError(f"migration {job_id} still running after {timeout} s: {job}")


def agreement_with_teacher(records, name: str) -> tuple[float, int]:
    """Over inputs answered both here (migrated adapter) and by the old server (teacher), the
    fraction of answers served here that equal the teacher's; and how many answers that is."""
    teacher = {x: a.strip() for n, _, routed, a, x in records if n == name and routed}
    local = [(a.strip(), x) for n, _, routed, a, x in records
             if n == name and routed is None and x in teacher]  # fmt: skip
    return sum(a == teacher[x] for a, x in local) / max(1, len(local)), len(local)


def roll_back(c: httpx.Client, job_id: str, timeout: float = 600) -> dict:
    """DELETE answers at once (202) and rolls back in the background; wait for the end."""
    r = c.delete(f"/v1/migrations/{job_id}")
    assert r.status_code in (200, 202), r.text
    deadline = time.monotonic() + timeout
    while (job := c.get(f"/v1/migrations/{job_id}").json())["state"] == "rolling_back":
        assert time.monotonic() < deadline, f"rollback of {job_id} still running: {job}"
        time.sleep(0.5)
    assert job["state"] == "rolled_back", job
    again = c.delete(f"/v1/migrations/{job_id}")  # idempotent
    assert again.status_code == 200 and again.json()["state"] == "rolled_back"
    return job


def test_hot_upgrade_switch_rollback_resume_and_refusal(old: Server, upgrade) -> None:
    new, hammer = upgrade
    with new.client() as c:
        jobs = c.get("/v1/migrations").json()["migrations"]
        assert len(jobs) == 1  # started by --migrate-from
        first = wait_job(c, jobs[0]["id"])
        states = {a["name"]: a["state"] for a in first["adapters"]}
        assert states == dict.fromkeys(TEACHERS, "switched"), json.dumps(first, indent=1)
        for a in first["adapters"]:
            assert a["examples"] == {"seeds": N_SEEDS, "reservoir": 12}
            assert a["gate"]["n_with_targets"] >= 20, a["gate"]  # the task metric decides
            assert a["gate"]["passed"] and a["gate"]["student_accuracy"] >= 0.8, a["gate"]
        listed = {a["name"]: a for a in c.get("/v1/adapters").json()["adapters"]}
        assert set(TEACHERS) <= set(listed)
        assert all(listed[n]["source"] == f"migrated from {old.url}" for n in TEACHERS)
        mark = more_records(hammer, len(hammer.records), 5)  # past any request in flight
        more_records(hammer, mark, 0, enough=lambda new: all(
            sum(r[0] == n and r[2] is None for r in new) >= 25 for n in TEACHERS))  # fmt: skip
        after_switch = hammer.since(mark)
        assert after_switch and all(r[2] is None for r in after_switch)

        # Rollback: the old routing again, the migrated copies gone, answers from the teacher.
        rolled = roll_back(c, first["id"])
        assert {a["state"] for a in rolled["adapters"]} == {"rolled_back"}
        assert not set(TEACHERS) & {a["name"] for a in c.get("/v1/adapters").json()["adapters"]}
        mark = more_records(hammer, len(hammer.records), 2)
        forwarded = hammer.since(more_records(hammer, mark, 10) - 10)
        assert forwarded and all(r[2] == old.url for r in forwarded)
        models = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        assert all(models[n]["forwarded_to"] == old.url for n in TEACHERS), models

        # The same request again resumes from every checkpoint: no step is redone.
        r = c.post("/v1/migrations", json=request_body(old))
        assert r.status_code == 202, r.text
        resumed = wait_job(c, r.json()["id"])
        assert {a["state"] for a in resumed["adapters"]} == {"switched"}
        for a in resumed["adapters"]:
            assert a["progress"]["from_checkpoint"] == list(STEPS), a["progress"]
        roll_back(c, resumed["id"])

        # A sabotaged student (one step at a tiny learning rate): the gate refuses it and the
        # adapter stays on the old server.
        sabotaged = {**OPTIONS, "student": {**OPTIONS["student"], "steps": 1, "lr": 1e-6}}
        r = c.post("/v1/migrations", json=request_body(old, adapters=["hu-kind"],
                   tasks={"hu-kind": {"seeds": seeds("hu-kind")}}, options=sabotaged))  # fmt: skip
        assert r.status_code == 202, r.text
        refused = wait_job(c, r.json()["id"])
        (verdict,) = refused["adapters"]
        assert verdict["state"] == "kept_old" and not verdict["gate"]["passed"], verdict
        assert "gate refused" in verdict["error"] and "student exact match" in verdict["error"]
        assert c.get("/v1/migrations").json()["forwarded"]["hu-kind"] == old.url
        assert "hu-kind" not in {a["name"] for a in c.get("/v1/adapters").json()["adapters"]}
        more_records(hammer, len(hammer.records), 5)  # hu-kind forwarded again, under traffic

        # A soup of two students (student_soup: 2): the mean of their deltas, cut to the
        # student rank, passes the server's adapter checks and the gate, and is switched to.
        soup = {**OPTIONS, "seed": 9, "student_soup": 2}
        r = c.post("/v1/migrations", json=request_body(old, adapters=["hu-kind"],
                   tasks={"hu-kind": {"seeds": seeds("hu-kind")}}, options=soup))  # fmt: skip
        assert r.status_code == 202, r.text
        souped = wait_job(c, r.json()["id"])
        (verdict,) = souped["adapters"]
        assert verdict["state"] == "switched" and verdict["gate"]["passed"], json.dumps(verdict)
        assert "hu-kind" in {a["name"] for a in c.get("/v1/adapters").json()["adapters"]}
        more_records(hammer, len(hammer.records), 5)  # hu-kind served by the soup, under traffic
        roll_back(c, r.json()["id"])  # the next test starts from the old routing

    hammer.halt.set()
    hammer.join(timeout=120)
    records = hammer.records
    failed = [r for r in records if r[1] != 200]
    print(f"hot upgrade: {len(records)} requests, {len(failed)} failed")
    assert not failed, failed[:5]
    for name in TEACHERS:
        routes = {r[2] for r in records if r[0] == name}
        assert routes == {old.url, None}, routes  # served by both servers over the run
        agreement, n = agreement_with_teacher(records, name)
        print(f"{name}: migrated answers equal the teacher's on {agreement:.2f} of {n}")
        # A constant answer scores ~0.5 (balanced inputs), a broken student 0.
        assert n > 20 and agreement >= 0.6


def test_a_killed_migration_job_fails_its_adapter_and_resumes(old: Server, upgrade) -> None:
    """kill -9 of a migration's own process while its student trains (what an out-of-memory
    kill does): the server keeps serving (the adapters through the old server, its base
    itself), the adapter reads ``failed`` with the signal and stays on the old server; the
    same request posted again resumes from the checkpoints, and its cancel stops the new
    child. The student's budget (no early stop, 10⁵ steps) outlasts every wait here, so no
    step of this races the training."""
    new, _ = upgrade
    endless = {**OPTIONS, "seed": 21, "student_fit": 0.0,
               "student": {**OPTIONS["student"], "steps": 100_000}}  # fmt: skip
    tasks = {"hu-flag": {"seeds": seeds("hu-flag")}}
    body = request_body(old, adapters=["hu-flag"], tasks=tasks, options=endless)
    with new.client() as c:
        r = c.post("/v1/migrations", json=body)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        wait_until_training(c, job_id)
        (a,) = c.get(f"/v1/migrations/{job_id}").json()["adapters"]
        assert a["runs_in"].startswith("pid "), a  # a child process, not the server
        pid = int(a["runs_in"].split()[1])
        assert b"vllm_lora_ext.jobs" in Path(f"/proc/{pid}/cmdline").read_bytes()
        os.kill(pid, signal.SIGKILL)
        (a,) = wait_job(c, job_id)["adapters"]
        assert a["state"] == "failed" and "killed by SIGKILL" in a["error"], a
        assert c.get("/v1/migrations").json()["forwarded"]["hu-flag"] == old.url
        for model in ("hu-flag", "hu-kind", new.base):  # still serving: forwarded and local
            chat = {"model": model, "messages": [{"role": "user", "content": "1 2"}],
                    "max_tokens": 4, "temperature": 0}  # fmt: skip
            r = c.post("/v1/chat/completions", json=chat)
            assert r.status_code == 200, (model, r.text)

        r = c.post("/v1/migrations", json=body)
        assert r.status_code == 202, r.text
        wait_until_training(c, r.json()["id"])
        (a,) = c.get(f"/v1/migrations/{r.json()['id']}").json()["adapters"]
        assert a["progress"]["from_checkpoint"] == ["discriminator", "synthesise", "label"], a
        rolled = roll_back(c, r.json()["id"])
        assert [a["state"] for a in rolled["adapters"]] == ["cancelled"]
        assert c.get("/v1/migrations").json()["forwarded"]["hu-flag"] == old.url


@pytest.mark.slow
def test_a_migration_on_ray_gives_the_child_process_student(
    old: Server, ray_address: str, tmp_path: Path
) -> None:
    """The migration job of one adapter, run as a child process and as a task on a real local
    Ray head, with the same spec, seeds and thread count, against the same old server: the two
    students are the same adapter, to float tolerance. Every training input is a seed with its
    answer (no reservoir), so what the old server answers, batched with the hammer's traffic
    as it happens to be, reaches only the gate, never the students."""
    short = {**OPTIONS, "student_fit": 0.0, "student": {**OPTIONS["student"], "steps": 30}}
    options = MigrationOptions.model_validate(short)
    spec = MigrationSpec(
        **options.model_dump(), adapter="hu-kind", task_description="short strings",
        seeds=[Seed(**x) for x in seeds("hu-kind")],
    )  # fmt: skip
    students = {}
    for name, runner in (("child", SubprocessRunner(threads=1)),
                         ("ray", RayRunner(ray_address, threads=1))):  # fmt: skip
        params = migration_job.params(
            spec=spec.model_dump(mode="json"), work_dir=tmp_path / name / "work",
            old_base=old.model_dir, new_base=old.model_dir, source_url=old.url,
            source_base="tiny-llama", adapter="hu-kind", generator_url=None,
            generator_model=None, seeded=True,
        )  # fmt: skip
        secrets = {"source": old.api_key}
        result = asyncio.run(run_to_end(runner, JobFolder(tmp_path / name / "job"), "migration",
                                        params, secrets=secrets))  # fmt: skip
        students[name] = load_lora(Path(result["adapter_dir"])).tensors
    assert students["child"].keys() == students["ray"].keys() and students["child"]
    for key, tensor in students["child"].items():
        torch.testing.assert_close(students["ray"][key], tensor, rtol=1e-5, atol=1e-6)


def base_requests(c: httpx.Client) -> float:
    """Requests this server counted for its base model (``/metrics``)."""
    for line in c.get("/metrics").text.splitlines():
        if line.startswith('vllm_lora_ext_requests_total{adapter="base"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_bad_migration_requests_are_refused_clearly(old: Server, upgrade) -> None:
    new, _ = upgrade
    with new.client() as c:
        r = c.post("/v1/migrations", json=request_body(old, source_url="http://127.0.0.1:9"))
        assert r.status_code == 502 and "cannot reach" in r.json()["error"]["message"]
        r = c.post("/v1/migrations", json=request_body(old, source_model="other-model"))
        assert r.status_code == 409 and "not 'other-model'" in r.json()["error"]["message"]
        r = c.post("/v1/migrations", json=request_body(old, adapters=["nope"], tasks={}))
        assert r.status_code == 404
        r = c.post("/v1/migrations", json=request_body(old, adapters=["hu-bare"], tasks={}))
        message = r.json()["error"]["message"]
        assert r.status_code == 409 and "at least 3 distinct example inputs" in message, message
        assert "got 0" in message
        r = c.post("/v1/migrations", json=request_body(old, source_model_path=None))
        assert r.status_code == 400 and "give source_model_path" in r.json()["error"]["message"]
        r = c.post("/v1/migrations", json={**request_body(old), "colour": "red"})
        assert r.status_code == 400 and "colour" in r.json()["error"]["message"]
        r = c.post("/v1/migrations", json=request_body(old, source_url="ftp://x"))
        assert r.status_code == 400
        token_kl = {**OPTIONS, "distillation": "token_kl"}  # Llama tokenizer -> Gemma's
        r = c.post("/v1/migrations", json=request_body(old, options=token_kl))
        message = r.json()["error"]["message"]
        assert r.status_code == 400 and "different vocabularies" in message, message

        # Divergence: an absurd learning rate makes the loss NaN; nothing is registered.
        wild = {**OPTIONS, "seed": 5, "student": {**OPTIONS["student"], "lr": 1e8}}
        flag_only = {"adapters": ["hu-flag"], "tasks": {"hu-flag": {"seeds": seeds("hu-flag")}}}
        body = request_body(old, **flag_only, options=wild)
        r = c.post("/v1/migrations", json=body)
        assert r.status_code == 202, r.text
        busy = c.post("/v1/migrations", json=body)
        assert busy.status_code == 409 and "still running" in busy.json()["error"]["message"]
        job = wait_job(c, r.json()["id"])
        (a,) = job["adapters"]
        assert a["state"] == "failed" and "diverged" in a["error"], a

        # The paper's generator: the new base writes the synthetic inputs (through this server).
        before = base_requests(c)
        own = {**OPTIONS, "data": "unfiltered", "seed": 7, "target_count": 4, "sampling": "batched",
               "synthesis": {"batch": 4, "max_tokens": 8, "attempts_per_input": 2}}  # fmt: skip
        r = c.post("/v1/migrations", json=request_body(old, **flag_only, options=own,
                                                       generator="new_base"))  # fmt: skip
        assert r.status_code == 202, r.text
        (a,) = wait_job(c, r.json()["id"])["adapters"]
        generated = a["progress"]["generated"]
        assert generated in (4, 8), a  # rounds of 4, until 4 kept or 4 x 2 attempts
        # Sampled in batched requests (options.sampling "batched"): one per round of 4 prompts.
        assert base_requests(c) - before >= generated // 4
        if a["state"] == "switched":
            roll_back(c, r.json()["id"])

        # Cancel: DELETE while it runs; it stops, nothing half-written, routing unchanged.
        # student_fit 0: all 400 steps, so the cancel lands long before training could end
        # (fitting its rows would end it after ~50).
        slow = {**OPTIONS, "seed": 6, "student_fit": 0.0,
                "student": {**OPTIONS["student"], "steps": 400}}  # fmt: skip
        r = c.post("/v1/migrations", json=request_body(old, adapters=["hu-flag"],
                   tasks={"hu-flag": {"seeds": seeds("hu-flag")}}, options=slow))  # fmt: skip
        assert r.status_code == 202, r.text
        wait_until_training(c, r.json()["id"])
        job = roll_back(c, r.json()["id"])
        (a,) = job["adapters"]
        assert a["state"] == "cancelled", job
        assert "hu-flag" not in {x["name"] for x in c.get("/v1/adapters").json()["adapters"]}
        assert c.get("/v1/migrations").json()["forwarded"]["hu-flag"] == old.url
    store = Path(new.store)
    assert not list(store.glob(".staging-*")) and not (store / "hu-flag").exists()


def test_migrate_cli_reports_and_follows(old: Server, upgrade) -> None:
    new, _ = upgrade
    cli = [sys.executable, "-m", "vllm_lora_ext.cli", "migrate", "--url", new.url]
    bad = subprocess.run([*cli, "start", "--from", "http://127.0.0.1:9"], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 6 and "error (502): cannot reach" in bad.stderr, bad.stderr
    missing = subprocess.run([*cli, "start", "--from", old.url, "--request", "/nonexistent"],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert missing.returncode == 2 and "--request /nonexistent" in missing.stderr
    with new.client() as c:
        job_id = c.get("/v1/migrations").json()["migrations"][0]["id"]
    shown = subprocess.run([*cli, "status", job_id, "--follow"], capture_output=True, text=True,
                           timeout=120)  # fmt: skip
    assert shown.returncode in (0, 1), shown.stderr  # 1: not every adapter is switched now
    assert "hu-kind: " in shown.stdout and "hu-flag: " in shown.stdout
    assert "step" in shown.stderr  # the tqdm bar
    unreachable = subprocess.run([sys.executable, "-m", "vllm_lora_ext.cli", "migrate", "--url",
                                  "http://127.0.0.1:9", "status", job_id], capture_output=True,
                                 text=True, timeout=120)  # fmt: skip
    assert unreachable.returncode == 3
