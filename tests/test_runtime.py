"""Parallel controllers on torch.distributed (gloo, CPU): N ranks give the one-rank
update, the single controller gives it too, failures end the job with the failing
rank named and no process left behind, and a job resumes on another rank count."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from plait.config import ConfigError
from plait.parallel.dist import resolve_backend, shard_bounds


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "plait.cli", *args], capture_output=True,
                          text=True, env={**os.environ, "PLAIT_PROGRESS": "0"},
                          timeout=timeout)


def job(tiny_job, reward_spec, run_dir, *extra, reward="digit_fraction"):
    base = [a for a in tiny_job if not a.startswith(("run.dir=", "train.threads="))]
    return [*base, f"run.dir={run_dir}", "train.threads=1", "train.steps=3",
            "optim.lr=1e-2", "algo.reward_range=[0, 1]",
            f"reward.functions=[{{fn: '{reward_spec(reward)}'}}]", *extra]


def final_weights(run_dir):
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    return load_file(str(ckpts[-1] / "policy" / "model.safetensors"))


def assert_same_weights(a_dir, b_dir, atol=1e-4):
    a, b = final_weights(a_dir), final_weights(b_dir)
    start = load_file(str(a_dir / "tiny_model" / "model.safetensors"))
    moved = max(float((a[k] - start[k]).abs().max()) for k in a)
    assert moved > 1e-3, "the weights did not move: the comparison would be empty"
    for key in a:
        assert torch.allclose(a[key], b[key], atol=atol), (key, (a[key] - b[key]).abs().max())


def worker_pids():
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return {int(line.split()[0]) for line in out.splitlines() if "plait.runtime.worker" in line}


def test_shard_bounds_cover_everything_once():
    for total in range(0, 11):
        for world in range(1, 5):
            parts = [shard_bounds(total, r, world) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(parts[:-1], parts[1:], strict=True))
            assert max(h - lo for lo, h in parts) - min(h - lo for lo, h in parts) <= 1


@pytest.mark.parametrize("extra", [
    (),                                                        # GRPO, parallel controllers
    ("runtime.controller=single",),                            # GRPO, single controller
    ("algo.name=ppo", "algo.group_size=2", "algo.epochs=2",    # PPO: critic + global whitening
     "algo.kl_coef=0.05", "algo.kl_mode=reward"),
    ("algo.advantage=reinforce++", "algo.kl_coef=0.05",        # REINFORCE++: global whitening
     "algo.kl_mode=reward"),
], ids=["grpo-parallel", "grpo-single", "ppo-parallel", "reinforce++-parallel"])
def test_two_ranks_give_the_one_rank_update(tiny_job, reward_spec, tmp_path, extra):
    one, two = tmp_path / "one", tmp_path / "two"
    alone = [e for e in extra if not e.startswith("runtime.")]  # one rank has no controller
    proc = run_cli("train", *job(tiny_job, reward_spec, one, *alone))
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli("train", *job(tiny_job, reward_spec, two, *extra, "runtime.num_ranks=2"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_weights(one, two)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["gradient_traffic_bytes"] > 0
    m1 = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(m1[1:4], m2[1:4], strict=True):  # the steps' batch statistics are the global ones
        assert b["samples"] == a["samples"] and b["tokens"] == a["tokens"]
        assert b["reward/mean"] == pytest.approx(a["reward/mean"], abs=1e-6)
        assert b["loss/policy"] == pytest.approx(a["loss/policy"], abs=1e-5)


@pytest.mark.slow
def test_ranks_skipping_different_rows_give_the_one_rank_update(tiny_job, reward_spec,
                                                                tmp_path):
    """Zero-advantage rows left out of the update on each rank (a rank may keep none and
    run one zero-weight row): 2 ranks still give the one-rank update."""
    one, two = tmp_path / "one", tmp_path / "two"
    runs = {}
    for run_dir, extra in ((one, ()), (two, ("runtime.num_ranks=2",))):
        proc = run_cli("train", *job(tiny_job, reward_spec, run_dir, "train.steps=4", *extra,
                                     reward="digits_on_even_prompts"))
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[run_dir] = [json.loads(line)
                         for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert_same_weights(one, two)
    assert any(0 < m.get("update/rows_skipped_frac", 0) for m in runs[one])
    proc = run_cli("train", *job(tiny_job, reward_spec, tmp_path / "none", "runtime.num_ranks=2",
                                 reward="zero_reward"))  # every row skipped on every rank
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
def test_resume_on_a_different_number_of_ranks(tiny_job, reward_spec, tmp_path):
    straight, switched = tmp_path / "straight", tmp_path / "switched"
    common = ("train.save_every=2", "train.keep_last=0")
    proc = run_cli("train", *job(tiny_job, reward_spec, straight, *common, "train.steps=4"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli("train", *job(tiny_job, reward_spec, switched, *common, "train.steps=2",
                                 "runtime.num_ranks=2"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli("train", *job(tiny_job, reward_spec, switched, *common, "train.steps=4"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stdout + proc.stderr
    assert_same_weights(straight, switched)


@pytest.mark.parametrize("layout", [("runtime.num_ranks=2",),
                                    ("runtime.placement=disaggregated",)],
                         ids=["colocated", "rollout-worker"])
def test_dead_rank_ends_the_job_and_names_it(tiny_job, reward_spec, tmp_path, layout):
    before = worker_pids()
    run_dir = tmp_path / "run"
    start = time.time()
    proc = run_cli("train", *job(tiny_job, reward_spec, run_dir, *layout,
                                 "train.steps=50", "train.save_every=1",
                                 reward="kill_rank1"))
    assert proc.returncode == 1
    assert "rank 1" in proc.stderr and "killed by signal 9" in proc.stderr
    assert "last message: 'step" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.time() - start < 120
    time.sleep(0.5)
    assert worker_pids() <= before, "rank processes were left behind"
    # the checkpoint rank 0 wrote last is complete and loadable
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    assert ckpts and (ckpts[-1] / "COMPLETE").is_file()
    final_weights(run_dir)


@pytest.mark.slow  # a frozen rank: test_rank_faults keeps a fast case
def test_hung_rank_is_detected_by_heartbeat(tiny_job, reward_spec, tmp_path):
    before = worker_pids()
    start = time.time()
    proc = run_cli("train", *job(tiny_job, reward_spec, tmp_path / "run", "runtime.num_ranks=2",
                                 "train.steps=50", "runtime.heartbeat_timeout_s=3",
                                 reward="freeze_rank1"))
    elapsed = time.time() - start
    assert proc.returncode == 1
    assert "rank 1" in proc.stderr and "stopped responding" in proc.stderr
    assert "last message: 'step" in proc.stderr
    assert elapsed < 60
    time.sleep(0.5)
    assert worker_pids() <= before, "rank processes were left behind"


def test_rank_alive_but_stuck_is_named_by_the_progress_watch(tiny_job, reward_spec, tmp_path):
    """Rank 1 keeps beating while its step never ends (a reward call that does not return,
    under a generous reward time limit); rank 0 waits for it in a collective. The job ends
    naming rank 1, not the rank that waits."""
    before = worker_pids()
    start = time.time()
    proc = run_cli("train", *job(tiny_job, reward_spec, tmp_path / "run", "runtime.num_ranks=2",
                                 "train.steps=50", "runtime.progress_timeout_s=2",
                                 "reward.timeout_s=600", reward="stall_rank1"))
    elapsed = time.time() - start
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "rank 1" in proc.stderr and "made no progress for" in proc.stderr, proc.stderr
    assert "last message: 'step 3'" in proc.stderr
    assert elapsed < 60
    time.sleep(0.5)
    assert worker_pids() <= before, "rank processes were left behind"


def test_killed_launcher_takes_its_ranks_with_it(tiny_job, reward_spec, tmp_path):
    before = worker_pids()
    run_dir = tmp_path / "run"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "plait.cli", "train",
         *job(tiny_job, reward_spec, run_dir, "runtime.num_ranks=2", "train.steps=100000")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "PLAIT_PROGRESS": "0"})
    deadline = time.time() + 90
    while time.time() < deadline and not (run_dir / "metrics.jsonl").is_file():
        time.sleep(0.2)
    assert (run_dir / "metrics.jsonl").is_file(), "the job never started training"
    ranks = worker_pids() - before
    assert len(ranks) >= 2  # the ranks (and their forked reward workers)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    deadline = time.time() + 15
    while time.time() < deadline and worker_pids() & ranks:
        time.sleep(0.2)
    assert not worker_pids() & ranks, "ranks outlived their launcher"


@pytest.mark.slow
def test_ray_launcher_runs_the_same_job(tiny_job, reward_spec, tmp_path):
    pytest.importorskip("ray")
    one, on_ray = tmp_path / "one", tmp_path / "ray"
    proc = run_cli("train", *job(tiny_job, reward_spec, one))
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli("train", *job(tiny_job, reward_spec, on_ray, "runtime.num_ranks=2",
                                 "runtime.launcher=ray"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_weights(one, on_ray)
    assert json.loads((on_ray / "summary.json").read_text())["ranks"] == 2


@pytest.mark.slow
def test_ray_launcher_names_a_dead_rank(tiny_job, reward_spec, tmp_path):
    pytest.importorskip("ray")
    proc = run_cli("train", *job(tiny_job, reward_spec, tmp_path / "run", "runtime.num_ranks=2",
                                 "runtime.launcher=ray", "train.steps=50",
                                 reward="kill_rank1"))
    assert proc.returncode == 1
    assert "rank 1 (Ray actor) died" in proc.stderr, proc.stderr[-2000:]
    assert "last message: 'step" in proc.stderr


def metrics_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("placement, trainers, extra", [
    ("disaggregated", 1, ()),
    pytest.param("disaggregated", 2, (), marks=pytest.mark.slow),
    # reference log-probs from the rollout worker, groups sent as they finish
    ("partial", 1, ("algo.kl_coef=0.1", "runtime.stream_groups=true")),
    # sharded trainers gather the policy together for each push to the worker
    pytest.param("disaggregated", 2, ("runtime.data_parallel=fsdp",), marks=pytest.mark.slow),
    # groups stop at different lengths: each trainer takes its groups one by one
    pytest.param("disaggregated", 2, ("runtime.stream_groups=true", "rollout.max_new_tokens=24",
                                      'rollout.stop=["1", "2", "3"]'), marks=pytest.mark.slow),
], ids=["disaggregated-1", "disaggregated-2", "partial-kl", "disaggregated-2-fsdp",
        "disaggregated-2-streamed"])
def test_workers_apart_synchronous_equals_colocated(tiny_job, reward_spec, tmp_path, placement,
                                                    trainers, extra):
    """Rollout workers apart, max_staleness=0: the same samples (per-prompt seeds) and
    the same weights (pushed before each batch) give the colocated job's update, also
    when the trainers train on groups as they arrive (runtime.stream_groups)."""
    one, apart = tmp_path / "one", tmp_path / "apart"
    alone = [e for e in extra if not e.startswith("runtime.")]
    proc = run_cli("train", *job(tiny_job, reward_spec, one, *alone))
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli("train", *job(tiny_job, reward_spec, apart, f"runtime.placement={placement}",
                                 f"runtime.num_ranks={trainers}", *extra))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_weights(one, apart)
    steps = [m for m in metrics_of(apart) if "rollout/staleness" in m]
    assert all(m["rollout/staleness"] == 0 for m in steps)
    streamed = "runtime.stream_groups=true" in extra
    assert all(("rollout/parts" in m) == streamed for m in steps)
    if any(e.startswith("rollout.stop") for e in extra):
        assert any(m["rollout/parts"] > 1 for m in steps)


@pytest.mark.slow
def test_compiled_workers_serve_sharded_trainers(tiny_job, reward_spec, tmp_path):
    """rollout.compile with FSDP trainers apart: the worker generates through its compiled
    decode step, the sharded trainers evaluate with an eager engine."""
    run_dir = tmp_path / "run"
    proc = run_cli("train", *job(tiny_job, reward_spec, run_dir, "train.steps=2",
                                 "runtime.placement=disaggregated", "runtime.num_ranks=2",
                                 "runtime.data_parallel=fsdp", "rollout.compile=true"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and "accuracy_after" in summary


def test_disaggregated_with_staleness_trains_one_version_behind(tiny_job, reward_spec,
                                                                tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("train", *job(tiny_job, reward_spec, run_dir, "train.steps=5",
                                 "runtime.placement=disaggregated", "runtime.max_staleness=1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = [m for m in metrics_of(run_dir) if "rollout/staleness" in m]
    assert [m["rollout/staleness"] for m in steps] == [0, 1, 1, 1, 1]
    # the decoupled objective is on: its importance weights differ from 1 on stale batches
    assert all("policy/is_weight_mean" in m for m in steps)
    assert any(abs(m["policy/is_weight_mean"] - 1) > 1e-4 for m in steps[1:])
    assert abs(steps[0]["policy/is_weight_mean"] - 1) < 1e-4
    # the worker's own stage times reach the trainer's log; a cycle (posting one batch to
    # posting the next) holds the previous post, the weight wait and the generation
    assert all(m["rollout/worker_generate_s"] > 0 and "rollout/worker_weights_wait_s" in m
               for m in steps)
    assert "rollout/worker_cycle_s" not in steps[0] and "rollout/worker_send_s" not in steps[0]
    assert all(m["rollout/worker_send_s"] > 0 for m in steps[1:])
    assert all(m["rollout/worker_cycle_s"] >= m["rollout/worker_generate_s"] +
               m["rollout/worker_weights_wait_s"] + m["rollout/worker_send_s"]
               for m in steps[1:])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 5


@pytest.mark.parametrize("placement, k, extra", [
    ("disaggregated", 1, ()),
    # two workers, two trainers, batches two versions behind
    pytest.param("disaggregated", 2, ("runtime.rollout_workers=2", "runtime.num_ranks=2"),
                 marks=pytest.mark.slow),
    ("partial", 1, ("algo.kl_coef=0.1",)),  # reference log-probs from the worker, fused
], ids=["disaggregated", "disaggregated-k2-2x2", "partial-kl"])
def test_partial_rollout_generates_the_next_batch_in_the_tail(tiny_job, reward_spec, tmp_path,
                                                              placement, k, extra):
    """runtime.partial_rollout: batch s + k starts on weights v(s) (never older: the
    staleness stays k) while earlier batches still generate, so batch 1, submitted with
    batch 0 at the start, is done sooner after batch 0's post than its own generation
    took; versions pushed while rows run are taken between decode steps."""
    run_dir = tmp_path / "run"
    proc = run_cli("train", *job(tiny_job, reward_spec, run_dir, "train.steps=6",
                                 "rollout.max_new_tokens=64", f"runtime.placement={placement}",
                                 f"runtime.max_staleness={k}", "runtime.partial_rollout=true",
                                 *extra))
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = [m for m in metrics_of(run_dir) if "rollout/staleness" in m]
    assert [m["rollout/staleness"] for m in steps] == [min(s, k) for s in range(6)]
    assert steps[1]["rollout/worker_generate_s"] > steps[1]["rollout/worker_cycle_s"]
    assert any(abs(m["policy/is_weight_mean"] - 1) > 1e-4 for m in steps[1:])
    if placement == "disaggregated" and k == 1:  # 64-token rows outlast a batch's update
        assert sum(m["rollout/worker_weights_load_s"] for m in steps) > 0
    if placement == "partial":
        assert all(m["kl_ref"] > 0 for m in steps[1:])  # the worker's reference log-probs
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 6 and "accuracy_after" in summary


def test_workers_far_ahead_do_not_deadlock_the_trainer(tiny_job, reward_spec, tmp_path):
    """max_staleness=3: a worker that runs batches ahead keeps posting (here group by
    group) while trainer 0 is blocked pushing a version the worker will take only later
    (their sends do not wait for the receiver)."""
    run_dir = tmp_path / "run"
    proc = run_cli("train", *job(tiny_job, reward_spec, run_dir, "train.steps=8",
                                 "runtime.placement=disaggregated", "runtime.max_staleness=3",
                                 "runtime.stream_groups=true", "rollout.max_new_tokens=24",
                                 'rollout.stop=["1", "2", "3"]',
                                 "runtime.progress_timeout_s=30"), timeout=200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = [m for m in metrics_of(run_dir) if "rollout/staleness" in m]
    assert [m["rollout/staleness"] for m in steps] == [0, 1, 2, 3, 3, 3, 3, 3]
    assert any(m["rollout/parts"] > 1 for m in steps)


@pytest.mark.parametrize("gpus,device,ranks,want", [
    (0, "auto", 2, "gloo"), (0, "cpu", 4, "gloo"),
    (2, "auto", 2, "nccl"), (2, "cuda", 1, "nccl"),
    (1, "auto", 2, "gloo"),  # two ranks share one GPU: NCCL refuses that, gloo carries it
    (2, "cpu", 2, "gloo"),   # GPUs present, ranks on the CPU
])
def test_auto_backend_follows_devices_and_gpus_per_rank(monkeypatch, gpus, device, ranks, want):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert resolve_backend("auto", device, ranks) == want
    assert resolve_backend("gloo", device, ranks) == "gloo"


@pytest.mark.parametrize("gpus,device,ranks,words", [
    (0, "auto", 2, "no CUDA device"), (2, "cpu", 2, "train.device=cpu"),
    (1, "auto", 2, "a GPU per rank"), (1, "cuda", 3, "3 ranks share"),
])
def test_nccl_that_cannot_work_is_refused_with_the_way_out(monkeypatch, gpus, device, ranks,
                                                           words):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    with pytest.raises(ConfigError, match="runtime.backend=gloo") as err:
        resolve_backend("nccl", device, ranks)
    assert words in str(err.value)
    if gpus:
        assert resolve_backend("nccl", "cuda", gpus) == "nccl"


def test_layout_routes_every_prompt_once():
    from plait.runtime.placement import Layout

    for trainers, workers in [(1, 1), (2, 1), (1, 2), (2, 4), (4, 2)]:
        layout = Layout(trainers, workers)
        sent = sorted((t, lo, hi) for w in range(workers)
                      for t, lo, hi in layout.worker_targets(w, 8))
        got = sorted((t, lo, hi) for t in range(trainers)
                     for _, lo, hi in layout.trainer_sources(t, 8))
        assert sent == got
        covered = sorted(i for _, lo, hi in sent for i in range(lo, hi))
        assert covered == list(range(8))


def test_missing_ray_is_a_clear_error(monkeypatch):
    from plait.config import ConfigError
    from plait.runtime.ray_launcher import _import_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'plait\[ray\]'"):
        _import_ray()


def test_progress_watch_rules():
    from plait.parallel.heartbeat import ProgressWatch

    def beat(message, since, waiting=None, longest=2.0):
        return {"time": since + 100.0, "since": since, "message": message,
                "waiting": waiting, "status": "running", "longest_step_s": longest}

    watch = ProgressWatch(floor_s=5.0, factor=10.0)
    # no step finished yet: nothing is judged, however old
    assert watch.stuck({0: beat("step 1", 0.0, longest=0.0)}, now=1000.0) is None
    # the longest step any rank reported sets the limit
    watch.stuck({0: beat("step 2", 2.0, longest=1.0), 1: beat("step 2", 2.0)}, now=2.1)
    assert watch.longest_step == 2.0 and watch.limit() == 20.0
    # under the limit, or out of a step (evaluation, saving): nothing
    assert watch.stuck({0: beat("step 2", 2.0), 1: beat("step 2", 2.0)}, now=21.0) is None
    assert watch.stuck({0: beat("evaluate (step_2)", 2.0)}, now=500.0) is None
    assert watch.stuck({0: beat("saving checkpoint (step 2)", 2.0)}, now=500.0) is None
    # both late: the rank not blocked in a collective is the one to blame
    late = {0: beat("step 3", 3.0, waiting="all_reduce (control)"), 1: beat("step 3", 3.5)}
    rank, why = watch.stuck(late, now=30.0)
    assert rank == 1 and "made no progress for 26 s" in why
    # all waiting (a collective that never completes): the longest stalled is named
    late = {0: beat("step 3", 3.0, waiting="all_reduce"), 1: beat("step 3", 3.5, waiting="x")}
    assert watch.stuck(late, now=30.0)[0] == 0
    # the floor holds when steps are short
    quick = ProgressWatch(floor_s=5.0)
    quick.stuck({0: beat("step 2", 0.01, longest=0.01)}, now=0.02)
    assert quick.limit() == 5.0
