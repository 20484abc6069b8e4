"""Fewer training threads while other work keeps the CPUs busy (`lorakit.train.threads`)."""

from __future__ import annotations

import json
import os

import torch

from conftest import make_tiny_llama
from lorakit import LoraConfig, get_peft_model
from lorakit.train import TrainConfig, train
from lorakit.train.threads import ThreadGovernor, busy_cpu_seconds


class FakeMachine:
    """2 CPUs; `others` cores of other work; our own process uses `ours` CPU-seconds a second."""

    def __init__(self, others: float, ours: float = 2.0) -> None:
        self.others, self.ours, self.now, self.busy_s, self.own_s = others, ours, 0.0, 0.0, 0.0
        self.threads: list[int] = []

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.own_s += self.ours * seconds
        self.busy_s += (self.ours + self.others) * seconds

    def governor(self, threads: int = 2) -> ThreadGovernor:
        return ThreadGovernor(
            {0, 1},
            threads,
            busy=lambda: self.busy_s,
            own=lambda: self.own_s,
            clock=lambda: self.now,
            set_threads=self.threads.append,
        )


def test_busy_cpu_seconds_reads_only_this_process_cpus(tmp_path):
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal: busy = user+nice+system+irq+softirq
    stat.write_text(
        "cpu  900 0 900 10 0 0 0 0 0 0\n"
        "cpu0 100 10 20 999 5 1 2 7 0 0\n"
        "cpu1 200 0 0 999 0 0 0 0 0 0\n"
        "cpu2 500 0 0 0 0 0 0 0 0 0\n"
        "intr 1 2 3\n"
    )
    hz = os.sysconf("SC_CLK_TCK")
    assert busy_cpu_seconds({0, 1}, str(stat)) == (133 + 200) / hz
    assert busy_cpu_seconds({2}, str(stat)) == 500 / hz
    assert busy_cpu_seconds({0}, str(tmp_path / "missing")) is None
    assert busy_cpu_seconds(os.sched_getaffinity(0)) > 0  # this machine's /proc/stat


def test_two_busy_windows_switch_to_the_free_cores_and_back():
    machine = FakeMachine(others=1.0)  # 2 busy processes beside 2 threads get ~1 core
    governor = machine.governor()
    machine.advance(0.5)
    assert governor.update() is None  # under a second: no window yet
    machine.advance(1.0)
    assert governor.update() is None and machine.threads == []  # one window asks, one waits
    machine.advance(1.5)
    assert governor.update() == (1, 1.0) and machine.threads == [1]
    machine.others, machine.ours = 1.3, 1.0  # beside 1 thread they get more: still 1
    for _ in range(3):
        machine.advance(2.0)
        assert governor.update() is None
    machine.others = 0.0  # the other work ended
    machine.advance(2.0)
    assert governor.update() is None
    machine.advance(2.0)
    assert governor.update() == (2, 0.0) and machine.threads == [1, 2]


def test_a_single_busy_window_or_a_quiet_machine_changes_nothing():
    machine = FakeMachine(others=0.1)
    governor = machine.governor()
    for others in (0.1, 1.2, 0.0, 1.2, 0.2):  # a lone busy window between quiet ones
        machine.others = others
        machine.advance(2.0)
        assert governor.update() is None
    assert machine.threads == [] and governor.threads == 2
    governor.restore()
    assert machine.threads == []


def test_for_run_only_for_one_cpu_process_without_fixed_threads(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("LORAKIT_FIXED_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert ThreadGovernor.for_run(cpu, world_size=1) is not None
    assert ThreadGovernor.for_run(cpu, world_size=2) is None
    assert ThreadGovernor.for_run(torch.device("meta"), world_size=1) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert ThreadGovernor.for_run(cpu, world_size=1) is None
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("LORAKIT_FIXED_THREADS", "1")
    assert ThreadGovernor.for_run(cpu, world_size=1) is None


def test_training_on_a_busy_machine_drops_a_thread_logs_it_and_restores(
    tmp_path, monkeypatch, capsys
):
    machine = FakeMachine(others=1.0)
    seen: list[int] = []

    def governor(device, world_size):
        machine_governor = machine.governor(torch.get_num_threads())
        machine_governor._set = lambda n: (machine.threads.append(n), torch.set_num_threads(n))
        return machine_governor

    def advance_each_step(module, args):  # every forward: 1.2 s of a busy machine
        machine.advance(1.2)
        seen.append(torch.get_num_threads())

    monkeypatch.setattr(ThreadGovernor, "for_run", staticmethod(governor))
    model = get_peft_model(make_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    model.get_base_model().model.register_forward_pre_hook(advance_each_step)  # the decoder
    ids = torch.randint(0, 128, (2, 8))
    batches = [{"input_ids": ids, "labels": ids}] * 4
    config = TrainConfig(
        precision="fp32", max_steps=4, progress="plain", tensorboard=False, plots=False
    )
    before = torch.get_num_threads()
    train(model, None, batches, None, config, tmp_path)
    assert before == 2 and machine.threads == [1, 2]  # dropped to 1, restored at the end
    assert seen[0] == 2 and seen[-1] == 1 and torch.get_num_threads() == 2
    assert "training on 1 thread(s) instead of 2" in capsys.readouterr().err
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["threads"] for r in steps if r["kind"] == "train"] == [2, 2, 1, 1]
